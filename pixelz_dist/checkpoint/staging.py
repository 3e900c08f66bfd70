"""A snapshot's state copied into host memory that is kept between snapshots, so it can be written in the background.

Training goes on while a snapshot is written, and the next optimizer step changes the parameters and the optimizer's
state *in place*: the writer must work on a copy. Copying is cheap next to serialising (a 256 MB state: about 20 ms
of memcpy here against about 260 ms for ``torch.save`` + ``fsync``), but only into memory already faulted in: the
first copy into fresh pages costs as much as the save. So the buffers are kept, one per tensor, keyed by the
tensor's place in the state (``model.layer1.weight``), and reused while its shape, strides and dtype stay.

CUDA tensors are copied into pinned buffers on a side stream that first waits for the work already queued; the
current stream then waits for the copies (an event, not a host sync), so the next optimizer step or forward on that
stream cannot touch a parameter or buffer before its copy is taken. The writer calls :meth:`Staged.wait` (a host
sync on that event) before it reads the buffers. Containers are rebuilt (a callback's list appended to after the
snapshot must not change it); other values are immutable once :func:`~pixelz_dist.checkpoint.loadable.make_loadable`
has passed them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class Staged:
    """A staged state: ``state`` may be read once :meth:`wait` has returned."""

    def __init__(self, state, events: list, sources: list):
        self.state = state
        self._events = events
        self._sources = sources  # the source tensors stay alive until their copies are complete

    def wait(self) -> None:
        for event in self._events:
            event.synchronize()
        self._events, self._sources = [], []


class HostStaging:
    """Reusable host copies of snapshot states (one set: a new snapshot is staged only after the last one is written).

    Shared tensors (tied weights, a tensor held in two places) are copied once and stay shared.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._streams: dict[torch.device, object] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for b in self._buffers.values())

    def stage(self, state) -> Staged:
        copies: dict[tuple, torch.Tensor] = {}
        used: set[str] = set()
        cuda_sources: dict[torch.device, list] = {}
        staged = self._walk(state, "", copies, used, cuda_sources)
        for key in set(self._buffers) - used:  # a tensor that is no longer in the state: its memory goes
            del self._buffers[key]
        events, sources = [], []
        for device, pairs in cuda_sources.items():
            events.append(self._copy_on_side_stream(device, pairs))
            sources.extend(source for source, _ in pairs)
        return Staged(staged, events, sources)

    def _walk(self, value, path: str, copies: dict, used: set, cuda_sources: dict):
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, copies, used, cuda_sources)
        kind = type(value)
        if kind in (dict, OrderedDict):
            return kind((k, self._walk(v, f"{path}.{k}" if path else str(k), copies, used, cuda_sources))
                        for k, v in value.items())
        if kind in (list, tuple, set):
            return kind(self._walk(v, f"{path}.{i}", copies, used, cuda_sources) for i, v in enumerate(value))
        return value

    def _tensor(self, tensor: torch.Tensor, path: str, copies: dict, used: set, cuda_sources: dict) -> torch.Tensor:
        same = _identity(tensor)
        if same in copies:
            return copies[same]
        tensor = tensor.detach()
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type not in ("cpu", "cuda"):
            copy = tensor.to("cpu", copy=True)  # rare layouts: a plain copy, not reused
        else:
            copy = self._buffer(path, tensor)
            used.add(path)
            if tensor.device.type == "cuda":
                cuda_sources.setdefault(tensor.device, []).append((tensor, copy))
            else:
                copy.copy_(tensor)
        copies[same] = copy
        return copy

    def _buffer(self, path: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if (buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype
                or (buffer.stride() != tensor.stride() and _dense(tensor))):
            # empty_like keeps a dense tensor's strides (channels_last stays channels_last), else is contiguous
            buffer = torch.empty_like(tensor, device="cpu", pin_memory=tensor.device.type == "cuda")
            self._buffers[path] = buffer
        return buffer

    def _copy_on_side_stream(self, device: torch.device, pairs: list):
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)  # the copies see every update queued so far ...
        with torch.cuda.stream(stream):
            for source, copy in pairs:
                copy.copy_(source, non_blocking=True)
        event = stream.record_event()
        current.wait_event(event)  # ... and nothing queued after this point writes a source before it is copied
        return event


def _dense(tensor: torch.Tensor) -> bool:
    """Whether a buffer of the same strides can hold it (a view with gaps is copied into a contiguous one)."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def _identity(tensor: torch.Tensor) -> tuple:
    """The same values in the same memory (a tied weight's state_dict entries are distinct detached tensors)."""
    if tensor.layout != torch.strided:
        return (id(tensor),)
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)
