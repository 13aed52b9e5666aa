"""``KVCompactLayer``: one attention layer's cache, with logical and physical lengths kept apart.

* logical length -- tokens this layer has seen (``get_seq_length``). ``generate`` derives RoPE
  positions and its multi-turn prefill slice from it, so it never shrinks on eviction.
* physical length -- tokens actually held (``storage.length``); ``update`` returns exactly these.

The mask contract follows transformers' ``DynamicSlidingWindowLayer``: ``get_mask_sizes`` returns
``(physical + q, logical - physical)``. The mask then treats kept token ``j`` as position
``logical - physical + j``: every kept old token sits before every query, so causality holds after
any eviction, and the new tokens land exactly on their logical positions. What breaks is a 2-D
*padding* mask, which is indexed with those shifted positions; see ``KVCompactCache``.

Windowed layers (``sliding_attention``/``chunked_attention`` of Gemma 2/3, Mistral ...) behave
like transformers' ``DynamicSlidingWindowLayer``: they return the last ``window - 1`` old tokens
plus the new ones and need no eviction (the window bounds them), so budgets skip them.
"""

from __future__ import annotations

from typing import Callable

import torch

from kvcompact import ops
from kvcompact.cache import compat
from kvcompact.cache.storage import TokenStore, Workspace, _round_up

__all__ = ["KVCompactLayer"]


