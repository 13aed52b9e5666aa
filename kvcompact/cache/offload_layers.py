"""``offload="layers"``: every layer's storage in one pinned host pool, streamed through two device slots.

How a forward runs
------------------
Each attention layer's :class:`~kvcompact.cache.storage.TokenStore` lives in host memory: its
buffers come from one :class:`~kvcompact.offload.PinnedPool` (the cache's own, grown
geometrically, or the ``pool=`` given). The device holds two persistent *slots*, flat byte buffers
re-carved per layer. ``KVCompactCache.update`` for layer ``i``:

1. hands back the previous layer (its storage is the host copy again) and records, on the current
   stream, that its slot may be overwritten once the attention already queued has read it;
2. at the first attention layer of a forward, makes room on the host for the new tokens in every
   layer (growth, window trims), so a pool too small fails before any layer changed;
3. makes layer ``i`` resident: its slot already holds it (prefetched, the current stream waits on
   the copy's event) or it is copied now;
4. runs the ordinary layer update and eviction on the *device twin* (a store over the slot), so
   attention, policies and kernels see what they see without offload;
5. writes back only the new rows (after an eviction, the kept rows) and the residual shadow, on a
   side stream ordered after the append by an event;
6. enqueues the copy of the next attention layer (after the last, layer 0 for the next forward)
   into the other slot, on the side stream, after that slot's release event. No host sync.

The twin stays the layer's storage until the next update (or any cache operation), so hooks that
run right after attention (query-aware policies) read device tensors.

Why eviction runs on the device copy: the policy's ``keep_idx`` is computed from the K/V attention
reads, on the device; compacting the twin there and writing back the kept rows costs one layer of
copy per eviction (every ``slack`` steps), while compacting on the host would need ``keep_idx``
on the host (a device-to-host sync per eviction) and a second staging of the layer.

Why edits run on the host copies: span edits, crops, imports and batch reordering happen between
forwards; running them with the CPU kernels on the host copies needs no device memory and cannot
leave a device copy disagreeing: every such operation first waits for the side stream, hands the
resident layer back and forgets what the slots hold.

Host-side reorganizations of a layer (its host buffers growing by 1/16, a window trim, the owned
pool growing) wait for the side stream first; they happen every ~1/16 of the context, not per
token.

On a CPU-only machine the slots are separate CPU tensors and every copy is synchronous, so the
same logic (and the accounting) runs in CI.
"""

from __future__ import annotations

import time
import weakref

import torch

from kvcompact.offload._streams import OffloadStats, TimedWait, copy_index_, is_async
from kvcompact.offload.pool import PinnedPool, PoolExhaustedError

__all__ = ["LayerStreamer"]

