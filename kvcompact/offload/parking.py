"""Session parking: a whole cache to pinned host memory and back, asynchronously."""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import torch

from kvcompact.offload._streams import OffloadStats, copy_whole_, is_async
from kvcompact.offload.pool import PinnedPool

__all__ = ["ParkHandle", "ResumeHandle", "SessionParker"]


class _Transfer:
    """An issued transfer: an event (None on CPU: complete) and host-side waits."""

    def __init__(self, event: Optional[torch.cuda.Event]):
        self._event = event

    def done(self) -> bool:
        """True once the copy has completed (never blocks)."""
        return self._event is None or self._event.query()

    def wait(self) -> None:
        """Block the host until the copy has completed."""
        if self._event is not None:
            self._event.synchronize()

    def wait_stream(self, stream=None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copy, device side."""
        if self._event is not None:
            (stream or torch.cuda.current_stream(self._event_device())).wait_event(self._event)

    def _event_device(self):
        return None


class ParkHandle(_Transfer):
    """A parked set of tensors: their host copies and the event of the copy.

    The device tensors handed to :meth:`SessionParker.park` may be dropped right
    after the call (their memory is not reused before the copy reads it).
    """

    def __init__(self, host: list[torch.Tensor], device: torch.device,
                 event: Optional[torch.cuda.Event]):
        super().__init__(event)
        self.host = host
        self.device = device
        self.nbytes = sum(t.numel() * t.element_size() for t in host)
        self.resumed = False

    def _event_device(self):
        return self.device


class ResumeHandle(_Transfer):
    """Device tensors being restored; use them after :meth:`wait_stream` or :meth:`wait`.

    When :meth:`SessionParker.resume` was called with ``block_current_stream=True``
    (the default) the current stream already waits, so work enqueued on it after
    the call may use :attr:`tensors` directly.
    """

    def __init__(self, tensors: list[torch.Tensor], device: torch.device,
                 event: Optional[torch.cuda.Event]):
        super().__init__(event)
        self.tensors = tensors
        self.device = device

    def _event_device(self):
        return self.device


class SessionParker:
    """Moves sets of cache tensors to a :class:`PinnedPool` and back, off the compute stream.

    Copies run on a side stream ordered after the work already enqueued on the
    current stream (``side.wait_stream(current)``), as one batched
    ``copy_blocks_`` per tensor. Host memory comes from the pool (no
    allocation or pinning per park); it returns to the pool once a resume's
    copy has completed (tracked here, so dropping a handle early is safe).
    On CPU every copy is synchronous and the handles are complete at once.

    Thread safety: one parker may be used from several threads. Every
    read-modify-write of its state (the in-flight list, the side streams, a
    handle's resumed flag, the stats) happens under one lock, so a host range
    is never dropped from the in-flight list, and thus never returned to the
    pool, before the event of the copy touching it has completed; a handle is
    resumed (or discarded) once, by whichever thread claims it first.

    Parameters
    ----------
    pool : PinnedPool
        Where parked tensors live.
    device : torch.device or str, optional
        The device tensors are resumed to (default: the parked tensors' device).

    Example
    -------
    >>> parker = SessionParker(PinnedPool(8 << 30))
    >>> h = parker.park([k_cache, v_cache]); del k_cache, v_cache   # frees device memory
    >>> ...                                                         # agent waits on a tool
    >>> k_cache, v_cache = parker.resume(h).tensors
    """

    def __init__(self, pool: PinnedPool, device: torch.device | str | None = None):
        self.pool = pool
        self.device = torch.device(device) if device is not None else None
        self.stats = OffloadStats()
        self._lock = threading.Lock()
        self._sides: dict[torch.device, torch.cuda.Stream] = {}
        self._inflight: list[tuple[torch.cuda.Event, list[torch.Tensor]]] = []

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        # Caller holds self._lock (two threads must not each create "the" side stream).
        side = self._sides.get(device)
        if side is None:
            side = self._sides[device] = torch.cuda.Stream(device)
        return side

    def _sweep(self) -> None:
        # Caller holds self._lock. Host ranges return to the pool once the copy touching them has
        # completed; the list is filtered in place so no reference to it can go stale.
        inflight = self._inflight
        inflight[:] = [(e, ts) for e, ts in inflight if not e.query()]

    def park(self, tensors: Sequence[torch.Tensor]) -> ParkHandle:
        """Start copying ``tensors`` (all on one device) into pool memory.

        Raises
        ------
        PoolExhaustedError
            The pool cannot hold them (nothing is copied; ranges taken so far
            are returned).
        """
        tensors = list(tensors)
        if not tensors:
            raise ValueError("SessionParker.park: `tensors` is empty")
        device = tensors[0].device
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"SessionParker.park: tensors[{i}] is on {t.device}, "
                                 f"tensors[0] on {device}")
        with self._lock:
            self._sweep()
        host = [self.pool.tensor(t.shape, t.dtype) for t in tensors]
        event = None
        if is_async(device):
            with self._lock:
                side = self._side(device)
                side.wait_stream(torch.cuda.current_stream(device))  # pending writes land first
                try:
                    with torch.cuda.stream(side):
                        for h, t in zip(host, tensors):
                            copy_whole_(h, t.contiguous())
                            t.record_stream(side)  # the caller may free t now
                finally:
                    # Keep the host ranges alive until the copies into them complete, even if
                    # the caller drops the handle or a later copy failed to enqueue (else the
                    # pool could hand them out while the DMA still writes).
                    event = torch.cuda.Event()
                    event.record(side)
                    self._inflight.append((event, list(host)))
            copy_ms = 0.0
        else:
            t0 = time.perf_counter()
            for h, t in zip(host, tensors):
                copy_whole_(h, t.contiguous())
            copy_ms = (time.perf_counter() - t0) * 1e3
        handle = ParkHandle(host, device, event)
        with self._lock:
            self.stats.copy_time_ms += copy_ms
            self.stats.bytes_to_host += handle.nbytes
            self.stats.transfers_to_host += 1
        return handle

    def resume(self, handle: ParkHandle, *, device: torch.device | str | None = None,
               block_current_stream: bool = True) -> ResumeHandle:
        """Start copying a parked set back; its host memory returns to the pool after.

        Parameters
        ----------
        device : optional
            Target device (default: the parker's, else where the tensors were parked from).
        block_current_stream : bool, default True
            Make the current stream wait (device side) for the copy, so later
            work on it can use the tensors. False lets compute keep running;
            then call ``wait_stream()`` on the result before using the tensors.

        Raises
        ------
        ValueError
            The handle was already resumed or discarded (by this or another thread).
        """
        with self._lock:
            self._sweep()
            if handle.resumed:
                raise ValueError("SessionParker.resume: this handle was already resumed (or discarded)")
            handle.resumed = True  # claimed: a concurrent resume or discard of it now refuses
            host = handle.host
        try:
            device = torch.device(device) if device is not None else (self.device or handle.device)
            out = [torch.empty(h.shape, dtype=h.dtype, device=device) for h in host]
            event = None
            if is_async(device):
                with self._lock:
                    current = torch.cuda.current_stream(device)
                    side = self._side(device)
                    side.wait_stream(current)  # the fresh allocations may reuse memory still in use
                    if handle._event is not None:
                        side.wait_event(handle._event)
                    with torch.cuda.stream(side):
                        for o, h in zip(out, host):
                            copy_whole_(o, h)
                            o.record_stream(side)
                        event = torch.cuda.Event()
                        event.record(side)
                    if block_current_stream:
                        current.wait_event(event)
                    self._inflight.append((event, host))
                copy_ms = 0.0
            else:
                handle.wait()  # a park from a GPU onto a CPU target
                t0 = time.perf_counter()
                for o, h in zip(out, host):
                    copy_whole_(o, h)
                copy_ms = (time.perf_counter() - t0) * 1e3
        except BaseException:
            with self._lock:
                handle.resumed = False  # nothing was handed out: the handle can be resumed again
            raise
        handle.host = []
        with self._lock:
            self.stats.copy_time_ms += copy_ms
            self.stats.bytes_to_device += sum(o.numel() * o.element_size() for o in out)
            self.stats.transfers_to_device += 1
        return ResumeHandle(out, device, event)

    def discard(self, handle: ParkHandle) -> None:
        """Drop a parked set without resuming it (its host memory returns to the pool).

        A handle already resumed or discarded is left alone.
        """
        with self._lock:
            if handle.resumed:
                return
            handle.resumed = True
            if handle._event is not None and not handle.done():
                self._inflight.append((handle._event, handle.host))
            handle.host = []

    def synchronize(self) -> None:
        """Block until every transfer has completed and return their host memory."""
        with self._lock:
            sides = list(self._sides.values())
        for side in sides:
            side.synchronize()
        with self._lock:
            self._sweep()

    def stats_dict(self) -> dict:
        with self._lock:
            self._sweep()
            d = self.stats.as_dict()
            inflight = len(self._inflight)
        d.update(pool_used_bytes=self.pool.used_bytes, pool_capacity_bytes=self.pool.capacity_bytes,
                 inflight=inflight)
        return d
