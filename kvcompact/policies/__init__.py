"""Token eviction policies: score tokens per (layer, KV head), keep the best ``budget``.

Policies (by name with :func:`get_policy`, or as objects): ``streaming``, ``knorm``, ``snapkv``,
``h2o``, ``tova``, ``random``, ``spans``; any kvpress scorer press through :class:`KVPressPolicy`.
Query-aware ones (snapkv, h2o, tova) need :func:`attach`. See ``docs/policies.md``.
"""

from kvcompact.policies.base import (
    DEFAULT_RECENT,
    DEFAULT_SINKS,
    Policy,
    available_policies,
    budget_for_layer,
    get_policy,
    layer_keys,
    register_policy,
    select_keep_idx,
)
from kvcompact.policies.observed import ObservedQueries, accumulate_attention, attention_probs
from kvcompact.policies.streaming import StreamingPolicy
from kvcompact.policies.knorm import KNormPolicy
from kvcompact.policies.snapkv import SnapKVPolicy
from kvcompact.policies.h2o import H2OPolicy
from kvcompact.policies.tova import TOVAPolicy
from kvcompact.policies.random import RandomPolicy
from kvcompact.policies.spans import SpansPolicy
from kvcompact.policies.press import KVPressPolicy
from kvcompact.policies.attach import attach, attention_modules, query_states

__all__ = [
    "Policy",
    "ObservedQueries",
    "select_keep_idx",
    "budget_for_layer",
    "get_policy",
    "register_policy",
    "available_policies",
    "layer_keys",
    "attention_probs",
    "accumulate_attention",
    "attach",
    "attention_modules",
    "query_states",
    "StreamingPolicy",
    "KNormPolicy",
    "SnapKVPolicy",
    "H2OPolicy",
    "TOVAPolicy",
    "RandomPolicy",
    "SpansPolicy",
    "KVPressPolicy",
    "DEFAULT_SINKS",
    "DEFAULT_RECENT",
]
