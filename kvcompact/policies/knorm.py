"""Key-norm eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
Cache Compression"): keys with a LOW L2 norm draw high attention, so they are kept.

Score = ``-||k||_2`` per (head, token), computed in fp32 on the (dequantized) keys. Needs no
hooks, works at prefill and decode alike, and costs one pass over the keys.
"""

from __future__ import annotations

from kvcompact.policies.base import Policy, register_policy

__all__ = ["KNormPolicy"]


@register_policy("knorm")
class KNormPolicy(Policy):
    """Keep the tokens whose keys have the smallest L2 norm (per KV head)."""

    def score(self, layer_idx, keys, values, observed):
        return -keys.float().norm(dim=-1)
