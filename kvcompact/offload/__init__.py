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
    A standalone layer pipeline over fixed host tensors: every layer's KV stays
    on the host; two device slots alternate, layer ``i + 1`` copied on a side
    stream while layer ``i`` computes, ordered with events against the
    *current* stream (``KVCompactCache(offload="layers")`` has its own streamer,
    see below).
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
``offload="idle"`` (``kvcompact/cache/parking.py``): ``cache.park()`` / ``cache.resume()`` drive a
:class:`SessionParker` over the cache's ``storage_tensors()``; ``Session.park`` /
``Session.tool_call`` use them. An agent session parks while it waits on a tool and resumes before
the next ``generate``; ``handle.done()`` lets a scheduler overlap the resume with another
session's decode.

``offload="layers"`` (``kvcompact/cache/offload_layers.py``, ``LayerStreamer``): every layer's
``TokenStore`` lives in host memory from one :class:`PinnedPool` and is staged per update into one
of two device slots; the next layer is copied on a side stream while the current one computes
(events only), and only the appended rows go back. It does not use :class:`LayerPrefetcher`:
that class fixes each layer's host tensors and the slot sizes at construction, while a cache's
layers grow, shrink after evictions and are reorganised by window trims and edits; the streamer
re-carves its slots per layer and checks, per update, that the staged copy still matches the host
one. Both share this package's copy helpers (``copy_index_``: one batched ``copy_blocks_`` per
tensor) and :class:`OffloadStats`. ``cache.offload_stats()`` reports them.

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
