"""CUDA quantize/dequantize: bit-for-bit equal to the CPU kernels.

The CPU kernels are held to kvcompact.reference (and torch's own float8 casts) by
the CPU tests; here every CUDA result is compared with the CPU result on the same
input: codes as raw bytes, scales bitwise with NaN in the same places. Inputs
cover both CUDA paths (16-byte vector fast path and the scalar fallback for
strided or unaligned views and odd group sizes). Runs only where a GPU is
visible (benchmarks/gpu_check.sh on a lent machine).
"""

from __future__ import annotations

import random

import pytest
import torch

import kvcompact
from kvcompact import ops, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FORMATS = ("fp8_e4m3", "fp8_e5m2", "int8")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODE_DTYPE = reference.CODE_DTYPE
QMAX = reference.QMAX

# (shape, group_size): fast path (G % 16 == 0 and aligned) and scalar path.
SHAPES = [
    ((1, 1, 1, 64), 32),  # one token
    ((1, 1, 1, 128), None),
    ((2, 3, 5, 64), 16),  # one lane per group
    ((2, 4, 7, 128), 32),
    ((2, 4, 7, 128), 128),
    ((1, 2, 9, 256), None),  # a full warp per group
    ((1, 2, 9, 256), 64),
    ((3, 7, 96), 96),  # 6 chunks: 8 lanes, 2 idle
    ((3, 7, 96), 48),  # 3 chunks: 4 lanes, 1 idle
    ((5, 80), 80),
    ((5, 80), 40),  # scalar path: G % 16 != 0
    ((2, 576), 576),  # MLA-sized rows: 36 chunks, 2 per lane
    ((2, 2048), 2048),  # 4 chunks per lane
    ((2, 4096), 4096),  # past the register path: scalar kernel
    ((4, 7), 7),
    ((3, 1), None),
    ((33, 24), 8),
]


def _device():
    return torch.device("cuda", torch.cuda.current_device())


