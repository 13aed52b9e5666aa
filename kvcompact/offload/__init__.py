"""Pinned host memory, layer prefetch and session parking for KV caches.

Pieces
------
:class:`PinnedPool`
    One page-locked allocation (``cudaHostAlloc``; ordinary memory without a
    GPU) handed out as CPU tensors; exhaustion raises :class:`PoolExhaustedError`.
:func:`kvcompact.ops.copy_blocks_`
    Batched block copies in any direction on the current stream (the primitive
    everything here uses).
:class:`LayerPrefetcher`
    ``offload="layers"``: every layer's KV stays on the host; two device slots
    alternate, layer ``i + 1`` copied on a side stream while layer ``i``
    computes, ordered with events against the *current* stream.
:class:`SessionParker`
    ``offload="idle"``: ``park(tensors) -> ParkHandle`` moves a whole cache to
    the pool asynchronously (the device tensors may be dropped at once);
    ``resume(handle) -> ResumeHandle`` brings it back; both have ``done()`` /
    ``wait()``.

Both report :class:`OffloadStats` (bytes each way, transfers, compute-stream
stall time). On CPU-only machines every copy is synchronous but goes through
the same calls, so CI exercises the logic.

Integration with ``KVCompactCache``
-----------------------------------
``offload="idle"`` is built (``kvcompact/cache/parking.py``): ``cache.park()`` /
``cache.resume()`` drive a :class:`SessionParker` over the cache's
``storage_tensors()``, and ``Session.park`` / ``Session.tool_call`` use them.
``offload="layers"`` is not built yet (the cache refuses it); the plan:

``offload="layers"``
    At construction (or lazy initialization, once buffer shapes are known) the
    cache allocates each layer's preallocated buffers (keys, values and, when
    quantized, their scales; ``[B, H, T_max, D]``) from one ``PinnedPool`` sized
    with :func:`kvcompact.memory` estimates, and builds
    ``LayerPrefetcher(host_layers, device, extent=lambda i: (…, slice(0, length_i)))``
    so only valid tokens move. In ``layer.update(k, v)`` for layer ``i``:
    ``k_buf, v_buf = prefetcher.acquire(i)``; append the new tokens into the
    device views (quantize_into_); return views for attention; then, as the
    next layer's ``update`` starts (or in a post-forward hook),
    ``prefetcher.release(i, writeback=(…, slice(t0, t1)))`` writes back only the
    appended tokens. Compaction (``compact_``) on an offloaded layer runs on the
    acquired device views followed by ``release(i, writeback=True)``, or on the
    host tensors directly after ``prefetcher.synchronize()`` plus
    ``prefetcher.invalidate(i)``. ``cache.stats()`` adds
    ``prefetcher.stats_dict()`` (device staging bytes, host bytes, bytes moved,
    stall time).
``offload="idle"`` (as built)
    ``cache.park()`` calls ``SessionParker.park(all layer tensors)`` and drops
    the device tensors (device memory is freed once the copy has read them);
    ``cache.resume()`` calls ``SessionParker.resume(handle)`` and re-binds the
    returned tensors to the layers. An agent session parks while it waits on a
    tool and resumes before the next ``generate``; ``handle.done()`` lets a
    scheduler overlap the resume with another session's decode
    (``block_current_stream=False`` then ``wait_stream()`` before use).

Safety rules the classes enforce or document
--------------------------------------------
* A host range is never handed out again while a tensor views it (the
  storage owns a lease on the pool) nor while a copy started here still
  touches it (handles keep host tensors alive until their event completes).
* Device memory that crosses streams is protected with ``record_stream``.
* The compute stream is always the *current* stream at call time, never
  the default stream implicitly.
"""

from kvcompact.offload._streams import OffloadStats
from kvcompact.offload.parking import ParkHandle, ResumeHandle, SessionParker
from kvcompact.offload.pool import PinnedPool, PoolExhaustedError
from kvcompact.offload.prefetch import LayerPrefetcher

__all__ = ["LayerPrefetcher", "OffloadStats", "ParkHandle", "PinnedPool", "PoolExhaustedError",
           "ResumeHandle", "SessionParker"]
