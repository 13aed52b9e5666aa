"""Parking: a whole cache's buffers to pinned host memory and back (``cache.park`` / ``cache.resume``).

Every :class:`~kvcompact.cache.KVCompactCache` can park. ``park`` hands every buffer of every
used attention layer (token codes and scales, or model-dtype K/V; residual shadows; sliding and
full layers alike: :meth:`~kvcompact.cache.edits.SpanEditsMixin.storage_tensors`) to a
:class:`~kvcompact.offload.SessionParker`, releases the device buffers and the dequantization
workspace; ``resume`` copies them back and re-binds them. The length bookkeeping never moves, so
``get_seq_length``, ``get_mask_sizes`` and ``stats`` answer while parked.

What the construction's ``offload`` decides is what *using* a parked cache does:

* ``offload="idle"``: any operation that reads or writes the buffers (``update``, hence a forward
  or ``generate``; ``crop``, span edits, ``export_state``, batch reordering) resumes the cache
  first, so a model may be run on a parked cache as if it had never left.
* ``offload=None``: the cache moves only when told; such an operation on a parked cache raises
  ``RuntimeError`` (nothing changes) naming ``resume()`` and ``offload="idle"``.

Host memory comes from the ``pool`` given at construction (shared with other caches), else from
a pool the cache allocates at its first park, sized for its buffers, and reuses for every later
park (replaced by one of at least twice the capacity when the buffers outgrow it).

* ``offload="layers"``: the storage already lives in pinned host memory (see
  :mod:`kvcompact.cache.offload_layers`), so ``park`` moves nothing: it frees the two device
  staging slots and the workspace (``device_bytes`` -> 0) and returns 0; ``resume`` only clears
  the flag, and any use resumes by itself (the next forward re-allocates the slots). ``park(pool=...)``
  with another pool raises ``ValueError``: the storage stays in the cache's own pool.

Example
-------
>>> import torch, transformers
>>> from kvcompact import KVCompactCache
>>> from kvcompact.cache import compat
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                num_attention_heads=2, num_key_value_heads=1)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> cache = KVCompactCache(cfg, kv_dtype="int8", offload="idle")
>>> out = model.generate(torch.tensor([[1, 5, 9, 3]]), **compat.cache_kwargs(cache), max_new_tokens=4,
...                      do_sample=False, pad_token_id=0)
>>> nbytes = cache.park()           # e.g. while an agent waits on a tool
>>> cache.parked, cache.stats().device_bytes, cache.stats().host_bytes == cache.pool.capacity_bytes
(True, 0, True)
>>> out = model.generate(out, **compat.cache_kwargs(cache), max_new_tokens=4, do_sample=False,
...                      pad_token_id=0)   # the first update resumes the cache
>>> cache.parked, cache.stats().device_bytes > 0
(False, True)
"""

from __future__ import annotations

import torch

__all__ = ["ParkingMixin"]

_ALIGN = 256  # the pool rounds every request up to this many bytes
_GROWTH = 2  # capacity factor when an owned pool must grow


def _pool_bytes(tensors) -> int:
    """Bytes of pool ranges ``tensors`` take (each request rounded up as :class:`PinnedPool` does)."""
    return sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in tensors)


