"""Pinned host memory pool (``torch.classes.kvcompact.PinnedPool``), wrapped for Python."""

from __future__ import annotations

import warnings
import weakref
from typing import Sequence

import torch

import kvcompact  # noqa: F401  (loads the extension, which registers the class)

__all__ = ["PinnedPool", "PoolExhaustedError"]


class PoolExhaustedError(MemoryError):
    """The pool has no free range large enough for a request."""


class PinnedPool:
    """One page-locked host allocation, handed out as CPU tensors.

    The range is allocated once: with ``cudaHostAlloc`` (portable, mapped) in
    CUDA builds when a CUDA device is usable, otherwise with ordinary aligned
    host memory (CPU-only builds, machines without a GPU), so the same code
    paths run everywhere. Tensors are carved out best-fit, 256-byte aligned,
    and released ranges are coalesced with their free neighbours.

    Lifetime: every tensor keeps the pool's memory alive, and its range goes
    back to the pool automatically when the tensor (and every view of it) is
    freed. :meth:`release` returns a range early; it refuses while other views
    are alive and leaves the released tensor empty, so no Python object can
    reach memory the pool may hand out again. The pool cannot see copies still
    in flight on a CUDA stream: keep a tensor alive until its copy has
    completed (the prefetcher and :class:`~kvcompact.offload.SessionParker` do).

    Parameters
    ----------
    capacity_bytes : int
        Size of the range (rounded down to a multiple of 256).
    allow_pageable_fallback : bool, default False
        If True, a failed ``cudaHostAlloc`` falls back to pageable memory, and an
        exhausted pool returns an ordinary (pageable) ``torch.empty`` tensor with a
        warning instead of raising :class:`PoolExhaustedError`. Copies from
        pageable memory are not asynchronous, so this is off by default.

    Example
    -------
    >>> pool = PinnedPool(64 << 20)
    >>> k = pool.tensor((8, 1024, 128), torch.bfloat16)   # [H, T, D], 2 MiB
    >>> pool.used_bytes
    2097152
    >>> pool.release(k)       # or just `del k`
    >>> pool.used_bytes
    0
    """

    def __init__(self, capacity_bytes: int, *, allow_pageable_fallback: bool = False):
        self._impl = torch.classes.kvcompact.PinnedPool(int(capacity_bytes),
                                                        bool(allow_pageable_fallback))
        self._allow_fallback = bool(allow_pageable_fallback)
        # Pageable tensors handed out on exhaustion, by id (tensors compare elementwise).
        self._fallback: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._warned = False

    # -- allocation ---------------------------------------------------------
    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor of ``shape`` and ``dtype`` in pool memory.

        Contents are uninitialized. ``is_pinned()`` is True when :attr:`pinned`.

        Raises
        ------
        PoolExhaustedError
            No free range fits (names the request and the free bytes), unless
            ``allow_pageable_fallback``.
        ValueError
            A negative or overflowing shape.
        """
        shape = [int(s) for s in shape]
        t = self._impl.try_tensor(shape, dtype)
        if t is not None:
            return t
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        msg = (f"PinnedPool: cannot allocate {nbytes} bytes for a {dtype} tensor of shape "
               f"{tuple(shape)}: {self.free_bytes} bytes free of {self.capacity_bytes} "
               f"(largest free range {self.largest_free_block} bytes)")
        if not self._allow_fallback:
            raise PoolExhaustedError(msg)
        if not self._warned:
            warnings.warn(msg + "; falling back to pageable memory (copies will not overlap)",
                          ResourceWarning, stacklevel=2)
            self._warned = True
        t = torch.empty(shape, dtype=dtype)
        self._fallback[id(t)] = t
        return t

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """A pool tensor with ``t``'s shape and dtype (contiguous)."""
        return self.tensor(t.shape, t.dtype)

    def release(self, t: torch.Tensor) -> None:
        """Return ``t``'s range to the pool now; ``t`` becomes an empty tensor.

        Raises
        ------
        ValueError
            ``t`` was not handed out by this pool, was already released, or
            other tensors still view its range.
        """
        if self._fallback.get(id(t)) is t:
            del self._fallback[id(t)]
            t.set_()
            return
        self._impl.release(t)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` views a range handed out by this pool."""
        return bool(self._impl.owns(t))

    # -- state ----------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return int(self._impl.capacity_bytes())

    @property
    def used_bytes(self) -> int:
        """Bytes handed out (each request rounded up to 256)."""
        return int(self._impl.used_bytes())

    @property
    def free_bytes(self) -> int:
        return int(self._impl.free_bytes())

    @property
    def largest_free_block(self) -> int:
        """The largest single request that can succeed now."""
        return int(self._impl.largest_free_block())

    @property
    def num_allocations(self) -> int:
        return int(self._impl.num_allocations())

    @property
    def pinned(self) -> bool:
        """True when the range is page-locked (cudaHostAlloc)."""
        return bool(self._impl.pinned())

    @property
    def backing(self) -> str:
        """How the range was obtained, e.g. ``"cudaHostAlloc"``."""
        return str(self._impl.backing())

    def __repr__(self) -> str:
        return (f"PinnedPool(capacity_bytes={self.capacity_bytes}, used_bytes={self.used_bytes}, "
                f"allocations={self.num_allocations}, backing={self.backing!r})")
