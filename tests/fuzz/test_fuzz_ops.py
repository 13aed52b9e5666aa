"""Differential fuzzing of every kernel against kvcompact.reference (issue 9).

Each example is tiny (a few hundred elements) so 1,000 examples per op fit the CI
budget; KVCOMPACT_FUZZ_EXAMPLES raises the count for long runs. Every check is
bit for bit: the contract (docs/kernels.md) says the kernels compute exactly what
reference.py states. ``quantize`` itself is fuzzed in tests/test_quantize.py;
here the *_into_ variants are driven through strided, offset views (how a cache
appends), which that file does not cover.

CUDA-vs-CPU variants run the same example on both devices and compare bits;
they skip without a GPU.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from kvcompact import ops  # noqa: E402
from kvcompact import reference as ref  # noqa: E402

from conftest import FUZZ_EXAMPLES  # noqa: E402
from _token_helpers import assert_bits_equal, bits  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

EXAMPLES = FUZZ_EXAMPLES or 1000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=FUZZ_EXAMPLES is None,  # CI: reproducible; long runs: fresh draws
    database=None,
    suppress_health_check=list(HealthCheck),
)
GPU_FUZZ = settings(FUZZ, max_examples=max(EXAMPLES // 4, 50))

FMTS = ["fp8_e4m3", "fp8_e5m2", "int8"]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
CODE = ref.CODE_DTYPE
GROUP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                torch.int8, torch.int32, torch.int64, torch.uint8]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _values(shape, dtype, gen, special=False):
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return (torch.randn(shape, generator=gen) * 4).to(dtype)
    if not dtype.is_floating_point:
        lo, hi = {torch.int8: (-128, 128), torch.uint8: (0, 256)}.get(dtype, (-(1 << 30), 1 << 30))
        return torch.randint(lo, hi, shape, generator=gen, dtype=dtype)
    x = torch.randn(shape, generator=gen) * (10.0 ** torch.randint(-3, 4, (1,), generator=gen).item())
    if special and x.numel():
        flat = x.view(-1)
        i = torch.randint(0, flat.numel(), (1,), generator=gen).item()
        flat[i] = [float("nan"), float("inf"), 0.0, 1e-40][i % 4]
    return x.to(dtype)


def _strided_view(base_shape, dtype, gen, kind):
    """A view of a larger buffer with the given logical shape and a layout kind."""
    *lead, d = base_shape
    if kind == "slice_tokens":  # cache append: rows [off, off + n) of a bigger T
        full = _values([*lead[:-1], lead[-1] + 5, d], dtype, gen) if lead else _values([d], dtype, gen)
        return full[..., 2 : 2 + lead[-1], :] if lead else full
    if kind == "every_other":
        full = _values([*lead, 2 * d], dtype, gen)
        return full[..., ::2]
    if kind == "transposed" and len(lead) >= 2:
        full = _values([*lead[:-2], lead[-1], lead[-2], d], dtype, gen)
        return full.transpose(-2, -3)
    return _values(base_shape, dtype, gen)


def _same(a, b, msg=""):
    """Bit equality with every NaN counted equal to every NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype, msg)
    if a.dtype.is_floating_point:
        assert torch.equal(a.float().isnan(), b.float().isnan()), msg
        a = torch.where(a.float().isnan(), torch.zeros_like(a), a)
        b = torch.where(b.float().isnan(), torch.zeros_like(b), b)
    assert_bits_equal(a.contiguous(), b.contiguous(), msg)


# --- quantize_into_ / dequantize_into_ on strided views ----------------------------


