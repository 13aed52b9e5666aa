"""move_: overlapping-safe token moves along dim 2 against reference.move."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompact import ops, reference

from _token_helpers import DEVICES, assert_bits_equal, bits, cache_group, needs_cuda, odd_views

B, H, T, D = 2, 3, 40, 8

CASES = [
    (10, 30, 0),    # close a gap at the front (overlapping, moving down)
    (10, 30, 5),    # overlapping, moving down by less than the length
    (5, 25, 10),    # overlapping, moving up (open a gap)
    (0, 39, 1),     # shift everything up by one
    (1, 40, 0),     # shift everything down by one
    (0, 10, 30),    # disjoint
    (30, 40, 0),    # disjoint, down
    (7, 7, 3),      # empty range
    (12, 20, 12),   # no-op
    (0, 40, 0),     # whole range in place
]


def run_and_check(tensors, src_start, src_end, dst_start):
    expected = reference.move([bits(t).clone() for t in tensors], src_start, src_end, dst_start)
    ptrs = [t.data_ptr() for t in tensors]
    ops.move_(tensors, src_start, src_end, dst_start)
    for i, (t, e) in enumerate(zip(tensors, expected)):
        assert t.data_ptr() == ptrs[i]
        assert_bits_equal(t, e, f"tensor {i} move({src_start}, {src_end}, {dst_start})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_moves_mixed_group(device, case):
    gen = torch.Generator().manual_seed(sum(case))
    run_and_check(cache_group(B, H, T, D, device, gen), *case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:4], ids=[str(c) for c in CASES[:4]])
def test_moves_non_contiguous(device, case):
    gen = torch.Generator().manual_seed(7)
    run_and_check(odd_views(B, H, T, D, device, gen), *case)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 50), data=st.data())
def test_hypothesis_cpu(t, data):
    s0 = data.draw(st.integers(0, t))
    s1 = data.draw(st.integers(s0, t))
    d0 = data.draw(st.integers(0, t - (s1 - s0)))
    gen = torch.Generator().manual_seed(t)
    run_and_check(cache_group(1, 2, t, 4, gen=gen) + odd_views(1, 2, t, 4, gen=gen), s0, s1, d0)


@needs_cuda
@pytest.mark.parametrize("case", [(1, 5000, 0), (0, 4999, 1), (100, 5000, 37), (37, 4000, 1000),
                                  (0, 2000, 3000)])
def test_cuda_matches_cpu(case):
    gen = torch.Generator().manual_seed(0)
    cpu = cache_group(1, 8, 5000, 128, gen=gen) + odd_views(1, 8, 5000, 16, gen=gen)
    gpu = [t.cuda() for t in cpu]
    ops.move_(cpu, *case)
    ops.move_(gpu, *case)
    for a, b in zip(cpu, gpu):
        assert_bits_equal(a, b, str(case))


def test_bad_ranges():
    t = [torch.randn(1, 2, 10, 4)]
    before = t[0].clone()
    with pytest.raises(ValueError, match="src_start.*reversed"):
        ops.move_(t, 5, 3, 0)
    with pytest.raises(IndexError, match="src_start"):
        ops.move_(t, -1, 3, 0)
    with pytest.raises(IndexError, match="src_end"):
        ops.move_(t, 2, 11, 0)
    with pytest.raises(IndexError, match="dst_start"):
        ops.move_(t, 2, 6, 7)
    with pytest.raises(IndexError, match="dst_start"):
        ops.move_(t, 2, 6, -1)
    with pytest.raises(ValueError, match="tensors.*non-empty"):
        ops.move_([], 0, 1, 0)
    with pytest.raises(ValueError, match="share B, H and T"):
        ops.move_([t[0], torch.randn(1, 2, 9, 4)], 0, 1, 0)
    assert torch.equal(t[0], before)


def test_opcheck():
    tensors = cache_group(1, 2, 12, 8)
    torch.library.opcheck(torch.ops.kvcompact.move_.default, (tensors, 3, 9, 1))