class KVCompactLayer(compat.CacheLayerMixin):
    """Cache of one attention layer over preallocated (optionally 8-bit) buffers.

    The layer stores tokens and answers length questions; it holds no reference to its cache (no
    cycle: a cache is freed as soon as its last user drops it). Eviction is decided by
    :meth:`KVCompactCache.update`, which calls :meth:`wants_eviction` and then :meth:`evict`.
    Span edits (drop a range, re-rotate keys, splice) and whole-state export/import are methods
    here, called through the cache's edit API.

    Parameters
    ----------
    fmt : str or None
        Storage format: None (model dtype, lossless), "fp8_e4m3", "fp8_e5m2" or "int8".
    group_size : int or None
        Elements per scale along head_dim (quantized only; None = whole head).
    residual : int
        Newest tokens also kept in full precision (quantized only).
    workspace : Workspace
        Dequantization buffer shared by the cache's layers.
    window : int or None
        Sliding window (windowed layers) or None (full attention).
    budget : int or None
        Max physical tokens after an eviction (full-attention layers; None = unbounded).
    slack : int
        Tokens the layer may grow past ``budget`` before the next eviction, so eviction runs once
        per ``slack`` decode steps rather than every step.
    layer_idx : int or None
        The layer's index in the model (policies use it to find captured queries).
    host_allocator : callable, optional
        Keep the storage in host memory from this allocator (``offload="layers"``; see
        :class:`~kvcompact.cache.storage.TokenStore`). The cache then stages the layer on the
        device for each update.
    """

    is_compileable = False

    def __init__(
        self,
        fmt: str | None = None,
        group_size: int | None = None,
        residual: int = 0,
        workspace: Workspace | None = None,
        window: int | None = None,
        budget: int | None = None,
        slack: int = 1,
        layer_idx: int | None = None,
        host_allocator=None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.is_sliding = window is not None
        self.budget = None if self.is_sliding else budget
        self.slack = slack
        self._store_args = (fmt, group_size, residual, workspace or Workspace(), host_allocator)
        self.reset()

    # -- lengths ---------------------------------------------------------------------------------

    @property
    def logical_len(self) -> int:
        """Tokens seen (never decreases on eviction)."""
        return self._logical

    @property
    def physical_len(self) -> int:
        """Tokens held in the buffers."""
        return self.storage.length

    @property
    def tail_contiguous(self) -> int:
        """Newest physical tokens still at the logical end, in order: what ``crop`` may remove.

        After an eviction this is known only on the device (it depends on ``keep_idx``); it is read
        back here, on demand, so the decode path never waits for it.
        """
        if isinstance(self._tail, torch.Tensor):
            self._tail = int(self._tail)
        return self._tail

    def get_seq_length(self) -> int:
        return self._logical

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the next ``update``; accepts ``query_length`` or ``cache_position``."""
        q = compat.query_length(query_length)
        if self.is_sliding:
            kv_offset = max(self._logical - self.window + 1, 0)
            return min(self._logical, self.window - 1) + q, kv_offset
        return self.storage.length + q, self._logical - self.storage.length

    def get_max_length(self) -> int:
        return self.window if self.is_sliding else -1

    get_max_cache_shape = get_max_length  # transformers < 5.14

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` can roll tokens back: true until something is evicted.

        Windowed layers say True like transformers' own (a crop deeper than what they still hold
        raises a clear error instead).
        """
        return self.is_sliding or self.tail_contiguous == self.storage.length == self._logical

    # -- transformers' hooks ---------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Record B, H, D, dtype and device from ``key_states`` ``[B, H, T, D]``."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.storage.init(key_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens and return the K/V attention should read.

        Parameters
        ----------
        key_states, value_states : torch.Tensor
            ``[B, H_kv, Q, D]`` in the model dtype. Extra positional/keyword arguments
            (``cache_kwargs`` on older transformers) are accepted and ignored.

        Returns
        -------
        tuple of torch.Tensor
            Keys and values ``[B, H_kv, kv_length, D]`` with ``kv_length`` as ``get_mask_sizes``
            announced. Lossless: views of the buffers, valid until this layer's next update.
            Quantized: the shared workspace, valid until the cache's next quantized update.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self.is_sliding:
            return self._update_windowed(key_states, value_states, q)
        self.storage.append(key_states, value_states)
        self._logical += q
        self._tail = self._tail + q
        return self.storage.view(exact_key=key_states, exact_value=value_states)

    def wants_eviction(self, new_tokens: int) -> bool:
        """After appending ``new_tokens``: is the layer past its budget + slack (or, after a
        multi-token chunk such as a prefill or a new turn, past its budget)? Host ints only."""
        return self._past_budget(self.storage.length, new_tokens)

    def evicts_after(self, q: int) -> bool:
        """Whether appending ``q`` tokens would make :meth:`wants_eviction` true (host ints only)."""
        return self._past_budget(self.storage.length + q, q)

    def _past_budget(self, held: int, new_tokens: int) -> bool:
        budget = self.budget
        return budget is not None and (held > budget + self.slack or (new_tokens > 1 and held > budget))

    def evict(self, keep_idx: torch.Tensor, validate: bool = True, shrink: bool = True) -> None:
        """Keep physical positions ``keep_idx`` (see :meth:`compact`), then give back the capacity a
        long prompt grew beyond the budget (``shrink=False``: the caller does, e.g. on the host copy
        of an offloaded layer)."""
        self.compact(keep_idx, validate=validate)
        if shrink:
            self.storage.shrink(self.budget)

    def prepare_append(self, q: int) -> bool:
        """Do now the reallocation (and, for a window, the trim) the next ``update`` of ``q`` tokens
        would do, so that update only writes rows. Returns whether rows moved (a window trim).

        An offloaded layer runs this on its host copy before staging it: the staging slot cannot
        grow, and a refused host allocation then happens before anything changed.
        """
        if not self.is_initialized:
            return False
        moved = self._trim_window(q) if self.is_sliding else False
        self.storage.reserve(q)
        return moved

    def _trim_window(self, q: int) -> bool:
        store, window = self.storage, self.window
        visible = min(store.length, window - 1)  # old tokens the new queries may still see
        # Trim lazily (when the buffer would grow, or holds two windows) so the amortised cost of
        # dropping old tokens stays O(1) per token; shrink once after a long prefill.
        if store.length > visible and (store.length + q > store.capacity or store.length >= 2 * window):
            store.keep_last(visible)
            if store.capacity > 4 * (window + q):
                store._alloc(_round_up(2 * window + q))
            return True
        return False

    def _update_windowed(self, key_states, value_states, q):
        start = self._append_windowed(key_states, value_states, q)
        return self.storage.view(start=start, exact_key=key_states, exact_value=value_states)

    def _append_windowed(self, key_states, value_states, q) -> int:
        """Trim, append; the first row this step's attention reads."""
        store, window = self.storage, self.window
        self._trim_window(q)
        visible = min(store.length, window - 1)
        store.append(key_states, value_states)
        self._logical += q
        return store.length - visible - q

    def share_storage_of(self, other: "KVCompactLayer") -> None:
        """Hold ``other``'s tokens: full-attention storage shared read-only (copy on write, see
        :meth:`TokenStore.share_prefix`), a windowed layer's storage copied (its window rewrites
        old rows as it slides). This layer must be new; ``other`` must not change afterwards."""
        import copy

        if not other.is_initialized:
            return
        if self.is_sliding:
            self.storage = copy.deepcopy(other.storage, memo={id(other.storage.workspace): self.storage.workspace})
        else:
            self.storage.share_prefix(other.storage)
        self.dtype, self.device = other.dtype, other.device
        self._logical, self._tail = other._logical, other.tail_contiguous
        self.is_initialized = True

    # -- attention read from storage (kvcompact.ops.decode_attention) ----------------------------

    def update_deferred(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """:meth:`update` for a step whose attention kvcompact computes from storage.

        Appends like :meth:`update` but returns ``key_states``/``value_states`` unchanged (no
        dequantized view, no workspace) and remembers the step, so that :meth:`attend_pending`,
        called by kvcompact's attention function with those same tensors, reads the rows
        :meth:`update` would have returned. The cache uses it only inside ``kvcompact.attach``
        (which routes the model's attention there), for steps that evict nothing.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self.is_sliding:
            start = self._append_windowed(key_states, value_states, q)
        else:
            self.storage.append(key_states, value_states)
            self._logical += q
            self._tail = self._tail + q
            start = 0
        # A record left by a forward that failed before its attention ran is replaced: that
        # forward's output was never used.
        self._pending = (key_states, value_states, start)
        return key_states, value_states

    def attend_pending(self, query: torch.Tensor, key: torch.Tensor, scale: float, softcap: float | None):
        """Attention of ``query`` ``[B, Hq, Q, D]`` over what the last :meth:`update_deferred` appended
        to, or None when ``key`` is not the tensor that call returned (another cache's forward).

        Returns ``(out [B, Hq, Q, D] float32, lse [B, Hq, Q] float32)``. The stored segments are
        read in place (8-bit codes included); the exact newest rows of a quantized layer ride as the
        ``tail`` of the last segment's call, so a decode step over one stored segment is one call
        with no merge. Several segments (a shared prefix) merge by log-sum-exp.
        """
        pending = self._pending
        if pending is None or pending[0] is not key:
            return None
        self._pending = None
        exact_key, exact_value, start = pending
        rows = self.storage.length - start
        q = query.shape[2]
        window = self.window if self.is_sliding else None
        segments, tail = self.storage.attention_segments(start, exact_key, exact_value)
        if tail is not None and not segments:  # every row is exact: attend the tail as the segment
            segments = [(*tail, None, None, rows - tail[0].shape[2])]
            tail = None
        parts = []
        for i, (k, v, ks, vs, offset) in enumerate(segments):
            tk, tv = tail if tail is not None and i == len(segments) - 1 else (None, None)
            parts.append(ops.decode_attention(query, k, v, ks, vs, scale=scale, softcap=softcap, window=window,
                                              query_start=rows - q - offset, tail_key=tk, tail_value=tv))
        return ops.merge_attention(parts)

    def compact(self, keep_idx: torch.Tensor, validate: bool = True) -> None:
        """Keep only physical positions ``keep_idx``, in place; the logical length is unchanged.

        Parameters
        ----------
        keep_idx : torch.Tensor
            ``[B, H_kv, K]`` int64 on the cache's device, each row strictly increasing in
            ``[0, physical_len)``. Rows may differ (head-wise eviction); all keep ``K`` tokens.
        validate : bool
            Check ``keep_idx`` in the kernel (False for indices kvcompact built itself).
        """
        if self.is_sliding:
            raise ValueError("compact: sliding-window layers are bounded by their window and are never evicted")
        store = self.storage
        if keep_idx.dim() != 3 or tuple(keep_idx.shape[:2]) != (store.batch, store.heads):
            raise ValueError(
                f"compact: keep_idx must be [B={store.batch}, H={store.heads}, K], got {tuple(keep_idx.shape)}"
            )
        if keep_idx.shape[-1] > store.length:
            raise ValueError(f"compact: keep_idx keeps {keep_idx.shape[-1]} of {store.length} tokens")
        n, k = store.length, keep_idx.shape[-1]
        keep_idx = keep_idx.to(device=self.device, dtype=torch.int64)
        # Newest tokens still logically contiguous with the end: the common suffix on which
        # keep_idx[..., j] == n - k + j in every row. Only those can be cropped later. Computed on
        # the device and read back only if a crop asks (see tail_contiguous).
        if k:
            same = keep_idx == torch.arange(n - k, n, device=keep_idx.device)
            run = same.flip(-1).to(torch.int64).cumprod(-1).sum(-1).min()
            self._tail = torch.minimum(run, self._tail) if isinstance(self._tail, torch.Tensor) else \
                run.clamp(max=self._tail)
        else:
            self._tail = 0
        store.compact(keep_idx, validate=validate)

    # -- span edits (called through KVCompactCache's edit API) -------------------------------------

    def check_rows(self, op: str, start: int, end: int) -> None:
        """Raise ``ValueError`` unless ``0 <= start <= end <= physical_len``."""
        n = self.storage.length if self.is_initialized else 0
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n):
            raise ValueError(f"{op}: rows [{start}, {end}) are outside the {n} cached tokens")

    def drop_rows(self, start: int, end: int) -> None:
        """Remove physical rows ``[start, end)``; the logical length (next position) is unchanged."""
        if not self.is_initialized or end <= start:
            return
        n = self.storage.length
        tail = self.tail_contiguous
        self.storage.drop_rows(start, end)
        self._tail = min(tail, n - end)

    def shift_positions(self, length: int) -> None:
        """Move the logical end back by ``length`` positions (a closed gap: later keys re-rotated)."""
        if not self.is_initialized or length == 0:
            return
        if length > self._logical - self.storage.length:
            raise ValueError(f"shift_positions: cannot close {length} positions, the layer has a gap of "
                             f"{self._logical - self.storage.length}")
        self._logical -= length

    def rotate_keys(self, start: int, end: int, delta: int, inv_freq: torch.Tensor, style: str) -> None:
        """Re-rotate the keys at physical rows ``[start, end)`` by ``delta`` positions."""
        if self.is_initialized:
            self.storage.rotate_keys(start, end, delta, inv_freq, style)

    def mark(self) -> tuple:
        """The layer's own lengths, raw (no device read-back): for :meth:`rewind`."""
        return self._logical, self._tail

    def rewind(self, mark: tuple) -> None:
        """Put back what :meth:`mark` returned (after an update that failed half-way)."""
        self._logical, self._tail = mark

    def snapshot(self) -> tuple:
        """The host-side bookkeeping, for :meth:`restore` (buffers are backed up by the caller)."""
        return (self.storage.length, self.storage.shadow_len, self._logical, self.tail_contiguous)

    def restore(self, snap: tuple) -> None:
        """Put back what :meth:`snapshot` returned."""
        self.storage.length, self.storage.shadow_len, self._logical, self._tail = snap

    def open_splice(self, start: int, end: int, new_len: int, position: int) -> None:
        """Make rows ``[start, start + new_len)`` the next to be written, the tail after them.

        Moves rows ``[end, n)`` to ``start + new_len`` (memmove) and sets the lengths to ``start`` /
        ``position``, so the next ``update`` writes the replacement and sees only what precedes it.
        """
        store = self.storage
        n = store.length
        store.move_rows(end, n, start + new_len)
        store.length, store.shadow_len = start, 0
        self._logical, self._tail = position, 0

    def close_splice(self, start: int, end: int, new_len: int, old: tuple) -> None:
        """After the replacement was written: restore the lengths around it (``old``: the snapshot)."""
        n, _, logical, _ = old
        tail = n - end
        delta = new_len - (end - start)
        self.storage.length = start + new_len + tail
        self.storage.shadow_len = 0
        self._logical = logical + delta
        self._tail = new_len + tail

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Valid rows of every buffer (views) and the bookkeeping that restores them; None if unused."""
        if not self.is_initialized:
            return None
        store = self.storage
        meta = {"physical": store.length, "logical": self._logical, "tail_contiguous": self.tail_contiguous,
                "shadow_len": store.shadow_len if store.residual else 0,
                "dtype": str(store.dtype).replace("torch.", ""), "shape": [store.batch, store.heads, store.head_dim]}
        return store.valid_rows(), meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict, device) -> None:
        """The inverse of :meth:`export_state` on an empty layer; ``ValueError`` if it does not fit."""
        if self.is_initialized and self.storage.length:
            raise ValueError("import_state: the layer already holds tokens")
        b, h, d = meta["shape"]
        n, logical = int(meta["physical"]), int(meta["logical"])
        if logical < n or not 0 <= int(meta["tail_contiguous"]) <= n:
            raise ValueError(f"import_state: inconsistent lengths {meta}")
        like = torch.empty((b, h, 0, d), dtype=getattr(torch, meta["dtype"]), device=device)
        self.lazy_initialization(like, like)
        try:
            self.storage.load_rows(tensors, n, int(meta.get("shadow_len", 0)))
        except ValueError:
            self.reset()
            raise
        self._logical, self._tail = logical, int(meta["tail_contiguous"])

    # -- structural operations -------------------------------------------------------------------

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens. ``n < 0`` removes ``-n``; ``0`` removes nothing; ``n > 0`` keeps
        the first ``n`` (4.x form).

        Raises ``ValueError`` when a token to remove was already evicted or fell out of the window:
        the rollback could not restore what attention saw before. A refused crop changes nothing.
        """
        m = compat.crop_count(tokens_to_remove, self._logical)
        if m == 0 or not self.is_initialized:
            return
        self.check_crop(m)
        self.storage.truncate(m)
        self._logical -= m
        if not self.is_sliding:
            self._tail = max(self.tail_contiguous - m, 0)

    def check_crop(self, m: int) -> None:
        """Raise ``ValueError`` if removing the newest ``m`` tokens cannot be done exactly (changes nothing)."""
        if m <= 0 or not self.is_initialized:
            return
        store = self.storage
        if self.is_sliding:
            # After removing m tokens the window needs the m removed plus min(rest, window - 1) older ones.
            need = m + min(self._logical - m, self.window - 1)
            if store.length < need:
                raise ValueError(
                    f"crop: cannot remove {m} tokens from a sliding-window layer holding {store.length} "
                    f"(window {self.window}); the tokens before them were already dropped"
                )
        elif m > self.tail_contiguous:
            raise ValueError(
                f"crop: cannot remove the last {m} tokens: only the newest {self.tail_contiguous} are still "
                "contiguous in the cache, older ones were evicted (crop before evicting, or re-prefill)"
            )

    def reset(self) -> None:
        """Drop all tokens (buffers freed); the layer is re-initialised by its next update."""
        fmt, group_size, residual, workspace, host_allocator = self._store_args
        self.storage = TokenStore(fmt, group_size, residual, workspace, host_allocator)
        self._logical = 0
        self._tail = 0  # see tail_contiguous; an int, or a device scalar after an eviction
        self._pending = None  # see update_deferred
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (eviction-safe: rows move whole)."""
        self.storage.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.storage.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.storage.map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self):
        # transformers' Cache calls these only when built with offloading=True, which
        # KVCompactCache never is; refuse loudly rather than half-offload a quantized layer.
        raise RuntimeError("KVCompactLayer does not offload through transformers' Cache(offloading=True); "
                           "use KVCompactCache(..., offload='idle') and cache.park() / cache.resume()")

    prefetch = offload

    # -- read-only access (legacy `cache[i]`, `layer.keys`) ---------------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        """Physical keys ``[B, H, physical, D]``; None before use.

        Lossless: a view of the buffer. Quantized: a fresh dequantized copy (the shared workspace,
        which attention may be reading, is left alone).
        """
        return self._kv()[0]

    @property
    def values(self) -> torch.Tensor | None:
        return self._kv()[1]

    @keys.setter
    def keys(self, value) -> None:
        # The mixin's __init__ assigns None; anything else would bypass the buffers.
        if value is not None:
            raise AttributeError("KVCompactLayer.keys is read-only; use update()")

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("KVCompactLayer.values is read-only; use update()")

    def _kv(self):
        if not self.is_initialized:
            return None, None
        if self.storage.released:
            raise RuntimeError("the cache is parked (its buffers are in host memory): call cache.resume() first")
        self.storage.wait_pending()  # an offloaded layer's host copy may still be receiving rows
        return self.storage.view(fresh=True)

    def __repr__(self):
        kind = f"window={self.window}" if self.is_sliding else f"budget={self.budget}"
        return (
            f"KVCompactLayer(fmt={self.storage.fmt}, {kind}, logical={self._logical}, "
            f"physical={self.storage.length})"
        )
