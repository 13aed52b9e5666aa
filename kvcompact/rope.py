"""The rotary embedding of a model, as the cache's key re-rotation needs it.

``rope_params(model)`` finds the model's ``inv_freq``, RoPE type and key layout once; span edits
(``KVCompactCache.drop_span(..., reposition=True)``, ``KVCompactCache.splice``) take the returned
:class:`RotaryParams`, and :func:`kvcompact.attach` uses :func:`rope_layout` / :func:`check_query_rope`.

What can be re-rotated. Moving a cached key from position ``p`` to ``p + delta`` by a rotation of
``delta * inv_freq`` (``ops.rope_shift_``) is exact only when the model rotates position ``p`` by
``p * inv_freq`` with one fixed ``inv_freq``:

* supported (:data:`STATIC_ROPE_TYPES`): ``default``, ``linear`` (``inv_freq / factor``),
  ``llama3`` and ``proportional`` (a fixed reshaped ``inv_freq``), ``yarn`` (a fixed reshaped
  ``inv_freq``; its attention factor multiplies cos and sin alike, i.e. scales the rotated key
  once, and a further rotation keeps that scale, so ``shift(rope(k, p), delta) == rope(k, p + delta)``);
* refused: ``dynamic`` (``inv_freq`` recomputed from the sequence length), ``longrope`` (short or
  long factors chosen by the sequence length), multimodal RoPE (``mrope_section``: each head's
  sections are rotated by different position axes), unknown types, and models with several
  distinct ``inv_freq`` (e.g. Gemma 3's local and global rotary: one ``inv_freq`` cannot serve
  both kinds of layer).

Layout. ``"neox"`` rotates pairs ``(i, i + R/2)`` (HF's ``rotate_half``), ``"gptj"`` interleaved
pairs ``(2i, 2i + 1)``. It is read from the model's own modeling module: its ``rotate_half`` is
probed on ``[0, 1, 2, 3]`` (neox gives ``[-2, -3, 0, 1]``, interleaved ``[-1, 0, -3, 2]``), which
is reliable across model families that copy the function under one name; modules without one
(GPT-J, CodeGen: ``rotate_every_two``) are interleaved.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

__all__ = ["RotaryParams", "rope_params", "rope_layout", "rope_types", "check_query_rope", "STATIC_ROPE_TYPES"]

# RoPE types whose rotation of position p is p * inv_freq with a fixed inv_freq (see module docstring).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")

_WHY_NOT = {
    "dynamic": "dynamic NTK scaling recomputes inv_freq from the sequence length, so keys rotated at "
    "one length cannot be moved with the frequencies of another",
    "longrope": "longrope switches between its short and long factors when the sequence passes "
    "original_max_position_embeddings, so the frequencies a key was rotated with depend on the length",
    "su": "su (longrope) switches between short and long factors with the sequence length",
    "mrope": "multimodal RoPE rotates each section of a head (mrope_section) by a different position "
    "axis (time, height, width); one position delta cannot express a move",
}

# model_type values without a module-level rotate_half that rotate interleaved pairs.
_GPTJ_MODEL_TYPES = ("gptj", "codegen", "chatglm")


@dataclass(frozen=True)
class RotaryParams:
    """The rotation a cached key received, as ``ops.rope_shift_`` needs it.

    Attributes
    ----------
    inv_freq : torch.Tensor
        ``[rotary_dim // 2]`` float32, detached: position ``p`` is rotated by ``p * inv_freq``.
    style : str
        Key layout, ``"neox"`` (rotate halves) or ``"gptj"`` (interleaved pairs).
    rope_type : str
        The config's RoPE type (one of :data:`STATIC_ROPE_TYPES`).
    """

    inv_freq: torch.Tensor
    style: str = "neox"
    rope_type: str = "default"


def _rope_dicts(model) -> list[dict]:
    """Every RoPE parameter dict of the model's config and text config (flat or per layer type)."""
    config = getattr(model, "config", model)
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text = get_text(decoder=True)
        if text is not config:
            configs.append(text)
    out = []
    for cfg in configs:
        # transformers 5.x: rope_parameters; 4.x: rope_scaling (None for plain RoPE).
        for attr in ("rope_parameters", "rope_scaling"):
            d = getattr(cfg, attr, None)
            if not isinstance(d, dict):
                continue
            nested = [v for v in d.values() if isinstance(v, dict)]
            if nested and not any(k in d for k in ("rope_type", "type", "rope_theta")):
                out.extend(nested)  # per layer type, e.g. {"full_attention": {...}, "sliding_attention": {...}}
            else:
                out.append(d)
    return out


def rope_types(model) -> list[str]:
    """The distinct RoPE types of the model's config, ``"mrope"`` for any ``mrope_section``.

    Parameters
    ----------
    model : transformers.PreTrainedModel or transformers.PretrainedConfig

    Returns
    -------
    list of str
        Sorted; ``["default"]`` for a config that names no type.
    """
    found = set()
    for d in _rope_dicts(model):
        kind = d.get("rope_type", d.get("type")) or "default"
        if d.get("mrope_section") is not None or kind == "mrope":
            kind = "mrope"
        found.add(str(kind))
    return sorted(found) or ["default"]


def _check_static(model, what: str) -> str:
    types = rope_types(model)
    for kind in types:
        if kind in STATIC_ROPE_TYPES:
            continue
        why = _WHY_NOT.get(kind)
        if why is None and "dynamic" in kind:
            why = _WHY_NOT["dynamic"]
        if why is None:
            why = f"it is not one of the types known to rotate position p by p * inv_freq {STATIC_ROPE_TYPES}"
        raise ValueError(f"{what}: the model's rope_type {kind!r} is not supported: {why}")
    moving = [t for t in types if t != "default"]
    return moving[0] if moving else "default"


def check_query_rope(model) -> None:
    """Raise ``ValueError`` where recomputing queries with the rotate-half formula would be wrong.

    :func:`kvcompact.attach` rotates queries with the ``(cos, sin)`` the model passes its attention,
    so any length-dependent scaling (dynamic, longrope) is followed; what it cannot reproduce is
    the interleaved layout and multimodal RoPE.
    """
    if "mrope" in rope_types(model):
        raise ValueError(f"attach: {_WHY_NOT['mrope']}, which attach's query recomputation does not implement")
    text = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    if getattr(text, "rope_interleave", False):
        raise ValueError("attach: the model permutes interleaved query dims before RoPE (rope_interleave=True), "
                         "which attach's query recomputation does not implement")
    layout = rope_layout(model)
    if layout != "neox":
        mt = getattr(getattr(model, "config", None), "model_type", "?")
        raise ValueError(f"attach: model_type {mt!r} rotates interleaved pairs (GPT-J layout); attach recomputes "
                         "queries only for the rotate-half (neox) layout")


def _rotary_modules(model) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """``(name, module, inv_freq)`` of every live ``inv_freq`` (``original_inv_freq`` copies excluded)."""
    out = []
    for path, module in model.named_modules():
        names = [n for n, _ in module.named_buffers(recurse=False)]
        if "inv_freq" not in names and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            names.append("inv_freq")  # a plain attribute rather than a buffer
        for n in names:
            if n.endswith("inv_freq") and not n.endswith("original_inv_freq"):
                out.append((f"{path}.{n}" if path else n, module, getattr(module, n)))
    return out


def _probe_rotate_half(fn) -> str | None:
    try:
        got = fn(torch.arange(4, dtype=torch.float32)).tolist()
    except Exception:  # an unexpected signature: fall back to the model_type table
        return None
    if got == [-2.0, -3.0, 0.0, 1.0]:
        return "neox"
    if got == [-1.0, 0.0, -3.0, 2.0]:
        return "gptj"
    return None


def rope_layout(model) -> str:
    """``"neox"`` or ``"gptj"``: how the model pairs the dims it rotates (see the module docstring).

    Raises
    ------
    ValueError
        When neither the modeling module nor the model type tells.
    """
    # Where RoPE is applied decides: the attention modules' file first (a rotary embedding class
    # may be imported from another model's file), then the model's, then the rotary module's.
    mods = [
        type(m).__module__
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))
    ]
    mods.append(type(model).__module__)
    mods.extend(type(module).__module__ for _, module, _ in _rotary_modules(model))
    for name in dict.fromkeys(mods):
        pymod = sys.modules.get(name)
        fn = getattr(pymod, "rotate_half", None)
        if callable(fn):
            layout = _probe_rotate_half(fn)
            if layout is not None:
                return layout
        if callable(getattr(pymod, "rotate_every_two", None)):
            return "gptj"
    mt = getattr(getattr(model, "config", None), "model_type", "")
    if mt in _GPTJ_MODEL_TYPES:
        return "gptj"
    raise ValueError(f"cannot tell the rotary layout of model_type {mt!r} (no rotate_half in its modeling module); "
                     "pass style='neox' or 'gptj'")


