"""``kvcompact.attach(model, cache)``: capture the query states that query-aware policies score with.

How. A forward *pre*-hook on every attention module (transformers' Llama/Qwen2/Qwen3/Mistral/Phi3
family: ``q_proj`` or fused ``qkv_proj``, ``layer_idx``, and ``position_embeddings=(cos, sin)``
passed to the attention forward, as in 4.57 ... 5.24) recomputes ``q = RoPE(q_proj(h))`` -- with
``q_norm`` where the model has one and partial rotary where ``cos`` is narrower than ``head_dim`` --
and hands it to the layer's :class:`ObservedQueries`. The hook runs *before* the attention forward,
hence before ``cache.update``, which is where a budgeted cache evicts: the queries of the very
chunk being appended are available to that eviction (SnapKV at prefill needs exactly that). It
does not depend on the attention implementation (sdpa, eager, flash...), and costs one extra
``q_proj`` over the newest ``window`` tokens (every token for h2o).

Which forwards. Only those whose attention receives ``cache`` itself: transformers passes it as
``cache=`` from 5.24 on and as ``past_key_values=`` before (either keyword, or the fourth
positional argument), read with :func:`kvcompact.cache.compat.cache_from_kwargs`. A forward with
another cache, or none, appends nothing to ``cache``; observing it would misalign the queries with
the cached tokens.

RoPE. The ``(cos, sin)`` are the ones the model hands its attention, so length-dependent scaling
(dynamic, longrope) is followed as the model computes it. Models that rotate interleaved pairs
(GPT-J layout: Cohere, GLM...) or use multimodal RoPE (``mrope_section``) are refused with a
``ValueError`` when ``attach`` is entered (:func:`kvcompact.rope.check_query_rope`).

Coupling to the cache: ONE attribute. The hook writes ``cache.observed[layer_idx]``
(a ``dict[int, ObservedQueries]``, created if absent); the cache passes
``observed=self.observed.get(layer_idx)`` to ``policy.keep_indices``. Cache-only policies
(streaming, knorm, random, spans) install no hook.
"""

from __future__ import annotations

import contextlib

import torch

from kvcompact.policies.base import get_policy
from kvcompact.policies.observed import ObservedQueries
from kvcompact.rope import check_query_rope

__all__ = ["attach", "attention_modules", "query_states"]

# Accumulating (h2o) layers the cache never evicts (no budget) fold their queries into the mass
# once this many are pending, so the pending queries never outgrow a bounded buffer.
MAX_PENDING = 512


