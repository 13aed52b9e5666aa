"""Plain-torch statements of every kvcompact kernel: the readable specification.

Tests compare the kernels against these bit for bit where DESIGN.md's contract
says bit-exact. They favour clarity over speed and allocate freely.
"""

from __future__ import annotations

import torch

QMAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0}
CODE_DTYPE = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
FORMAT_OF_DTYPE = {dtype: fmt for fmt, dtype in CODE_DTYPE.items()}

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
