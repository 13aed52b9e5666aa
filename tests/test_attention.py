"""``decode_attention``: the CPU kernel against ``kvcompact.reference.decode_attention``.

The op is not bit-exact (its summation order differs from torch's matmul), so results are compared
within 1e-5 (fp32 accumulation everywhere). Inputs cover every storage kind (fp32/fp16/bf16 keys,
fp8_e4m3/fp8_e5m2/int8 codes with several group sizes), GQA ratios 1-8, head dims with and without
the 16-float vector path, one to a few queries, sliding windows, soft-capping, segments placed
anywhere relative to the queries, non-contiguous views, empty inputs, and every CPU ISA path
(``KVCOMPACT_CPU_ISA``). Segments attended separately must merge to the whole.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompact  # noqa: F401  (loads the ops)
from kvcompact import ops, reference

from conftest import FUZZ_EXAMPLES

ATOL = RTOL = 1e-5
FORMATS = (None, "fp8_e4m3", "fp8_e5m2", "int8")


def _isas() -> list[str]:
    """The CPU ISA paths this machine can run, the best first (``KVCOMPACT_CPU_ISA`` values)."""
    order = ["avx512", "avx2", "scalar"]
    return order[order.index(kvcompact.build_info()["cpu_isa"]):]


ISAS = _isas()


def make_kv(shape, fmt, group_size, dtype=torch.float32, gen=None):
    """Random K and V ``shape`` as stored: ``(key, value, key_scales, value_scales)``."""
    k = torch.randn(shape, generator=gen) * 2.0
    v = torch.randn(shape, generator=gen)
    if fmt is None:
        return k.to(dtype), v.to(dtype), None, None
    kc, ks = ops.quantize(k, fmt, group_size)
    vc, vs = ops.quantize(v, fmt, group_size)
    return kc, vc, ks, vs


def assert_matches_reference(query, key, value, ks, vs, **kw):
    out, lse = ops.decode_attention(query, key, value, ks, vs, **kw)
    ref_out, ref_lse = reference.decode_attention(query, key, value, ks, vs, **kw)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == query.shape and lse.shape == query.shape[:3]
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)
    return out, lse


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rep", [1, 3, 8])
@pytest.mark.parametrize("head_dim,group_size", [(64, 32), (128, None), (128, 16), (80, 40), (24, 8)])
@pytest.mark.parametrize("q_len", [1, 3])
def test_matches_reference(fmt, rep, head_dim, group_size, q_len):
    gen = torch.Generator().manual_seed(rep * 1000 + head_dim + q_len)
    key, value, ks, vs = make_kv((2, 2, 301, head_dim), fmt, group_size, gen=gen)
    query = torch.randn(2, 2 * rep, q_len, head_dim, generator=gen)
    assert_matches_reference(query, key, value, ks, vs, scale=head_dim**-0.5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_isa_and_dtype(isa, fmt, dtype, monkeypatch):
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(7)
    key, value, ks, vs = make_kv((1, 3, 517, 64), fmt, 32, dtype=dtype, gen=gen)
    query = torch.randn(1, 9, 2, 64, generator=gen).to(dtype)
    assert_matches_reference(query, key, value, ks, vs, scale=0.125, softcap=30.0, window=200)


@pytest.mark.parametrize("window", [0, 1, 5, 64])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("query_start", [None, -3, 0, 10, 99, 150])
def test_masks(window, softcap, query_start):
    gen = torch.Generator().manual_seed(window + int(softcap))
    key, value, ks, vs = make_kv((1, 2, 100, 32), "int8", 16, gen=gen)
    query = torch.randn(1, 4, 4, 32, generator=gen)
    out, lse = assert_matches_reference(query, key, value, ks, vs, scale=0.3, softcap=softcap, window=window,
                                        query_start=query_start)
    # Queries that see no row: out 0, lse -inf (the reference mask decides which).
    seen = reference.attention_mask(4, 100, window, query_start).any(-1)
    assert torch.isneginf(lse[..., ~seen]).all() and (out[..., ~seen, :] == 0).all()
    assert torch.isfinite(lse[..., seen]).all()


@pytest.mark.parametrize("seed", range(8))
def test_every_code_decodes_exactly(seed):
    # Every finite code of each 8-bit format, one per key row (each row with its own scale), used as
    # keys and as values: a wrong decode of any code moves lse or out far past the tolerance. The
    # values span +-86,016 (e5m2's 57,344 times a scale up to 1.5), so `out`, a weighted sum of them
    # that can cancel to near 0, is held to 1e-5 of the largest value: float32 summation order alone
    # moves it by ~1e-7 of that (reference and kernel add in different orders).
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
        codes = torch.arange(256, dtype=torch.uint8).view(dtype).view(1, 1, 256, 1).expand(1, 1, 256, 16)
        finite = torch.isfinite(codes[0, 0, :, 0].float())
        key = codes[:, :, finite].contiguous()
        scales = torch.rand(1, 1, key.shape[2], 1, generator=gen) + 0.5
        query = torch.randn(1, 2, 1, 16, generator=gen)
        out, lse = ops.decode_attention(query, key, key, scales, scales, scale=1e-3)
        ref_out, ref_lse = reference.decode_attention(query, key, key, scales, scales, scale=1e-3)
        largest = reference.dequantize(key, scales, torch.float32).abs().max().item()
        torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out, ref_out, atol=ATOL * largest, rtol=RTOL)


def test_nan_group_poisons_only_the_queries_that_see_it():
    key, value, ks, vs = make_kv((1, 1, 50, 32), "fp8_e4m3", 16)
    ks[0, 0, 10, 1] = float("nan")  # row 10's second key group holds NaN/Inf
    query = torch.randn(1, 2, 3, 32)
    out, lse = ops.decode_attention(query, key, value, ks, vs, scale=0.2, window=5, query_start=8)
    # Query i sits at row 8 + i with a window of 5: rows 4..8+i; row 10 is seen by query 2 only.
    assert torch.isnan(out[:, :, 2]).all() and torch.isnan(lse[:, :, 2]).all()
    assert torch.isfinite(out[:, :, :2]).all() and torch.isfinite(lse[:, :, :2]).all()


@pytest.mark.parametrize("shape", [(1, 2, 0, 16), (0, 2, 5, 16)])
def test_empty(shape):
    key = torch.randn(shape)
    query = torch.randn(shape[0], 4, 2, 16)
    out, lse = ops.decode_attention(query, key, key, scale=1.0)
    assert out.shape == query.shape and (out == 0).all() and torch.isneginf(lse).all()
    out, lse = ops.decode_attention(torch.randn(1, 2, 0, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16),
                                    scale=1.0)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_one_token():
    key, value, ks, vs = make_kv((1, 1, 1, 64), "int8", None)
    query = torch.randn(1, 1, 1, 64)
    out, lse = assert_matches_reference(query, key, value, ks, vs, scale=0.125)
    torch.testing.assert_close(out, reference.dequantize(value, vs, torch.float32), atol=ATOL, rtol=RTOL)


def test_non_contiguous_views():
    gen = torch.Generator().manual_seed(3)
    codes, scales = ops.quantize(torch.randn(2, 4, 300, 64, generator=gen), "fp8_e4m3", 32)
    # A slice of a capacity buffer, and a transposed-heads layout ([B, T, H, D] storage viewed as [B, H, T, D]).
    key, ks = codes[:, :, :211], scales[:, :, :211]
    tkey = codes.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 5:216]
    tks = scales.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 5:216]
    query = torch.randn(2, 3, 8, 64, generator=gen).transpose(1, 2)  # [2, 8, 3, 64], strided
    assert_matches_reference(query, key, key, ks, ks, scale=0.125)
    assert_matches_reference(query, tkey, key, tks, ks, scale=0.125)
    # A last dim that is not contiguous (every other element) is accepted too.
    wide = torch.randn(1, 2, 40, 128, generator=gen)
    assert_matches_reference(torch.randn(1, 4, 1, 64, generator=gen), wide[..., ::2], wide[..., 1::2], None, None,
                             scale=0.125)


@pytest.mark.parametrize("splits", [[0, 1000], [0, 1, 1000], [0, 400, 401, 1000], [0, 999, 1000], [0, 250, 500, 750, 1000]])
@pytest.mark.parametrize("window", [0, 300])
def test_segments_merge_to_the_whole(splits, window):
    gen = torch.Generator().manual_seed(len(splits) + window)
    key, value, ks, vs = make_kv((1, 2, 1000, 64), "int8", 32, gen=gen)
    query = torch.randn(1, 6, 2, 64, generator=gen)
    whole = ops.decode_attention(query, key, value, ks, vs, scale=0.125, window=window)
    parts = []
    for a, b in zip(splits[:-1], splits[1:]):
        parts.append(ops.decode_attention(query, key[:, :, a:b], value[:, :, a:b], ks[:, :, a:b], vs[:, :, a:b],
                                          scale=0.125, window=window, query_start=1000 - 2 - a))
    merged = ops.merge_attention(parts)
    torch.testing.assert_close(merged[0], whole[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(merged[1], whole[1], atol=ATOL, rtol=RTOL)
    ref = reference.merge_attention(parts)
    torch.testing.assert_close(merged[0], ref[0], atol=ATOL, rtol=RTOL)


def test_mixed_segments_lossless_and_codes():
    # The cache's own split: older rows as codes, the newest rows exact in the model dtype.
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(1, 2, 200, 64, generator=gen)
    v = torch.randn(1, 2, 200, 64, generator=gen)
    kc, ks = ops.quantize(k[:, :, :190], "fp8_e4m3", 32)
    vc, vs = ops.quantize(v[:, :, :190], "fp8_e4m3", 32)
    query = torch.randn(1, 4, 3, 64, generator=gen)
    merged = ops.merge_attention([
        ops.decode_attention(query, kc, vc, ks, vs, scale=0.125, query_start=197),
        ops.decode_attention(query, k[:, :, 190:], v[:, :, 190:], scale=0.125, query_start=7),
    ])
    full_k = torch.cat([reference.dequantize(kc, ks, torch.float32), k[:, :, 190:]], 2)
    full_v = torch.cat([reference.dequantize(vc, vs, torch.float32), v[:, :, 190:]], 2)
    ref = reference.decode_attention(query, full_k, full_v, scale=0.125)
    torch.testing.assert_close(merged[0], ref[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(merged[1], ref[1], atol=ATOL, rtol=RTOL)


# -- tail: the exact newest rows attended in the same call -------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tail_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "stored,tail,q_len,window",
    [
        (45, 1, 1, 0),  # a decode step: the last stored block is partial, the tail one row
        (600, 1, 1, 0),  # several KV splits
        (732, 300, 2, 0),  # a tail that crosses a split boundary
        (700, 5, 3, 64),  # a sliding window that starts in the stored rows
        (0, 3, 1, 0),  # nothing stored yet
        (64, 0, 1, 0),  # an empty tail
    ],
)
def test_tail_matches_reference(isa, fmt, tail_dtype, stored, tail, q_len, window, monkeypatch):
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(stored + tail)
    key, value, ks, vs = make_kv((2, 2, stored, 64), fmt, 32, gen=gen)
    tail_key = torch.randn(2, 2, tail, 64, generator=gen).to(tail_dtype)
    tail_value = torch.randn(2, 2, tail, 64, generator=gen).to(tail_dtype)
    query = torch.randn(2, 6, q_len, 64, generator=gen)
    assert_matches_reference(query, key, value, ks, vs, scale=0.125, softcap=20.0, window=window,
                             tail_key=tail_key, tail_value=tail_value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tail_equals_two_merged_segments(fmt):
    # What the cache did before the tail existed: the stored rows and the exact rows as two calls,
    # merged by log-sum-exp. One call must give the same attention.
    gen = torch.Generator().manual_seed(5)
    key, value, ks, vs = make_kv((1, 3, 517, 64), fmt, 32, gen=gen)
    tail_key, tail_value = torch.randn(1, 3, 2, 64, generator=gen), torch.randn(1, 3, 2, 64, generator=gen)
    query = torch.randn(1, 9, 2, 64, generator=gen)
    fused = ops.decode_attention(query, key, value, ks, vs, scale=0.125, tail_key=tail_key, tail_value=tail_value)
    merged = ops.merge_attention([
        ops.decode_attention(query, key, value, ks, vs, scale=0.125, query_start=517),
        ops.decode_attention(query, tail_key, tail_value, scale=0.125),
    ])
    torch.testing.assert_close(fused[0], merged[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fused[1], merged[1], atol=ATOL, rtol=RTOL)


def test_tail_rows_are_positions_after_the_stored_ones():
    # query_start counts over stored + tail rows: a query at row 10 of 8 stored + 4 tail rows sees
    # the tail's first 3 rows only, whatever the tail holds after them.
    gen = torch.Generator().manual_seed(9)
    key, value, ks, vs = make_kv((1, 1, 8, 32), "int8", 16, gen=gen)
    tail_key, tail_value = torch.randn(1, 1, 4, 32, generator=gen), torch.randn(1, 1, 4, 32, generator=gen)
    query = torch.randn(1, 2, 1, 32, generator=gen)
    poisoned_k, poisoned_v = tail_key.clone(), tail_value.clone()
    poisoned_k[:, :, 3], poisoned_v[:, :, 3] = float("nan"), float("inf")
    clean = ops.decode_attention(query, key, value, ks, vs, scale=0.2, query_start=10, tail_key=tail_key,
                                 tail_value=tail_value)
    masked = ops.decode_attention(query, key, value, ks, vs, scale=0.2, query_start=10, tail_key=poisoned_k,
                                  tail_value=poisoned_v)
    assert torch.isfinite(masked[0]).all()
    torch.testing.assert_close(masked[0], clean[0], atol=0, rtol=0)


@settings(max_examples=FUZZ_EXAMPLES or 60, deadline=None)
@given(
    rep=st.sampled_from([1, 2, 3, 4, 8]),
    kv_heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 32, 48, 64, 128]),
    q_len=st.integers(1, 5),
    kv_len=st.integers(1, 700),
    fmt=st.sampled_from(FORMATS),
    group_div=st.sampled_from([1, 2, 4]),
    window=st.sampled_from([0, 1, 7, 128]),
    softcap=st.sampled_from([0.0, 20.0]),
    start_shift=st.integers(-3, 3),
    tail_len=st.sampled_from([None, 0, 1, 2, 5, 40]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz(rep, kv_heads, head_dim, q_len, kv_len, fmt, group_div, window, softcap, start_shift, tail_len, seed):
    gen = torch.Generator().manual_seed(seed)
    group = head_dim // group_div
    key, value, ks, vs = make_kv((1, kv_heads, kv_len, head_dim), fmt, group, gen=gen)
    query = torch.randn(1, kv_heads * rep, q_len, head_dim, generator=gen)
    tail = {}
    if tail_len is not None:
        tail = dict(tail_key=torch.randn(1, kv_heads, tail_len, head_dim, generator=gen),
                    tail_value=torch.randn(1, kv_heads, tail_len, head_dim, generator=gen))
    total = kv_len + (tail_len or 0)
    assert_matches_reference(query, key, value, ks, vs, scale=1 / math.sqrt(head_dim), softcap=softcap,
                             window=window, query_start=total - q_len + start_shift, **tail)


# -- bad input ---------------------------------------------------------------------------------


def _args():
    key, value, ks, vs = make_kv((1, 2, 10, 32), "int8", 16)
    return torch.randn(1, 4, 1, 32), key, value, ks, vs


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, "`query` must be 4-D"),
        (lambda a: (a[0].to(torch.int32), *a[1:]), TypeError, "`query` must be float32"),
        (lambda a: (torch.randn(1, 3, 1, 32), *a[1:]), ValueError, "multiple of `key` heads"),
        (lambda a: (torch.randn(1, 4, 1, 16), *a[1:]), ValueError, "head dim"),
        (lambda a: (torch.randn(2, 4, 1, 32), *a[1:]), ValueError, "batch"),
        (lambda a: (a[0], a[1], a[2], a[3], None), ValueError, "both `key_scales` and `value_scales`"),
        (lambda a: (a[0], a[1], a[2][:, :, :5], a[3], a[4]), ValueError, "same shape"),
        (lambda a: (a[0], a[1], a[2].float(), a[3], a[4]), TypeError, "same dtype"),
        (lambda a: (a[0], a[1].float(), a[2].float(), a[3], a[4]), TypeError, "`codes` must be"),
        (lambda a: (a[0], a[1], a[2], a[3].double(), a[4].double()), TypeError, "float32"),
        (lambda a: (a[0], a[1], a[2], a[3][..., :1].expand(1, 2, 10, 3), a[4][..., :1].expand(1, 2, 10, 3)),
         ValueError, "must divide D"),
        (lambda a: (a[0], a[1], a[2], a[3][:, :, :4], a[4][:, :, :4]), ValueError, "key_scales"),
        (lambda a: (a[0], a[1].to(torch.int32), a[2].to(torch.int32), None, None), TypeError, "float32, float16"),
    ],
)
def test_bad_input(mutate, exc, match):
    query, key, value, ks, vs = mutate(_args())
    with pytest.raises(exc, match=match):
        ops.decode_attention(query, key, value, ks, vs, scale=1.0)


@pytest.mark.parametrize(
    "kw,match",
    [(dict(scale=float("nan")), "`scale` must be finite"), (dict(scale=1.0, softcap=-1.0), "`softcap`"),
     (dict(scale=1.0, window=-2), "`window`"), (dict(scale=1.0, query_start=1 << 50), "`query_start`")],
)
def test_bad_scalars(kw, match):
    query, key, value, ks, vs = _args()
    with pytest.raises(ValueError, match=match):
        ops.decode_attention(query, key, value, ks, vs, **kw)


@pytest.mark.parametrize(
    "tail,exc,match",
    [
        (dict(tail_key=torch.randn(1, 2, 1, 32)), ValueError, "both `tail_key` and `tail_value`"),
        (dict(tail_value=torch.randn(1, 2, 1, 32)), ValueError, "both `tail_key` and `tail_value`"),
        (dict(tail_key=torch.randn(1, 2, 1, 32), tail_value=torch.randn(1, 2, 2, 32)), ValueError, "same shape"),
        (dict(tail_key=torch.randn(1, 1, 1, 32), tail_value=torch.randn(1, 1, 1, 32)), ValueError, "B, Hkv, T_tail, D"),
        (dict(tail_key=torch.randn(1, 2, 1, 16), tail_value=torch.randn(1, 2, 1, 16)), ValueError, "B, Hkv, T_tail, D"),
        (dict(tail_key=torch.randn(2, 1, 32), tail_value=torch.randn(2, 1, 32)), ValueError, "`tail_key` must be 4-D"),
        (dict(tail_key=torch.ones(1, 2, 1, 32, dtype=torch.int8), tail_value=torch.ones(1, 2, 1, 32, dtype=torch.int8)),
         TypeError, "float dtype"),
        (dict(tail_key=torch.randn(1, 2, 1, 32), tail_value=torch.randn(1, 2, 1, 32).half()), TypeError, "float dtype"),
    ],
)
def test_bad_tail(tail, exc, match):
    with pytest.raises(exc, match=match):
        ops.decode_attention(*_args(), scale=1.0, **tail)


def test_bad_isa_name(monkeypatch):
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KVCOMPACT_CPU_ISA"):
        ops.decode_attention(*_args(), scale=1.0)


def test_merge_needs_parts():
    with pytest.raises(ValueError, match="at least one"):
        ops.merge_attention([])


# -- dispatcher, fake kernel, compile --------------------------------------------------------------


def test_opcheck():
    query, key, value, ks, vs = _args()
    torch.library.opcheck(torch.ops.kvcompact.decode_attention, (query, key, value, ks, vs, 0.2, 0.0, 0, None))
    torch.library.opcheck(torch.ops.kvcompact.decode_attention,
                          (query, key.float(), value.float(), None, None, 0.2, 10.0, 3, 5))
    tail = torch.randn(1, 2, 2, 32)
    torch.library.opcheck(torch.ops.kvcompact.decode_attention,
                          (query, key, value, ks, vs, 0.2, 0.0, 0, None, tail, tail.clone()))


def test_compile_fullgraph():
    query, key, value, ks, vs = _args()
    exact_k, exact_v = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)

    def step(query, key, value, ks, vs, exact_k, exact_v):
        old = ops.decode_attention(query, key, value, ks, vs, scale=0.2, query_start=10)
        new = ops.decode_attention(query, exact_k, exact_v, scale=0.2)
        out, lse = ops.merge_attention([old, new])
        return out.to(query.dtype), lse

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(query, key, value, ks, vs, exact_k, exact_v)
    want = step(query, key, value, ks, vs, exact_k, exact_v)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])

    def fused_step(query, key, value, ks, vs, exact_k, exact_v):  # the cache's decode step: one call
        out, lse = ops.decode_attention(query, key, value, ks, vs, scale=0.2, tail_key=exact_k, tail_value=exact_v)
        return out.to(query.dtype), lse

    got = torch.compile(fused_step, fullgraph=True, backend="eager")(query, key, value, ks, vs, exact_k, exact_v)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
