"""Bridge to NVIDIA kvpress: any of its scorer presses as a kvcompact policy.

kvpress compresses at prefill only, with ``topk`` + ``gather`` into new tensors; here its
``score(module, hidden_states, keys, values, attentions, kwargs) -> [B, H_kv, T]`` feeds the shared
selection, so the press evicts per head for real, at prefill and at decode.

``hidden_states`` and ``kwargs["position_embeddings"]`` are those of the newest ``window``
tokens, captured by :func:`kvcompact.attach`; presses that only read keys (knorm, random...) need
no hooks at all. ``attentions`` is None (sdpa does not produce them): presses that need eager
attention weights are not supported. kvpress pins transformers < 5.3, so this bridge is exercised
only where it imports.
"""

from __future__ import annotations

from kvcompact.policies.base import Policy, _check_int

__all__ = ["KVPressPolicy"]

# Presses whose score reads only keys/values: no hooks needed.
_CACHE_ONLY = {"KnormPress", "RandomPress", "StreamingLLMPress"}


class KVPressPolicy(Policy):
    """Use a kvpress ``ScorerPress``'s ``score`` as this policy's score."""

    name = "kvpress"
    observes_hidden = True
    needs_values = True

    def __init__(self, press, *, window: int = 64, **kw):
        if not hasattr(press, "score"):
            raise ValueError(f"press must be a kvpress ScorerPress (with .score), got {press!r}")
        super().__init__(**kw)
        self.press = press
        self.window = _check_int("window", window, 1)
        self.observes = None if type(press).__name__ in _CACHE_ONLY else "window"

    def score(self, layer_idx, keys, values, observed):
        module = hidden = None
        kwargs = {}
        if observed is not None:
            module, hidden = observed.module, observed.hidden_states
            if observed.position_embeddings is not None:
                kwargs["position_embeddings"] = observed.position_embeddings
        if hidden is None:  # cache-only presses read only the shape of hidden_states
            b, _, t, d = keys.shape
            hidden = keys.new_zeros(b, t, d)
        return self.press.score(module, hidden, keys, values, None, kwargs).float()

    def __repr__(self):
        return f"KVPressPolicy({self.press!r}, sinks={self.sinks}, recent={self.recent})"
