"""CUDA ``decode_attention`` against the CPU kernel and ``kvcompact.reference``.

The CPU kernel is held to the reference by tests/test_attention.py; here every CUDA result is
compared with the CPU op on the same input (NaN in the same places: a NaN score makes the whole
query row NaN on both backends, and a zero weight never multiplies a NaN value), and with the
reference where the reference defines the same thing. Nothing is bit-exact (summation orders
differ), everything accumulates in fp32, so the tolerance is 1e-5.

Inputs cover both CUDA paths: the cp.async fast path (rows of 16-byte units: fp32/fp16/bf16 keys,
8-bit codes with group sizes that are multiples of 16, head dims up to 256, aligned views) and the
fallback (odd head dims and group sizes, unaligned views, head dims past 256), GQA ratios 1-8, one
and several queries (several row blocks per KV head), caches shorter than one tile and long enough
for many KV splits (merge kernel), windows, soft-capping, queries placed anywhere relative to the
segment, NaN scale groups, and the current stream. Runs only where a GPU is visible
(benchmarks/gpu_check.sh on a lent machine; its sanitizer pass skips ids with "large" or "float32").
"""

from __future__ import annotations

import math

import pytest
import torch

import kvcompact
from kvcompact import ops, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ATOL = RTOL = 1e-5
FORMATS = ("fp8_e4m3", "fp8_e5m2", "int8")

# (fmt, dtype, group_size): model-dtype storage, or codes of fmt with group_size.
STORAGES = [
    pytest.param((None, torch.float32, None), id="float32"),
    pytest.param((None, torch.float16, None), id="float16"),
    pytest.param((None, torch.bfloat16, None), id="bfloat16"),
    *[pytest.param((fmt, None, g), id=f"{fmt}-G{g}") for fmt in FORMATS for g in (16, 32, None)],
]

# (B, Hq, Hkv, Q, T, D, query dtype). R = Hq / Hkv * Q query rows per KV head: R <= 4 and R <= 8
# take one row block of 4 or 8, R = 9 and 24 take several. T = 1 and 7 are shorter than a tile;
# 300 and 4097 split the cache (merge kernel). D = 256 uses the 256-column kernels.
SHAPES = [
    pytest.param((1, 8, 8, 1, 1, 64, torch.float32), id="rep1-T1-q_float32"),
    pytest.param((2, 6, 2, 3, 7, 128, torch.bfloat16), id="rep3-Q3-T7-q_bfloat16"),
    pytest.param((1, 8, 1, 1, 300, 128, torch.float32), id="rep8-T300-q_float32"),
    pytest.param((2, 24, 3, 3, 300, 64, torch.float32), id="rep8-Q3-T300-q_float32"),
    pytest.param((1, 3, 3, 3, 300, 80, torch.bfloat16), id="rep1-Q3-D80-T300-q_bfloat16"),
    pytest.param((1, 6, 2, 1, 37, 96, torch.float32), id="rep3-D96-T37-q_float32"),
    pytest.param((1, 4, 2, 2, 70, 256, torch.float16), id="rep2-Q2-D256-T70-q_float16"),
    pytest.param((1, 8, 2, 2, 300, 256, torch.float32), id="rep4-Q2-D256-T300-q_float32"),
    pytest.param((1, 4, 4, 3, 4097, 64, torch.float32), id="large-rep1-Q3-T4097-q_float32"),
    pytest.param((1, 16, 2, 1, 4097, 128, torch.bfloat16), id="large-rep8-T4097-q_bfloat16"),
]


def _device():
    return torch.device("cuda", torch.cuda.current_device())


def make_kv(shape, fmt, dtype=torch.float32, group_size=None, gen=None):
    """Random K and V ``shape`` as stored, on the CPU: ``(key, value, key_scales, value_scales)``."""
    k = torch.randn(shape, generator=gen) * 2.0
    v = torch.randn(shape, generator=gen)
    if fmt is None:
        return k.to(dtype), v.to(dtype), None, None
    kc, ks = ops.quantize(k, fmt, group_size)
    vc, vs = ops.quantize(v, fmt, group_size)
    return kc, vc, ks, vs


def _cpu(t):
    return None if t is None else t.cpu()


def _cuda(t):
    return None if t is None else t.to(_device())


