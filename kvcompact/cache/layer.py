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

from kvcompact.cache import compat
from kvcompact.cache.storage import TokenStore, Workspace, _round_up

__all__ = ["KVCompactLayer"]


class KVCompactLayer(compat.CacheLayerMixin):
    """Cache of one attention layer over preallocated (optionally 8-bit) buffers.

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
    select : callable
        ``select(layer, budget, keys, values) -> keep_idx`` ``[B, H, K]`` int64: the eviction rule;
        ``keys``/``values`` are the physical K/V attention reads this step.
    guard : callable
        Called with the layer before any eviction; raises if the cache cannot evict safely.
    layer_idx : int or None
        The layer's index in the model (policies use it to find captured queries).
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
        select: Callable | None = None,
        guard: Callable | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.is_sliding = window is not None
        self.budget = None if self.is_sliding else budget
        self.slack = slack
        self.select = select
        self.guard = guard
        self._store_args = (fmt, group_size, residual, workspace or Workspace())
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
        return self.is_sliding or self._tail_contiguous == self.storage.length == self._logical

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
        self._tail_contiguous += q
        keys, values = self.storage.view(exact_key=key_states, exact_value=value_states)
        n, budget = self.storage.length, self.budget
        # Evict after a multi-token chunk (prefill, a new turn) or once past budget + slack.
        if budget is not None and (n > budget + self.slack or (q > 1 and n > budget)):
            if self.storage.fmt is None:
                # Lossless views alias the buffers that compaction rewrites; this step's attention
                # still needs the pre-eviction tokens. One copy per eviction, i.e. per `slack` steps.
                keys, values = keys.clone(), values.clone()
            self.compact(self.select(self, budget, keys, values))
            self.storage.shrink(budget)
        return keys, values

    def _update_windowed(self, key_states, value_states, q):
        store, window = self.storage, self.window
        visible = min(store.length, window - 1)  # old tokens the new queries may still see
        # Trim lazily (when the buffer would grow, or holds two windows) so the amortised cost of
        # dropping old tokens stays O(1) per token; shrink once after a long prefill.
        if store.length > visible and (store.length + q > store.capacity or store.length >= 2 * window):
            store.keep_last(visible)
            if store.capacity > 4 * (window + q):
                store._alloc(_round_up(2 * window + q))
        store.append(key_states, value_states)
        self._logical += q
        return store.view(start=store.length - visible - q, exact_key=key_states, exact_value=value_states)

    def compact(self, keep_idx: torch.Tensor) -> None:
        """Keep only physical positions ``keep_idx``, in place; the logical length is unchanged.

        Parameters
        ----------
        keep_idx : torch.Tensor
            ``[B, H_kv, K]`` int64 on the cache's device, each row strictly increasing in
            ``[0, physical_len)``. Rows may differ (head-wise eviction); all keep ``K`` tokens.
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
        if self.guard is not None:
            self.guard(self)
        n, k = store.length, keep_idx.shape[-1]
        keep_idx = keep_idx.to(device=self.device, dtype=torch.int64)
        # Newest tokens still logically contiguous with the end: the common suffix on which
        # keep_idx[..., j] == n - k + j in every row. Only those can be cropped later.
        if k:
            same = keep_idx == torch.arange(n - k, n, device=keep_idx.device)
            run = int(same.flip(-1).int().cumprod(-1).sum(-1).min())
        else:
            run = 0
        store.compact(keep_idx)
        self._tail_contiguous = min(run, self._tail_contiguous)

    def set_lengths(self, *, physical: int, logical: int, tail_contiguous: int) -> None:
        """Overwrite the length bookkeeping after an external edit of the buffers (span editors).

        For code that rewrites ``storage`` rows itself (``kvcompact.agent.kvedit``: evicting a
        message's span, re-rotating keys, splicing a replacement). ``physical`` rows
        ``[0, physical)`` must hold valid tokens, ``logical`` is the next token's position and
        ``tail_contiguous`` the newest tokens a ``crop`` may still remove. The full-precision
        residual shadow is dropped (its rows no longer match); the quantized copies remain.
        """
        if self.is_sliding:
            raise ValueError("set_lengths: sliding-window layers cannot be span-edited")
        store = self.storage
        if not 0 <= physical <= (store.capacity if store.initialized else 0) or logical < physical:
            raise ValueError(f"set_lengths: physical={physical}, logical={logical} invalid for capacity "
                             f"{getattr(store, 'capacity', 0)}")
        store.length = physical
        store.shadow_len = 0
        self._logical = logical
        self._tail_contiguous = max(0, min(tail_contiguous, physical))

    # -- structural operations -------------------------------------------------------------------

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens. ``n < 0`` removes ``-n``; ``n >= 0`` keeps the first ``n`` (4.x form).

        Raises ``ValueError`` when a token to remove was already evicted or fell out of the window:
        the rollback could not restore what attention saw before.
        """
        m = compat.crop_count(tokens_to_remove, self._logical)
        if m == 0 or not self.is_initialized:
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
        elif m > self._tail_contiguous:
            raise ValueError(
                f"crop: cannot remove the last {m} tokens: only the newest {self._tail_contiguous} are still "
                "contiguous in the cache, older ones were evicted (crop before evicting, or re-prefill)"
            )
        store.truncate(m)
        self._logical -= m
        self._tail_contiguous = max(self._tail_contiguous - m, 0)

    def reset(self) -> None:
        """Drop all tokens (buffers freed); the layer is re-initialised by its next update."""
        fmt, group_size, residual, workspace = self._store_args
        self.storage = TokenStore(fmt, group_size, residual, workspace)
        self._logical = 0
        self._tail_contiguous = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (eviction-safe: rows move whole)."""
        self.storage.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.storage.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.storage.map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self):
        raise RuntimeError("KVCompactLayer: offloading arrives with kvcompact.offload")

    def prefetch(self):
        raise RuntimeError("KVCompactLayer: offloading arrives with kvcompact.offload")

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
        return self.storage.view(fresh=True)

    def __repr__(self):
        kind = f"window={self.window}" if self.is_sliding else f"budget={self.budget}"
        return (
            f"KVCompactLayer(fmt={self.storage.fmt}, {kind}, logical={self._logical}, "
            f"physical={self.storage.length})"
        )
