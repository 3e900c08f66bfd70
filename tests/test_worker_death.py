"""torch's words for a dead DataLoader worker, turned into one WorkerDied (pixelz_dist.data.worker_death).

The real thing (a SIGKILL to a real worker, a worker calling os._exit) is in tests/test_failures.py; these check the
reading of torch's messages when the worker is not one of the loop's (nothing but the message to go by).
"""

import signal

from pixelz_dist import PixelzError, WorkerDied
from pixelz_dist.data.worker_death import worker_death


def test_the_signal_and_pid_are_read_from_torchs_sigchld_message():
    died = worker_death(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "))
    assert isinstance(died, WorkerDied) and isinstance(died, PixelzError) and isinstance(died, RuntimeError)
    assert (died.pid, died.signal, died.worker) == (4242, signal.SIGKILL, None)
    assert str(died).startswith("a DataLoader worker (pid 4242) was killed by signal 9 (SIGKILL): often out of memory")
    bus = worker_death(RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that "
                                    "dataloader's workers are out of shared memory."))
    assert bus.signal == signal.SIGBUS and "/dev/shm" in str(bus)


def test_an_exit_code_is_read_through_the_error_that_wraps_it():
    try:
        try:
            raise RuntimeError("DataLoader worker (pid 99) exited unexpectedly with exit code 3. Details are lost")
        except RuntimeError as inner:
            raise RuntimeError("DataLoader worker (pid(s) 99) exited unexpectedly") from inner
    except RuntimeError as outer:
        died = worker_death(outer)
    assert (died.pid, died.signal, died.exit_code_of_worker) == (99, None, 3)
    assert "exited with code 3" in str(died) and "--workers 0" in str(died)


def test_other_errors_are_left_alone():
    assert worker_death(RuntimeError("the model failed at call 3")) is None
    assert worker_death(ValueError("DataLoader worker (pid 1) is killed by signal: Killed. ")) is None
    assert worker_death(WorkerDied("DataLoader worker (pid 1) was killed")) is None  # already ours


def test_a_batch_lost_in_transit_from_a_killed_worker_is_that_workers_death():
    """Killed while the main process was receiving its batch, a worker's shared-memory handle cannot be fetched:
    multiprocessing raises ConnectionResetError before torch notices. With a real killed process among the workers it
    is that worker's death; with every worker alive it is left alone."""
    import multiprocessing
    import os
    import time

    ctx = multiprocessing.get_context("fork")
    alive, victim = ctx.Process(target=time.sleep, args=(30,)), ctx.Process(target=time.sleep, args=(30,))
    alive.start()
    victim.start()
    try:
        lost = ConnectionResetError(104, "Connection reset by peer")
        assert worker_death(lost, [alive, victim]) is None  # nothing ended: not a worker's death
        os.kill(victim.pid, signal.SIGKILL)
        died = worker_death(lost, [alive, victim])
        assert isinstance(died, WorkerDied)
        assert (died.worker, died.pid, died.signal) == (1, victim.pid, signal.SIGKILL)
        assert str(died).startswith(f"DataLoader worker 1 (pid {victim.pid}) was killed by signal 9 (SIGKILL)")
        try:
            raise RuntimeError("while reading the batch") from EOFError()
        except RuntimeError as wrapped:
            assert worker_death(wrapped, [alive, victim]).pid == victim.pid
        assert worker_death(ConnectionResetError(), []) is None  # no workers to ask: an ordinary network error
    finally:
        for p in (alive, victim):
            p.kill()
            p.join()
