"""What query-aware policies see of the model: recent query states and accumulated attention.

One :class:`ObservedQueries` per attention layer, filled by :func:`kvcompact.attach` (a hook that
recomputes the query states, RoPE applied, before the attention module runs, i.e. before the
cache's ``update`` may evict) and read by the policy when the layer is compacted.

Alignment with physical positions. Queries are kept in arrival order. The newest ``P`` queries
belong to the newest ``P`` tokens, which are always still held (the recent window is protected,
and accumulated queries are folded at every eviction), so query ``i`` of ``P`` sits at physical
position ``T - P + i`` and its causal mask is "keys ``j <= T - P + i``" -- no logical positions
are needed. ``attn_mass`` is indexed by physical position and compacted with the layer's
``keep_idx``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ObservedQueries", "attention_probs", "accumulate_attention"]

# Queries per chunk when accumulating attention: bounds the [B, Hq, chunk, T] fp32 temporary.
_CHUNK = 256


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """Softmax attention of the newest queries onto the physical keys, grouped per KV head.

    Parameters
    ----------
    queries : torch.Tensor
        ``[B, H_q, P, D]`` RoPE applied; query ``i`` sits at physical position ``T - P + i``.
    keys : torch.Tensor
        ``[B, H_kv, T, D]``, ``H_q`` a multiple of ``H_kv`` (GQA), ``P <= T``.
    scaling : float, optional
        Logit scale (default ``D ** -0.5``).

    Returns
    -------
    torch.Tensor
        ``[B, H_kv, G, P, T]`` float32, ``G = H_q // H_kv``; row ``(.., i, :)`` sums to 1 over
        ``j <= T - P + i`` and is 0 beyond (causal).
    """
    b, hq, p, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    if hq % hkv:
        raise ValueError(f"queries have {hq} heads, not a multiple of the {hkv} KV heads")
    if p > t:
        raise ValueError(f"{p} queries but only {t} keys: the queries' own tokens must be held")
    g = hq // hkv
    scaling = d**-0.5 if scaling is None else scaling
    q = queries.float().reshape(b, hkv, g, p, d)
    logits = torch.einsum("bhgpd,bhtd->bhgpt", q, keys.float()) * scaling
    future = torch.arange(t, device=keys.device) > (t - p + torch.arange(p, device=keys.device)).unsqueeze(-1)
    logits = logits.masked_fill(future, -math.inf)
    return logits.softmax(dim=-1)


def accumulate_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """``attention_probs`` summed over the queries and the GQA group: ``[B, H_kv, T]`` float32.

    Chunked over queries, so a prefill of ``P`` tokens needs ``[B, H_q, 256, T]`` temporaries.
    """
    b, hq, p, _ = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    out = torch.zeros(b, hkv, t, dtype=torch.float32, device=keys.device)
    for s in range(0, p, _CHUNK):
        e = min(s + _CHUNK, p)
        # Query s..e of P sees keys up to T - P + e - 1: cut the keys there so the chunk is "newest".
        visible = t - p + e
        probs = attention_probs(queries[:, :, s:e], keys[:, :, :visible], scaling)
        out[:, :, :visible] += probs.sum(dim=(2, 3))
    return out


class ObservedQueries:
    """Per-layer observation state for query-aware policies.

    Parameters
    ----------
    window : int
        Newest query states kept (``queries``), default 32.
    accumulate : bool
        Maintain ``attn_mass`` (h2o): every query's attention is added to it.
    scaling : float, optional
        Attention logit scale of the layer (``module.scaling``); default ``D ** -0.5``.
    keep_hidden : bool
        Also keep the window's hidden states and position embeddings (kvpress presses need them).

    Attributes
    ----------
    queries : torch.Tensor or None
        ``[B, H_q, w, D]`` the newest ``w <= window`` query states, RoPE applied, oldest first.
    pending : torch.Tensor or None
        ``[B, H_q, P, D]`` queries not yet folded into ``attn_mass`` (accumulate only).
    attn_mass : torch.Tensor or None
        ``[B, H_kv, T']`` float32 accumulated attention per physical position, ``T' <=`` the
        layer's physical length (positions beyond ``T'`` have received nothing yet).
    """

    def __init__(self, window: int = 32, *, accumulate: bool = False, scaling: float | None = None, keep_hidden=False):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window
        self.accumulate = accumulate
        self.scaling = scaling
        self.keep_hidden = keep_hidden
        self.reset()

    def reset(self) -> None:
        self.queries = None
        self.pending = None
        self.attn_mass = None
        self.hidden_states = None
        self.position_embeddings = None
        self.module = None

    # -- written by the hook ---------------------------------------------------------------------

    def observe(self, queries: torch.Tensor, hidden_states=None, position_embeddings=None, module=None) -> None:
        """Record the query states ``[B, H_q, Q, D]`` (RoPE applied) of ``Q`` new tokens."""
        w = self.window
        new = queries[:, :, -w:].detach()
        if self.queries is None or self.queries.shape[:2] != new.shape[:2] or new.shape[2] == w:
            self.queries = new.clone()
        else:
            self.queries = torch.cat([self.queries, new], dim=2)[:, :, -w:]
        if self.accumulate:
            q = queries.detach()
            self.pending = q.clone() if self.pending is None else torch.cat([self.pending, q], dim=2)
        if self.keep_hidden:
            self.module = module
            if hidden_states is not None:
                h = hidden_states[:, -w:].detach()
                prev = self.hidden_states
                self.hidden_states = h if prev is None or h.shape[1] == w else torch.cat([prev, h], 1)[:, -w:]
            if position_embeddings is not None:
                cos, sin = position_embeddings
                prev = self.position_embeddings
                if prev is None or cos.shape[-2] >= w:
                    self.position_embeddings = (cos[..., -w:, :], sin[..., -w:, :])
                else:
                    self.position_embeddings = tuple(
                        torch.cat([p, c], dim=-2)[..., -w:, :] for p, c in zip(prev, (cos, sin))
                    )

    @property
    def num_pending(self) -> int:
        return 0 if self.pending is None else self.pending.shape[2]

    # -- used at eviction ------------------------------------------------------------------------

    def fold(self, keys: torch.Tensor) -> None:
        """Add the pending queries' attention onto ``keys [B, H_kv, T, D]`` to ``attn_mass``.

        The pending queries are the newest ``P`` tokens, all held (nothing was evicted since they
        arrived: every eviction folds first). Afterwards ``attn_mass`` has length ``T``.
        """
        if not self.accumulate:
            return
        b, hkv, t = keys.shape[0], keys.shape[1], keys.shape[2]
        mass = self.attn_mass
        if mass is None:
            mass = torch.zeros(b, hkv, t, dtype=torch.float32, device=keys.device)
        elif mass.shape[-1] < t:
            mass = torch.nn.functional.pad(mass, (0, t - mass.shape[-1]))
        elif mass.shape[-1] > t:
            raise RuntimeError(f"ObservedQueries: attention mass covers {mass.shape[-1]} tokens but the layer holds {t}")
        if self.pending is not None:
            mass = mass + accumulate_attention(self.pending.to(keys.device), keys, self.scaling)
            self.pending = None
        self.attn_mass = mass

    def compact(self, keep_idx: torch.Tensor) -> None:
        """Keep ``attn_mass`` at the positions ``keep_idx [B, H_kv, K]`` (the layer's compaction).

        Query states are not positions and stay as they are; unfolded (pending) queries would lose
        their alignment, so they must have been folded (``fold``) first.
        """
        if self.pending is not None:
            raise RuntimeError("ObservedQueries.compact: fold(keys) the pending queries before compacting")
        if self.attn_mass is not None:
            t = self.attn_mass.shape[-1]
            if keep_idx.shape[-1] and int(keep_idx.max()) >= t:
                # Tokens past the mass received no attention yet: pad so their mass (0) is kept.
                self.attn_mass = torch.nn.functional.pad(self.attn_mass, (0, int(keep_idx.max()) + 1 - t))
            self.attn_mass = torch.gather(self.attn_mass, 2, keep_idx.to(self.attn_mass.device))

    def crop(self, count: int) -> None:
        """Forget the newest ``count`` tokens (the cache's ``crop``): their queries and their mass."""
        if count <= 0:
            return
        if self.queries is not None:
            self.queries = self.queries[:, :, : max(self.queries.shape[2] - count, 0)]
            if self.queries.shape[2] == 0:
                self.queries = None
        if self.pending is not None:
            keep = self.pending.shape[2] - count
            self.pending = self.pending[:, :, :keep] if keep > 0 else None
            count = max(-keep, 0)  # tokens already folded into the mass
        if self.attn_mass is not None and count:
            # Mass the removed queries put on older tokens stays: it is a score, not a position.
            self.attn_mass = self.attn_mass[..., : max(self.attn_mass.shape[-1] - count, 0)]
        if self.keep_hidden and self.hidden_states is not None:
            self.hidden_states = None
            self.position_embeddings = None

    def __repr__(self) -> str:
        w = 0 if self.queries is None else self.queries.shape[2]
        m = None if self.attn_mass is None else self.attn_mass.shape[-1]
        return f"ObservedQueries(window={self.window}, held={w}, pending={self.num_pending}, mass_len={m})"