def _random(shape, dtype, device="cpu", seed=None):
    """Normal values with per-row magnitudes spread over many decades and a few
    outliers, so scales, subnormal codes and clamping all occur."""
    g = torch.Generator().manual_seed(random.randrange(2**31) if seed is None else seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if x.dim() >= 1 and x.numel() > 0:
        decades = torch.randint(-6, 5, (*shape[:-1], 1), generator=g).float()
        x = x * torch.pow(10.0, decades)
        outliers = torch.rand(shape, generator=g) < 0.01
        x = torch.where(outliers, x * 300.0, x)
    return x.to(dtype).to(device)


def _bytes(codes: torch.Tensor) -> torch.Tensor:
    return codes.contiguous().view(torch.uint8).cpu()


def assert_codes_equal(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = _bytes(got), _bytes(want)
    if not torch.equal(g, w):
        bad = (g != w).nonzero()
        raise AssertionError(
            f"{len(bad)} code bytes differ; first at {bad[0].tolist()}: "
            f"got {g[tuple(bad[0])].item():#04x}, want {w[tuple(bad[0])].item():#04x}"
        )


def assert_float_equal(got: torch.Tensor, want: torch.Tensor):
    """Bitwise equal, except that NaN only has to be NaN in the same places."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.cpu(), want.cpu()
    assert torch.equal(g.isnan(), w.isnan()), "NaN positions differ"
    int_dtype = {4: torch.int32, 2: torch.int16}[g.element_size()]
    keep = ~w.isnan()
    gi = g.contiguous().view(int_dtype)[keep]
    wi = w.contiguous().view(int_dtype)[keep]
    if not torch.equal(gi, wi):
        bad = (gi != wi).nonzero()[0].item()
        raise AssertionError(
            f"values differ: got {g[keep][bad].item()!r}, want {w[keep][bad].item()!r}"
        )


def check_quantize(x: torch.Tensor, fmt: str, group_size):
    """Quantizes CUDA tensor ``x`` on both backends and compares."""
    codes, scales = ops.quantize(x, fmt, group_size)
    assert codes.device == x.device and scales.device == x.device
    want_codes, want_scales = ops.quantize(x.cpu(), fmt, group_size)
    assert_codes_equal(codes, want_codes)
    assert_float_equal(scales, want_scales)
    return codes, scales


def test_build_has_cuda_kernels():
    assert kvcompact.build_info()["cuda_kernels"], "extension was built without CUDA kernels"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,group_size", SHAPES, ids=str)
def test_quantize_matches_cpu(fmt, dtype, shape, group_size):
    x = _random(shape, dtype, _device())
    check_quantize(x, fmt, group_size)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_large_cache(fmt, group_size):
    """[1, 8, 16384, 128] bf16, the benchmark shape: many blocks, grid-strided."""
    x = _random((1, 8, 16384, 128), torch.bfloat16, _device())
    codes, scales = check_quantize(x, fmt, group_size)
    # and the contract itself, on a slice
    ref_codes, ref_scales = reference.quantize(x[:, :, :64].cpu(), fmt, group_size)
    assert_codes_equal(codes[:, :, :64], ref_codes)
    assert_float_equal(scales[:, :, :64], ref_scales)


def test_quantize_32k_tokens_grid_strides():
    """More groups than the grid has warps: every group is still written once."""
    x = _random((1, 8, 32768, 128), torch.bfloat16, _device())
    check_quantize(x, "fp8_e4m3", 16)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_quantize_transposed_keys(fmt, dtype, group_size):
    """Keys arrive as [B, T, H, D] storage seen as [B, H, T, D]."""
    x = _random((2, 37, 4, 64), dtype, _device()).transpose(1, 2)
    assert not x.is_contiguous()
    check_quantize(x, fmt, group_size)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_strided_last_dim(fmt, dtype):
    x = _random((3, 5, 128), dtype, _device())[..., ::2]  # last-dim stride 2
    check_quantize(x, fmt, 16)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [16, 64])
def test_quantize_unaligned_input(fmt, dtype, group_size):
    """A view one element past a 16-byte boundary takes the scalar path."""
    flat = _random((1 + 6 * 64,), dtype, _device())
    x = flat[1:].view(2, 3, 64)
    assert x.data_ptr() % 16 != 0
    check_quantize(x, fmt, group_size)


def _sentinel_buffers(fmt, shape, groups, device):
    code_buf = torch.full(shape, 0x5A, dtype=torch.uint8, device=device).view(CODE_DTYPE[fmt])
    scale_buf = torch.full((*shape[:-1], groups), -7.25, device=device)
    return code_buf, scale_buf


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_quantize_into_cache_slice_writes_only_its_views(fmt, dtype, group_size):
    """Appending tokens 10..13 of a [B, H, T, D] cache buffer."""
    dev = _device()
    b, h, t, d = 2, 4, 64, 64
    groups = d // group_size
    code_buf, scale_buf = _sentinel_buffers(fmt, (b, h, t, d), groups, dev)
    code_before, scale_before = code_buf.clone(), scale_buf.clone()
    new = _random((b, h, 3, d), dtype, dev)
    ops.quantize_into_(new, code_buf[:, :, 10:13], scale_buf[:, :, 10:13], fmt)

    want_codes, want_scales = ops.quantize(new.cpu(), fmt, group_size)
    assert_codes_equal(code_buf[:, :, 10:13], want_codes)
    assert_float_equal(scale_buf[:, :, 10:13], want_scales)
    outside = torch.ones(t, dtype=torch.bool)
    outside[10:13] = False
    assert_codes_equal(code_buf[:, :, outside], code_before[:, :, outside])
    assert_float_equal(scale_buf[:, :, outside], scale_before[:, :, outside])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_into_transposed_and_unaligned_outputs(fmt, dtype):
    """Outputs in [B, T, H, D] storage, and codes one byte off alignment."""
    dev = _device()
    x = _random((2, 4, 9, 32), dtype, dev)
    want_codes, want_scales = ops.quantize(x.cpu(), fmt, 16)

    code_buf = torch.zeros(2, 9, 4, 32, dtype=torch.uint8, device=dev).view(CODE_DTYPE[fmt])
    scale_buf = torch.zeros(2, 9, 4, 2, device=dev)
    ops.quantize_into_(x, code_buf.transpose(1, 2), scale_buf.transpose(1, 2), fmt)
    assert_codes_equal(code_buf.transpose(1, 2), want_codes)
    assert_float_equal(scale_buf.transpose(1, 2), want_scales)

    flat = torch.full((1 + x.numel(),), 0x5A, dtype=torch.uint8, device=dev)
    codes = flat[1:].view(CODE_DTYPE[fmt]).view(x.shape)
    scales = torch.empty(2, 4, 9, 2, device=dev)
    ops.quantize_into_(x, codes, scales, fmt)
    assert_codes_equal(codes, want_codes)
    assert_float_equal(scales, want_scales)
    assert flat[0].item() == 0x5A


def _special_groups(dtype, qmax, g=32):
    """Rows of `g` values, one special case per row (fp32, cast to dtype)."""
    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    rows = [
        torch.zeros(g),  # all-zero group: scale 1
        torch.full((g,), -0.0),
        torch.linspace(-1, 1, g).index_fill(0, torch.tensor([5]), float("nan")),
        torch.linspace(-1, 1, g).index_fill(0, torch.tensor([7]), float("inf")),
        torch.linspace(-1, 1, g).index_fill(0, torch.tensor([0]), float("-inf")),
        torch.full((g,), float("nan")),
        torch.linspace(-3, 3, g) * min(info.max / 4, 1e6),  # magnitudes past QMAX
        torch.full((g,), info.max).index_fill(0, torch.tensor([1]), -info.max),
        torch.linspace(-8, 8, g) * tiny,  # subnormal and near-subnormal inputs
        torch.tensor([tiny / 4, -tiny / 8] * (g // 2)),  # all subnormal (tiny scale)
        torch.cat([torch.tensor([1e4]), torch.linspace(-1e-3, 1e-3, g - 1)]),  # tiny codes
        torch.cat([torch.tensor([qmax]), torch.arange(g - 1) + 0.5]),  # scale 1, int ties
        # scale 1 and fp8 rounding midpoints (ties to even) around a few binades
        torch.cat([torch.tensor([qmax]), torch.tensor([1.0625, 1.1875, 2.125, 0.5 * 2**-9,
                                                       1.5 * 2**-9, 2**-17, 3 * 2**-17,
                                                       2.5, 3.5] * 4)[: g - 1]]),
    ]
    x = torch.stack(rows)
    return x.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["vector", "scalar"])
def test_quantize_special_values(fmt, dtype, path):
    x = _special_groups(dtype, QMAX[fmt]).to(_device())
    if path == "scalar":  # same values, one element off alignment
        flat = torch.empty(1 + x.numel(), dtype=dtype, device=x.device)
        flat[1:] = x.flatten()
        x = flat[1:].view(x.shape)
    codes, scales = check_quantize(x, fmt, 16)
    ref_codes, ref_scales = reference.quantize(x.cpu(), fmt, 16)
    assert_codes_equal(codes, ref_codes)
    assert_float_equal(scales, ref_scales)
    # NaN/Inf groups: NaN scale and zero codes; their neighbours are finite
    nonfinite = ~torch.isfinite(x.float().cpu().view(x.shape[0], -1, 16)).all(-1)
    assert torch.equal(scales.cpu().isnan(), nonfinite)
    assert (_bytes(codes).view(x.shape[0], -1, 16)[nonfinite] == 0).all()


def _rounding_boundaries(fmt):
    """fp32 values on and next to every rounding boundary of fmt's code grid.

    fp8: every sign, binade up to QMAX and mantissa prefix of the format's width,
    with low-bit tails at, just below and just above the midpoint (ties to even,
    fp8 subnormals and the underflow to +-0 included). int8: k + 0.5 and its
    float neighbours."""
    qmax = QMAX[fmt]
    if fmt == "int8":
        k = torch.arange(-128, 128, dtype=torch.float32) + 0.5
        v = torch.cat([k, torch.nextafter(k, k + 1), torch.nextafter(k, k - 1), k - 0.5])
    else:
        p = 3 if fmt == "fp8_e4m3" else 2
        t = 23 - p
        half = 1 << (t - 1)
        tails = [0, 1, 2, half - 2, half - 1, half, half + 1, half + 2, (1 << t) - 2, (1 << t) - 1]
        tails += random.Random(0).sample(range(1 << t), 6)
        top = 127 + int(qmax).bit_length()
        e = torch.arange(0, top, dtype=torch.int64)
        m = torch.arange(1 << p, dtype=torch.int64)
        tl = torch.tensor(tails, dtype=torch.int64)
        bits = (e[:, None, None] << 23) | (m[None, :, None] << t) | tl[None, None, :]
        bits = bits.flatten()
        bits = torch.cat([bits, bits | (1 << 31)])
        v = (bits - (bits >> 31 << 32)).to(torch.int32).view(torch.float32)
    v = v[v.abs() <= qmax]
    n = (len(v) + 14) // 15 * 15
    v = torch.cat([v, torch.zeros(n - len(v))]).view(-1, 15)
    # every group of 16 holds QMAX, so its scale is exactly 1 and codes = cast(x)
    return torch.cat([torch.full((v.shape[0], 1), qmax), v], dim=1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["vector", "scalar"])
def test_quantize_every_rounding_boundary(fmt, path):
    x = _rounding_boundaries(fmt).to(_device())
    if path == "scalar":
        flat = torch.empty(1 + x.numel(), device=x.device)
        flat[1:] = x.flatten()
        x = flat[1:].view(x.shape)
    codes, scales = check_quantize(x, fmt, 16)
    assert (scales == 1.0).all()
    # and torch's own cast, which the contract names for fp8
    xc = x.cpu()
    want = torch.round(xc).to(torch.int8) if fmt == "int8" else xc.to(CODE_DTYPE[fmt])
    assert_codes_equal(codes, want)


@pytest.mark.parametrize("seed", range(40))
def test_quantize_random_layouts(seed):
    """Random shapes, group sizes, dtypes, formats and views against the CPU."""
    rng = random.Random(seed)
    dev = _device()
    d = rng.choice([16, 32, 48, 64, 80, 96, 128, 160, 256, 8, 24, 7])
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    g = rng.choice(divisors)
    lead = [rng.randint(1, 6) for _ in range(rng.randint(0, 3))]
    dtype = rng.choice(DTYPES)
    fmt = rng.choice(FORMATS)
    x = _random((*lead, d + rng.choice([0, 0, 1, 3])), dtype, dev, seed=seed)[..., :d]
    if x.dim() >= 3 and rng.random() < 0.5:
        x = x.transpose(0, 1)
    check_quantize(x, fmt, g)


# ---------------------------------------------------------------------------
# dequantize


def _all_codes(fmt, rows, d, device):
    """Every byte pattern (NaN codes of fp8 included), repeated and shuffled."""
    n = rows * d
    g = torch.Generator().manual_seed(random.randrange(2**31))
    b = torch.arange(n) % 256
    b = b[torch.randperm(n, generator=g)].to(torch.uint8)
    return b.view(rows, d).view(CODE_DTYPE[fmt]).to(device)


def _scales(rows, groups, device):
    g = torch.Generator().manual_seed(random.randrange(2**31))
    s = torch.rand(rows, groups, generator=g) * torch.pow(
        10.0, torch.randint(-8, 8, (rows, groups), generator=g).float()
    )
    specials = torch.tensor([float("nan"), float("inf"), 0.0, 1.0, 2**-149, 2**-126, 3e38])
    s.view(-1)[: len(specials)] = specials[: s.numel()]
    return s.to(device)


def check_dequantize(codes, scales, dtype):
    y = ops.dequantize(codes, scales, dtype)
    assert y.device == codes.device and y.dtype == dtype
    want = ops.dequantize(codes.cpu(), scales.cpu(), dtype)
    assert_float_equal(y, want)
    return y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,group_size", [(128, 128), (128, 32), (64, 16), (96, 48), (40, 8), (7, 7)])
def test_dequantize_matches_cpu(fmt, dtype, d, group_size):
    dev = _device()
    rows = 64
    codes = _all_codes(fmt, rows, d, dev)
    scales = _scales(rows, d // group_size, dev)
    check_dequantize(codes, scales, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_strided_and_unaligned(fmt, dtype):
    dev = _device()
    codes = _all_codes(fmt, 2 * 9 * 4, 64, dev).view(2, 9, 4, 64).transpose(1, 2)
    scales = _scales(2 * 9 * 4, 4, dev).view(2, 9, 4, 4).transpose(1, 2)
    want = ops.dequantize(codes.cpu(), scales.cpu(), dtype)
    check_dequantize(codes, scales, dtype)

    # into a slice of a bigger workspace: only the slice is written
    buf = torch.full((2, 4, 20, 64), 3.0, dtype=dtype, device=dev)
    ops.dequantize_into_(codes, scales, buf[:, :, 5:14])
    assert_float_equal(buf[:, :, 5:14], want)
    assert (buf[:, :, :5] == 3.0).all() and (buf[:, :, 14:] == 3.0).all()

    # output one element off alignment, codes one byte off
    flat = torch.empty(1 + codes.numel(), dtype=dtype, device=dev)
    out = flat[1:].view(codes.shape)
    ops.dequantize_into_(codes, scales, out)
    assert_float_equal(out, want)
    cflat = torch.empty(1 + codes.numel(), dtype=torch.uint8, device=dev)
    c2 = cflat[1:].view(CODE_DTYPE[fmt]).view(codes.shape)
    c2.copy_(codes)
    check_dequantize(c2, scales, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_large(fmt, dtype):
    x = _random((1, 8, 4096, 128), dtype, _device())
    codes, scales = ops.quantize(x, fmt, 32)
    check_dequantize(codes, scales, dtype)


# ---------------------------------------------------------------------------
# devices, streams, empties


def test_empty_inputs():
    dev = _device()
    for shape in [(0, 64), (2, 0, 64), (1, 8, 0, 128)]:
        x = torch.randn(shape, device=dev)
        codes, scales = ops.quantize(x, "int8", 32)
        assert codes.shape == x.shape and scales.shape == (*shape[:-1], shape[-1] // 32)
        y = ops.dequantize(codes, scales, torch.bfloat16)
        assert y.shape == x.shape and y.device == dev


def test_mismatched_devices_raise_value_error():
    dev = _device()
    x = torch.randn(4, 64, device=dev)
    codes = torch.empty(4, 64, dtype=torch.int8)
    scales = torch.empty(4, 2, device=dev)
    with pytest.raises(ValueError, match="codes"):
        ops.quantize_into_(x, codes, scales, "int8")
    with pytest.raises(ValueError, match="scales"):
        ops.quantize_into_(x, codes.to(dev), scales.cpu(), "int8")
    with pytest.raises(ValueError, match="out"):
        ops.dequantize_into_(codes.to(dev), scales, torch.empty(4, 64))
    with pytest.raises(ValueError, match="scales"):
        ops.dequantize_into_(codes.to(dev), scales.cpu(), torch.empty(4, 64, device=dev))


def test_bad_arguments_on_cuda():
    dev = _device()
    x = torch.randn(4, 64, device=dev)
    with pytest.raises(ValueError, match="group_size"):
        ops.quantize(x, "int8", 48)
    with pytest.raises(ValueError, match="fmt"):
        ops.quantize(x, "int4", 32)
    with pytest.raises(TypeError, match="x"):
        ops.quantize(x.to(torch.int32), "int8", 32)
    with pytest.raises(TypeError, match="codes"):
        ops.quantize_into_(x, torch.empty(4, 64, device=dev), torch.empty(4, 2, device=dev), "int8")


def test_runs_on_current_stream():
    """Work queued on a side stream before the op must be seen by it: the op has
    to run on that stream, not the default one."""
    dev = _device()
    src = _random((8, 64, 128), torch.bfloat16, dev)
    want_codes, want_scales = ops.quantize(src.cpu(), "fp8_e4m3", 32)
    x = torch.zeros_like(src)
    codes = torch.zeros(src.shape, dtype=torch.float8_e4m3fn, device=dev)
    scales = torch.zeros(8, 64, 4, device=dev)
    y = torch.zeros(src.shape, dtype=torch.float32, device=dev)
    torch.cuda.synchronize()
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms: the default stream would win the race
        x.copy_(src)
        ops.quantize_into_(x, codes, scales, "fp8_e4m3")
        ops.dequantize_into_(codes, scales, y)
    side.synchronize()
    assert_codes_equal(codes, want_codes)
    assert_float_equal(scales, want_scales)
    assert_float_equal(y, ops.dequantize(want_codes, want_scales, torch.float32))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x = _random((4, 8, 64), torch.bfloat16, torch.device("cuda", 1))
    with torch.cuda.device(0):
        codes, scales = check_quantize(x, "int8", 32)
        check_dequantize(codes, scales, torch.float16)


def test_opcheck_cuda():
    dev = _device()
    x = _random((2, 3, 64), torch.bfloat16, dev)
    torch.library.opcheck(torch.ops.kvcompact.quantize.default, (x, "fp8_e4m3", 32))
    codes, scales = ops.quantize(x, "int8", 16)
    torch.library.opcheck(torch.ops.kvcompact.dequantize.default, (codes, scales, torch.float32))
    torch.library.opcheck(
        torch.ops.kvcompact.quantize_into_.default,
        (x, torch.empty_like(codes), torch.empty_like(scales), "int8"),
    )
    torch.library.opcheck(
        torch.ops.kvcompact.dequantize_into_.default,
        (codes, scales, torch.empty(x.shape, device=dev)),
    )
