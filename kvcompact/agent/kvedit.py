"""Span edits on a ``KVCompactCache``: evict a token range, re-rotate keys, splice new tokens in.

These are the cache-side halves of :meth:`Session.drop` and :meth:`Session.replace`. Every edit
applies to all attention layers identically (a message's span is the same token range in every
layer and head), runs in place on the preallocated buffers with the kvcompact kernels, and leaves
the layer's length bookkeeping consistent (``KVCompactLayer.set_lengths``):

* :func:`evict_span` -- ``compact_`` with one ``keep_idx`` that skips ``[start, end)``; the logical
  length (the next token's position) is unchanged, so later tokens keep their positions and a gap
  of ``end - start`` positions remains.
* :func:`shift_keys` -- ``rope_shift_`` (or ``rope_shift_quantized_`` for 8-bit storage) of the
  keys at rows ``[start, end)`` by ``delta`` positions. RoPE rotations compose (rotating by ``p``
  then ``delta`` equals rotating by ``p + delta``), so a gap closes without recomputing anything;
  values carry no position and are never touched.
* :func:`splice` -- replace rows ``[start, end)`` by the KV of new tokens computed by the model
  against the tokens before ``start`` only (``move_`` opens or closes the gap, the forward writes
  the new rows, the tail's keys are re-rotated by the length change).

Only full-attention layers without a token budget can be span-edited (a budget evicts per head,
after which a "token range" no longer means the same tokens in every head).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from kvcompact import ops
from kvcompact.cache.layer import KVCompactLayer

__all__ = ["attention_layers", "check_editable", "rope_params", "evict_span", "shift_keys", "splice",
           "logical_length", "physical_length"]


def attention_layers(cache) -> list[KVCompactLayer]:
    return [layer for layer in cache.layers if isinstance(layer, KVCompactLayer)]


def check_editable(cache) -> None:
    """Raise ``ValueError`` unless every layer of ``cache`` can be span-edited."""
    if getattr(cache, "budget", None) is not None:
        raise ValueError(
            f"Session needs a cache without a token budget (got budget={cache.budget}): a budget evicts tokens "
            "per head, after which a message no longer occupies one token range in every head; use drop() / "
            "compact_messages for memory instead")
    layers = attention_layers(cache)
    if not layers or len(layers) != len(cache.layers) or any(layer.is_sliding for layer in layers):
        raise ValueError("Session needs a KVCompactCache whose layers are all full attention "
                         "(sliding-window layers cannot hold arbitrary message spans)")


def rope_params(model, style: str | None = None) -> tuple[torch.Tensor, str]:
    """``(inv_freq, style)`` of the model's rotary embedding (the first ``inv_freq`` buffer found).

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
        mt = getattr(model.config, "model_type", "")
        style = "gptj" if mt in ("gptj", "codegen", "cohere", "cohere2", "chatglm", "glm") else "neox"
    return inv.detach().to(torch.float32), style


def physical_length(cache) -> int:
    layers = attention_layers(cache)
    return layers[0].physical_len if layers and layers[0].is_initialized else 0


def logical_length(cache) -> int:
    return cache.get_seq_length()


def evict_span(cache, start: int, end: int) -> None:
    """Remove physical rows ``[start, end)`` from every layer (``compact_``); logical length kept."""
    for layer in attention_layers(cache):
        if not layer.is_initialized:
            continue
        store = layer.storage
        n = store.length
        if not 0 <= start <= end <= n:
            raise ValueError(f"evict_span: [{start}, {end}) is outside the {n} cached tokens")
        keep = torch.cat([torch.arange(0, start), torch.arange(end, n)]).to(layer.device)
        keep = keep.view(1, 1, -1).expand(store.batch, store.heads, -1).contiguous()
        tail = n - end
        ops.compact_(store.token_tensors(), keep, validate=False)
        layer.set_lengths(physical=n - (end - start), logical=layer.logical_len, tail_contiguous=tail)


def shift_keys(cache, start: int, end: int, delta: int, inv_freq: torch.Tensor, style: str) -> None:
    """Re-rotate the keys at physical rows ``[start, end)`` by ``delta`` positions, every layer."""
    if delta == 0 or end <= start:
        return
    for layer in attention_layers(cache):
        if not layer.is_initialized:
            continue
        store = layer.storage
        d = torch.full((end - start,), int(delta), dtype=torch.int64, device=layer.device)
        inv = inv_freq.to(layer.device)
        if store.fmt is None:
            ops.rope_shift_(store.keys[:, :, start:end], d, inv, style)
        else:
            ops.rope_shift_quantized_(store.key_codes[:, :, start:end], store.key_scales[:, :, start:end], d, inv,
                                      style)
        store.shadow_len = 0  # the full-precision shadow holds unrotated keys


def splice(cache, start: int, end: int, new_len: int, position: int, forward: Callable[[], None],
           inv_freq: torch.Tensor, style: str) -> None:
    """Replace physical rows ``[start, end)`` by ``new_len`` tokens that ``forward()`` feeds the model.

    Parameters
    ----------
    position : int
        RoPE position of row ``start`` (the new tokens take ``position ... position + new_len - 1``).
    forward : callable
        Runs the model on exactly the ``new_len`` new tokens with ``past_key_values=cache``; while it
        runs, the cache shows only rows ``[0, start)`` (logical length ``position``), so the new
        tokens attend to what precedes them and nothing after.

    Steps per layer: grow the buffer if the text got longer; ``move_`` the tail ``[end, n)`` to
    ``start + new_len`` (memmove: opens or closes the gap); set the lengths to ``start`` /
    ``position``. Then one forward writes rows ``[start, start + new_len)`` in every layer. Finally
    the lengths are restored and the tail's keys re-rotated by ``new_len - (end - start)``.
    """
    layers = [layer for layer in attention_layers(cache) if layer.is_initialized]
    delta = new_len - (end - start)
    saved = []
    for layer in layers:
        store = layer.storage
        n = store.length
        if not 0 <= start <= end <= n:
            raise ValueError(f"splice: [{start}, {end}) is outside the {n} cached tokens")
        if delta > 0:
            store.reserve(delta)
        if n > end and delta:
            ops.move_(store.token_tensors(), end, n, start + new_len)
        saved.append((n, layer.logical_len))
        layer.set_lengths(physical=start, logical=position, tail_contiguous=0)
    try:
        forward()
    finally:
        for layer, (n, logical) in zip(layers, saved):
            if layer.physical_len != start + new_len:
                raise RuntimeError(f"splice: the forward wrote {layer.physical_len - start} tokens, expected {new_len}")
            tail = n - end
            layer.set_lengths(physical=start + new_len + tail, logical=logical + delta,
                              tail_contiguous=new_len + tail)
    shift_keys(cache, start + new_len, start + new_len + (saved[0][0] - end if saved else 0), delta, inv_freq, style)
