"""``Session.park`` / ``Session.resume`` / ``Session.tool_call``: a session's cache to pinned host
memory while it waits, and back.

The cache does the moving (``cache.park`` / ``cache.resume``, :mod:`kvcompact.cache.parking`);
the session adds its own rule on top: every other session method raises until :func:`resume`.
:func:`tool_call` parks for the duration of a tool and records what the model waited for.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["ToolCallRecord", "park", "resume", "settle_resume", "tool_call"]


@dataclass
class ToolCallRecord:
    """What one :meth:`Session.tool_call` did (``Session.last_tool_call``).

    Attributes
    ----------
    name : str
        The tool's name, as given.
    parked_bytes : int
        Cache bytes moved to host memory when the tool started (0 for an empty cache).
    tool_seconds : float
        Wall time of the tool (the ``with`` body).
    resume_wait_seconds : float or None
        How long the model waited for the resume copy. On CPU the copy is synchronous: the time of
        the resume itself. On CUDA the resume is issued when the tool returns and its copy runs
        while the host goes on; the wait is measured at the session's next forward (host time until
        the copy completed; exactly 0.0 when it already had). None until that forward.
    """

    name: str
    parked_bytes: int = 0
    tool_seconds: float = 0.0
    resume_wait_seconds: float | None = None


def park(session, pool=None) -> int:
    """Move the session's cache to pinned host memory (``cache.park``); returns bytes parked.

    The device buffers are released (device memory returns to the allocator once the copy has
    read them; on CPU the copy is synchronous). Every other method raises until :func:`resume`.
    A resume copy still in flight (CUDA, after :func:`resume`) is waited for first.
    ``pool``: a :class:`~kvcompact.offload.PinnedPool` to park into this time, e.g. one shared by
    several sessions (default: the cache's ``pool``, or the one it allocates and keeps for its
    parks). If the pool cannot hold the cache, :class:`~kvcompact.offload.PoolExhaustedError`
    propagates and nothing changed.
    """
    session._require_editable("park")
    session._check_live()
    settle_resume(session)
    if session.cache.transfer_in_flight:
        # The cache refuses to park while its last copy runs (the pool still reserves those host
        # ranges); a session serializes instead: the copy is short and already queued.
        session.cache.wait_transfer()
    nbytes = session.cache.park(non_blocking=True, pool=pool)
    session._parked = True
    return nbytes


def resume(session) -> None:
    """Bring a parked cache back to the device; a session that is not parked is left as it is.

    The current stream waits (device side) for the copy, so the next forward sees the buffers.
    """
    if session._parked is None:
        return
    session.cache.resume(non_blocking=True)
    session._parked = None


def settle_resume(session) -> None:
    """Before the first forward after a :func:`tool_call`: wait for its resume copy, record the wait."""
    record = session._resume_record
    if record is None:
        return
    session._resume_record = None
    if not session.cache.transfer_in_flight:
        record.resume_wait_seconds = 0.0
        return
    t0 = time.perf_counter()
    session.cache.wait_transfer()
    record.resume_wait_seconds = time.perf_counter() - t0


@contextmanager
def tool_call(session, name: str):
    """Park the cache while the ``with`` body (a tool) runs, resume it when the body ends.

    The park is issued as the tool starts (its copy overlaps the tool), the resume as it returns
    (its copy overlaps what the host does before the next forward: adding the tool's result,
    rendering it). If the body raises, the cache is resumed and the exception propagates. If the
    park itself fails (a pool too small: ``PoolExhaustedError``) the body does not run and the
    session is unchanged. Yields the :class:`ToolCallRecord`, also kept as ``session.last_tool_call``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool_call: name must be a non-empty str, got {name!r}")
    nbytes = park(session)
    record = ToolCallRecord(name=name, parked_bytes=nbytes)
    session.last_tool_call = record
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record.tool_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        resume(session)
        if session.cache is None:  # closed while the tool ran: nothing to bring back
            record.resume_wait_seconds = 0.0
        elif session.cache.transfer_in_flight:
            session._resume_record = record  # measured at the next forward (settle_resume)
        else:
            record.resume_wait_seconds = time.perf_counter() - t1
