"""Layer-by-layer prefetch: KV lives on the host, one layer at a time on the device."""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from kvcompact.offload._streams import (OffloadStats, TimedWait, copy_index_, copy_whole_,
                                        is_async)
from kvcompact.offload.pool import PinnedPool

__all__ = ["LayerPrefetcher"]

Index = Optional[tuple]  # a tuple of slices/ints applied to every tensor of a layer, or None


class LayerPrefetcher:
    """Keeps each layer's tensors in (pinned) host memory and stages them on the device.

    Two persistent device slots alternate: while layer ``i`` is in use (its
    compute enqueued on the *current* stream), layer ``i + 1`` is copied into the
    other slot on a side stream. The order is enforced with CUDA events only, no
    host syncs:

    * prefetch into a slot waits (on the side stream) for the event recorded on
      the compute stream when the slot's previous layer was released;
    * :meth:`acquire` makes the current stream wait for the slot's copy event
      (timed, see :attr:`stats`);
    * write-backs run on the same side stream, so a later prefetch of that
      layer (FIFO on the stream) always reads what was written back.

    Nothing is allocated per step: the slots are sized once for the largest
    layer and views are cached. After the last layer, layer 0 is prefetched for
    the next step. On CPU (``device="cpu"``) the same calls copy synchronously.

    Parameters
    ----------
    host_layers : sequence of sequences of Tensor
        ``host_layers[i]`` are layer ``i``'s tensors (e.g. keys, values, scales)
        in host memory, contiguous; allocate them from a :class:`PinnedPool` so
        copies are asynchronous. They are used in place (the prefetcher copies
        into and out of them; the caller may write them while no copy is in
        flight, e.g. after :meth:`synchronize`).
    device : torch.device or str
        Where layers are staged.
    extent : callable, optional
        ``extent(i) -> index or None``: the part of each tensor of layer ``i``
        worth moving (e.g. ``(slice(None), slice(None), slice(0, length))`` for
        ``[B, H, T, D]`` buffers holding ``length`` valid tokens). None moves
        whole tensors with one copy each; a slice of one dim of contiguous
        tensors is one batched ``copy_blocks_`` per tensor (rows of the dims
        before it); other indexes fall back to ``copy_``.
    timing : bool, default True
        Measure how long the compute stream stalls on each acquire.

    Example
    -------
    >>> pool = PinnedPool(1 << 30)
    >>> host = [[pool.tensor((1, 8, 4096, 128), torch.bfloat16) for _ in "kv"] for _ in range(32)]
    >>> pf = LayerPrefetcher(host, "cuda")
    >>> for i in range(32):
    ...     k, v = pf.acquire(i)         # device views; the copy is awaited on the current stream
    ...     ...                          # attention for layer i (current stream)
    ...     pf.release(i, writeback=(slice(None), slice(None), slice(t, t + 1)))
    """

    def __init__(self, host_layers: Sequence[Sequence[torch.Tensor]],
                 device: torch.device | str, *, extent: Callable[[int], Index] | None = None,
                 timing: bool = True):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.host_layers = [list(ts) for ts in host_layers]
        if not self.host_layers:
            raise ValueError("LayerPrefetcher: `host_layers` is empty")
        width = len(self.host_layers[0])
        for i, ts in enumerate(self.host_layers):
            if len(ts) != width:
                raise ValueError(f"LayerPrefetcher: layer {i} has {len(ts)} tensors, layer 0 "
                                 f"has {width}")
            for j, t in enumerate(ts):
                if t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"LayerPrefetcher: host_layers[{i}][{j}] must be a "
                                     f"contiguous CPU tensor; got {t.device}, "
                                     f"contiguous={t.is_contiguous()}")
        self.num_layers = len(self.host_layers)
        self.extent = extent
        self.stats = OffloadStats()
        self._async = is_async(self.device)
        # Two slots; each holds, per tensor position, one flat byte buffer sized for
        # the largest layer, viewed per layer (views cached: no per-step allocation).
        self._slot_bytes = [
            max(ts[j].numel() * ts[j].element_size() for ts in self.host_layers)
            for j in range(width)]
        self._slots = [[torch.empty(max(n, 1), dtype=torch.uint8, device=self.device)
                        for n in self._slot_bytes] for _ in range(2)]
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._slot_layer: list[Optional[int]] = [None, None]
        self._busy = [False, False]
        if self._async:
            self._side = torch.cuda.Stream(self.device)
            # The slots may reuse memory that work already queued on the current
            # stream still touches; the side stream writes them first.
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            self._ready = [torch.cuda.Event(), torch.cuda.Event()]
            self._free = [torch.cuda.Event(), torch.cuda.Event()]
            self._free_recorded = [False, False]
        self._timed = TimedWait(self.device, 2) if timing else None

    # -- views ------------------------------------------------------------------
    def _slot_views(self, slot: int, layer: int) -> list[torch.Tensor]:
        key = (slot, layer)
        views = self._views.get(key)
        if views is None:
            views = []
            for buf, h in zip(self._slots[slot], self.host_layers[layer]):
                nbytes = h.numel() * h.element_size()
                views.append(buf[:nbytes].view(h.dtype).view(h.shape))
            self._views[key] = views
        return views

    def _current_stream(self):
        return torch.cuda.current_stream(self.device) if self._async else None

    # -- pipeline ---------------------------------------------------------------
    def prefetch(self, layer: int) -> None:
        """Start bringing ``layer`` to a free slot (no-op if it is already there)."""
        layer = self._check_layer(layer)
        if layer in self._slot_layer:
            return
        # The slot not in use; prefer the one not holding the most recent layer.
        candidates = [s for s in (0, 1) if not self._busy[s]]
        if not candidates:
            held = [l for l in self._slot_layer if l is not None]
            raise RuntimeError(f"LayerPrefetcher: both slots are in use (layers {held}); "
                               f"release one before prefetching layer {layer}")
        empty = [s for s in candidates if self._slot_layer[s] is None]
        slot = (empty or candidates)[0]
        self._slot_layer[slot] = None  # invalid until the copy below is issued
        index = self.extent(layer) if self.extent is not None else None
        dst = self._slot_views(slot, layer)
        src = self.host_layers[layer]
        if self._async:
            side = self._side
            if self._free_recorded[slot]:
                side.wait_event(self._free[slot])  # compute done with the slot's last layer
            with torch.cuda.stream(side):
                moved = sum(copy_index_(d, s, index) for d, s in zip(dst, src))
            self._ready[slot].record(side)
        else:
            t0 = time.perf_counter()
            moved = sum(copy_index_(d, s, index) for d, s in zip(dst, src))
            self.stats.copy_time_ms += (time.perf_counter() - t0) * 1e3
        self.stats.bytes_to_device += moved
        self.stats.transfers_to_device += 1
        self._slot_layer[slot] = layer

    def acquire(self, layer: int, *, prefetch_next: bool = True) -> list[torch.Tensor]:
        """Device views of ``layer``'s tensors, safe to use on the current stream.

        Issues the prefetch of ``layer`` if it was not already, makes the current
        stream wait for it, then prefetches ``(layer + 1) % num_layers`` into the
        other slot. The views stay valid until :meth:`release` (``layer``).
        """
        layer = self._check_layer(layer)
        if layer not in self._slot_layer:
            self.prefetch(layer)
        slot = self._slot_layer.index(layer)
        if self._busy[slot]:
            raise RuntimeError(f"LayerPrefetcher: layer {layer} is already acquired")
        if self._async:
            stream = self._current_stream()
            if self._timed is not None:
                self._timed.wait(stream, self._ready[slot], slot, self.stats)
            else:
                stream.wait_event(self._ready[slot])
        self._busy[slot] = True
        if prefetch_next and self.num_layers > 1:
            nxt = (layer + 1) % self.num_layers
            if nxt not in self._slot_layer and self._busy[1 - slot]:
                raise RuntimeError(
                    f"LayerPrefetcher: release layer {self._slot_layer[1 - slot]} before "
                    f"acquiring layer {layer} (its slot receives layer {nxt})")
            self.prefetch(nxt)
        return self._slot_views(slot, layer)

    def release(self, layer: int, writeback: Index | bool = None) -> None:
        """Declare ``layer``'s compute enqueued; optionally copy changes back to host.

        Parameters
        ----------
        writeback : None, True, or an index
            None: the device copy was only read. True: copy the whole layer back.
            An index (tuple of slices, e.g. the token just appended) copies that
            part of every tensor back. Write-backs run on the side stream after
            the compute enqueued so far on the current stream.
        """
        layer = self._check_layer(layer)
        if layer not in self._slot_layer or not self._busy[self._slot_layer.index(layer)]:
            raise ValueError(f"LayerPrefetcher.release: layer {layer} is not acquired")
        slot = self._slot_layer.index(layer)
        if self._async:
            stream = self._current_stream()
            self._free[slot].record(stream)
            self._free_recorded[slot] = True
        if writeback is not None and writeback is not False:
            index = None if writeback is True else writeback
            src = self._slot_views(slot, layer)
            dst = self.host_layers[layer]
            if self._async:
                self._side.wait_event(self._free[slot])
                with torch.cuda.stream(self._side):
                    moved = sum(copy_index_(h, d, index) for h, d in zip(dst, src))
            else:
                t0 = time.perf_counter()
                moved = sum(copy_index_(h, d, index) for h, d in zip(dst, src))
                self.stats.copy_time_ms += (time.perf_counter() - t0) * 1e3
            self.stats.bytes_to_host += moved
            self.stats.transfers_to_host += 1
        self._busy[slot] = False

    def invalidate(self, layer: int | None = None) -> None:
        """Forget staged copies (after the caller changed host tensors directly)."""
        for s in (0, 1):
            if not self._busy[s] and (layer is None or self._slot_layer[s] == layer):
                self._slot_layer[s] = None

    def synchronize(self) -> None:
        """Block the host until every issued copy has completed."""
        if self._async:
            self._side.synchronize()
            if self._timed is not None:
                self._timed.resolve_all(self.stats, block=True)

    def stats_dict(self) -> dict:
        """:class:`OffloadStats` as a dict, plus device bytes held by the slots."""
        if self._async and self._timed is not None:
            self._timed.resolve_all(self.stats)
        d = self.stats.as_dict()
        d["device_staging_bytes"] = 2 * sum(self._slot_bytes)
        d["host_bytes"] = sum(t.numel() * t.element_size() for ts in self.host_layers for t in ts)
        return d

    def close(self) -> None:
        """Release the device slots (safe while copies are in flight)."""
        if self._async:
            for slot in self._slots:
                for buf in slot:
                    buf.record_stream(self._side)  # freed only after side-stream copies
        self._slots = [[], []]
        self._views.clear()
        self._slot_layer = [None, None]

    def _check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"LayerPrefetcher: layer {layer} out of range [0, {self.num_layers})")
        return int(layer)

    @classmethod
    def from_device(cls, device_layers: Sequence[Sequence[torch.Tensor]], pool: PinnedPool,
                    **kwargs) -> "LayerPrefetcher":
        """Move existing device tensors into ``pool`` and build a prefetcher over them.

        Synchronizes once (this is setup, not the decode loop).
        """
        host = []
        for ts in device_layers:
            row = []
            for t in ts:
                h = pool.tensor(t.shape, t.dtype)
                copy_whole_(h, t.contiguous())
                row.append(h)
            host.append(row)
        device = device_layers[0][0].device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return cls(host, device, **kwargs)