def rope_params(model, style: str | None = None) -> RotaryParams:
    """The model's rotary parameters, refusing RoPE that a key re-rotation cannot follow.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    style : {"neox", "gptj"}, optional
        Override the detected layout (:func:`rope_layout`).

    Returns
    -------
    RotaryParams
        ``inv_freq`` ``[rotary_dim // 2]`` float32 (detached, on the model's device), ``style``
        and ``rope_type``.

    Raises
    ------
    ValueError
        No ``inv_freq`` in the model; several distinct ones; a RoPE type outside
        :data:`STATIC_ROPE_TYPES` (dynamic, longrope, mrope...), naming it and why; a bad ``style``.
    """
    if style is not None and style not in ("neox", "gptj"):
        raise ValueError(f"style must be 'neox' or 'gptj', got {style!r}")
    rope_type = _check_static(model, "rope_params")
    found = _rotary_modules(model)
    if not found:
        raise ValueError("cannot find the model's rotary embedding (no module with an inv_freq buffer)")
    distinct = []
    for name, module, inv in found:
        inv = inv.detach().to(torch.float32)
        if not any(d.shape == inv.shape and torch.equal(d.to(inv.device), inv) for d, _ in distinct):
            distinct.append((inv, name))
    if len(distinct) > 1:
        raise ValueError(
            f"rope_params: the model has {len(distinct)} rotary embeddings with different inv_freq "
            f"({', '.join(n for _, n in distinct)}), e.g. local and global layers; a single re-rotation "
            "cannot serve them all"
        )
    return RotaryParams(distinct[0][0], style or rope_layout(model), rope_type)
