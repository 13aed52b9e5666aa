"""The rotary embedding of a model, as the cache's key re-rotation needs it.

``rope_params(model)`` finds the model's ``inv_freq`` and key layout once; span edits
(``KVCompactCache.drop_span(..., reposition=True)``, ``KVCompactCache.splice``) and the
query-aware policies' hooks take the returned :class:`RotaryParams`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RotaryParams", "rope_params"]

# model_type values whose attention rotates interleaved pairs (GPT-J layout) rather than halves.
_GPTJ_LAYOUT = ("gptj", "codegen", "cohere", "cohere2", "chatglm", "glm")


@dataclass(frozen=True)
class RotaryParams:
    """``inv_freq`` ``[rotary_dim // 2]`` fp32 and the key layout (``"neox"`` or ``"gptj"``)."""

    inv_freq: torch.Tensor
    style: str = "neox"


def rope_params(model, style: str | None = None) -> RotaryParams:
    """The model's rotary parameters (the first ``inv_freq`` buffer found).

    HF's Llama-family models rotate halves (``"neox"``); GPT-J-style models interleave pairs.
    """
    inv = None
    for module in model.modules():
        cand = getattr(module, "inv_freq", None)
        if isinstance(cand, torch.Tensor):
            inv = cand
            break
    if inv is None:
        raise ValueError("cannot find the model's rotary embedding (no module with an inv_freq buffer)")
    if style is None:
        style = "gptj" if getattr(model.config, "model_type", "") in _GPTJ_LAYOUT else "neox"
    return RotaryParams(inv.detach().to(torch.float32), style)
