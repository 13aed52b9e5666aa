"""rope_shift_ / rope_shift_quantized_: re-rotation of cached keys.

Checked three ways: bit for bit against reference.rope_shift (same arithmetic),
against transformers' own rotary embedding recomputed from scratch at the new
positions (default and llama3 scaling, neox), and against a plain fp64
interleaved formula for gptj.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompact import ops, reference

from _token_helpers import DEVICES, assert_bits_equal, needs_cuda

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def inv_freq_for(rotary_dim, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def make_delta(shape_kind, B, H, T, gen, lo=-300, hi=300, device="cpu"):
    if shape_kind == "shared":
        return torch.randint(lo, hi, (T,), generator=gen).to(device)
    if shape_kind == "uniform":  # every token after an evicted span moves by the same amount
        return torch.full((T,), -57, dtype=torch.int64, device=device)
    return torch.randint(lo, hi, (B, H, T), generator=gen).to(device)


# --- against the reference, bit for bit ----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("delta_kind", ["shared", "uniform", "per_row"])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # 32 < D: partial rotary
def test_matches_reference(device, dtype, style, delta_kind, rotary_dim):
    gen = torch.Generator().manual_seed(rotary_dim)
    B, H, T, D = 2, 3, 21, 64
    keys = torch.randn(B, H, T, D, generator=gen).to(dtype).to(device)
    delta = make_delta(delta_kind, B, H, T, gen, device=device)
    inv_freq = inv_freq_for(rotary_dim).to(device)
    expected = reference.rope_shift(keys.cpu(), delta.cpu(), inv_freq.cpu(), style)
    ptr = keys.data_ptr()
    ops.rope_shift_(keys, delta, inv_freq, style)
    assert keys.data_ptr() == ptr
    assert_bits_equal(keys, expected, f"{style} {dtype}")
    if rotary_dim < D:
        assert torch.equal(keys[..., rotary_dim:].cpu(), expected[..., rotary_dim:])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_keys(device):
    # [B, T, H, D] storage seen as [B, H, T, D], and a capacity slice.
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 30, 4, 32, generator=gen).to(device)
    keys = base.transpose(1, 2)[:, :, :25]
    delta = torch.randint(-50, 50, (25,), generator=gen).to(device)
    f = inv_freq_for(32).to(device)
    expected = reference.rope_shift(keys.cpu(), delta.cpu(), f.cpu(), "neox")
    untouched = base[:, 25:].clone()
    ops.rope_shift_(keys, delta, f, "neox")
    assert_bits_equal(keys, expected)
    assert torch.equal(base[:, 25:], untouched)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 20), half=st.integers(1, 8), extra=st.integers(0, 3),
       style=st.sampled_from(["neox", "gptj"]), seed=st.integers(0, 999))
def test_hypothesis_cpu(t, half, extra, style, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, t, 2 * half + extra, generator=gen)
    delta = torch.randint(-10**6, 10**6, (t,), generator=gen)
    f = torch.rand(half, generator=gen)
    expected = reference.rope_shift(keys, delta, f, style)
    ops.rope_shift_(keys, delta, f, style)
    assert_bits_equal(keys, expected)


# --- against transformers' rotary embedding, recomputed from scratch ------------


def llama_rotary(rope_parameters, head_dim=64):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=head_dim, max_position_embeddings=131072,
                      rope_parameters=rope_parameters)
    return LlamaRotaryEmbedding(cfg)


def hf_rotate(rotary, k, positions):
    """transformers' own `apply_rotary_pos_emb` for keys at `positions` [T]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = rotary(k, positions[None])
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    return k_rot


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("dtype", FLOATS)
def test_matches_transformers_recomputed(rope, dtype):
    rotary = llama_rotary(ROPES[rope])
    assert rotary.attention_scaling == 1.0
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 24, 64
    raw = torch.randn(B, H, T, D, generator=gen)
    # Keys cached at positions 40..63; a 40-token span before them is evicted,
    # so they move to 0..23 (delta -40); and the converse (an insertion, +17).
    # Positions stay small because transformers rounds position * inv_freq to
    # fp32 itself (half an ulp of a 64-radian angle is 4e-6).
    for old0, new0 in ((40, 0), (3, 20)):
        old = torch.arange(old0, old0 + T)
        new = torch.arange(new0, new0 + T)
        cached = hf_rotate(rotary, raw, old).to(dtype)
        target = hf_rotate(rotary, raw, new)
        ops.rope_shift_(cached, new - old, rotary.inv_freq.float(), "neox")
        err = (cached.float() - target).abs().max() / target.abs().max()
        # fp32: 1e-5 relative; half types: the dtype's rounding of input and output.
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        assert err <= tol, (rope, dtype, float(err))


