"""Work one process of a torchrun job does for all of them, before the process group exists: listing the data folders.

Every rank listing three folders of a million files is a metadata storm on a shared file system (Lustre, NFS) at
every start and restart; one process lists and the others receive the table. The dataset is built *before*
``train_model`` creates the process group (the command line does so, and so do users' scripts), so the hand-over
cannot be a collective. Under torchrun it need not be one: torchrun's agent hosts the job's c10d store at
MASTER_ADDR:MASTER_PORT from the start (:func:`~pixelz_dist.distributed.env.agent_store`). :func:`from_rank0` runs
``produce`` on rank 0 and puts its result there; the other ranks wait for it and read it.

- Keys: ``pixelz_dist/once/attempt_{TORCHELASTIC_RESTART_COUNT}/{name}/{n}``, where ``n`` counts this process's calls
  with that name: every rank builds its datasets in the same order, so their counts agree (a name says what is
  built, e.g. a hash of the folders, so a dataset built on rank 0 alone does not shift the others' counts). The
  agent keeps its store across elastic restarts, so a restarted job must not read the previous attempt's value.
- Size: the store's server refuses values over 8 MiB (torch 2.14's libuv backend: ``Invalid payload size ... max:
  8388608``, and it drops the connection), so the value travels in chunks of :data:`CHUNK_BYTES`. The last reader
  deletes them: the agent's store lives as long as the job.
- Failure: when ``produce`` raises on rank 0 (a missing folder, files that do not pair), its message is put in the
  store instead, and every rank raises the same error at once, marked as raised by every rank (the command line then
  prints it once): nobody waits for a timeout.
- Waiting: up to the job's collective timeout (PIXELZ_DIST_TIMEOUT, default 600 s): rank 0's listing of a huge
  folder on a slow file system can take minutes.

Without torchrun's store: with a process group already made (a user's own ``init_process_group``), rank 0's result is
broadcast to every rank; without either (``env://`` launchers such as ``srun`` before a group exists, a single
process), every process runs ``produce`` itself, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from ..errors import ConfigError, DataError, PixelzError, on_every_rank
from . import env as dist_env

__all__ = ["CHUNK_BYTES", "from_rank0", "key_name"]

logger = logging.getLogger(__name__)

#: Bytes per store value: half the libuv server's limit (8 MiB), to leave room for its framing.
CHUNK_BYTES = 4 << 20
_ERRORS: dict[str, type[PixelzError]] = {"DataError": DataError, "ConfigError": ConfigError}
_calls: Counter = Counter()  # name -> calls in this process
T = TypeVar("T")


def key_name(*parts) -> str:
    """A short store-key name for what ``parts`` (JSON-able) describe."""
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).hexdigest()


def from_rank0(name: str, produce: Callable[[], T], encode: Callable[[T], bytes], decode: Callable[[bytes], T],
               what: str, hint: str) -> T:
    """``produce()``, run by rank 0 of the job alone; its result on every rank (see the module docstring).

    Args:
        name: what is produced (see :func:`key_name`); every rank must call with the same names in the same order.
        produce: the work.
        encode, decode: its result to bytes (compressed when large: every other rank downloads them) and back.
        what: for messages, e.g. ``"the listing of ['a', 'b']"``.
        hint: what to do when rank 0 hands nothing over (it never made this call).

    Raises:
        PixelzError: rank 0's error, on every rank (a ``DataError`` or ``ConfigError`` keeps its class; anything
            else reaches the other ranks as a ``DataError`` naming it), or a ``DataError`` when rank 0 handed
            nothing over within the timeout.
    """
    env = dist_env.read_env()
    if not env.is_distributed or _in_dataloader_worker():
        return produce()
    timeout = dist_env.timeout_seconds()
    store = dist_env.agent_store(timedelta(seconds=timeout))
    if store is None:
        if dist_env.is_initialized():
            return _broadcast(env, produce, encode, decode)
        logger.debug("%s: no torchrun store and no process group yet, so every process does it itself", what)
        return produce()
    _calls[name] += 1
    base = f"pixelz_dist/once/attempt_{dist_env.restart_attempt()}/{name}/{_calls[name]}"
    if env.is_main:
        return _publish(store, base, produce, encode)
    return decode(_receive(store, base, env.world_size, timeout, what, hint))


def _in_dataloader_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None  # a worker of rank 0 and one of rank 1 cannot pair up by counting


def _publish(store, base: str, produce: Callable[[], T], encode: Callable[[T], bytes]) -> T:
    try:
        result = produce()
    except Exception as e:
        store.set(f"{base}/meta", json.dumps({"error": str(e), "type": type(e).__name__}))
        store.check([f"{base}/meta"])  # a round trip (set is not one): the error is in before this process exits
        if isinstance(e, PixelzError):
            on_every_rank(e)
        raise
    value = encode(result)
    chunks = [value[i : i + CHUNK_BYTES] for i in range(0, len(value), CHUNK_BYTES)]
    for i, chunk in enumerate(chunks):
        store.set(f"{base}/{i}", chunk)
    store.set(f"{base}/meta", json.dumps({"chunks": len(chunks), "bytes": len(value)}))  # last: readers wait for it
    return result


def _receive(store, base: str, world_size: int, timeout: float, what: str, hint: str) -> bytes:
    try:
        store.wait([f"{base}/meta"], timedelta(seconds=timeout))
    except RuntimeError as e:  # torch's DistStoreError
        raise DataError(f"rank 0 did not hand over {what} within {timeout:g} s (PIXELZ_DIST_TIMEOUT): {e}. "
                        f"HINT: {hint}") from e
    meta = json.loads(store.get(f"{base}/meta"))
    if "error" in meta:
        raise on_every_rank(_error(meta["type"], meta["error"]))
    result = b"".join(store.get(f"{base}/{i}") for i in range(meta["chunks"]))
    if len(result) != meta["bytes"]:
        raise DataError(f"{what} arrived with {len(result)} of its {meta['bytes']} bytes")
    if store.add(f"{base}/read", 1) == world_size - 1:  # the last reader: the agent's store lives as long as the job
        for key in [f"{base}/{i}" for i in range(meta["chunks"])] + [f"{base}/meta", f"{base}/read"]:
            store.delete_key(key)
    return result


def _error(kind: str, message: str) -> PixelzError:
    if kind in _ERRORS:
        return _ERRORS[kind](message)
    return DataError(f"rank 0 failed: {kind}: {message}")


def _broadcast(env, produce: Callable[[], T], encode: Callable[[T], bytes], decode: Callable[[bytes], T]) -> T:
    """With a process group (a user's own, made before the dataset): rank 0's result or error, to every rank."""
    result, value, error = None, None, None
    if env.is_main:
        try:
            result = produce()
            value = encode(result)
        except Exception as e:
            error = e
    failure = None if error is None else (type(error).__name__, str(error))
    value, failure = dist_env.broadcast_from_main((value, failure))
    if error is not None:
        raise on_every_rank(error) if isinstance(error, PixelzError) else error
    if failure is not None:
        raise on_every_rank(_error(*failure))
    return result if env.is_main else decode(value)
