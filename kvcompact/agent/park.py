"""``Session.park`` / ``Session.resume``: a session's cache to pinned host memory and back.

The cache hands out its buffers (``storage_tensors``) and takes them back
(``replace_storage_tensors``); :class:`~kvcompact.offload.SessionParker` does the copies.
"""

from __future__ import annotations

__all__ = ["park", "resume"]


def park(session, pool=None) -> int:
    """Move the session's cache to pinned host memory (``kvcompact.offload``); returns bytes parked.

    The device buffers are released (device memory returns to the allocator once the copy has
    read them; on CPU the copy is synchronous). Every other method raises until :func:`resume`.
    ``pool``: a :class:`~kvcompact.offload.PinnedPool` to use (default: one sized for this cache,
    allocated here; on a CPU-only machine it is ordinary memory). If the pool cannot hold the
    cache, :class:`~kvcompact.offload.PoolExhaustedError` propagates and nothing changed.
    """
    session._require_editable("park")
    session._check_live()
    from kvcompact.offload import PinnedPool, SessionParker

    tensors = session.cache.storage_tensors()
    if not tensors:  # nothing fed yet: nothing to move
        session._parked = (None, None)
        return 0
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if pool is None:
        pool = PinnedPool(nbytes + 4096 * (len(tensors) + 1), allow_pageable_fallback=True)
    parker = SessionParker(pool)
    handle = parker.park(tensors)
    del tensors
    session.cache.replace_storage_tensors(None)
    session._parked = (parker, handle)
    return handle.nbytes


def resume(session) -> None:
    """Bring a parked cache back to the device (blocks the current stream until it is there)."""
    if session._parked is None:
        return
    parker, handle = session._parked
    if handle is not None:
        restored = parker.resume(handle, device=session._device())
        restored.wait()
        session.cache.replace_storage_tensors(restored.tensors)
    session._parked = None
