"""For jobs that kill themselves to be resumed from the newest snapshot: wait until that one is durable first.

Periodic snapshots are written in the background, so a kill at the iteration after one would often land during its
write and the run would resume from the snapshot before it (correct, and what tests/test_async_snapshots.py checks,
but not the point these jobs are made to resume from).
"""

import os
import time


def wait_until_durable(state, timeout: float = 60.0) -> None:
    path, _ = state.newest_snapshot
    deadline = time.monotonic() + timeout
    while path is not None and not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"snapshot {path} was not written within {timeout} s")
        time.sleep(0.01)
