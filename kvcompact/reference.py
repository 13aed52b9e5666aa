"""Plain-torch statements of every kvcompact kernel: the readable specification.

Tests compare the kernels against these bit for bit where the contract in
docs/kernels.md says bit-exact. They favour clarity over speed and allocate freely.
"""

from __future__ import annotations

import torch

from kvcompact.formats import FORMATS

# Views of the one format table (kvcompact.formats), under the names the tests use.
QMAX = {name: f.qmax for name, f in FORMATS.items()}
CODE_DTYPE = {name: f.dtype for name, f in FORMATS.items()}
FORMAT_OF_DTYPE = {f.dtype: name for name, f in FORMATS.items()}

# absmax / QMAX underflows to 0 for tiny subnormal groups; the scale is floored
# at the smallest positive float32 (2**-149) so codes stay finite.
MIN_SCALE = 2.0**-149


def quantize(x: torch.Tensor, fmt: str, group_size: int | None = None):
    """Quantize ``x [..., D]`` in groups of ``group_size`` along D.

    Returns ``codes`` (x's shape, fmt's dtype) and ``scales``
    (``[..., D // group_size]`` float32).
    """
    qmax = QMAX[fmt]
    d = x.shape[-1]
    g = d if group_size is None else group_size
    xf = x.float().reshape(*x.shape[:-1], d // g, g)
    nonfinite = ~torch.isfinite(xf).all(dim=-1)
    absmax = xf.abs().nan_to_num(0.0, 0.0, 0.0).amax(dim=-1)
    scale = absmax / qmax
    scale = torch.where(absmax == 0, torch.ones_like(scale), scale.clamp_min(MIN_SCALE))
    scale = torch.where(nonfinite, torch.full_like(scale, float("nan")), scale)

    q = (xf / scale.unsqueeze(-1)).clamp(-qmax, qmax)
    q = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(q), q)
    if fmt == "int8":
        codes = torch.round(q).to(torch.int8)  # torch.round is half-to-even
    else:
        codes = q.to(CODE_DTYPE[fmt])
    return codes.reshape(x.shape), scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """``y = float(code) * scale`` per group, rounded to ``dtype``."""
    d = codes.shape[-1]
    groups = scales.shape[-1]
    cf = codes.float().reshape(*codes.shape[:-1], groups, d // groups)
    return (cf * scales.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def compact(tensors: list[torch.Tensor], keep_idx: torch.Tensor) -> list[torch.Tensor]:
    """Out-of-place compaction: each ``t [B, H, T, ...]`` becomes its first K rows
    replaced by ``t[b, h, keep_idx[b, h]]``; rows from K on are left as they were."""
    out = []
    for t in tensors:
        b, h, k = keep_idx.shape
        idx = keep_idx.reshape(b, h, k, *([1] * (t.dim() - 3))).expand(b, h, k, *t.shape[3:])
        r = t.clone()
        r[:, :, :k] = torch.gather(t, 2, idx)
        out.append(r)
    return out


def move(tensors: list[torch.Tensor], src_start: int, src_end: int, dst_start: int):
    """Out-of-place memmove of tokens ``[src_start, src_end)`` to ``dst_start``
    along dim 2; tokens outside the destination range are left as they were."""
    out = []
    n = src_end - src_start
    for t in tensors:
        r = t.clone()
        r[:, :, dst_start : dst_start + n] = t[:, :, src_start:src_end]
        out.append(r)
    return out


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> torch.Tensor:
    """Out-of-place block copy: a clone of ``dst`` with ``dst[j] = src[i]`` for every
    row ``(i, j)`` of ``block_mapping`` (int64 ``[N, 2]``); other blocks unchanged."""
    out = dst.clone()
    for i, j in block_mapping.tolist():
        out[j] = src[i].to(out.device)
    return out


def _rope_pairs(x: torch.Tensor, half: int, style: str):
    """The two halves of every rotary pair of ``x [..., D]`` as views."""
    if style == "neox":
        return x[..., :half], x[..., half : 2 * half]
    if style == "gptj":
        return x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
    raise ValueError(f"rope_shift: `style` must be 'neox' or 'gptj'; got {style!r}")


def rope_shift(
    keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, style: str = "neox"
) -> torch.Tensor:
    """Out-of-place RoPE re-rotation of ``keys [B, H, T, D]`` by ``delta * inv_freq``.

    ``delta`` is int64 ``[T]`` or ``[B, H, T]``; R = 2 * len(inv_freq) <= D and
    dims from R on are untouched. Angles are fp64 (``delta * inv_freq``), cos and
    sin are rounded once to fp32, and each pair rotates in fp32 with every product
    and sum rounded separately::

        y1 = x1 * cos - x2 * sin,   y2 = x2 * cos + x1 * sin

    then the result is rounded to ``keys.dtype``.
    """
    half = inv_freq.shape[0]
    d = delta if delta.dim() == 3 else delta.reshape(1, 1, -1)
    angle = d.double().unsqueeze(-1) * inv_freq.double()  # [.., .., T, R/2]
    c, s = torch.cos(angle).float(), torch.sin(angle).float()
    x = keys.float()
    x1, x2 = _rope_pairs(x, half, style)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    out = x.clone()
    o1, o2 = _rope_pairs(out, half, style)
    o1.copy_(y1)
    o2.copy_(y2)
    return out.to(keys.dtype)


def rope_shift_quantized(
    codes: torch.Tensor,
    scales: torch.Tensor,
    delta: torch.Tensor,
    inv_freq: torch.Tensor,
    style: str = "neox",
):
    """Dequantize to fp32, :func:`rope_shift`, requantize with the same group size
    and format (from ``codes.dtype``). Returns new ``(codes, scales)``."""
    fmt = FORMAT_OF_DTYPE[codes.dtype]
    group_size = codes.shape[-1] // scales.shape[-1]
    x = dequantize(codes, scales, torch.float32)
    return quantize(rope_shift(x, delta, inv_freq, style), fmt, group_size)


def attention_mask(q_len: int, kv_len: int, window: int = 0, query_start: int | None = None) -> torch.Tensor:
    """Bool ``[Q, T]``: query ``i`` (at row position ``query_start + i``, default ``T - Q``) sees row
    ``j`` iff ``j <= query_start + i`` and, with ``window > 0``, ``query_start + i - j < window``."""
    start = kv_len - q_len if query_start is None else query_start
    qpos = start + torch.arange(q_len).unsqueeze(1)
    j = torch.arange(kv_len).unsqueeze(0)
    visible = j <= qpos
    if window > 0:
        visible &= qpos - j < window
    return visible


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    query_start: int | None = None,
    tail_key: torch.Tensor | None = None,
    tail_value: torch.Tensor | None = None,
):
    """Attention of ``query [B, Hq, Q, D]`` over ``key``/``value`` ``[B, Hkv, T, D]``, in fp32.

    Keys and values are a float dtype, or 8-bit codes with per-group fp32 ``*_scales``
    ``[B, Hkv, T, D // G]`` (dequantized to fp32 first). GQA: query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. Scores ``q . k * scale``, then ``softcap * tanh(s / softcap)`` when
    ``softcap > 0``; the mask is :func:`attention_mask`. Returns ``out [B, Hq, Q, D]`` and
    ``lse [B, Hq, Q]`` (float32); a query that sees no row gets ``out = 0``, ``lse = -inf``.
    ``tail_key``/``tail_value`` ``[B, Hkv, T_tail, D]`` (a float dtype) are rows
    ``[T, T + T_tail)``, appended after the stored ones.
    """
    k = key.float() if key_scales is None else dequantize(key, key_scales, torch.float32)
    v = value.float() if value_scales is None else dequantize(value, value_scales, torch.float32)
    if tail_key is not None:
        k = torch.cat([k, tail_key.float()], dim=2)
        v = torch.cat([v, tail_value.float()], dim=2)
    rep = query.shape[1] // key.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = attention_mask(query.shape[2], k.shape[2], window, query_start)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows seeing nothing: 0
    return torch.matmul(weights, v), lse


def merge_attention(parts):
    """Merge ``[(out, lse), ...]`` of segments attended separately into the attention over their
    union: ``lse = logsumexp_s lse_s``, ``out = sum_s exp(lse_s - lse) * out_s``."""
    lses = torch.stack([lse for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse).nan_to_num(0.0)
    out = sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts))
    return out, lse
