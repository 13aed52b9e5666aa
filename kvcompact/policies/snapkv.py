"""SnapKV (Li et al. 2024): the attention that an observation window of the newest queries pays to
the earlier tokens predicts what generation will need.

Score, per KV head:

1. ``A = softmax(q_w k^T * scaling)`` for the newest ``w = window`` queries (RoPE applied, causal),
   ``[B, H_q, w, T]``;
2. ``s = sum over the w queries`` of ``A`` -> ``[B, H_q, T]``;
3. on the prefix ``[0, T - w)`` only, 1-D pooling along tokens (``pooling="max"`` or ``"avg"``,
   kernel ``pool``, stride 1, same length) so that neighbours of a hit are kept together -- the
   pooling that lets SnapKV keep whole phrases rather than isolated tokens;
4. mean over the query heads of each GQA group -> ``[B, H_kv, T]``.

The window itself keeps its raw scores and is protected by ``recent`` (default ``window``), as in
SnapKV. At decode the window is the newest ``window`` generated/prompt queries, so the same rule
applies at every eviction. Needs :func:`kvcompact.attach`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcompact.policies.base import Policy, _check_int, register_policy
from kvcompact.policies.observed import attention_probs

__all__ = ["SnapKVPolicy"]

POOLINGS = ("max", "avg")


@register_policy("snapkv")
class SnapKVPolicy(Policy):
    """Keep what an observation window of recent queries attends to (pooled, GQA-averaged)."""

    observes = "window"

    def __init__(self, *, window: int = 32, pool: int = 7, pooling: str = "max", recent: int | None = None, **kw):
        self.window = _check_int("window", window, 1)
        self.pool = _check_int("pool", pool, 1)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        super().__init__(recent=self.window if recent is None else recent, **kw)

    def score(self, layer_idx, keys, values, observed):
        if observed is None or observed.queries is None:
            raise RuntimeError("snapkv: no query states observed for this layer; run the model inside kvcompact.attach")
        b, hkv, t = keys.shape[:3]
        q = observed.queries[:, :, -min(self.window, t) :]
        w = q.shape[2]
        probs = attention_probs(q, keys, observed.scaling)  # [B, Hkv, G, w, T]
        g = probs.shape[2]
        s = probs.sum(dim=3).reshape(b * hkv * g, 1, t)  # per query head
        prefix = s[..., : t - w]
        if self.pool > 1 and prefix.shape[-1]:
            pad = self.pool // 2
            if self.pooling == "max":
                pooled = F.max_pool1d(prefix, self.pool, stride=1, padding=pad)
            else:
                pooled = F.avg_pool1d(prefix, self.pool, stride=1, padding=pad)
            prefix = pooled[..., : t - w]
        s = torch.cat([prefix, s[..., t - w :]], dim=-1)
        return s.reshape(b, hkv, g, t).mean(dim=2)

    def _params(self):
        return {"window": self.window, "pool": self.pool, "pooling": self.pooling, **super()._params()}