class ParkingMixin:
    """Mixed into :class:`~kvcompact.cache.KVCompactCache`, before the span edits, whose buffer
    operations it guards (needs ``self.layers``, ``self.workspace``, ``self.offload_mode``)."""

    def _init_parking(self, pool=None) -> None:
        self._pool = pool  # a shared pool (owned: False) or the one made at the first park
        self._owns_pool = pool is None
        self._parker = None
        self._park_handle = None  # the ParkHandle while parked (None also for a 0-byte park)
        self._is_parked = False
        self._park_device = None
        self._transfer = None  # the last park/resume handle whose copy may still be in flight
        self._held_range_bytes = 0  # pool bytes of the parked buffers in a pool the cache does not own

    # -- state -----------------------------------------------------------------------------------

    @property
    def parked(self) -> bool:
        """True between :meth:`park` and :meth:`resume`: the buffers are in host memory."""
        return self._is_parked

    @property
    def pool(self):
        """The :class:`~kvcompact.offload.PinnedPool` parked buffers go to (None before the first
        park of a cache built without ``pool=``). With ``offload="layers"``: the pool holding the
        storage (None before the first update of a cache built without ``pool=``)."""
        if self._streamer is not None:
            return self._streamer.pool
        return self._pool

    @property
    def transfer_in_flight(self) -> bool:
        """True while the last park or resume copy has not completed (never on CPU: copies there
        are synchronous)."""
        if self._transfer is not None and self._transfer.done():
            self._transfer = None
        return self._transfer is not None

    def wait_transfer(self) -> None:
        """Block the host until the last park or resume copy has completed."""
        if self._transfer is not None:
            self._transfer.wait()
            self._transfer = None

    def _host_bytes(self) -> int:
        if self._streamer is not None:
            return self._streamer.host_bytes(self._host_stores())
        owned = self._pool.capacity_bytes if (self._owns_pool and self._pool is not None) else 0
        held = self._held_range_bytes if (self._is_parked or self.transfer_in_flight) else 0
        return owned + held

    # -- park / resume ---------------------------------------------------------------------------

    def park(self, non_blocking: bool = True, *, pool=None) -> int:
        """Move every buffer to pinned host memory and free the device copies; returns bytes parked.

        Parameters
        ----------
        non_blocking : bool, default True
            True: the copy runs on a side stream after the work already queued on the current
            stream, and this returns at once (the device memory returns to the allocator when the
            copy has read it). False: the host waits for the copy. On CPU copies are synchronous.
        pool : kvcompact.offload.PinnedPool, optional
            Park into this (shared) pool this time instead of the cache's own ``pool``.

        Raises
        ------
        ValueError
            The cache is already parked.
        RuntimeError
            The previous park or resume copy is still in flight (CUDA): call :meth:`wait_transfer`.
            Its host ranges stay reserved in the pool until it completes, so a pool sized for one
            copy could not take this one; the caller decides whether to block.
        PoolExhaustedError
            A shared pool cannot hold the buffers; the cache stays on the device, unchanged.
        """
        if self._is_parked:
            raise ValueError("park: the cache is already parked; call resume() first")
        if self._streamer is not None:
            return self._park_streamed(pool)
        if self.transfer_in_flight:
            raise RuntimeError("park: the previous park/resume copy is still in flight; call cache.wait_transfer() "
                               "first (or resume(non_blocking=False))")
        if pool is not None:
            self._check_pool(pool)
        tensors = super().storage_tensors()
        if not tensors:  # nothing fed yet: nothing to move, but the cache counts as parked
            self._park_handle, self._park_device, self._held_range_bytes = None, None, 0
            self._is_parked = True
            return 0
        parker = self._parker_for(_pool_bytes(tensors), pool)
        device = tensors[0].device
        handle = parker.park(tensors)  # PoolExhaustedError: ranges returned, nothing changed here
        del tensors
        super().replace_storage_tensors(None)
        self.workspace.release()
        self._park_handle, self._park_device = handle, device
        self._held_range_bytes = 0 if parker.pool is self._owned_pool() else _pool_bytes(handle.host)
        self._is_parked = True
        self._transfer = handle
        if not non_blocking:
            self.wait_transfer()
        return handle.nbytes

    def resume(self, non_blocking: bool = True) -> None:
        """Copy the parked buffers back to the device they came from.

        Parameters
        ----------
        non_blocking : bool, default True
            True: the current stream waits (device side) for the copy, so work queued after this
            call sees the buffers while the host runs on. False: the host waits. On CPU the copy
            is synchronous either way.

        Raises
        ------
        ValueError
            The cache is not parked.
        """
        if not self._is_parked:
            raise ValueError("resume: the cache is not parked (park() it first)")
        handle = self._park_handle
        if self._streamer is not None:
            handle = None
        if handle is not None:
            restored = self._parker.resume(handle, device=self._park_device, block_current_stream=True)
            super().replace_storage_tensors(restored.tensors)
            # Only the copy's completion is kept: holding the tensors would keep buffers the storage
            # later replaces (growth) alive on the device, unseen by stats().
            restored.tensors = []
            self._transfer = restored
        self._park_handle = None
        self._is_parked = False
        if not non_blocking:
            self.wait_transfer()

    def _park_streamed(self, pool) -> int:
        """``offload="layers"``: the storage is on the host already; free the device side only."""
        if pool is not None and pool is not self._streamer.pool:
            self._check_pool(pool)
            raise ValueError("park: pool= cannot be used with offload='layers': the storage already lives in the "
                             "cache's own pinned pool (park only frees the device slots)")
        self._streamer.release_slots()
        self.workspace.release()
        self._is_parked = True
        return 0

    def _owned_pool(self):
        return self._pool if self._owns_pool else None

    def _parker_for(self, need: int, pool=None):
        """The parker on ``pool`` (default: this cache's pool, made or grown to hold ``need`` bytes).

        Replacing the parker drops its in-flight list; that is safe because :meth:`park` refuses
        while the last copy is in flight, and every earlier copy completed before it.
        """
        from kvcompact.offload import PinnedPool, SessionParker

        if pool is not None:
            if self._parker is None or self._parker.pool is not pool:
                self._parker = SessionParker(pool)
            return self._parker
        if self._owns_pool and (self._pool is None or self._pool.capacity_bytes < need):
            old = self._pool.capacity_bytes if self._pool is not None else 0
            # Pinned allocations are slow and fragment the host: one per growth, never per park.
            cap = max(need, _GROWTH * old)
            self._parker = None
            self._pool = PinnedPool(cap, allow_pageable_fallback=True)
        if self._parker is None or self._parker.pool is not self._pool:
            self._parker = SessionParker(self._pool)
        return self._parker

    def _discard_parked(self) -> None:
        if self._streamer is not None:
            self._is_parked = False
            return
        self._discard_parked_copy()

    def _discard_parked_copy(self) -> None:
        """Forget a parked copy (its host ranges return to the pool); the cache is then empty."""
        if self._park_handle is not None:
            self._parker.discard(self._park_handle)
        self._park_handle = None
        self._is_parked = False
        self._held_range_bytes = 0

    # -- guards: operations on the buffers --------------------------------------------------------

    def _resident(self, op: str) -> None:
        """Make the buffers usable for ``op``: resume an ``offload="idle"`` cache, refuse otherwise."""
        if self._streamer is not None:
            if op != "update":
                self._streamer.settle()  # the host copies become the truth before the operation
            self._is_parked = False  # nothing to copy back: the slots come back with the next update
            return
        if not self._is_parked:
            return
        if self.offload_mode == "idle":
            self.resume(non_blocking=True)
            return
        raise RuntimeError(f"{op}: the cache is parked; call cache.resume() first (a cache built with "
                           "offload='idle' resumes itself on use)")

    def drop_span(self, *args, **kwargs):
        self._resident("drop_span")
        return super().drop_span(*args, **kwargs)

    def shift_keys(self, *args, **kwargs):
        self._resident("shift_keys")
        return super().shift_keys(*args, **kwargs)

    def splice(self, *args, **kwargs):
        self._resident("splice")
        return super().splice(*args, **kwargs)

    def export_state(self):
        self._resident("export_state")
        return super().export_state()

    def import_state(self, *args, **kwargs):
        self._resident("import_state")
        return super().import_state(*args, **kwargs)

    def storage_tensors(self) -> list[torch.Tensor]:
        self._resident("storage_tensors")
        return super().storage_tensors()

    def replace_storage_tensors(self, tensors) -> None:
        if self._streamer is not None:
            self._resident("replace_storage_tensors")
            if tensors is None:
                raise ValueError("replace_storage_tensors(None): a cache with offload='layers' keeps its storage in "
                                 "its pinned pool; use park() to free the device slots")
            # Copied into the cache's pool, so the storage stays host-resident and counted.
            specs = [(tuple(t.shape), t.dtype) for t in tensors]
            homes = self._streamer.host_tensors(specs)
            for home, t in zip(homes, tensors):
                home.copy_(t)
            tensors = homes
        elif self._is_parked:
            raise RuntimeError("replace_storage_tensors: the cache is parked (its buffers belong to the park); "
                               "call cache.resume() first")
        super().replace_storage_tensors(tensors)

    def reorder_cache(self, beam_idx) -> None:
        self._resident("reorder_cache")
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._resident("batch_repeat_interleave")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        self._resident("batch_select_indices")
        super().batch_select_indices(indices)

    def reset(self) -> None:
        """Also discards a parked copy (its host memory returns to the pool)."""
        if self._is_parked:
            self._discard_parked()
        super().reset()
