"""StreamingLLM (Xiao et al. 2023): attention sinks plus the most recent tokens.

The one implementation of the rule in kvcompact: ``KVCompactCache`` uses it when a budget comes
without a policy, and ``get_policy("streaming")`` returns it. Its score is the physical position
(newer = higher), so the shared selection keeps the first ``sinks`` tokens and the newest
``budget - sinks``; :meth:`StreamingPolicy.select` builds exactly that ``keep_idx`` directly
(no scores, no top-k), since the answer does not depend on the tokens. Needs no hooks.
"""

from __future__ import annotations

import torch

from kvcompact.policies.base import DEFAULT_SINKS, Policy, _check_budget, register_policy

__all__ = ["StreamingPolicy", "streaming_keep_idx"]


def streaming_keep_idx(batch: int, heads: int, length: int, budget: int, device, sinks: int = DEFAULT_SINKS,
                       recent: int = 0) -> torch.Tensor:
    """Physical positions to keep: ``[0, sinks)`` and ``[length - (budget - sinks), length)``.

    Parameters
    ----------
    batch, heads : int
        Leading dims of the layer's buffers.
    length : int
        Physical tokens held.
    budget : int
        Tokens to keep, ``> sinks``; ``length <= budget`` keeps everything.
    recent : int
        Accepted for the shared selection's signature; the newest tokens are kept anyway.

    Returns
    -------
    torch.Tensor
        ``keep_idx`` ``[batch, heads, min(budget, length)]`` int64 on ``device``, strictly
        increasing per row.
    """
    if length <= budget:
        row = torch.arange(length, device=device)
    else:
        row = torch.cat([torch.arange(sinks, device=device),
                         torch.arange(length - (budget - sinks), length, device=device)])
    return row.expand(batch, heads, row.numel()).contiguous()


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

    def select(self, keys, values, budget, *, layer_idx=None, observed=None):
        """The same ``keep_idx`` as scoring by position and the shared selection, built directly."""
        _check_budget(budget, self.sinks, self.recent)
        b, h, t = keys.shape[:3]
        return streaming_keep_idx(b, h, t, budget, keys.device, sinks=self.sinks)