def check(query, key, value, ks=None, vs=None, *, against_reference=True, **kw):
    """Runs the op on CUDA tensors (any views) and compares with the CPU op on copies, and with
    the reference on the rows whose lse the CPU finds non-NaN."""
    out, lse = ops.decode_attention(query, key, value, ks, vs, **kw)
    assert out.device == query.device and lse.device == query.device
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == query.shape and lse.shape == query.shape[:3]
    args = [_cpu(t) for t in (query, key, value, ks, vs)]
    want_out, want_lse = ops.decode_attention(*args, **kw)
    got_out, got_lse = out.cpu(), lse.cpu()
    torch.testing.assert_close(got_lse, want_lse, atol=ATOL, rtol=RTOL, equal_nan=True)
    torch.testing.assert_close(got_out, want_out, atol=ATOL, rtol=RTOL, equal_nan=True)
    if against_reference:
        ref_out, ref_lse = reference.decode_attention(*args, **kw)
        keep = ~want_lse.isnan()
        torch.testing.assert_close(got_lse[keep], ref_lse[keep], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got_out[keep], ref_out[keep], atol=ATOL, rtol=RTOL)
    return got_out, got_lse


def test_build_has_cuda_kernels():
    assert kvcompact.build_info()["cuda_kernels"], "extension was built without CUDA kernels"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("storage", STORAGES)
def test_matches_cpu_and_reference(storage, shape):
    fmt, dtype, group_size = storage
    b, hq, hkv, q_len, t, d, qdtype = shape
    if group_size is not None and d % group_size:
        pytest.skip(f"group size {group_size} does not divide D = {d}")
    gen = torch.Generator().manual_seed(hq * 1000 + t + d)
    key, value, ks, vs = make_kv((b, hkv, t, d), fmt, dtype or torch.float32, group_size, gen)
    query = torch.randn(b, hq, q_len, d, generator=gen).to(qdtype)
    check(*[_cuda(x) for x in (query, key, value, ks, vs)], scale=d**-0.5)


# Head dims, group sizes and dtypes that the fast path does not take: rows that are not whole
# 16-byte units (D * elem % 16), groups that are not multiples of 16 codes, D > 256 (K in column
# chunks, one CTA per 128 output columns).
FALLBACKS = [
    pytest.param(("fp8_e4m3", None, None, 72), id="fp8_e4m3-D72"),
    pytest.param(("int8", None, 8, 64), id="int8-G8"),
    pytest.param(("fp8_e5m2", None, 24, 48), id="fp8_e5m2-D48-G24"),
    pytest.param((None, torch.float16, None, 36), id="float16-D36"),
    pytest.param((None, torch.bfloat16, None, 20), id="bfloat16-D20"),
    pytest.param((None, torch.float32, None, 7), id="float32-D7"),
    pytest.param(("int8", None, None, 300), id="int8-D300"),
    pytest.param((None, torch.float16, None, 320), id="float16-D320"),
    pytest.param(("fp8_e4m3", None, 64, 576), id="fp8_e4m3-D576-G64"),
    pytest.param(("fp8_e5m2", None, 40, 520), id="fp8_e5m2-D520-G40"),
]


@pytest.mark.parametrize("q_len,rep", [(1, 4), (3, 3)])
@pytest.mark.parametrize("case", FALLBACKS)
def test_fallback_path(case, q_len, rep):
    fmt, dtype, group_size, d = case
    gen = torch.Generator().manual_seed(d * 10 + q_len)
    key, value, ks, vs = make_kv((1, 2, 300, d), fmt, dtype or torch.float32, group_size, gen)
    query = torch.randn(1, 2 * rep, q_len, d, generator=gen)
    check(*[_cuda(x) for x in (query, key, value, ks, vs)], scale=d**-0.5, softcap=20.0, window=250)


@pytest.mark.parametrize("fmt,dtype", [(None, torch.float16), (None, torch.float32), ("fp8_e4m3", None),
                                       ("int8", None)], ids=str)
def test_unaligned_views_take_the_fallback(fmt, dtype):
    """K/V (and scales) one element past a 16-byte boundary."""
    gen = torch.Generator().manual_seed(5)
    key, value, ks, vs = make_kv((1, 2, 200, 64), fmt, dtype or torch.float32, 32, gen)
    dev = _device()

    def shifted(t):
        if t is None:
            return None
        flat = torch.zeros(1 + t.numel(), dtype=t.dtype, device=dev)
        flat[1:].copy_(t.flatten().to(dev))
        view = flat[1:].view(t.shape)
        assert view.data_ptr() % 16 != 0
        return view

    query = torch.randn(1, 6, 2, 64, generator=gen)
    check(_cuda(query), shifted(key), shifted(value), shifted(ks), shifted(vs), scale=0.125)