_ALIGN = 256  # carve offsets, and the pool's granule
_MIN_POOL = 1 << 20
_POOL_GROWTH = 2
_ALL = slice(None)


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _granule(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Slot:
    """One device staging buffer and what it holds (``layer`` index, its ``twin`` store)."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.layer: int | None = None  # the layer whose rows the twin holds (valid copy), or None
        self.twin = None
        self.twin_key = None  # (id(host), capacity, batch, heads) the cached twin was carved for
        self.host_ref = None  # weakref to that host store (ids can be reused)
        self.ready = None  # CUDA event: the copy into this slot completed
        self.free = None  # CUDA event: compute is done with the slot's previous occupant
        self.free_recorded = False

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel()


class HostAllocator:
    """``TokenStore``'s ``host_allocator`` for one streamer, referencing it weakly.

    Stores are owned by layers and the streamer keeps the resident layer's host store: a strong
    reference back would make a cycle, and the pinned pool would outlive ``del cache`` until a
    garbage-collection pass.
    """

    def __init__(self, streamer: "LayerStreamer"):
        self._streamer = weakref.ref(streamer)

    def __call__(self, specs, owner=None) -> list[torch.Tensor]:
        streamer = self._streamer()
        if streamer is None:
            raise RuntimeError("offload='layers': the cache that owned this layer's host memory is gone")
        return streamer.host_tensors(specs, owner)


class LayerStreamer:
    """Host-resident layer storage streamed through two device slots (see the module docstring).

    Parameters
    ----------
    pool : PinnedPool, optional
        Shared pinned memory for every layer's host buffers. Exhaustion raises
        :class:`~kvcompact.offload.PoolExhaustedError` (the cache then changes nothing). Default:
        the streamer allocates its own at the first request, sized ``2 x`` the request times
        ``num_layers``, and replaces it by one twice as large when full (moving the host buffers).
    num_layers : int
        Attention layers, to size the first owned pool.
    timing : bool, default True
        Measure how long the compute stream waits for each staged layer (CUDA).
    """

    def __init__(self, pool: PinnedPool | None = None, num_layers: int = 1, *, timing: bool = True):
        self._pool = pool
        self.owns_pool = pool is None
        self.num_layers = max(1, int(num_layers))
        self.stats = OffloadStats()
        self.stats.extra.update(prefetch_hits=0, staged_on_demand=0, pool_growths=0, host_syncs=0)
        self._stores: weakref.WeakSet = weakref.WeakSet()  # every host store using this pool
        self._slots = [_Slot(), _Slot()]
        self._device: torch.device | None = None
        self._async = False
        self._side = None
        self._timed = None
        self._timing = timing
        # The layer last updated, whose storage is still its device twin: (layer, its host store,
        # slot index). The only strong reference to that host store meanwhile.
        self._resident = None
        self._last_slot = 1  # slot of the layer last updated (a miss stages into the other one)
        self._shrunk = False  # an eviction shrank a host copy: the slots may be oversized

    # -- host memory -----------------------------------------------------------------------------

    @property
    def allocator(self) -> "HostAllocator":
        """The ``host_allocator`` to give each layer's store (holds this streamer weakly)."""
        return HostAllocator(self)

    @property
    def pool(self) -> PinnedPool | None:
        return self._pool

    def host_tensors(self, specs, owner=None) -> list[torch.Tensor]:
        """Host buffers for ``specs`` ``[(shape, dtype), ...]`` from the pool, all or none.

        ``owner`` (the requesting store) is tracked, so a growing owned pool moves its buffers.

        0-byte buffers are plain tensors (the pool would round them up to a granule). An owned pool
        that cannot fit them is replaced by a larger one (every host buffer moves); a shared one
        raises ``PoolExhaustedError`` with nothing allocated.
        """
        if owner is not None:
            self._stores.add(owner)
        need = sum(_granule(_nbytes(s, d)) for s, d in specs)
        if self._pool is None:
            self._pool = PinnedPool(max(_MIN_POOL, 2 * need * self.num_layers))
        while True:
            try:
                return self._try_alloc(specs)
            except PoolExhaustedError:
                if not self.owns_pool:
                    raise
                self._grow_pool(need)

    def _try_alloc(self, specs) -> list[torch.Tensor]:
        out = []
        try:
            for shape, dtype in specs:
                if _nbytes(shape, dtype) == 0:
                    out.append(torch.empty(shape, dtype=dtype))
                else:
                    out.append(self._pool.tensor(shape, dtype))
        except PoolExhaustedError:
            for t in out:
                if t.numel():
                    self._pool.release(t)
            raise
        return out

    def _grow_pool(self, need: int) -> None:
        """Replace the owned pool by one ``_POOL_GROWTH`` x larger; move every host buffer into it."""
        self.host_sync()
        old = self._pool
        cap = max(_POOL_GROWTH * old.capacity_bytes, old.used_bytes + 2 * need)
        new = PinnedPool(cap)
        for store in list(self._stores):
            if not store.initialized:
                continue
            for name in store.buffer_names():
                t = getattr(store, name, None)
                if t is None or not t.numel() or not old.owns(t):
                    continue
                moved = new.tensor(t.shape, t.dtype)
                moved.copy_(t)
                setattr(store, name, moved)
        self._pool = new
        self.stats.extra["pool_growths"] += 1

    def host_bytes(self, stores) -> int:
        """Pinned bytes held: the owned pool's capacity, or the granules ``stores`` take in a shared pool."""
        if self.owns_pool:
            return self._pool.capacity_bytes if self._pool is not None else 0
        total = 0
        for store in stores:
            if store.initialized:
                total += sum(_granule(t.numel() * t.element_size()) for t in store.buffers()
                             if t.numel() and self._pool.owns(t))
        return total

    # -- device side -----------------------------------------------------------------------------

    @property
    def device_bytes(self) -> int:
        """Bytes of the two device slots (everything the cache's storage holds on the device)."""
        return sum(s.nbytes for s in self._slots)

    def _bind_device(self, device: torch.device) -> None:
        if self._device is not None:
            if device != self._device:
                raise ValueError(f"offload='layers': the cache streams to {self._device}, got tensors on {device}")
            return
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._device = device
        self._async = is_async(device)
        if self._async:
            self._side = torch.cuda.Stream(device)
            for s in self._slots:
                s.ready, s.free = torch.cuda.Event(), torch.cuda.Event()
            self._timed = TimedWait(device, 2) if self._timing else None

    def _current(self):
        return torch.cuda.current_stream(self._device) if self._async else None

    def host_sync(self) -> None:
        """Block until every copy issued here has completed (host buffers are then safe to touch)."""
        if self._async:
            self._side.synchronize()
            self.stats.extra["host_syncs"] += 1
        for store in list(self._stores):
            store.pending_write = None

    def _ensure_slot(self, slot: _Slot, nbytes: int) -> None:
        if slot.nbytes >= nbytes:
            return
        if slot.buf is not None and self._async:
            slot.buf.record_stream(self._side)  # freed only after the side stream's copies
        slot.buf = None
        slot.buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        if self._async:
            # The new block may reuse memory work already queued on the compute stream touches.
            self._side.wait_stream(self._current())
        slot.layer, slot.twin, slot.twin_key = None, None, None

    def _twin_bytes(self, host, cap: int) -> int:
        return sum(_granule(_nbytes(shape, dtype)) for _, shape, dtype in host.layout(cap))

    def _twin(self, slot: _Slot, host, cap: int):
        """The device store over ``slot`` for ``host`` at ``cap`` rows (cached while the layout holds)."""
        key = (id(host), cap, host.batch, host.heads)
        if slot.twin is not None and slot.twin_key == key and slot.host_ref() is host:
            twin = slot.twin
            twin.length, twin.shadow_len = host.length, host.shadow_len
            return twin
        offset = [0]
        buf = slot.buf

        def carve(shape, dtype):
            n = _nbytes(shape, dtype)
            view = buf[offset[0]: offset[0] + n].view(dtype).view(shape)
            offset[0] += _granule(n)
            return view

        twin = host.device_twin(carve, self._device, cap)
        slot.twin, slot.twin_key, slot.host_ref = twin, key, weakref.ref(host)
        return twin

    def _stage(self, slot_idx: int, layer_idx: int, host, cap: int, *, prefetch: bool) -> None:
        """Copy ``host``'s valid rows into slot ``slot_idx`` (side stream on CUDA)."""
        slot = self._slots[slot_idx]
        self._ensure_slot(slot, self._twin_bytes(host, cap))
        twin = self._twin(slot, host, cap)
        rows = (_ALL, _ALL, slice(0, host.length))
        pairs = [(getattr(twin, n), getattr(host, n), rows) for n in host.token_names()]
        if host.residual and host.shadow_len:
            shadow = (_ALL, _ALL, slice(0, host.shadow_len))
            pairs += [(twin.key_shadow, host.key_shadow, shadow), (twin.value_shadow, host.value_shadow, shadow)]
        slot.layer = None
        if self._async:
            if slot.free_recorded:
                self._side.wait_event(slot.free)
            with torch.cuda.stream(self._side):
                moved = sum(copy_index_(d, s, ix) for d, s, ix in pairs)
            slot.ready.record(self._side)
        else:
            t0 = time.perf_counter()
            moved = sum(copy_index_(d, s, ix) for d, s, ix in pairs)
            self.stats.copy_time_ms += (time.perf_counter() - t0) * 1e3
        self.stats.bytes_to_device += moved
        self.stats.transfers_to_device += 1
        if not prefetch:
            self.stats.extra["staged_on_demand"] += 1
        slot.layer = layer_idx

    def _holding(self, layer_idx: int, host, q: int) -> int | None:
        """The slot holding a valid copy of ``layer_idx`` with room for ``q`` more rows, or None."""
        for i, slot in enumerate(self._slots):
            twin = slot.twin
            if (slot.layer == layer_idx and twin is not None and slot.host_ref() is host
                    and twin.batch == host.batch and twin.length == host.length
                    and twin.shadow_len == host.shadow_len and twin.capacity >= host.length + q):
                return i
        return None

    @staticmethod
    def _cap_for(host, q: int) -> int:
        from kvcompact.cache.storage import _round_up

        return max(host.capacity, _round_up(host.length + q))

    def forget(self, layer_idx: int | None = None) -> None:
        """Drop what the slots hold (of ``layer_idx``, or all): the host copy changed."""
        for slot in self._slots:
            if layer_idx is None or slot.layer == layer_idx:
                slot.layer = None

    # -- the forward -----------------------------------------------------------------------------

    def hand_back(self) -> None:
        """Make the last updated layer's storage its host copy again and release its slot.

        The twin's lengths are authoritative while it is resident (an edit may have set them), so
        the host copy takes them; its rows were written back by the update.
        """
        if self._resident is None:
            return
        layer, host, slot_idx = self._resident
        self._resident = None
        if layer.storage is self._slots[slot_idx].twin:
            twin = layer.storage
            host.length, host.shadow_len = twin.length, twin.shadow_len
            layer.storage = host
        if self._async:
            slot = self._slots[slot_idx]
            slot.free.record(self._current())
            slot.free_recorded = True

    def prepare(self, layers, q: int) -> None:
        """Host-side room for ``q`` more tokens in every used layer (growth, window trims)."""
        for idx, layer in layers:
            store = layer.storage
            if not store.initialized:
                continue
            if self._reorganizes(layer, q):
                self.host_sync()
                if layer.prepare_append(q):
                    self.forget(idx)

    @staticmethod
    def _reorganizes(layer, q: int) -> bool:
        """Whether ``prepare_append(q)`` would move host rows (a reallocation or a window trim)."""
        store = layer.storage
        if store.length + q > store.capacity:
            return True
        if layer.is_sliding:
            visible = min(store.length, layer.window - 1)
            return store.length > visible and store.length >= 2 * layer.window
        return False

    def update(self, layers, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, compute):
        """One layer's update with its storage staged on the device; returns what ``compute`` returns.

        Parameters
        ----------
        layers : list of (int, KVCompactLayer)
            The cache's attention layers with their indices (for the next-layer prefetch).
        compute : callable
            ``compute() -> (keys, values, evicted)``: the ordinary update and eviction, run while
            the layer's storage is its device twin.
        """
        layer = dict(layers)[layer_idx]
        self._bind_device(key_states.device)
        self.hand_back()
        q = key_states.shape[2]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if layer_idx == layers[0][0]:
            self.prepare(layers, q)
        elif self._reorganizes(layer, q):  # a layer first used in this forward
            self.host_sync()
            if layer.prepare_append(q):
                self.forget(layer_idx)
        host = layer.storage
        slot_idx = self._holding(layer_idx, host, q)
        if slot_idx is not None:
            self.stats.extra["prefetch_hits"] += 1
        else:
            # The other slot than the last layer's: attention may still be reading that one.
            slot_idx = 1 - self._last_slot
            self.forget(layer_idx)
            self._stage(slot_idx, layer_idx, host, self._cap_for(host, q), prefetch=False)
        slot = self._slots[slot_idx]
        if self._async:
            stream = self._current()
            if self._timed is not None:
                self._timed.wait(stream, slot.ready, slot_idx, self.stats)
            else:
                stream.wait_event(slot.ready)
        twin = slot.twin
        start, mark = host.length, layer.mark()
        layer.storage = twin
        try:
            keys, values, evicted = compute()
        except BaseException:
            # The host copy was not touched: put the layer back as it was; the slot is stale.
            layer.storage = host
            layer.rewind(mark)
            slot.layer = None
            raise
        self._write_back(layer, host, twin, 0 if evicted else start, evicted)
        self._resident = (layer, host, slot_idx)
        self._last_slot = slot_idx
        self._prefetch_next(layers, layer_idx, slot_idx, q)
        return keys, values

    def _write_back(self, layer, host, twin, start: int, evicted: bool) -> None:
        """Copy rows ``[start, length)`` and the shadow from ``twin`` to ``host``; adopt its lengths."""
        host.length, host.shadow_len = twin.length, twin.shadow_len
        if evicted and layer.budget is not None and host.wants_shrink(layer.budget):
            # The eviction freed most of a long prompt's capacity: give it back on the host (new
            # buffers, filled by the copy below). Old buffers may still be read by copies in flight.
            self.host_sync()
            try:
                host.shrink(layer.budget, copy=False)
                self._shrunk = True
            except PoolExhaustedError:
                pass  # keep the larger buffers; shrinking is an optimisation
        rows = (_ALL, _ALL, slice(start, twin.length))
        pairs = [(getattr(host, n), getattr(twin, n), rows) for n in host.token_names()]
        if host.residual and twin.shadow_len:
            shadow = (_ALL, _ALL, slice(0, twin.shadow_len))
            pairs += [(host.key_shadow, twin.key_shadow, shadow), (host.value_shadow, twin.value_shadow, shadow)]
        if self._async:
            appended = torch.cuda.Event()
            appended.record(self._current())
            self._side.wait_event(appended)
            with torch.cuda.stream(self._side):
                moved = sum(copy_index_(d, s, ix) for d, s, ix in pairs)
            done = torch.cuda.Event()
            done.record(self._side)
            host.pending_write = done
        else:
            t0 = time.perf_counter()
            moved = sum(copy_index_(d, s, ix) for d, s, ix in pairs)
            self.stats.copy_time_ms += (time.perf_counter() - t0) * 1e3
        self.stats.bytes_to_host += moved
        self.stats.transfers_to_host += 1

    def _prefetch_next(self, layers, layer_idx: int, slot_idx: int, q: int) -> None:
        pos = next(k for k, (idx, _) in enumerate(layers) if idx == layer_idx)
        wrap = pos + 1 == len(layers)
        nxt_idx, nxt = layers[0] if wrap else layers[pos + 1]
        if nxt_idx == layer_idx or not nxt.is_initialized:
            return
        host = nxt.storage
        hint = 1 if wrap else q  # the next forward is usually one decode token
        if self._holding(nxt_idx, host, hint) is not None:
            return
        if self._shrunk:
            self._shrink_slots(layers)
        self._stage(1 - slot_idx, nxt_idx, host, self._cap_for(host, hint), prefetch=True)

    def _shrink_slots(self, layers) -> None:
        """After evictions shrank host copies: give back slot bytes beyond twice the largest need."""
        self._shrunk = False
        need = max((self._twin_bytes(l.storage, self._cap_for(l.storage, 1)) for _, l in layers
                    if l.is_initialized), default=0)
        for slot in self._slots:
            if slot.nbytes > 2 * need and (self._resident is None or slot is not self._slots[self._resident[2]]):
                if slot.buf is not None and self._async:
                    slot.buf.record_stream(self._side)
                slot.buf, slot.layer, slot.twin, slot.twin_key = None, None, None, None

    # -- between forwards ------------------------------------------------------------------------

    def host_store(self, layer):
        """``layer``'s host store (its storage, unless it is the resident layer: then its twin's source)."""
        if self._resident is not None and self._resident[0] is layer:
            return self._resident[1]
        return layer.storage

    def settle(self) -> None:
        """Before an operation on the host copies: hand back the resident layer, wait for every
        copy, forget the slots' contents (the operation may change the host copies)."""
        self.hand_back()
        self.host_sync()
        self.forget()

    def release_slots(self) -> None:
        """Free the device slots (re-allocated by the next update)."""
        self.settle()
        for slot in self._slots:
            slot.buf, slot.layer, slot.twin, slot.twin_key, slot.free_recorded = None, None, None, None, False

    def stats_dict(self) -> dict:
        """Counters (bytes each way, transfers, stalls, hits) plus slot and pool sizes."""
        if self._async and self._timed is not None:
            self._timed.resolve_all(self.stats)
        d = self.stats.as_dict()
        d["device_slot_bytes"] = self.device_bytes
        d["pool_capacity_bytes"] = self._pool.capacity_bytes if self._pool is not None else 0
        return d
