"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): keep the tokens the LATEST query
attends to most.

Score = softmax attention of the newest query onto every held key, averaged over the query heads
of each GQA group. TOVA proper evicts one token per step; here the same score is used at every
eviction, i.e. once per ``slack`` decode steps (and after a prefill, with the prompt's last query).
Needs :func:`kvcompact.attach` (query states).
"""

from __future__ import annotations

from kvcompact.policies.base import Policy, register_policy
from kvcompact.policies.observed import attention_probs

__all__ = ["TOVAPolicy"]


@register_policy("tova")
class TOVAPolicy(Policy):
    """Keep the tokens with the highest attention from the newest query (GQA group mean)."""

    observes = "window"
    window = 1

    def score(self, layer_idx, keys, values, observed):
        if observed is None or observed.queries is None:
            raise RuntimeError("tova: no query states observed for this layer; run the model inside kvcompact.attach")
        q = observed.queries[:, :, -1:]
        return attention_probs(q, keys, observed.scaling)[:, :, :, 0].mean(dim=2)
