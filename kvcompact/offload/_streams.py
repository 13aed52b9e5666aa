"""Streams, events and whole-tensor copies that degrade to synchronous CPU code.

Everything in kvcompact.offload goes through this module so that on a machine
without a GPU the same logic runs with plain synchronous copies (events are
``None`` and count as complete).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kvcompact  # noqa: F401  (registers torch.ops.kvcompact)

_ONE_BLOCK = torch.zeros(1, 2, dtype=torch.int64)  # block_mapping [[0, 0]]


@dataclass
class OffloadStats:
    """Counters shared by the prefetcher and the parker.

    ``compute_wait_ms`` is the time the compute stream stalled waiting for a
    transfer (measured with timing events, so it is only known once those
    events complete; 0 on CPU, where copies are synchronous and
    ``copy_time_ms`` holds their host time instead).
    """

    bytes_to_device: int = 0
    bytes_to_host: int = 0
    transfers_to_device: int = 0
    transfers_to_host: int = 0
    compute_waits: int = 0
    compute_wait_ms: float = 0.0
    copy_time_ms: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "bytes_to_device", "bytes_to_host", "transfers_to_device", "transfers_to_host",
            "compute_waits", "compute_wait_ms", "copy_time_ms")}
        d.update(self.extra)
        return d


def is_async(device: torch.device) -> bool:
    return device.type == "cuda"


def copy_whole_(dst: torch.Tensor, src: torch.Tensor) -> int:
    """Copy contiguous ``src`` into contiguous ``dst`` with one copy_blocks_ call.

    Runs on the current stream. Returns the bytes moved.
    """
    if src.numel() == 0:
        return 0
    torch.ops.kvcompact.copy_blocks_(src.view(1, -1), dst.view(1, -1), _ONE_BLOCK)
    return src.numel() * src.element_size()


_IDENTITY: dict[int, torch.Tensor] = {}


def _identity_mapping(rows: int) -> torch.Tensor:
    m = _IDENTITY.get(rows)
    if m is None:
        m = torch.arange(rows, dtype=torch.int64).unsqueeze(1).expand(rows, 2).contiguous()
        _IDENTITY[rows] = m
    return m


def as_blocks(t: torch.Tensor, index) -> torch.Tensor | None:
    """``t[index]`` as a ``[rows, row_elems]`` view with contiguous rows, or None.

    Works when ``t`` is contiguous and ``index`` slices a single dim with step 1
    (e.g. the valid tokens ``[:, :, 0:n]`` of a ``[B, H, T, D]`` buffer: B*H rows
    of n*D elements), so the copy is one batched copy_blocks_ call.
    """
    if not t.is_contiguous() or not isinstance(index, tuple) or len(index) > t.dim():
        return None
    cut = None
    for d, ix in enumerate(index):
        if not isinstance(ix, slice):
            return None
        if ix == slice(None):
            continue
        if cut is not None or ix.step not in (None, 1):
            return None
        cut = d
    if cut is None:
        return t.view(1, -1)
    start, stop, _ = index[cut].indices(t.shape[cut])
    stop = max(start, stop)
    outer = 1
    for s in t.shape[:cut]:
        outer *= s
    inner = 1
    for s in t.shape[cut + 1:]:
        inner *= s
    rows = t.view(outer, t.shape[cut] * inner)
    return rows[:, start * inner: stop * inner]


def copy_index_(dst: torch.Tensor, src: torch.Tensor, index) -> int:
    """Copy ``src[index]`` into ``dst[index]`` (a sub-range, e.g. valid tokens).

    A one-dim slice of contiguous tensors is one batched copy_blocks_ (no
    allocation); anything else falls back to ``copy_`` (which may stage
    through a temporary).
    """
    if index is None:
        return copy_whole_(dst, src)
    s_rows, d_rows = as_blocks(src, index), as_blocks(dst, index)
    if s_rows is not None and d_rows is not None and s_rows.shape == d_rows.shape:
        if s_rows.numel() == 0:
            return 0
        torch.ops.kvcompact.copy_blocks_(s_rows, d_rows, _identity_mapping(s_rows.shape[0]))
        return s_rows.numel() * s_rows.element_size()
    part = src[index]
    dst[index].copy_(part, non_blocking=True)
    return part.numel() * part.element_size()


class TimedWait:
    """Makes ``stream`` wait for ``event`` and measures how long it stalled.

    The stall is elapsed(before, after) between timing events recorded on
    ``stream`` around the wait: ``after`` completes when both the compute that
    preceded it and the awaited copy are done. Measurements are resolved lazily
    (no host sync): a slot whose previous pair is still pending is skipped.
    """

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self._pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       for _ in range(slots)] if is_async(device) else []
        self._pending = [False] * slots

    def wait(self, stream, event, slot: int, stats: OffloadStats) -> None:
        if event is None:
            return
        if not self._pairs:
            stream.wait_event(event)
            return
        self._resolve(slot, stats)
        before, after = self._pairs[slot]
        if self._pending[slot]:  # previous measurement not done: wait without timing
            stream.wait_event(event)
            return
        before.record(stream)
        stream.wait_event(event)
        after.record(stream)
        self._pending[slot] = True

    def _resolve(self, slot: int, stats: OffloadStats) -> None:
        if self._pending[slot] and self._pairs[slot][1].query():
            before, after = self._pairs[slot]
            ms = before.elapsed_time(after)
            stats.compute_waits += 1
            stats.compute_wait_ms += ms
            self._pending[slot] = False

    def resolve_all(self, stats: OffloadStats, block: bool = False) -> None:
        for slot in range(len(self._pending)):
            if block and self._pending[slot]:
                self._pairs[slot][1].synchronize()
            self._resolve(slot, stats)
