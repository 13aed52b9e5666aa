"""Decode attention read straight from kvcompact storage, routed through transformers' attention API.

Without this, every forward of a quantized :class:`~kvcompact.cache.KVCompactCache` dequantizes the
whole layer into a workspace that attention then reads again (about 2.5x the bytes of a dense cache
per step). Inside ``kvcompact.attach(model, cache)`` the cache instead appends a short chunk (a
decode step, assisted-decoding candidates: at most ``MAX_DEFERRED_QUERIES`` tokens) and hands the
model back the chunk's own K/V; the model's attention call then lands in :func:`attention_forward`,
which finds the layer's pending step and runs :func:`kvcompact.ops.decode_attention` over the
storage segments (8-bit codes read in place, the newest rows exact), merged by log-sum-exp.

How the call gets here. transformers' attention modules look their attention function up by
``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` at every forward. :func:`route`
registers ``"kvcompact:<name>"`` for the model's current implementation ``<name>`` (``sdpa`` or
``eager``), with that implementation's mask function in ``ALL_MASK_ATTENTION_FUNCTIONS`` so masks
are built exactly as before, and sets the config to it while the block runs. A call that has no
pending step of this cache (a prefill, a step that evicts, a padded batch, another cache's
forward) goes to the original implementation unchanged.
"""

from __future__ import annotations

import contextlib
import sys
import weakref

import torch

__all__ = ["route", "attention_forward", "SUPPORTED_IMPLEMENTATIONS"]

# Implementations whose masks and outputs the fallback reproduces exactly.
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "kvcompact:"
# Attribute set on each attention module while routed: a weak reference to the cache.
_CACHE_ATTR = "_kvcompact_routed_cache"


def _original_forward(module, name: str):
    """The attention function ``name`` resolves to for ``module`` (eager is the modeling file's own)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if name == "eager":
        if eager is None:
            raise RuntimeError(f"kvcompact attention: {type(module).__name__}'s module has no eager_attention_forward")
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def attention_forward(original: str):
    """The attention function registered as ``"kvcompact:<original>"``."""

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, softcap=None,
                **kwargs):
        ref = getattr(module, _CACHE_ATTR, None)
        cache = ref() if ref is not None else None
        result = None
        if cache is not None and isinstance(getattr(module, "layer_idx", None), int):
            layer = cache.layers[module.layer_idx]
            attend = getattr(layer, "attend_pending", None)
            if attend is not None and layer._pending is not None and layer._pending[0] is key:
                _check_supported(module, dropout, kwargs)
                scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
                result = attend(query, key, float(scale), softcap)
        if result is None:
            fn = _original_forward(module, original)
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap,
                      **kwargs)
        out, _ = result
        # [B, Hq, Q, D] fp32 -> [B, Q, Hq, D] in the model's dtype, as sdpa/eager return it.
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    forward.__name__ = f"kvcompact_attention_{original}"
    return forward


def _check_supported(module, dropout, kwargs) -> None:
    """Refuse (loudly) what the storage read does not implement, before computing anything."""
    if dropout:
        raise ValueError(f"kvcompact attention: dropout={dropout} is not supported (use model.eval())")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError(f"kvcompact attention: attention sinks ({type(module).__name__}) are not supported")
    if kwargs.get("output_attentions"):
        raise ValueError("kvcompact attention: output_attentions=True is not supported; use attach(..., attention=False)")


def _register(original: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(name, attention_forward(original))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _layer_modules(model) -> list:
    """Modules with an integer ``layer_idx`` (the attention modules of transformers' decoders)."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def can_route(model, modules: list | None = None) -> str | None:
    """Why ``model`` cannot be routed (a sentence), or None when it can. ``modules``: its
    :func:`_layer_modules`, when the caller already has them."""
    current = getattr(model.config, "_attn_implementation", None)
    if current is not None and current.startswith(_PREFIX):
        return None  # already routed by an enclosing attach
    if current not in SUPPORTED_IMPLEMENTATIONS:
        return f"attn_implementation {current!r} (supported: {', '.join(SUPPORTED_IMPLEMENTATIONS)})"
    if not (_layer_modules(model) if modules is None else modules):
        return f"no attention module with a layer_idx in {type(model).__name__}"
    return None


@contextlib.contextmanager
def route(model, cache):
    """Route ``model``'s attention for ``cache``'s short chunks through ``decode_attention`` while the
    block runs (see the module docstring). Raises ``ValueError`` naming why a model cannot be routed."""
    modules = _layer_modules(model)  # one walk of the model per block (a Session enters one per forward)
    why = can_route(model, modules)
    if why is not None:
        raise ValueError(f"kvcompact.attach(attention=True): cannot route {type(model).__name__}: {why}")
    config = model.config
    original = config._attn_implementation
    nested = original.startswith(_PREFIX)
    if not nested:
        config._attn_implementation = _register(original)
    previous = [getattr(m, _CACHE_ATTR, None) for m in modules]
    was_routed = cache._attention_route
    ref = weakref.ref(cache)
    for m in modules:
        setattr(m, _CACHE_ATTR, ref)
    cache._attention_route = True
    try:
        yield
    finally:
        cache._attention_route = was_routed
        for m, prev in zip(modules, previous):
            if prev is None:
                delattr(m, _CACHE_ATTR)
            else:
                setattr(m, _CACHE_ATTR, prev)
        for layer in cache.layers:  # a step left pending by a forward that raised is moot
            if hasattr(layer, "_pending"):
                layer._pending = None
        if not nested:
            config._attn_implementation = original
