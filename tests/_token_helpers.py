"""Shared helpers for the compact_/move_/rope tests: devices, bit views, groups."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as integers of the same width (exact comparisons, NaN-safe)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert a.shape == b.shape, (a.shape, b.shape, msg)
    ba, bb = bits(a).cpu(), bits(b).cpu()
    if not torch.equal(ba, bb):
        bad = (ba != bb).nonzero()[:5].tolist()
        raise AssertionError(f"{msg}: {int((ba != bb).sum())} elements differ, first at {bad}")


def rand_like_dtype(shape, dtype, device="cpu", gen=None) -> torch.Tensor:
    """Random values of any dtype kvcompact groups hold (floats, fp8 codes, ints)."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return (torch.randn(shape, generator=gen) * 4).to(dtype).to(device)
    if dtype in (torch.int8, torch.int64, torch.int32, torch.uint8):
        lo, hi = (-128, 128) if dtype == torch.int8 else (0, 1 << 20)
        if dtype == torch.uint8:
            lo, hi = 0, 256
        return torch.randint(lo, hi, shape, generator=gen, dtype=dtype).to(device)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)


def cache_group(B, H, T, D, device="cpu", gen=None, group=16):
    """A realistic mixed group: bf16 keys, fp16 values, fp8 codes + fp32 scales,
    int8 codes, int64 positions [B, H, T] (no trailing dims)."""
    return [
        rand_like_dtype((B, H, T, D), torch.bfloat16, device, gen),
        rand_like_dtype((B, H, T, D), torch.float16, device, gen),
        rand_like_dtype((B, H, T, D), torch.float8_e4m3fn, device, gen),
        rand_like_dtype((B, H, T, max(1, D // group)), torch.float32, device, gen),
        rand_like_dtype((B, H, T, D), torch.int8, device, gen),
        rand_like_dtype((B, H, T), torch.int64, device, gen),
    ]


def odd_views(B, H, T, D, device="cpu", gen=None):
    """Non-contiguous [B, H, T, ...] views a cache really produces."""
    cap = T + 7
    base_cap = rand_like_dtype((B, H, cap, D), torch.float32, device, gen)
    base_wide = rand_like_dtype((B, H, T, 2 * D), torch.bfloat16, device, gen)
    base_bthd = rand_like_dtype((B, T, H, D), torch.float16, device, gen)
    base_perm = rand_like_dtype((B, H, T, 3, D), torch.float32, device, gen)
    return [
        base_cap[:, :, :T],                      # capacity slice of a preallocated buffer
        base_wide[..., ::2],                     # strided last dim: element-wise runs
        base_bthd.transpose(1, 2),               # [B, T, H, D] storage seen as [B, H, T, D]
        base_perm.transpose(3, 4),               # non-mergeable trailing dims [.., D, 3]
    ]
