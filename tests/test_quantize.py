"""quantize / dequantize against kvcompact.reference, bit for bit (the contract in docs/kernels.md)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvcompact
from kvcompact import ops
from kvcompact import reference as ref
from conftest import FUZZ_EXAMPLES

FORMATS = kvcompact.FORMATS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QMAX = ref.QMAX


def assert_codes_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "codes differ"


def assert_scales_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan()), "NaN scales differ"
    assert torch.equal(a.nan_to_num(0.0).view(torch.int32), b.nan_to_num(0.0).view(torch.int32))


def assert_same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality, with every NaN counted equal to every NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    ia = a.nan_to_num(0.0).contiguous().view(torch.uint8)
    ib = b.nan_to_num(0.0).contiguous().view(torch.uint8)
    assert torch.equal(ia, ib)


def check_against_reference(x, fmt, group_size):
    codes, scales = ops.quantize(x, fmt, group_size)
    rcodes, rscales = ref.quantize(x, fmt, group_size)
    assert_codes_equal(codes, rcodes)
    assert_scales_equal(scales, rscales)
    for dtype in DTYPES:
        assert_same_values(ops.dequantize(codes, scales, dtype), ref.dequantize(rcodes, rscales, dtype))
    return codes, scales


# --- hypothesis: random shapes, strides, dtypes, group sizes and special values

DIMS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256]


@st.composite
def quant_cases(draw):
    d = draw(st.sampled_from(DIMS))
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    group_size = draw(st.one_of(st.none(), st.sampled_from(divisors)))
    lead = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "strided_last"]))
    magnitude = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-30, 1e-42, 448.0, 6e4, 3e38]))
    specials = draw(st.lists(st.sampled_from(["zero_group", "nan", "inf", "-inf", "qmax", "huge", "subnormal"]), max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    return d, group_size, lead, dtype, layout, magnitude, specials, seed


def build_input(d, lead, dtype, layout, magnitude, specials, seed):
    g = torch.Generator().manual_seed(seed)
    shape = list(lead) + [d]
    if layout == "transposed" and len(lead) >= 2:
        base = torch.randn(*lead[:-2], lead[-1], lead[-2], d, generator=g)
        x = base.transpose(-2, -3)
    elif layout == "sliced":
        base = torch.randn(*[s * 2 + 1 for s in lead], d, generator=g)
        x = base[tuple(slice(1, None, 2) for _ in lead)]
    elif layout == "strided_last":
        x = torch.randn(*lead, 2 * d, generator=g)[..., ::2]
    else:
        x = torch.randn(*shape, generator=g)
    x = x * magnitude
    flat_rows = x.reshape(-1, d) if x.is_contiguous() else None
    if x.numel() > 0:
        idx = torch.randint(0, x.numel(), (1,), generator=g).item()
        pos = list(torch.unravel_index(torch.tensor(idx), x.shape))
        pos = tuple(int(p) for p in pos)
        for s in specials:
            if s == "zero_group":
                x[pos[:-1]] = 0.0
            elif s == "nan":
                x[pos] = float("nan")
            elif s == "inf":
                x[pos] = float("inf")
            elif s == "-inf":
                x[pos] = float("-inf")
            elif s == "qmax":
                x[pos] = 448.0
            elif s == "huge":
                x[pos] = 3.0e38
            elif s == "subnormal":
                x[pos[:-1]] = x[pos[:-1]] * 1e-40
    del flat_rows
    return x.to(dtype) if dtype != torch.float32 else x


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_matches_reference_hypothesis(fmt):
    @settings(
        max_examples=FUZZ_EXAMPLES or 2000,
        deadline=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(quant_cases())
    def run(case):
        d, group_size, lead, dtype, layout, magnitude, specials, seed = case
        x = build_input(d, lead, dtype, layout, magnitude, specials, seed)
        check_against_reference(x, fmt, group_size)

    run()


# --- targeted edge cases


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_group_has_unit_scale_and_zero_codes(fmt, dtype):
    x = torch.zeros(3, 64, dtype=dtype)
    x[1, 32:] = torch.randn(32).to(dtype)
    codes, scales = check_against_reference(x, fmt, 32)
    assert scales[0].tolist() == [1.0, 1.0] and scales[1, 0].item() == 1.0
    assert not codes[0].view(torch.uint8).any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_group_gets_nan_scale_and_neighbours_untouched(fmt):
    x = torch.randn(4, 64)
    clean_codes, clean_scales = ops.quantize(x, fmt, 16)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 20] = bad  # group (2, 1)
        codes, scales = check_against_reference(y, fmt, 16)
        assert math.isnan(scales[2, 1].item())
        assert not codes[2, 16:32].view(torch.uint8).any()
        mask = torch.ones_like(scales, dtype=torch.bool)
        mask[2, 1] = False
        assert torch.equal(scales[mask], clean_scales[mask])
        keep = torch.ones(4, 64, dtype=torch.bool)
        keep[2, 16:32] = False
        assert torch.equal(codes.view(torch.uint8)[keep], clean_codes.view(torch.uint8)[keep])
        assert ops.dequantize(codes, scales, torch.float32)[2, 16:32].isnan().all()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_codes_equal_torch_cast_when_scale_is_one(fmt):
    # absmax == QMAX gives scale exactly 1, so codes must be torch's own cast of x.
    qmax = QMAX[fmt]
    x = (torch.rand(64, 128) * 2 - 1) * qmax
    x[:, 0] = qmax
    x[::3, 1] = -qmax
    x[5, 2:40] = torch.logspace(-40, 0, 38) * qmax  # down into fp8 subnormals
    codes, scales = ops.quantize(x, fmt)
    assert torch.all(scales == 1.0)
    assert_codes_equal(codes, x.to(ref.CODE_DTYPE[fmt]))


def test_int8_rounds_half_to_even():
    # scale = 127 / 127 = 1: codes are the values rounded half to even.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])
    codes, scales = ops.quantize(x, "int8")
    assert scales.item() == 1.0
    assert codes.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_at_and_beyond_format_max(fmt):
    qmax = QMAX[fmt]
    x = torch.tensor([[qmax, -qmax, qmax * 4, 1.0], [3.0e38, -3.0e38, 1.0, 0.0]])
    codes, scales = check_against_reference(x, fmt, None)
    y = ops.dequantize(codes, scales, torch.float32)
    assert torch.isfinite(y).all()
    assert y[1, 0].item() == pytest.approx(3.0e38, rel=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_subnormal_groups_keep_a_positive_scale(fmt):
    # absmax / QMAX underflows to 0 here; the scale is floored at 2**-149.
    x = torch.tensor([[1.4e-45, -2.8e-45, 0.0, 1.4e-45]])
    codes, scales = check_against_reference(x, fmt, None)
    assert scales.item() == ref.MIN_SCALE
    y = ops.dequantize(codes, scales, torch.float32)
    assert torch.equal(y, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_and_single_token_inputs(fmt):
    for shape in [(0, 64), (2, 0, 3, 64), (1, 1, 1, 8), (1, 7)]:
        x = torch.randn(shape)
        codes, scales = check_against_reference(x, fmt, None)
        assert codes.shape == x.shape and scales.shape == (*shape[:-1], 1)


# --- relative error bound of the round trip

# Half a unit in the last place of a normal code (relative) and half the
# subnormal spacing (absolute, in units of the scale).
ERROR_BOUND = {
    "fp8_e4m3": (2.0**-4, 2.0**-10),
    "fp8_e5m2": (2.0**-3, 2.0**-17),
    "int8": (0.0, 0.5),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [None, 32, 8])
def test_round_trip_error_within_format_bound(fmt, group_size):
    x = torch.randn(64, 128) * torch.logspace(-3, 3, 128)
    codes, scales = ops.quantize(x, fmt, group_size)
    y = ops.dequantize(codes, scales, torch.float32)
    rel, absolute = ERROR_BOUND[fmt]
    g = group_size or 128
    scale_per_elem = scales.repeat_interleave(g, dim=-1)
    # Beyond the format's own rounding: x / scale and code * scale each round once in fp32, so a
    # value a hair from a rounding midpoint may land up to ~2 fp32 ulps of |x| past the bound.
    bound = x.abs() * (rel + 2.0**-22) + scale_per_elem * absolute
    assert torch.all((y - x).abs() <= bound * (1 + 1e-6) + 1e-30)


# --- quantize_into_ / dequantize_into_ on strided views of a cache buffer


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_into_writes_only_its_views(fmt, dtype):
    b, h, cap, d, g = 2, 4, 32, 64, 16
    codes_buf = torch.zeros(b, h, cap, d, dtype=ref.CODE_DTYPE[fmt])
    scale_buf = torch.full((b, h, cap, d // g), -5.0)
    new = torch.randn(b, 3, h, d).to(dtype).transpose(1, 2)  # [B, H, 3, D] view, as keys arrive
    ops.quantize_into_(new, codes_buf[:, :, 10:13], scale_buf[:, :, 10:13], fmt)
    rcodes, rscales = ref.quantize(new, fmt, g)
    assert_codes_equal(codes_buf[:, :, 10:13].contiguous(), rcodes)
    assert_scales_equal(scale_buf[:, :, 10:13].contiguous(), rscales)
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[10:13] = False
    assert not codes_buf[:, :, untouched].view(torch.uint8).any()
    assert torch.all(scale_buf[:, :, untouched] == -5.0)

    out_buf = torch.full((b, h, cap, d), 7.0, dtype=dtype)
    ops.dequantize_into_(codes_buf[:, :, 10:13], scale_buf[:, :, 10:13], out_buf[:, :, 10:13])
    assert_same_values(out_buf[:, :, 10:13].contiguous(), ref.dequantize(rcodes, rscales, dtype))
    assert torch.all(out_buf[:, :, untouched] == 7.0)


def test_dequantize_reads_strided_codes():
    codes, scales = ops.quantize(torch.randn(4, 6, 32), "fp8_e4m3", 8)
    ct, st_ = codes.transpose(0, 1), scales.transpose(0, 1)
    assert_same_values(ops.dequantize(ct, st_, torch.float32), ref.dequantize(ct, st_, torch.float32))


# --- op registration: opcheck and torch.compile


def _sample_calls():
    x = torch.randn(2, 3, 5, 32, dtype=torch.bfloat16)
    for fmt in FORMATS:
        codes, scales = ops.quantize(x, fmt, 8)
        yield torch.ops.kvcompact.quantize.default, (x, fmt, 8)
        yield torch.ops.kvcompact.quantize.default, (x.transpose(1, 2), fmt, None)
        yield torch.ops.kvcompact.quantize_into_.default, (x, codes.clone(), scales.clone(), fmt)
        yield torch.ops.kvcompact.dequantize.default, (codes, scales, torch.float16)
        yield torch.ops.kvcompact.dequantize_into_.default, (codes, scales, torch.empty_like(x))


ALL_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("call", list(_sample_calls()), ids=lambda c: str(c)[:40])
def test_opcheck(call):
    op, args = call
    has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for a in args)
    has_fp8 = has_fp8 or any(a in ("fp8_e4m3", "fp8_e5m2") for a in args if isinstance(a, str))
    # torch's schema checker compares tensors with arithmetic that float8 lacks
    # ("mul_cpu_reduced_float" not implemented); the same ops are schema-checked
    # with int8 codes, and every other utility runs on fp8 too.
    utils = ALL_OPCHECK_UTILS[1:] if has_fp8 else ALL_OPCHECK_UTILS
    torch.library.opcheck(op, args, test_utils=utils)


def test_torch_compile_fullgraph():
    def round_trip(x):
        codes, scales = ops.quantize(x, "fp8_e4m3", 32)
        return ops.dequantize(codes, scales, torch.float32) * 2.0

    compiled = torch.compile(round_trip, fullgraph=True, backend="inductor")
    x = torch.randn(2, 4, 9, 64)
    assert torch.equal(compiled(x), round_trip(x))


# --- bad input: clear Python exceptions naming the argument


BAD_INPUTS = [
    (lambda: ops.quantize(torch.randn(4, 8), "fp4"), ValueError, "`fmt`"),
    (lambda: ops.quantize(torch.randn(4, 8), "INT8"), ValueError, "`fmt`"),
    (lambda: ops.quantize(torch.arange(8), "int8"), TypeError, "`x`"),
    (lambda: ops.quantize(torch.ones(4, 8, dtype=torch.int8), "int8"), TypeError, "`x`"),
    (lambda: ops.quantize(torch.randn(4, 8), "int8", 0), ValueError, "`group_size`"),
    (lambda: ops.quantize(torch.randn(4, 8), "int8", -8), ValueError, "`group_size`"),
    (lambda: ops.quantize(torch.randn(4, 8), "int8", 3), ValueError, "`group_size`"),
    (lambda: ops.quantize(torch.tensor(1.0), "int8"), ValueError, "`x`"),
    (lambda: ops.quantize(torch.randn(4, 0), "int8"), ValueError, "`x`"),
    (lambda: ops.quantize_into_(torch.randn(4, 8), torch.empty(4, 8, dtype=torch.int8), torch.empty(4, 2), "fp8_e4m3"), TypeError, "`codes`"),
    (lambda: ops.quantize_into_(torch.randn(4, 8), torch.empty(4, 9, dtype=torch.int8), torch.empty(4, 1), "int8"), ValueError, "`codes`"),
    (lambda: ops.quantize_into_(torch.randn(4, 8), torch.empty(4, 8, dtype=torch.int8), torch.empty(4, 3), "int8"), ValueError, "`scales`"),
    (lambda: ops.quantize_into_(torch.randn(4, 8), torch.empty(4, 8, dtype=torch.int8), torch.empty(5, 2), "int8"), ValueError, "`scales`"),
    (lambda: ops.quantize_into_(torch.randn(4, 8), torch.empty(4, 8, dtype=torch.int8), torch.empty(4, 2, dtype=torch.float16), "int8"), TypeError, "`scales`"),
    (lambda: ops.quantize_into_(torch.randn(4, 8), torch.empty(4, 8, dtype=torch.int8, device="meta"), torch.empty(4, 2, device="meta"), "int8"), ValueError, "device"),
    (lambda: ops.dequantize(torch.ones(4, 8, dtype=torch.int16), torch.ones(4, 1)), TypeError, "`codes`"),
    (lambda: ops.dequantize(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 3)), ValueError, "`scales`"),
    (lambda: ops.dequantize(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1), torch.int32), TypeError, "`dtype`"),
    (lambda: ops.dequantize(torch.ones((), dtype=torch.int8), torch.ones(())), ValueError, "`codes`"),
    (lambda: ops.dequantize_into_(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1), torch.empty(4, 7)), ValueError, "`out`"),
    (lambda: ops.dequantize_into_(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1), torch.empty(4, 8, dtype=torch.int8)), TypeError, "`out`"),
]


@pytest.mark.parametrize("call,exc,needle", BAD_INPUTS, ids=[f"bad{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_clear_error(call, exc, needle):
    with pytest.raises(exc, match=needle.replace("`", "\\`")) as info:
        call()
    assert str(info.value).split(":")[0].strip() in {"quantize", "quantize_into_", "dequantize", "dequantize_into_"} or "device" in str(info.value)


def test_build_info_reports_the_build():
    info = kvcompact.build_info()
    assert info["runtime_torch_version"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert bool(info["cuda_archs"]) == info["cuda_kernels"]


# --- CPU SIMD fast paths (csrc/cpu/quantize_cpu.cpp, kvcompact/cpu/quant_simd.h)
#
# Rows whose last dim is contiguous take explicit AVX-512 / AVX2 kernels: blocks
# of 8 / 8 / 4 / 2 groups for G = 16 / 32 / 64 / 128 (bf16 loaded as interleaved
# pairs when G is a multiple of 32; whole contiguous tensors as one run of
# groups across rows), a masked loop for any other G, and scalar tails on AVX2.
# These cases put special values inside and across those blocks and vector
# boundaries, and run under every KVCOMPACT_CPU_ISA level this CPU offers.


def _cpu_isas() -> list[str]:
    """The CPU ISA paths this machine can run, the best first (``KVCOMPACT_CPU_ISA`` values)."""
    order = ["avx512", "avx2", "scalar"]
    return order[order.index(kvcompact.build_info()["cpu_isa"]):]


CPU_ISAS = _cpu_isas()

FAST_SHAPES = [
    # (rows, D, group_size)
    (37, 128, None), (37, 128, 32), (37, 128, 16), (37, 128, 64), (9, 256, 128),
    (11, 96, 32),    # 3 groups a row: rows run together as blocks of 8, 4 and single groups
    (13, 160, 32),   # 5 groups a row
    (13, 192, 64),   # 3 groups of 64 a row
    (7, 48, 16), (7, 48, 48), (7, 40, None), (7, 40, 8), (5, 24, 12),
    (5, 100, 20), (5, 33, None), (5, 8, 8), (5, 200, 40), (5, 1000, 250), (3, 17, None),
]


def _fast_input(rows, d, g, dtype, fmt, seed):
    gen = torch.Generator().manual_seed(seed)
    g = g or d
    x = torch.randn(rows, d, generator=gen) * torch.logspace(-2, 2, d)
    x[0] = 0.0                                    # all-zero groups
    if rows > 1:
        x[1] = x[1] * 1e-42                       # subnormal (fp32) groups
    if rows > 2:
        x[2, -1] = 3.0e38                         # values far past QMAX
        x[2, 0] = -3.0e38
    if rows > 3:
        x[3, g // 2] = float("nan")               # non-finite first group, rest finite
    if rows > 4:
        x[4, d - 1] = float("inf")                # non-finite last group
    if rows > 5:
        x[5, min(d - 1, 2 * g + 1)] = float("-inf")
    if rows > 6:
        x[6] = QMAX[fmt]                          # exactly QMAX: scale 1
        x[6, ::3] = -QMAX[fmt]
    if rows > 8:
        x[8, ::2] = -0.0                          # signed zeros keep their sign bit in fp8
    for r in range(7, rows, 5):                   # one NaN in a random group
        x[r, int(torch.randint(0, d, (1,), generator=gen))] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FAST_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_path_contiguous_rows(isa, fmt, dtype, shape, monkeypatch):
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", isa)
    rows, d, g = shape
    x = _fast_input(rows, d, g, dtype, fmt, seed=rows * 1000 + d)
    check_against_reference(x, fmt, g)
    # The same rows as a transposed [B, H, T, D] view: last dim still contiguous,
    # rows no longer one run.
    x4 = x.reshape(1, rows, 1, d).transpose(1, 2)
    check_against_reference(x4, fmt, g)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("g", [16, 32, 64, 128, 24])
def test_fast_path_strided_scales(isa, fmt, g, monkeypatch):
    # Contiguous x and codes rows, scales written through a strided view (the
    # multi-group blocks store scales as one vector only when contiguous).
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", isa)
    x = _fast_input(21, 384 if g == 128 else 192, g, torch.bfloat16, fmt, seed=g)
    groups = x.shape[-1] // g
    codes = torch.empty(x.shape, dtype=ref.CODE_DTYPE[fmt])
    scale_buf = torch.full((x.shape[0], groups * 2), -7.0)
    ops.quantize_into_(x, codes, scale_buf[:, ::2], fmt)
    rcodes, rscales = ref.quantize(x, fmt, g)
    assert_codes_equal(codes, rcodes)
    assert_scales_equal(scale_buf[:, ::2].contiguous(), rscales)
    assert torch.all(scale_buf[:, 1::2] == -7.0)
    for dtype in DTYPES:
        out = torch.empty(x.shape, dtype=dtype)
        ops.dequantize_into_(codes, scale_buf[:, ::2], out)
        assert_same_values(out, ref.dequantize(rcodes, rscales, dtype))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d,g", [(256, 32), (256, 256), (48, 16), (40, 40), (24, 8)])
def test_fast_path_dequantize_every_code_and_odd_scales(isa, fmt, d, g, monkeypatch):
    # Every code (fp8 NaN codes included) under scales that are tiny, huge
    # (256 * scale overflows: e4m3's folded-scale path must step aside),
    # negative, zero, infinite and NaN.
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", isa)
    rows = 16
    codes = torch.arange(rows * d).remainder(256).to(torch.uint8).reshape(rows, d)
    codes = codes.view(ref.CODE_DTYPE[fmt])
    specials = torch.tensor([1.0, 2.0**-149, 1e-40, 3.0e38, 2.0**120, 1.9e36, -0.75, 0.0, -0.0,
                             float("inf"), float("-inf"), float("nan"), 1e-3, 448.0, 5e-8, 2.0**-126])
    scales = specials.reshape(rows, 1).repeat(1, d // g)
    scales[:, -1] = specials.flip(0)
    for dtype in DTYPES:
        assert_same_values(ops.dequantize(codes, scales, dtype), ref.dequantize(codes, scales, dtype))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_fast_path_large_input_matches_reference(isa, monkeypatch):
    # The benchmark's shape family (many rows, several parallel tasks), bf16.
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", isa)
    x = torch.randn(2, 4, 300, 128, dtype=torch.bfloat16)
    x[1, 2, 17, 5] = float("nan")
    for fmt in FORMATS:
        for g in (None, 32):
            check_against_reference(x, fmt, g)


def test_quantize_rejects_unknown_cpu_isa(monkeypatch):
    monkeypatch.setenv("KVCOMPACT_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="KVCOMPACT_CPU_ISA"):
        ops.quantize(torch.randn(2, 32), "int8")
    with pytest.raises(ValueError, match="KVCOMPACT_CPU_ISA"):
        ops.dequantize(torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1))
