"""Bridge to NVIDIA kvpress: any of its scorer presses as a kvcompact policy.

kvpress compresses at prefill only, with ``topk`` + ``gather`` into new tensors; here its
``score(module, hidden_states, keys, values, attentions, kwargs) -> [B, H_kv, T]`` feeds the shared
selection, so the press evicts per head for real, at prefill and at decode.

``hidden_states`` and ``kwargs["position_embeddings"]`` are those of the newest ``window``
tokens, captured by :func:`kvcompact.attach`; presses that only read keys (knorm, random...) need
no hooks at all. ``attentions`` is None (sdpa does not produce them): presses that need eager
attention weights are not supported.

Window. A press with an observation window (``window_size``: SnapKV, 64 by default) asserts
``hidden_states.shape[1] > window_size`` -- it scores the keys before its window and pads the
window itself -- so the bridge captures ``window_size + 1`` tokens unless told otherwise, and a
smaller ``window`` is refused. An eviction before that many tokens were observed since the last
crop raises a ``RuntimeError`` saying so (kvpress itself would stop on its assertion).

kvpress pins transformers < 5.3, so its own presses are exercised only where it imports; the
tests mirror its SnapKVPress.
"""

from __future__ import annotations

from kvcompact.policies.base import Policy, _check_int

__all__ = ["KVPressPolicy"]

# Presses whose score reads only keys/values: no hooks needed.
_CACHE_ONLY = {"KnormPress", "RandomPress", "StreamingLLMPress"}

# Tokens captured for presses without an observation window of their own.
DEFAULT_WINDOW = 64


def _press_window(press) -> int | None:
    """The press's observation window (``window_size``) if it has one."""
    w = getattr(press, "window_size", None)
    return w if isinstance(w, int) and not isinstance(w, bool) else None


class KVPressPolicy(Policy):
    """Use a kvpress ``ScorerPress``'s ``score`` as this policy's score."""

    name = "kvpress"
    observes_hidden = True
    needs_values = True

    def __init__(self, press, *, window: int | None = None, **kw):
        """
        Parameters
        ----------
        press : kvpress ScorerPress
            Anything with ``score(module, hidden_states, keys, values, attentions, kwargs)``.
        window : int, optional
            Newest tokens whose hidden states and RoPE tables are captured for the press. Default:
            ``press.window_size + 1`` for a press with an observation window, else 64. Must exceed
            ``press.window_size`` where the press has one.
        **kw
            ``sinks``, ``recent``, ``schedule``, ``beta`` (see :class:`Policy`).
        """
        if not hasattr(press, "score"):
            raise ValueError(f"press must be a kvpress ScorerPress (with .score), got {press!r}")
        super().__init__(**kw)
        self.press = press
        need = _press_window(press)
        if window is None:
            window = DEFAULT_WINDOW if need is None else need + 1
        self.window = _check_int("window", window, 1)
        if need is not None and self.window <= need:
            raise ValueError(
                f"window={window} must exceed the press's window_size={need}: {type(press).__name__} scores the keys "
                f"before its window from more than window_size hidden states (default window: {need + 1})"
            )
        self.observes = None if type(press).__name__ in _CACHE_ONLY else "window"

    def score(self, layer_idx, keys, values, observed):
        module = hidden = None
        kwargs = {}
        if observed is not None:
            module, hidden = observed.module, observed.hidden_states
            if observed.position_embeddings is not None:
                kwargs["position_embeddings"] = observed.position_embeddings
        if self.observes is not None:
            need = _press_window(self.press)
            have = 0 if hidden is None else hidden.shape[1]
            if hidden is None or (need is not None and have <= need):
                wants = "some" if need is None else f"more than its window_size={need}"
                raise RuntimeError(
                    f"{type(self.press).__name__} (layer {layer_idx}): {have} tokens' hidden states observed, the "
                    f"press needs {wants}; evict only after that many tokens went through kvcompact.attach "
                    "(since the cache's last crop)"
                )
        if hidden is None:  # cache-only presses read only the shape of hidden_states
            b, _, t, d = keys.shape
            hidden = keys.new_zeros(b, t, d)
        return self.press.score(module, hidden, keys, values, None, kwargs).float()

    def __repr__(self):
        return f"KVPressPolicy({self.press!r}, sinks={self.sinks}, recent={self.recent})"
