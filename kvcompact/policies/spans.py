"""Explicit token ranges: what the agent layer uses to drop a message's tokens.

``SpansPolicy(drop=[(start, end), ...], keep=[...])``, ranges half-open in PHYSICAL positions,
shared by every head and batch row.

Two ways to use it:

* exact: :meth:`SpansPolicy.keep_idx` returns every position outside ``drop`` (no budget, no
  protection) -- "drop this tool output" as one ``layer.compact`` call;
* as a budget policy: dropped tokens are evicted first, then the oldest unprotected ones
  (score = position, ``-inf`` inside ``drop``); ``keep`` ranges, sinks and the recent window are
  protected.

Physical positions equal logical ones until a head-wise policy has evicted; after that the agent
layer must translate its spans per head before using this policy.
"""

from __future__ import annotations

import math

import torch

from kvcompact.policies.base import Policy, register_policy

__all__ = ["SpansPolicy"]


def _check_spans(name: str, spans) -> list[tuple[int, int]]:
    out = []
    for span in spans or ():
        try:
            start, end = (int(x) for x in span)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must hold (start, end) pairs of ints, got {span!r}") from None
        if start < 0 or end < start:
            raise ValueError(f"{name}: span {span!r} needs 0 <= start <= end")
        out.append((start, end))
    return out


def _mask(spans, length: int, device) -> torch.Tensor:
    m = torch.zeros(length, dtype=torch.bool, device=device)
    for start, end in spans:
        m[start:end] = True
    return m


@register_policy("spans")
class SpansPolicy(Policy):
    """Drop (and protect) explicit ranges of physical token positions.

    Parameters
    ----------
    drop : list of (start, end)
        Half-open ranges to evict.
    keep : list of (start, end)
        Half-open ranges always kept (budget mode).
    """

    def __init__(self, drop=(), keep=(), **kw):
        super().__init__(**kw)
        self.drop = _check_spans("drop", drop)
        self.keep = _check_spans("keep", keep)

    def keep_idx(self, length: int, batch: int = 1, heads: int = 1, device=None) -> torch.Tensor:
        """Exact mode: every position of ``[0, length)`` outside ``drop``, ``[batch, heads, K]`` int64."""
        keep = (~_mask(self.drop, length, device)).nonzero().squeeze(-1)
        return keep.expand(batch, heads, keep.numel()).contiguous()

    def score(self, layer_idx, keys, values, observed):
        b, h, t = keys.shape[:3]
        s = torch.arange(t, device=keys.device, dtype=torch.float32)
        s = s.masked_fill(_mask(self.drop, t, keys.device), -math.inf)
        return s.expand(b, h, t)

    def protected_mask(self, length, device):
        return _mask(self.keep, length, device) if self.keep else None

    def _params(self):
        return {"drop": self.drop, "keep": self.keep, **super()._params()}