def gptj_rotate_fp64(x, positions, inv_freq):
    """Plain interleaved RoPE (GPT-J `rotate_every_two`) in fp64 from scratch."""
    ang = positions.double()[:, None] * inv_freq.double()[None]  # [T, R/2]
    c, s = ang.cos(), ang.sin()
    x = x.double()
    r = 2 * inv_freq.numel()
    xe, xo = x[..., 0:r:2], x[..., 1:r:2]
    out = x.clone()
    out[..., 0:r:2] = xe * c - xo * s
    out[..., 1:r:2] = xo * c + xe * s
    return out


@pytest.mark.parametrize("style", ["gptj", "neox"])
def test_large_positions_vs_fp64_truth(style):
    # At 32k positions transformers' own fp32 angles are off by ~2e-3 rad;
    # the kernel's fp64 angles keep fp32 keys at fp32 accuracy.
    gen = torch.Generator().manual_seed(1)
    T, D, R = 16, 64, 48
    f = inv_freq_for(R)
    raw = torch.randn(1, 2, T, D, generator=gen, dtype=torch.float64)
    old = torch.randint(20000, 32000, (T,), generator=gen)
    new = old - torch.randint(0, 20000, (T,), generator=gen)
    if style == "gptj":
        cached, target = gptj_rotate_fp64(raw, old, f), gptj_rotate_fp64(raw, new, f)
    else:  # the same pairs permuted into rotate-half order
        perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2), torch.arange(R, D)])
        cached = gptj_rotate_fp64(raw, old, f)[..., perm]
        target = gptj_rotate_fp64(raw, new, f)[..., perm]
    k = cached.float()
    ops.rope_shift_(k, new - old, f, style)
    err = (k.double() - target).abs().max() / target.abs().max()
    assert err < 2e-6, float(err)


def test_composition_and_inverse():
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 2, 9, 32, generator=gen)
    f = inv_freq_for(32)
    a = keys.clone()
    ops.rope_shift_(a, torch.full((9,), 1000), f, "neox")
    ops.rope_shift_(a, torch.full((9,), -1000), f, "neox")
    assert (a - keys).abs().max() < 1e-5


# --- quantized keys ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("delta_kind", ["shared", "per_row"])
def test_quantized_matches_reference(device, fmt, group_size, style, delta_kind):
    gen = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 2, 13, 64
    x = torch.randn(B, H, T, D, generator=gen) * torch.linspace(0.1, 8, D)  # outlier channels
    codes, scales = reference.quantize(x, fmt, group_size)
    delta = make_delta(delta_kind, B, H, T, gen)
    f = inv_freq_for(48)  # partial rotary: groups straddle rotated and untouched dims
    exp_codes, exp_scales = reference.rope_shift_quantized(codes, scales, delta, f, style)
    codes, scales, delta, f = (t.to(device) for t in (codes, scales, delta, f))
    ops.rope_shift_quantized_(codes, scales, delta, f, style)
    assert_bits_equal(codes, exp_codes, "codes")
    assert_bits_equal(scales, exp_scales, "scales")


def test_quantized_strided_and_nonfinite():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 40, 32, generator=gen)
    x[0, 1, 3, 5] = float("nan")
    codes_buf, scales_buf = reference.quantize(x, "int8", 8)
    codes, scales = codes_buf[:, :, :30], scales_buf[:, :, :30]  # capacity slices
    delta = torch.randint(-99, 99, (1, 2, 30), generator=gen)
    f = inv_freq_for(32)
    exp_codes, exp_scales = reference.rope_shift_quantized(codes, scales, delta, f, "neox")
    ops.rope_shift_quantized_(codes, scales, delta, f, "neox")
    assert_bits_equal(codes, exp_codes)
    assert_bits_equal(scales, exp_scales)
    # Dim 5 (group 0) pairs with dim 21 (group 2): NaN spreads there only.
    assert torch.isnan(scales[0, 1, 3, [0, 2]]).all() and torch.isfinite(scales[0, 1, 3, [1, 3]]).all()


# --- CUDA against CPU ---------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("delta_kind", ["shared", "per_row"])
def test_cuda_matches_cpu_large(dtype, delta_kind):
    gen = torch.Generator().manual_seed(9)
    B, H, T, D = 1, 8, 3000, 128
    keys = torch.randn(B, H, T, D, generator=gen).to(dtype)
    delta = make_delta(delta_kind, B, H, T, gen, -30000, 30000)
    f = inv_freq_for(128, 500000.0)
    gpu = keys.cuda()
    ops.rope_shift_(keys, delta, f, "neox")
    ops.rope_shift_(gpu, delta.cuda(), f.cuda(), "neox")
    assert_bits_equal(keys, gpu)


