"""H2O (Zhang et al. 2023, "Heavy-Hitter Oracle"): keep the tokens with the largest attention mass
accumulated over every query seen so far, plus the recent window.

Score = ``ObservedQueries.attn_mass``: for each held token, the sum over all observed queries
(prompt and generated) and over the GQA group of the softmax attention it received. The mass is
kept per physical position and compacted with the layer (``ObservedQueries.compact``); queries
arriving between evictions are folded in at the next eviction against exactly the keys they saw
(see ``ObservedQueries.fold``). Older tokens have been seen by more queries, which is why the
recent window must be protected (``recent``). Needs :func:`kvcompact.attach`.
"""

from __future__ import annotations

from kvcompact.policies.base import Policy, register_policy

__all__ = ["H2OPolicy"]


@register_policy("h2o")
class H2OPolicy(Policy):
    """Keep heavy hitters (accumulated attention) and the recent window."""

    observes = "all"
    window = 1

    def score(self, layer_idx, keys, values, observed):
        if observed is None or not observed.accumulate:
            raise RuntimeError("h2o: no accumulated attention for this layer; run the model inside kvcompact.attach")
        observed.fold(keys)
        return observed.attn_mass
