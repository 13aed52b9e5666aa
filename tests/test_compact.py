"""compact_: in-place token compaction against reference.compact, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompact import ops, reference

from _token_helpers import (
    CUDA, DEVICES, assert_bits_equal, bits, cache_group, needs_cuda, odd_views, rand_like_dtype,
)


def run_and_check(tensors, keep, validate=True):
    """compact_ in place, then compare the first K tokens with the reference and
    check that storage did not move."""
    # On integer views of the same bits: torch.gather has no float8 kernels.
    expected = reference.compact([bits(t).clone() for t in tensors], keep)
    ptrs = [t.data_ptr() for t in tensors]
    ops.compact_(tensors, keep, validate)
    k = keep.shape[-1]
    for i, (t, e) in enumerate(zip(tensors, expected)):
        assert t.data_ptr() == ptrs[i], f"tensor {i} was reallocated"
        assert_bits_equal(t[:, :, :k], e[:, :, :k], f"tensor {i} ({t.dtype}, {tuple(t.stride())})")


def rows_of(index_fn, B, H, device="cpu"):
    """keep_idx [B, H, K] from one index list per row."""
    rows = [torch.as_tensor(index_fn(b, h), dtype=torch.int64) for b in range(B) for h in range(H)]
    k = rows[0].numel()
    return torch.stack(rows).reshape(B, H, k).to(device) if k else torch.empty(
        B, H, 0, dtype=torch.int64, device=device)


def random_rows(B, H, T, K, gen=None, device="cpu"):
    return torch.stack([torch.sort(torch.randperm(T, generator=gen)[:K]).values
                        for _ in range(B * H)]).reshape(B, H, K).to(device)


B, H, T, D = 2, 3, 37, 16

PATTERNS = {
    "keep_all": lambda b, h: list(range(T)),
    "keep_none": lambda b, h: [],
    "keep_last_only": lambda b, h: [T - 1],
    "keep_first_only": lambda b, h: [0],
    "alternating": lambda b, h: list(range(b % 2, T, 2))[: T // 2],
    "dropped_prefix": lambda b, h: list(range(11, T)),
    "sinks_recent": lambda b, h: [0, 1, 2, 3] + list(range(T - 9, T)),
    "middle_span_cut": lambda b, h: list(range(0, 10)) + list(range(20, T)),
    "shift_by_one": lambda b, h: list(range(1, T)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_patterns_mixed_group(device, pattern):
    gen = torch.Generator().manual_seed(sorted(PATTERNS).index(pattern))
    tensors = cache_group(B, H, T, D, device, gen)
    keep = rows_of(PATTERNS[pattern], B, H, device)
    run_and_check(tensors, keep)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [0, 1, 5, 18, 36, 37])
def test_random_per_row_subsets(device, K):
    gen = torch.Generator().manual_seed(K)
    tensors = cache_group(B, H, T, D, device, gen)
    run_and_check(tensors, random_rows(B, H, T, K, gen, device))


@pytest.mark.parametrize("device", DEVICES)
def test_single_token(device):
    for k in ([[[0]]], [[[]]]):
        keep = torch.tensor(k, dtype=torch.int64, device=device).reshape(1, 1, -1)
        run_and_check(cache_group(1, 1, 1, 8, device), keep)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_views(device):
    gen = torch.Generator().manual_seed(3)
    views = odd_views(B, H, T, D, device, gen)
    for v in views:
        assert not v.is_contiguous()
    keep = random_rows(B, H, T, 20, gen, device)
    bases = [v._base if v._base is not None else v for v in views]
    before = [b.clone() for b in bases]
    run_and_check(views, keep)
    # Capacity slice: tokens past T in the buffer are never touched.
    assert torch.equal(bases[0][:, :, T:], before[0][:, :, T:])
    # Strided last dim: the other interleaved half is never touched.
    assert torch.equal(bases[1][..., 1::2], before[1][..., 1::2])


@pytest.mark.parametrize("device", DEVICES)
def test_validate_false_and_no_trailing_dims(device):
    pos = torch.arange(2 * 3 * T, device=device).reshape(2, 3, T)
    keep = random_rows(2, 3, T, 9, device=device)
    run_and_check([pos], keep, validate=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), h=st.integers(1, 4), t=st.integers(1, 70), d=st.sampled_from([1, 3, 8, 64]),
    frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e5m2, torch.int64]),
)
def test_hypothesis_cpu(b, h, t, d, frac, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    k = int(round(frac * t))
    tensors = [rand_like_dtype((b, h, t, d), dtype, gen=gen),
               rand_like_dtype((b, h, t, d), torch.float16, gen=gen)]
    run_and_check(tensors, random_rows(b, h, t, k, gen))


# --- CUDA against CPU, bit for bit --------------------------------------------


def cpu_vs_cuda(tensors_cpu, keep_cpu):
    tensors_gpu = [t.cuda() for t in tensors_cpu]
    ops.compact_(tensors_gpu, keep_cpu.cuda())
    ops.compact_(tensors_cpu, keep_cpu)
    for i, (a, b) in enumerate(zip(tensors_cpu, tensors_gpu)):
        assert_bits_equal(a, b, f"tensor {i}")  # rows past K are untouched on both


@needs_cuda
@pytest.mark.parametrize("T_", [1, 63, 64, 65, 1000, 5000])
@pytest.mark.parametrize("kind", ["random50", "random90", "shift1", "sinks_recent", "prefix"])
def test_cuda_matches_cpu(T_, kind):
    gen = torch.Generator().manual_seed(T_)
    Bc, Hc = 1, 8
    if kind.startswith("random"):
        keep = random_rows(Bc, Hc, T_, max(0, T_ * int(kind[6:]) // 100), gen)
    elif kind == "shift1":
        keep = rows_of(lambda b, h: list(range(1, T_)), Bc, Hc)
    elif kind == "sinks_recent":
        keep = rows_of(lambda b, h: sorted(set(range(min(4, T_))) | set(range(T_ // 2, T_))), Bc, Hc)
    else:
        keep = rows_of(lambda b, h: list(range(T_ // 3, T_)), Bc, Hc)
    tensors = cache_group(Bc, Hc, T_, 128, "cpu", gen) + odd_views(Bc, Hc, T_, 16, "cpu", gen)
    cpu_vs_cuda(tensors, keep)


@needs_cuda
def test_cuda_large_token_blocks_split_launches():
    # 3 x 16 KiB per token: more than one CTA's staging budget, so tensors are
    # packed into several launches; each must still be correct.
    gen = torch.Generator().manual_seed(0)
    tensors = [rand_like_dtype((1, 2, 300, 4096), torch.float32, gen=gen) for _ in range(3)]
    cpu_vs_cuda(tensors, random_rows(1, 2, 300, 150, gen))


@needs_cuda
def test_cuda_peak_memory_is_index_sized():
    Bc, Hc, Tc, Dc = 1, 8, 8192, 128
    k = torch.randn(Bc, Hc, Tc, Dc, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    keep = random_rows(Bc, Hc, Tc, Tc // 2).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.compact_([k, v], keep)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= keep.numel() * keep.element_size(), extra  # O(B*H*K) index bytes, not O(T*D)
    assert extra < k.numel() * k.element_size() // 16


@needs_cuda
def test_cuda_validation_raises_before_writing():
    k = torch.randn(1, 2, 10, 4, device="cuda")
    before = k.clone()
    keep = torch.tensor([[[0, 3, 3], [1, 2, 4]]], device="cuda")
    with pytest.raises(ValueError, match="keep_idx.*duplicate"):
        ops.compact_([k], keep)
    with pytest.raises(IndexError, match=r"keep_idx`\[0, 1, 2\] = 10"):
        ops.compact_([k], torch.tensor([[[0, 3, 5], [1, 2, 10]]], device="cuda"))
    assert torch.equal(k, before)


@needs_cuda
def test_cuda_different_devices():
    k = torch.randn(1, 2, 10, 4, device="cuda")
    with pytest.raises(ValueError, match="device"):
        ops.compact_([k, torch.randn(1, 2, 10, 4)], torch.zeros(1, 2, 1, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="keep_idx"):
        ops.compact_([k], torch.zeros(1, 2, 1, dtype=torch.long))


# --- bad input ----------------------------------------------------------------


def bad_call(keep, tensors=None, exc=ValueError, match="keep_idx"):
    tensors = tensors if tensors is not None else [torch.randn(1, 2, 10, 4)]
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        ops.compact_(tensors, keep)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b), "nothing may be written before an error"


def test_bad_indices():
    bad_call(torch.tensor([[[0, 5, 10], [1, 2, 3]]]), exc=IndexError, match=r"keep_idx.*out of range")
    bad_call(torch.tensor([[[-1, 5, 9], [1, 2, 3]]]), exc=IndexError, match=r"keep_idx.*negative")
    bad_call(torch.tensor([[[0, 5, 4], [1, 2, 3]]]), match=r"keep_idx.*strictly increasing")
    bad_call(torch.tensor([[[0, 5, 6], [1, 2, 2]]]), match=r"keep_idx.*duplicate")
    bad_call(torch.tensor([[[0.0, 1.0]] * 2]), exc=TypeError, match="keep_idx.*int64")
    bad_call(torch.tensor([[[0, 1]] * 2], dtype=torch.int32), exc=TypeError, match="keep_idx.*int64")
    bad_call(torch.tensor([[0, 1], [0, 1]]), match=r"keep_idx.*3 dims")
    bad_call(torch.zeros(1, 3, 1, dtype=torch.long), match=r"keep_idx.*\[B, H, K\]")
    bad_call(torch.arange(11).expand(1, 2, 11), match="keep_idx.*K = 11")


def test_bad_tensors():
    keep = torch.zeros(1, 2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="tensors.*non-empty"):
        ops.compact_([], keep)
    bad_call(keep, [torch.randn(1, 2, 10, 4), torch.randn(1, 2, 9, 4)], match=r"tensors`\[1\].*share B, H and T")
    bad_call(keep, [torch.randn(1, 2, 10, 4), torch.randn(1, 3, 10, 4)], match=r"tensors`\[1\]")
    bad_call(keep, [torch.randn(2, 10)], match=r"tensors`\[0\].*3 dims")
    t = torch.randn(1, 2, 10, 4)
    bad_call(keep, [t, t], match="share memory")
    bad_call(keep, [torch.randn(1, 2, 1, 4).expand(1, 2, 10, 4)], match="expanded")


def test_opcheck():
    gen = torch.Generator().manual_seed(1)
    tensors = cache_group(1, 2, 12, 8, gen=gen)
    keep = random_rows(1, 2, 12, 6, gen)
    torch.library.opcheck(torch.ops.kvcompact.compact_.default, (tensors, keep, True))