# --- bad input ------------------------------------------------------------------


def test_bad_input():
    k = torch.randn(1, 2, 5, 8)
    d = torch.zeros(5, dtype=torch.long)
    f = inv_freq_for(8)
    with pytest.raises(ValueError, match="rotary dim.*exceeds"):
        ops.rope_shift_(k, d, inv_freq_for(10), "neox")
    with pytest.raises(ValueError, match="rotary dim.*exceeds"):
        ops.rope_shift_(torch.randn(1, 2, 5, 7), d, f, "gptj")  # odd D smaller than R
    with pytest.raises(ValueError, match="style"):
        ops.rope_shift_(k, d, f, "glm")
    with pytest.raises(TypeError, match="keys.*float32"):
        ops.rope_shift_(torch.zeros(1, 2, 5, 8, dtype=torch.int32), d, f, "neox")
    with pytest.raises(TypeError, match="delta.*int64"):
        ops.rope_shift_(k, d.int(), f, "neox")
    with pytest.raises(TypeError, match="delta.*int64"):
        ops.rope_shift_(k, d.float(), f, "neox")
    with pytest.raises(ValueError, match="delta.*shape"):
        ops.rope_shift_(k, torch.zeros(4, dtype=torch.long), f, "neox")
    with pytest.raises(ValueError, match="delta.*shape"):
        ops.rope_shift_(k, torch.zeros(1, 3, 5, dtype=torch.long), f, "neox")
    with pytest.raises(TypeError, match="inv_freq.*float32"):
        ops.rope_shift_(k, d, f.double(), "neox")
    with pytest.raises(ValueError, match="inv_freq.*non-empty"):
        ops.rope_shift_(k, d, torch.empty(0), "neox")
    with pytest.raises(ValueError, match="keys.*\\[B, H, T, D\\]"):
        ops.rope_shift_(torch.randn(2, 5, 8), d, f, "neox")
    with pytest.raises(ValueError, match="keys.*expanded"):
        ops.rope_shift_(torch.randn(1, 2, 1, 8).expand(1, 2, 5, 8), d, f, "neox")


def test_bad_input_quantized():
    codes, scales = reference.quantize(torch.randn(1, 2, 5, 8), "int8", 4)
    d = torch.zeros(5, dtype=torch.long)
    f = inv_freq_for(8)
    with pytest.raises(TypeError, match="codes"):
        ops.rope_shift_quantized_(codes.float(), scales, d, f, "neox")
    with pytest.raises(TypeError, match="scales.*float32"):
        ops.rope_shift_quantized_(codes, scales.double(), d, f, "neox")
    with pytest.raises(ValueError, match="scales.*must divide"):
        ops.rope_shift_quantized_(codes, torch.ones(1, 2, 5, 3), d, f, "neox")
    with pytest.raises(ValueError, match="scales"):
        ops.rope_shift_quantized_(codes, torch.ones(1, 2, 4, 2), d, f, "neox")
    with pytest.raises(ValueError, match="style"):
        ops.rope_shift_quantized_(codes, scales, d, f, "rot")


def test_opcheck():
    k = torch.randn(1, 2, 5, 8)
    d = torch.arange(5)
    f = inv_freq_for(8)
    torch.library.opcheck(torch.ops.kvcompact.rope_shift_.default, (k, d, f, "neox"))
    # int8: opcheck's schema check does arithmetic that float8 tensors lack on CPU.
    codes, scales = reference.quantize(torch.randn(1, 2, 5, 8), "int8", 4)
    torch.library.opcheck(torch.ops.kvcompact.rope_shift_quantized_.default,
                          (codes, scales, d, f, "gptj"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values(device, dtype):
    # NaN, +-Inf and values whose rotation overflows the dtype round the same
    # way as torch's own conversion (bf16 uses a branch-free path on CPU).
    big = torch.finfo(dtype).max
    keys = torch.randn(1, 1, 4, 16)
    keys[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    keys[0, 0, 1, :8] = big
    keys[0, 0, 2, :8] = -big
    keys = keys.to(dtype).to(device)
    delta = torch.tensor([3, -5, 7, 1], device=device)
    f = inv_freq_for(16).to(device)
    expected = reference.rope_shift(keys.cpu(), delta.cpu(), f.cpu(), "neox")
    ops.rope_shift_(keys, delta, f, "neox")
    # NaN payloads may legitimately differ; compare NaN-ness, then the rest bit for bit.
    got = keys.cpu()
    assert torch.equal(got.isnan(), expected.isnan())
    fin = ~expected.isnan()
    assert_bits_equal(got[fin], expected[fin])
