"""StreamingLLM (Xiao et al. 2023): attention sinks plus the most recent tokens.

Score = physical position (newer = higher), so with the shared selection the layer keeps its
first ``sinks`` tokens and the newest ``budget - sinks``. Needs no hooks.
"""

from __future__ import annotations

import torch

from kvcompact.policies.base import DEFAULT_SINKS, Policy, register_policy

__all__ = ["StreamingPolicy"]


@register_policy("streaming")
class StreamingPolicy(Policy):
    """Keep ``sinks`` attention-sink tokens and the newest ``budget - sinks``.

    ``recent`` defaults to 0 here: the score already is recency, so no extra protection is needed.
    """

    def __init__(self, *, sinks: int = DEFAULT_SINKS, recent: int = 0, **kw):
        super().__init__(sinks=sinks, recent=recent, **kw)

    def score(self, layer_idx, keys, values, observed):
        b, h, t = keys.shape[:3]
        return torch.arange(t, device=keys.device, dtype=torch.float32).expand(b, h, t)