def attention_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """``(layer_idx, module)`` of every self-attention module whose queries ``attach`` can recompute."""
    found = []
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and (hasattr(module, "q_proj") or hasattr(module, "qkv_proj")) and hasattr(
            module, "head_dim"
        ):
            found.append((idx, module))
    return found


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def query_states(module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The attention module's query states ``[B, H_q, Q, D]``, RoPE applied, as its forward computes them.

    Parameters
    ----------
    module : torch.nn.Module
        A Llama-family attention module.
    hidden_states : torch.Tensor
        ``[B, Q, hidden]`` the attention input (after the layer's input norm).
    position_embeddings : tuple of torch.Tensor
        ``(cos, sin)`` ``[B, Q, rotary_dim]`` (or ``[1, Q, rotary_dim]``) for these ``Q`` tokens,
        neox rotate-half layout (interleaved models are refused by :func:`attach`).
    """
    d = module.head_dim
    if hasattr(module, "q_proj"):
        q = module.q_proj(hidden_states)
    else:  # fused projection (Phi3): queries come first
        q = module.qkv_proj(hidden_states)[..., : module.config.num_attention_heads * d]
    q = q.view(*hidden_states.shape[:-1], -1, d)
    if getattr(module, "q_norm", None) is not None:  # Qwen3, OLMo2-style per-head norm, before RoPE
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    if cos.dim() != 3 or cos.shape[-1] > d or cos.shape[-1] % 2:
        raise ValueError(
            f"position_embeddings: expected (cos, sin) of shape [B, Q, rotary_dim <= {d}], got {tuple(cos.shape)} "
            f"from {type(module).__name__}"
        )
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    q_rot = (q_rot * cos) + (_rotate_half(q_rot) * sin)
    return q_rot if rot == d else torch.cat([q_rot, q_pass], dim=-1)


def _arg(args, kwargs, name, pos):
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


# Positional index of the cache in the attention forward: (hidden_states, position_embeddings,
# attention_mask, past_key_values / cache) on every supported version.
_CACHE_POS = 3


def _forward_cache(args, kwargs):
    """The cache an attention forward was handed (any keyword this version uses, or positional)."""
    from kvcompact.cache.compat import cache_from_kwargs  # lazy: kvcompact.cache imports the policies

    found = cache_from_kwargs(kwargs)
    if found is None and len(args) > _CACHE_POS:
        found = args[_CACHE_POS]
    return found


@contextlib.contextmanager
def attach(model, cache, policy=None, attention=None):
    """Capture query states for ``cache``'s policy, and read decode attention straight from ``cache``'s
    storage, while the block runs.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A Llama-family decoder (sdpa, eager or any other attention implementation).
    cache : KVCompactCache
        The cache the forward passes use; forwards with another cache (or none) are not observed.
    policy : str or Policy, optional
        The policy whose needs decide what is captured; default ``cache.policy``.
    attention : bool, optional
        Route the attention of short chunks (decode steps, up to 32 tokens) through
        :func:`kvcompact.ops.decode_attention`, which reads 8-bit codes in place instead of
        dequantizing the layer into a workspace (see :mod:`kvcompact.cache.attention`). Default:
        on for a quantized ``KVCompactCache`` (``kv_dtype`` set), off otherwise (lossless layers
        already hand attention views of their buffers). Needs ``attn_implementation`` "sdpa" or
        "eager"; with ``True`` anything else raises ``ValueError``.

    Yields
    ------
    dict[int, ObservedQueries]
        ``cache.observed`` (empty, and no hook installed, for cache-only policies).

    Raises
    ------
    ValueError
        For a query-aware policy on a model whose queries the hook cannot recompute: no suitable
        attention module, interleaved (GPT-J) RoPE layout, or multimodal RoPE.

    Example
    -------
    >>> from kvcompact.cache.compat import cache_kwargs
    >>> cache = KVCompactCache(model.config, budget=256, policy="snapkv")
    >>> with kvcompact.attach(model, cache):
    ...     out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=300)

    ``cache_kwargs(cache)`` is ``{"cache": cache}`` on transformers >= 5.24 (where
    ``past_key_values=`` is deprecated) and ``{"past_key_values": cache}`` before.
    """
    policy = getattr(cache, "policy", None) if policy is None else policy
    policy = get_policy("streaming" if policy is None else policy)
    observed = getattr(cache, "observed", None)
    if observed is None:
        observed = {}
        cache.observed = observed
    with contextlib.ExitStack() as stack:
        if _wants_attention_route(model, cache, attention):
            from kvcompact.cache.attention import route

            stack.enter_context(route(model, cache))
        if policy.observes is not None:
            stack.enter_context(_capture_queries(model, cache, policy, observed))
        yield observed


def _wants_attention_route(model, cache, attention) -> bool:
    if attention is not None and not isinstance(attention, bool):
        raise ValueError(f"attach: `attention` must be None, True or False; got {attention!r}")
    if not hasattr(cache, "_attention_route"):  # not a KVCompactCache
        if attention:
            raise ValueError(f"attach(attention=True) needs a KVCompactCache, got {type(cache).__name__}")
        return False
    if attention is None:
        from kvcompact.cache.attention import can_route

        return getattr(cache, "kv_dtype", None) is not None and can_route(model) is None
    return attention


@contextlib.contextmanager
def _capture_queries(model, cache, policy, observed):
    """The forward hooks that hand query states to ``observed`` (query-aware policies)."""

    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"attach: no attention module with q_proj/qkv_proj, head_dim and layer_idx in {type(model).__name__}"
        )
    check_query_rope(model)
    accumulate = policy.observes == "all"
    window = max(int(policy.window), 1)
    handles = []

    def capture(module, args, kwargs):
        if _forward_cache(args, kwargs) is not cache:
            return
        hidden = _arg(args, kwargs, "hidden_states", 0)
        pe = _arg(args, kwargs, "position_embeddings", 1)
        if pe is None:
            raise RuntimeError(
                f"attach: {type(module).__name__} received no position_embeddings=(cos, sin); "
                "query-aware policies need a RoPE model on transformers >= 4.57"
            )
        obs = observed.get(module.layer_idx)
        if obs is None:
            obs = observed[module.layer_idx] = ObservedQueries(
                window,
                accumulate=accumulate,
                scaling=getattr(module, "scaling", None),
                keep_hidden=policy.observes_hidden,
            )
        if not accumulate:  # only the newest `window` queries are kept: project only those
            hidden = hidden[:, -window:]
            pe = (pe[0][..., -window:, :], pe[1][..., -window:, :])
        with torch.no_grad():
            q = query_states(module, hidden, pe)
        obs.observe(q, hidden_states=hidden, position_embeddings=pe, module=module)

    def fold_if_idle(module, args, kwargs, output):
        if _forward_cache(args, kwargs) is not cache:
            return
        obs = observed.get(module.layer_idx)
        if obs is None or obs.num_pending < MAX_PENDING:
            return
        layers = getattr(cache, "layers", None)
        layer = layers[module.layer_idx] if layers is not None and module.layer_idx < len(layers) else None
        if layer is None or getattr(layer, "is_sliding", False):
            obs.pending = None  # never evicted by budget: nothing will read the mass
            return
        from kvcompact.policies.base import layer_keys

        with torch.no_grad():
            obs.fold(layer_keys(layer)[0])

    try:
        for _, module in modules:
            handles.append(module.register_forward_pre_hook(capture, with_kwargs=True))
            if accumulate:
                handles.append(module.register_forward_hook(fold_if_idle, with_kwargs=True))
        yield observed
    finally:
        for h in handles:
            h.remove()
