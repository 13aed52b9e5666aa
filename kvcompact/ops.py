"""Typed Python entry points for ``torch.ops.kvcompact`` and their fake kernels.

Shapes use B (batch), H (KV heads), T (tokens), D (head dim), G (group size).
Every op accepts CPU tensors, and CUDA tensors when the build has CUDA kernels
(:func:`kvcompact.build_info`). Bad arguments raise ``ValueError``,
``TypeError`` or ``IndexError`` naming the argument. The fake kernels let
``torch.compile(fullgraph=True)`` trace through every op.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from kvcompact.formats import FORMATS

_ops = torch.ops.kvcompact


def quantize(
    x: torch.Tensor, fmt: str, group_size: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` per group of ``group_size`` consecutive elements of D.

    Parameters
    ----------
    x : Tensor ``[..., D]``, float32/float16/bfloat16, any strides; read only.
    fmt : ``"fp8_e4m3"`` (QMAX 448), ``"fp8_e5m2"`` (QMAX 57344) or ``"int8"`` (QMAX 127).
    group_size : a positive divisor of D; None means D (one scale per row).

    Returns
    -------
    codes : Tensor ``[..., D]``, float8_e4m3fn / float8_e5m2 / int8, contiguous.
    scales : Tensor ``[..., D // group_size]``, float32. A group holding NaN or
        Inf gets a NaN scale and zero codes; other groups are untouched.

    Example
    -------
    >>> x = torch.randn(1, 8, 16, 64, dtype=torch.bfloat16)
    >>> codes, scales = quantize(x, "fp8_e4m3", group_size=32)
    >>> codes.dtype, tuple(scales.shape)
    (torch.float8_e4m3fn, (1, 8, 16, 2))
    """
    return _ops.quantize(x, fmt, group_size)


