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


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_scales: Optional[torch.Tensor] = None,
    value_scales: Optional[torch.Tensor] = None,
    *,
    scale: float,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    query_start: Optional[int] = None,
    tail_key: Optional[torch.Tensor] = None,
    tail_value: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few queries over cache storage, reading 8-bit codes directly.

    Parameters
    ----------
    query : Tensor ``[B, Hq, Q, D]`` float32/float16/bfloat16, any strides; read only.
    key, value : Tensors ``[B, Hkv, T, D]``, any strides (a slice of a cache buffer); read only.
        Either a float dtype (lossless storage) or 8-bit codes (float8_e4m3fn, float8_e5m2, int8;
        the dtype names the format) together with ``key_scales`` / ``value_scales``.
        ``Hq`` must be a multiple of ``Hkv`` (GQA: query head ``h`` reads KV head
        ``h // (Hq // Hkv)``).
    key_scales, value_scales : Tensors ``[B, Hkv, T, D // G]`` float32, or None for float K/V.
    scale : the softmax scale multiplying ``q . k`` (usually ``D ** -0.5``).
    softcap : ``softcap * tanh(score / softcap)`` after scaling (Gemma 2); None or 0: none.
    window : sliding window (a query sees rows less than ``window`` positions back); None or 0:
        none.
    query_start : row position of query 0; query ``i`` sees rows ``j <= query_start + i``.
        Default ``T + T_tail - Q``: the queries are the last ``Q`` rows (a decode step whose own
        keys were appended). A segment that lies wholly before the queries takes
        ``query_start >= T + T_tail - 1``.
    tail_key, tail_value : Tensors ``[B, Hkv, T_tail, D]`` in a float dtype, or None: rows
        ``[T, T + T_tail)`` of the same sequence, attended in the same pass -- the newest rows of
        an 8-bit cache kept exact (the chunk a decode step just appended), without a second call
        and a :func:`merge_attention`. Row positions count over all ``T + T_tail`` rows.

    Returns
    -------
    out : Tensor ``[B, Hq, Q, D]`` float32, the softmax-weighted values.
    lse : Tensor ``[B, Hq, Q]`` float32, natural log-sum-exp of each query's visible scores
        (``-inf``, with ``out = 0``, for a query that sees no row). Segments attended separately
        merge exactly with :func:`merge_attention`.

    Scores, the softmax and the value sum run in float32 with an online softmax; there is no
    dequantized copy of the cache. Not bit-exact (summation order differs by backend and split):
    :func:`kvcompact.reference.decode_attention` is the specification, to float32 rounding.

    Example
    -------
    >>> codes, scales = quantize(torch.randn(1, 2, 100, 64), "fp8_e4m3", group_size=32)
    >>> q = torch.randn(1, 6, 1, 64)
    >>> out, lse = decode_attention(q, codes, codes, scales, scales, scale=64 ** -0.5)
    >>> tuple(out.shape), tuple(lse.shape)
    ((1, 6, 1, 64), (1, 6, 1))
    """
    return _ops.decode_attention(
        query, key, value, key_scales, value_scales, float(scale), float(softcap or 0.0),
        int(window or 0), query_start, tail_key, tail_value,
    )


def merge_attention(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``[(out, lse), ...]`` of :func:`decode_attention` over disjoint segments of one
    sequence into the attention over their union (exact up to float32 rounding).

    ``lse = log(sum_s exp(lse_s))``, ``out = sum_s exp(lse_s - lse) * out_s``; a query that sees
    no row of any segment keeps ``out = 0``, ``lse = -inf``.
    """
    if len(parts) == 0:
        raise ValueError("merge_attention: `parts` must hold at least one (out, lse) pair")
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    # exp(-inf - -inf) is NaN for queries no segment reaches; their weight is 0.
    weights = torch.exp(lses - lse).nan_to_num_(0.0)
    out = parts[0][0] * weights[0].unsqueeze(-1)
    for w, (o, _) in zip(weights[1:], parts[1:]):
        out = out + o * w.unsqueeze(-1)
    return out, lse


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


@torch.library.register_fake("kvcompact::decode_attention")
def _decode_attention_fake(query, key, value, key_scales, value_scales, scale, softcap=0.0, window=0,
                           query_start=None, tail_key=None, tail_value=None):
    torch._check(query.dim() == 4 and key.dim() == 4, lambda: "decode_attention: query and key must be 4-D")
    torch._check(query.shape[1] % key.shape[1] == 0,
                 lambda: "decode_attention: query heads must be a multiple of key heads")
    _check_fake_devices("decode_attention", query=query, key=key, value=value)
    torch._check((tail_key is None) == (tail_value is None),
                 lambda: "decode_attention: pass both tail_key and tail_value or neither")
    if tail_key is not None:
        _check_fake_devices("decode_attention", query=query, tail_key=tail_key, tail_value=tail_value)
    out = query.new_empty(query.shape, dtype=torch.float32)
    lse = query.new_empty(query.shape[:3], dtype=torch.float32)
    return out, lse