@st.composite
def into_cases(draw):
    d = draw(st.sampled_from([1, 2, 4, 6, 8, 16, 24, 32]))
    g = draw(st.sampled_from([x for x in range(1, d + 1) if d % x == 0]))
    lead = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    return dict(
        shape=[*lead, d], g=g, fmt=draw(st.sampled_from(FMTS)), dtype=draw(st.sampled_from(FLOATS)),
        xkind=draw(st.sampled_from(["contig", "every_other", "transposed", "slice_tokens"])),
        okind=draw(st.sampled_from(["contig", "every_other", "transposed", "slice_tokens"])),
        special=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _run_into(c, device):
    gen = _gen(c["seed"])
    shape, g, fmt = c["shape"], c["g"], c["fmt"]
    x = _strided_view(shape, c["dtype"], gen, c["xkind"])
    if c["special"] and x.numel():  # one non-finite group, the rest must be untouched
        x[(0,) * x.dim()] = float("nan")
    codes = _strided_view(shape, CODE[fmt], gen, c["okind"])
    scales = _strided_view([*shape[:-1], shape[-1] // g], torch.float32, gen, c["okind"])
    x, codes, scales = x.to(device), _keep_layout(codes, device), _keep_layout(scales, device)
    ops.quantize_into_(x, codes, scales, fmt)
    out = _strided_view(shape, c["dtype"], gen, c["okind"])
    out = _keep_layout(out, device)
    ops.dequantize_into_(codes, scales, out)
    return codes.cpu(), scales.cpu(), out.cpu(), x.cpu()


def _keep_layout(t, device):
    """Move to ``device`` keeping t's strides (so CUDA sees the same strided view)."""
    if device == "cpu":
        return t
    base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return base.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


@FUZZ
@given(into_cases())
def test_quantize_into_dequantize_into(c):
    codes, scales, out, x = _run_into(c, "cpu")
    rcodes, rscales = ref.quantize(x, c["fmt"], c["g"])
    _same(codes, rcodes, "codes")
    _same(scales, rscales, "scales")
    _same(out, ref.dequantize(rcodes, rscales, c["dtype"]), "dequantize_into_")


@needs_cuda
@GPU_FUZZ
@given(into_cases())
def test_quantize_into_cuda_matches_cpu(c):
    for a, b in zip(_run_into(c, "cpu"), _run_into(c, "cuda")):
        _same(a, b, "cuda vs cpu")


# --- compact_ ---------------------------------------------------------------------


@st.composite
def compact_cases(draw):
    B, H, T = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(0, 12))
    K = draw(st.integers(0, T))
    trailing = draw(st.lists(st.sampled_from([(), (1,), (3,), (2, 2), (8,)]), min_size=1, max_size=4))
    dtypes = [draw(st.sampled_from(GROUP_DTYPES)) for _ in trailing]
    keep = [sorted(draw(st.permutations(range(T)))[:K]) for _ in range(B * H)]
    return dict(B=B, H=H, T=T, K=K, trailing=trailing, dtypes=dtypes, keep=keep,
                noncontig=draw(st.booleans()), validate=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def _run_compact(c, device):
    gen = _gen(c["seed"])
    B, H, T, K = c["B"], c["H"], c["T"], c["K"]
    tensors = []
    for tr, dt in zip(c["trailing"], c["dtypes"]):
        t = _values([B, H, T, *tr], dt, gen)
        if c["noncontig"]:  # a [B, T, H, ...] buffer viewed as [B, H, T, ...]
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        tensors.append(t.to(device) if device == "cpu" else _keep_layout(t, device))
    keep = torch.tensor(c["keep"], dtype=torch.int64).reshape(B, H, K).to(device)
    before = [t.clone() for t in tensors]
    ptrs = [t.data_ptr() for t in tensors]
    ops.compact_(tensors, keep, c["validate"])
    assert [t.data_ptr() for t in tensors] == ptrs
    return [t.cpu() for t in before], [t.cpu() for t in tensors], keep.cpu()


@FUZZ
@given(compact_cases())
def test_compact(c):
    before, after, keep = _run_compact(c, "cpu")
    K = c["K"]
    for i, (b, a) in enumerate(zip(before, after)):
        expected = ref.compact([bits(b)], keep)[0]  # as integers: gather has no fp8 kernel
        assert_bits_equal(a[:, :, :K].contiguous(), expected[:, :, :K].contiguous(), f"tensor {i} {b.dtype}")


@needs_cuda
@GPU_FUZZ
@given(compact_cases())
def test_compact_cuda_matches_cpu(c):
    K = c["K"]
    _, a_cpu, _ = _run_compact(c, "cpu")
    _, a_gpu, _ = _run_compact(c, "cuda")
    for a, b in zip(a_cpu, a_gpu):
        _same(a[:, :, :K], b[:, :, :K], "cuda vs cpu")


# --- move_ ------------------------------------------------------------------------


@st.composite
def move_cases(draw):
    T = draw(st.integers(1, 16))
    s = draw(st.integers(0, T))
    e = draw(st.integers(s, T))
    dst = draw(st.integers(0, T - (e - s)))
    trailing = draw(st.lists(st.sampled_from([(), (2,), (5,), (2, 3)]), min_size=1, max_size=3))
    dtypes = [draw(st.sampled_from(GROUP_DTYPES)) for _ in trailing]
    return dict(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)), T=T, s=s, e=e, dst=dst,
                trailing=trailing, dtypes=dtypes, noncontig=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def _run_move(c, device):
    gen = _gen(c["seed"])
    tensors = []
    for tr, dt in zip(c["trailing"], c["dtypes"]):
        t = _values([c["B"], c["H"], c["T"], *tr], dt, gen)
        if c["noncontig"]:
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        tensors.append(t if device == "cpu" else _keep_layout(t, device))
    before = [t.cpu().clone() for t in tensors]
    ops.move_(tensors, c["s"], c["e"], c["dst"])
    return before, [t.cpu() for t in tensors]


@FUZZ
@given(move_cases())
def test_move(c):
    before, after = _run_move(c, "cpu")
    n = c["e"] - c["s"]
    for b, a in zip(before, after):
        expected = ref.move([b], c["s"], c["e"], c["dst"])[0]
        # The destination range is exact; everything outside it is untouched.
        _same(a, expected, f"move {c['s']}:{c['e']} -> {c['dst']} (n={n})")


@needs_cuda
@GPU_FUZZ
@given(move_cases())
def test_move_cuda_matches_cpu(c):
    for a, b in zip(_run_move(c, "cpu")[1], _run_move(c, "cuda")[1]):
        _same(a, b, "cuda vs cpu")


# --- rope_shift_ / rope_shift_quantized_ ------------------------------------------


@st.composite
def rope_cases(draw):
    d = draw(st.sampled_from([2, 4, 6, 8, 16, 32]))
    half = draw(st.integers(1, d // 2))  # partial rotary when 2 * half < d
    B, H, T = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(0, 6))
    divisors = [x for x in range(1, d + 1) if d % x == 0]
    return dict(
        B=B, H=H, T=T, d=d, half=half, style=draw(st.sampled_from(["neox", "gptj"])),
        dtype=draw(st.sampled_from(FLOATS)), fmt=draw(st.sampled_from(FMTS)),
        g=draw(st.sampled_from(divisors)), per_row=draw(st.booleans()),
        delta_scale=draw(st.sampled_from([1, 100, 10_000, 1_000_000, 2**40])),
        base=draw(st.sampled_from([10_000.0, 500_000.0, 1e6])),
        noncontig=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _rope_inputs(c, gen):
    B, H, T, d, half = c["B"], c["H"], c["T"], c["d"], c["half"]
    shape = (B, H, T) if c["per_row"] else (T,)
    delta = torch.randint(-c["delta_scale"], c["delta_scale"] + 1, shape, generator=gen)
    inv_freq = 1.0 / (c["base"] ** (torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half)))
    return delta, inv_freq


def _run_rope(c, device):
    gen = _gen(c["seed"])
    keys = _values([c["B"], c["H"], c["T"], c["d"]], c["dtype"], gen)
    if c["noncontig"]:
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
    delta, inv_freq = _rope_inputs(c, gen)
    before = keys.clone()
    k = keys if device == "cpu" else _keep_layout(keys, device)
    ops.rope_shift_(k, delta.to(device), inv_freq.to(device), c["style"])
    return before, k.cpu(), delta, inv_freq


@FUZZ
@given(rope_cases())
def test_rope_shift(c):
    before, after, delta, inv_freq = _run_rope(c, "cpu")
    _same(after, ref.rope_shift(before, delta, inv_freq, c["style"]), "rope_shift_")


def _run_rope_q(c, device):
    gen = _gen(c["seed"])
    x = _values([c["B"], c["H"], c["T"], c["d"]], torch.float32, gen)
    codes, scales = ref.quantize(x, c["fmt"], c["g"])
    if c["noncontig"]:
        codes = codes.transpose(1, 2).contiguous().transpose(1, 2)
        scales = scales.transpose(1, 2).contiguous().transpose(1, 2)
    delta, inv_freq = _rope_inputs(c, gen)
    before = (codes.clone(), scales.clone())
    cd = codes if device == "cpu" else _keep_layout(codes, device)
    sc = scales if device == "cpu" else _keep_layout(scales, device)
    ops.rope_shift_quantized_(cd, sc, delta.to(device), inv_freq.to(device), c["style"])
    return before, (cd.cpu(), sc.cpu()), delta, inv_freq


@FUZZ
@given(rope_cases())
def test_rope_shift_quantized(c):
    (codes, scales), (oc, os_), delta, inv_freq = _run_rope_q(c, "cpu")
    rc, rs = ref.rope_shift_quantized(codes, scales, delta, inv_freq, c["style"])
    _same(oc, rc, "codes")
    _same(os_, rs, "scales")


@needs_cuda
@GPU_FUZZ
@given(rope_cases())
def test_rope_cuda_matches_cpu(c):
    _same(_run_rope(c, "cpu")[1], _run_rope(c, "cuda")[1], "rope_shift_ cuda vs cpu")
    (_, (c1, s1), _, _), (_, (c2, s2), _, _) = _run_rope_q(c, "cpu"), _run_rope_q(c, "cuda")
    _same(c1, c2, "codes cuda vs cpu")
    _same(s1, s2, "scales cuda vs cpu")


# --- copy_blocks_ -----------------------------------------------------------------


@st.composite
def copy_cases(draw):
    ns, nd = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    n = draw(st.integers(0, nd))
    dst_ids = draw(st.permutations(range(nd)))[:n]  # distinct destinations: order-free
    src_ids = [draw(st.integers(0, ns - 1)) for _ in range(n)]
    return dict(ns=ns, nd=nd, mapping=list(zip(src_ids, dst_ids)),
                block=draw(st.sampled_from([(1,), (4,), (2, 3), (2, 2, 4)])),
                dtype=draw(st.sampled_from(GROUP_DTYPES)), seed=draw(st.integers(0, 2**31 - 1)))


def _run_copy(c, src_dev, dst_dev):
    gen = _gen(c["seed"])
    src = _values([c["ns"], *c["block"]], c["dtype"], gen)
    dst = _values([c["nd"], *c["block"]], c["dtype"], gen)
    mapping = torch.tensor(c["mapping"], dtype=torch.int64).reshape(-1, 2)
    before = dst.clone()
    s, d = src.to(src_dev), dst.to(dst_dev)
    ops.copy_blocks_(s, d, mapping)
    return src, before, mapping, d.cpu()


@FUZZ
@given(copy_cases())
def test_copy_blocks(c):
    src, before, mapping, after = _run_copy(c, "cpu", "cpu")
    _same(after, ref.copy_blocks(src, before, mapping), "copy_blocks_")


@needs_cuda
@GPU_FUZZ
@given(copy_cases(), st.sampled_from([("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")]))
def test_copy_blocks_cuda(c, devs):
    src, before, mapping, after = _run_copy(c, *devs)
    _same(after, ref.copy_blocks(src, before, mapping), f"copy_blocks_ {devs}")