@pytest.mark.parametrize("t", [300, pytest.param(4097, id="large-4097")])
@pytest.mark.parametrize("window,softcap", [(1, 0.0), (64, 0.0), (0, 30.0), (200, 5.0), (1000, 50.0)])
@pytest.mark.parametrize("storage", [(None, torch.bfloat16, None), ("fp8_e4m3", None, 32)], ids=["bf16", "e4m3"])
def test_window_and_softcap(storage, window, softcap, t):
    fmt, dtype, group_size = storage
    gen = torch.Generator().manual_seed(window + t)
    key, value, ks, vs = make_kv((2, 2, t, 128), fmt, dtype or torch.float32, group_size, gen)
    query = torch.randn(2, 8, 3, 128, generator=gen)
    check(*[_cuda(x) for x in (query, key, value, ks, vs)], scale=128**-0.5, softcap=softcap, window=window)


@pytest.mark.parametrize("query_start,window", [(None, 0), (-7, 0), (-2, 0), (0, 0), (10, 5), (150, 100),
                                                (299, 5), (305, 0), (305, 5), (1000, 0), (-2, 100)])
def test_query_start(query_start, window):
    """Queries before, inside and after the segment; those that see no row get exactly 0 / -inf."""
    gen = torch.Generator().manual_seed(window + (query_start or 0) + 10)
    key, value, ks, vs = make_kv((1, 2, 300, 64), "int8", None, 16, gen)
    query = torch.randn(1, 4, 4, 64, generator=gen)
    out, lse = check(*[_cuda(x) for x in (query, key, value, ks, vs)], scale=0.125, window=window,
                     query_start=query_start)
    seen = reference.attention_mask(4, 300, window, query_start).any(-1)
    assert torch.isneginf(lse[..., ~seen]).all() and (out[..., ~seen, :] == 0).all()
    assert torch.isfinite(lse[..., seen]).all() and torch.isfinite(out[..., seen, :]).all()


def test_non_contiguous_views():
    gen = torch.Generator().manual_seed(3)
    dev = _device()
    codes, scales = ops.quantize(torch.randn(2, 4, 300, 64, generator=gen), "fp8_e4m3", 32)
    codes, scales = codes.to(dev), scales.to(dev)
    # A slice of a capacity buffer, and a transposed-heads layout ([B, T, H, D] storage viewed as [B, H, T, D]).
    key, ks = codes[:, :, :211], scales[:, :, :211]
    tkey = codes.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 5:216]
    tks = scales.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 5:216]
    assert not key.is_contiguous() and not tkey.is_contiguous()
    query = torch.randn(2, 3, 8, 64, generator=gen).to(dev).transpose(1, 2)  # [2, 8, 3, 64], strided
    check(query, key, key, ks, ks, scale=0.125)
    check(query, tkey, key, tks, ks, scale=0.125)
    # bf16 K/V as a capacity-buffer slice with transposed heads.
    buf = torch.randn(2, 512, 4, 64, generator=gen).to(torch.bfloat16).to(dev)
    kv = buf.transpose(1, 2)[:, :, 17:300]
    check(query.to(torch.float16), kv, kv, scale=0.125)
    # A last dim that is not contiguous (every other element): copied on the host.
    wide = torch.randn(1, 2, 40, 128, generator=gen).to(dev)
    check(torch.randn(1, 4, 1, 64, generator=gen).to(dev), wide[..., ::2], wide[..., 1::2], scale=0.125)


