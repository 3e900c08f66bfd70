"""Getting batches onto the device: pinned host memory, ``non_blocking`` copies, and on CUDA one batch copied ahead
on a side stream, so the host-to-device transfer of batch i+1 overlaps the compute of batch i."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

_END = object()


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Tensors in (nested) tuples, lists and dicts go to ``device`` (4-D float ones in channels_last when asked)."""
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, channels_last) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


class DeviceFeed:
    """Wraps the loader's iterator; ``feed(it)`` yields batches already on ``device``.

    Args:
        device: where the model is.
        channels_last: convert 4-D float tensors to channels_last on the way.
        ahead: on CUDA, copy the next batch on a side stream while the current one is used (read-ahead of one batch).
    """

    def __init__(self, device: torch.device, channels_last: bool = False, ahead: bool = True):
        self.device = device
        self.channels_last = channels_last
        self.needed = device.type != "cpu" or channels_last
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and ahead else None

    def feed(self, batches: Iterator) -> Iterator:
        if not self.needed:
            return batches
        if self.stream is None:
            device, cl = self.device, self.channels_last
            return (to_device(b, device, cl) for b in batches)
        return self._ahead(batches)

    def _start_copy(self, batches):
        batch = next(batches, _END)
        if batch is _END:
            return _END
        with torch.cuda.stream(self.stream):
            return to_device(batch, self.device, self.channels_last)

    def _ahead(self, batches):
        current_stream = torch.cuda.current_stream(self.device)
        pending = self._start_copy(batches)
        while pending is not _END:
            current_stream.wait_stream(self.stream)  # the compute stream waits for the copy, not the host
            batch = pending
            for t in _tensors(batch):
                t.record_stream(current_stream)  # its memory is not reused while the compute stream still reads it
            pending = self._start_copy(batches)
            yield batch