def quantize_into_(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fmt: str
) -> None:
    """:func:`quantize` writing into preallocated views (how a cache appends).

    Parameters
    ----------
    x : Tensor ``[..., D]`` float, read only.
    codes : Tensor ``[..., D]`` in ``fmt``'s dtype, any strides; written.
    scales : Tensor ``[..., D // G]`` float32, any strides; written. G is
        ``D // scales.shape[-1]``.
    fmt : as in :func:`quantize`.

    Example
    -------
    >>> buf = torch.empty(1, 8, 1024, 64, dtype=torch.int8)
    >>> sbuf = torch.empty(1, 8, 1024, 2)
    >>> new = torch.randn(1, 8, 3, 64)
    >>> quantize_into_(new, buf[:, :, 10:13], sbuf[:, :, 10:13], "int8")
    """
    _ops.quantize_into_(x, codes, scales, fmt)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``y = float(code) * scale`` per group, rounded to ``dtype``.

    Parameters
    ----------
    codes : Tensor ``[..., D]``, float8_e4m3fn / float8_e5m2 / int8 (the dtype
        names the format), any strides.
    scales : Tensor ``[..., D // G]`` float32.
    dtype : float32, float16 or bfloat16.

    Returns
    -------
    Tensor ``[..., D]`` of ``dtype``, contiguous.

    Example
    -------
    >>> codes, scales = quantize(torch.randn(4, 64), "int8")
    >>> dequantize(codes, scales, torch.float32).shape
    torch.Size([4, 64])
    """
    return _ops.dequantize(codes, scales, dtype)


def dequantize_into_(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`dequantize` into ``out`` (``[..., D]`` float, any strides; written),
    e.g. a reusable attention workspace."""
    _ops.dequantize_into_(codes, scales, out)


def compact_(
    tensors: Sequence[torch.Tensor], keep_idx: torch.Tensor, validate: bool = True
) -> None:
    """Keep the tokens ``keep_idx`` names, in place, for a group of aligned tensors.

    Parameters
    ----------
    tensors : non-empty list of Tensors ``[B, H, T, ...]`` on one device, sharing
        B, H, T (keys, values, codes, scales, positions; any dtypes); written.
    keep_idx : int64 Tensor ``[B, H, K]`` on the tensors' device, each row
        strictly increasing in ``[0, T)``. K = 0 and K = T are valid.
    validate : check ``keep_idx`` before writing anything (one pass over it);
        pass False in hot paths that build indices themselves.

    After the call, for every (b, h) and j < K:
    ``t[b, h, j] == old t[b, h, keep_idx[b, h, j]]``; rows from K on are
    unspecified. Storage is kept (``data_ptr`` unchanged); no temporary
    proportional to T is allocated.

    Example
    -------
    >>> k = torch.randn(1, 2, 6, 4)
    >>> keep = torch.tensor([[[0, 2, 5], [1, 3, 4]]])
    >>> compact_([k], keep)
    """
    _ops.compact_(list(tensors), keep_idx, validate)


def move_(tensors: Sequence[torch.Tensor], src_start: int, src_end: int, dst_start: int) -> None:
    """Move tokens ``[src_start, src_end)`` to ``dst_start`` along dim 2, in place,
    with memmove semantics (the ranges may overlap). ``tensors`` as in
    :func:`compact_`; the destination range must fit in T."""
    if len(tensors) == 0:
        # Checked here: with no tensor argument the dispatcher cannot pick a backend.
        raise ValueError("move_: `tensors` must be a non-empty list")
    _ops.move_(list(tensors), src_start, src_end, dst_start)


def rope_shift_(
    keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, style: str = "neox"
) -> None:
    """Rotate cached keys by ``delta * inv_freq``, in place.

    Parameters
    ----------
    keys : Tensor ``[B, H, T, D]`` float32/float16/bfloat16; written.
    delta : int64 Tensor ``[T]`` or ``[B, H, T]``: position change per token.
    inv_freq : float32 Tensor ``[R / 2]``; rotary_dim R = 2 * len(inv_freq) <= D,
        dims from R on are untouched (partial rotary).
    style : ``"neox"`` (rotate-half pairs (i, i + R/2)) or ``"gptj"``
        (interleaved pairs (2i, 2i + 1)).
    """
    _ops.rope_shift_(keys, delta, inv_freq, style)


def rope_shift_quantized_(
    codes: torch.Tensor,
    scales: torch.Tensor,
    delta: torch.Tensor,
    inv_freq: torch.Tensor,
    style: str = "neox",
) -> None:
    """:func:`rope_shift_` for quantized keys: dequantize, rotate and requantize
    per group in one pass (scales are recomputed). ``codes [B, H, T, D]`` and
    ``scales [B, H, T, D // G]`` are both written; the format is codes' dtype."""
    _ops.rope_shift_quantized_(codes, scales, delta, inv_freq, style)


def copy_blocks_(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy ``src[i] -> dst[j]`` for every row ``(i, j)`` of ``block_mapping``.

    Parameters
    ----------
    src, dst : Tensors ``[num_blocks, ...]`` with the same block shape and dtype,
        on a device or in (pinned) host memory; ``dst`` is written.
    block_mapping : int64 Tensor ``[N, 2]`` on the CPU.

    Runs on the current CUDA stream when either side is on a GPU.
    """
    _ops.copy_blocks_(src, dst, block_mapping)


# ---------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, for torch.compile and FakeTensor.


@torch.library.register_fake("kvcompact::quantize")
def _quantize_fake(x, fmt, group_size=None):
    torch._check(x.dim() >= 1, lambda: "quantize: `x` must have at least one dimension")
    torch._check(fmt in FORMATS, lambda: f"quantize: unknown `fmt` {fmt!r}")
    d = x.shape[-1]
    g = d if group_size is None else group_size
    torch._check(g > 0 and d % g == 0, lambda: "quantize: `group_size` must divide D")
    codes = x.new_empty(x.shape, dtype=FORMATS[fmt].dtype)
    scales = x.new_empty((*x.shape[:-1], d // g), dtype=torch.float32)
    return codes, scales


@torch.library.register_fake("kvcompact::dequantize")
def _dequantize_fake(codes, scales, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


def _check_fake_devices(op, **tensors):
    # A Meta (or fake) tensor mixed with real ones routes the call here; keep
    # the device contract of the real kernels instead of silently doing nothing.
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors must be on the same device; got {devices}")


@torch.library.register_fake("kvcompact::quantize_into_")
def _quantize_into_fake(x, codes, scales, fmt):
    _check_fake_devices("quantize_into_", x=x, codes=codes, scales=scales)


@torch.library.register_fake("kvcompact::dequantize_into_")
def _dequantize_into_fake(codes, scales, out):
    _check_fake_devices("dequantize_into_", codes=codes, scales=scales, out=out)


def _no_output_fake(*args, **kwargs):
    return None


for _name in (
    "compact_",
    "move_",
    "rope_shift_",
    "rope_shift_quantized_",
    "copy_blocks_",
):
    torch.library.register_fake(f"kvcompact::{_name}")(_no_output_fake)