@pytest.mark.parametrize("shape,q_len", [((1, 2, 0, 16), 2), ((0, 2, 5, 16), 2), ((1, 1, 5, 16), 0)])
def test_empty(shape, q_len):
    dev = _device()
    key = torch.randn(shape, device=dev)
    query = torch.randn(shape[0], 4, q_len, 16, device=dev)
    out, lse = ops.decode_attention(query, key, key, scale=1.0)
    assert out.shape == query.shape and lse.shape == query.shape[:3]
    assert out.device == dev and lse.device == dev
    assert (out == 0).all() and torch.isneginf(lse).all()
    codes, scales = ops.quantize(key, "int8", 16)
    out, lse = ops.decode_attention(query, codes, codes, scales, scales, scale=1.0)
    assert out.shape == query.shape and (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("t", [50, 700])
@pytest.mark.parametrize("fmt,group_size", [("fp8_e4m3", 16), ("int8", 32), ("fp8_e5m2", 8)])
def test_nan_scale_groups(fmt, group_size, t):
    """A NaN key group poisons exactly the query rows that see its row (out and lse NaN, as on the
    CPU); a NaN value group poisons the out columns of that group for the queries that see its
    row, and nothing for the queries that do not (a zero weight never multiplies it)."""
    gen = torch.Generator().manual_seed(t + group_size)
    key, value, ks, vs = make_kv((1, 2, t, 64), fmt, None, group_size, gen)
    query = torch.randn(1, 4, 3, 64, generator=gen)
    # query_start t - 5: query i sees rows 0 .. t - 5 + i; row t - 3 is seen by query 2 only,
    # rows t - 2 and t - 1 by none. Query heads 0, 1 read KV head 0; heads 2, 3 KV head 1.
    bad_ks = ks.clone()
    bad_ks[0, 0, t - 40, 1] = float("nan")  # every query of KV head 0
    bad_ks[0, 1, t - 3, 0] = float("nan")   # query 2 of KV head 1 (the tile holds it for all)
    bad_ks[0, 1, t - 1, 1] = float("nan")   # nobody
    out, lse = check(*[_cuda(x) for x in (query, key, value, bad_ks, vs)], scale=0.2, query_start=t - 5)
    assert torch.isnan(lse[0, :2]).all() and torch.isnan(out[0, :2]).all()
    assert torch.isnan(lse[0, 2:, 2]).all() and torch.isnan(out[0, 2:, 2]).all()
    assert torch.isfinite(lse[0, 2:, :2]).all() and torch.isfinite(out[0, 2:, :2]).all()

    bad_vs = vs.clone()
    bad_vs[0, 0, t - 3, 1] = float("nan")  # columns [G, 2G) of row t - 3, KV head 0
    out, lse = check(*[_cuda(x) for x in (query, key, value, ks, bad_vs)], against_reference=False, scale=0.2,
                     query_start=t - 5)
    assert torch.isfinite(lse).all()
    g = group_size
    assert torch.isnan(out[0, :2, 2, g:2 * g]).all()
    assert torch.isfinite(out[0, :2, 2, :g]).all() and torch.isfinite(out[0, :2, 2, 2 * g:]).all()
    assert torch.isfinite(out[0, :2, :2]).all() and torch.isfinite(out[0, 2:]).all()


@pytest.mark.parametrize("group_div", [1, 2], ids=["G16", "G8"])
def test_every_code_decodes_exactly(group_div):
    # Every finite code of each 8-bit format, one per key row with its own scale, used as keys and
    # as values: a wrong decode of any code moves lse or out far past the tolerance. G = 16 takes
    # the fast path (hardware fp8 conversion on sm_89+), G = 8 the fallback.
    dev = _device()
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
        codes = torch.arange(256, dtype=torch.uint8).view(dtype).view(1, 1, 256, 1).expand(1, 1, 256, 16)
        finite = torch.isfinite(codes[0, 0, :, 0].float())
        key = codes[:, :, finite].contiguous()
        scales = torch.rand(1, 1, key.shape[2], group_div) + 0.5
        query = torch.randn(1, 2, 1, 16)
        check(query.to(dev), key.to(dev), key.to(dev), scales.to(dev), scales.to(dev), scale=1e-3)


@pytest.mark.parametrize("fmt", [None, "fp8_e4m3"])
def test_large_many_splits(fmt):
    """One KV head and a long cache: the most splits the grid allows, merged."""
    gen = torch.Generator().manual_seed(21)
    key, value, ks, vs = make_kv((1, 1, 20000, 128), fmt, torch.bfloat16, 32, gen)
    query = torch.randn(1, 8, 1, 128, generator=gen)
    check(*[_cuda(x) for x in (query, key, value, ks, vs)], scale=128**-0.5, softcap=30.0)


def test_segments_merge_to_the_whole():
    gen = torch.Generator().manual_seed(8)
    dev = _device()
    key, value, ks, vs = [x.to(dev) for x in make_kv((1, 2, 1000, 64), "int8", None, 32, gen)]
    query = torch.randn(1, 6, 2, 64, generator=gen).to(dev)
    whole = ops.decode_attention(query, key, value, ks, vs, scale=0.125)
    parts = [
        ops.decode_attention(query, key[:, :, a:b], value[:, :, a:b], ks[:, :, a:b], vs[:, :, a:b],
                             scale=0.125, query_start=1000 - 2 - a)
        for a, b in [(0, 333), (333, 334), (334, 1000)]
    ]
    merged = ops.merge_attention(parts)
    torch.testing.assert_close(merged[0], whole[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(merged[1], whole[1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fmt", [None, *FORMATS])
@pytest.mark.parametrize("stored,tail,q_len,window", [(45, 1, 1, 0), (4097, 1, 1, 0), (300, 40, 3, 64), (0, 3, 1, 0)])
def test_tail_matches_cpu_and_reference(fmt, stored, tail, q_len, window):
    # The exact newest rows in the same call (the cache's decode step): CUDA attends them as a
    # second segment and merges; the result equals the CPU op's one pass and the reference.
    gen = torch.Generator().manual_seed(stored + tail)
    key, value, ks, vs = make_kv((1, 2, stored, 128), fmt, torch.bfloat16, 32, gen)
    tail_key = torch.randn(1, 2, tail, 128, generator=gen).to(torch.bfloat16)
    tail_value = torch.randn(1, 2, tail, 128, generator=gen).to(torch.bfloat16)
    query = torch.randn(1, 8, q_len, 128, generator=gen)
    kw = dict(scale=128**-0.5, softcap=30.0, window=window)
    cpu_args = (query, key, value, ks, vs)
    out, lse = ops.decode_attention(*[_cuda(t) for t in cpu_args], tail_key=_cuda(tail_key),
                                    tail_value=_cuda(tail_value), **kw)
    want = ops.decode_attention(*cpu_args, tail_key=tail_key, tail_value=tail_value, **kw)
    ref = reference.decode_attention(*cpu_args, tail_key=tail_key, tail_value=tail_value, **kw)
    for got, w, r in zip((out.cpu(), lse.cpu()), want, ref):
        torch.testing.assert_close(got, w, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got, r, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------
# devices, streams, dispatcher


def test_runs_on_current_stream():
    """Work queued on a side stream before the op must be seen by it, and its results must be
    complete once that stream is synchronized: the op has to run on the current stream."""
    dev = _device()
    gen = torch.Generator().manual_seed(2)
    key, value, ks, vs = make_kv((1, 2, 3000, 128), "fp8_e4m3", None, 32, gen)
    query = torch.randn(1, 8, 1, 128, generator=gen)
    want_out, want_lse = ops.decode_attention(query, key, value, ks, vs, scale=0.1)
    src = [x.to(dev) for x in (query, key, value, ks, vs)]
    dst = [torch.zeros_like(x) for x in src]
    torch.cuda.synchronize()
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms: the default stream would win the race
        for d, s in zip(dst, src):
            d.copy_(s)
        out, lse = ops.decode_attention(*dst, scale=0.1)
    side.synchronize()
    torch.testing.assert_close(out.cpu(), want_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=ATOL, rtol=RTOL)


def test_mismatched_devices_raise_value_error():
    dev = _device()
    query = torch.randn(1, 2, 1, 32, device=dev)
    key = torch.randn(1, 1, 5, 32)
    with pytest.raises(ValueError, match="key"):
        ops.decode_attention(query, key, key.to(dev), scale=1.0)
    codes, scales = ops.quantize(key.to(dev), "int8", 16)
    with pytest.raises(ValueError, match="scales"):
        ops.decode_attention(query, codes, codes, scales.cpu(), scales, scale=1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    gen = torch.Generator().manual_seed(4)
    key, value, ks, vs = make_kv((1, 2, 300, 64), "fp8_e5m2", None, 16, gen)
    query = torch.randn(1, 4, 2, 64, generator=gen)
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        check(*[None if x is None else x.to(dev) for x in (query, key, value, ks, vs)], scale=0.125)


def test_opcheck_cuda():
    dev = _device()
    gen = torch.Generator().manual_seed(9)
    key, value, ks, vs = [x.to(dev) for x in make_kv((1, 2, 40, 32), "int8", None, 16, gen)]
    query = torch.randn(1, 4, 2, 32, generator=gen).to(dev)
    torch.library.opcheck(torch.ops.kvcompact.decode_attention.default,
                          (query, key, value, ks, vs, 0.2, 0.0, 0, None))
    torch.library.opcheck(torch.ops.kvcompact.decode_attention.default,
                          (query.half(), key.float(), value.float(), None, None, 0.2, 10.0, 3, 30))
