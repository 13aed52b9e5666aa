"""copy_blocks_: bit-exact block copies in every direction, and clear errors."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompact
from kvcompact import ops, reference

HAS_CUDA = torch.cuda.is_available() and kvcompact.build_info()["cuda_kernels"]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8, torch.int64, torch.bool]
BLOCK_SHAPES = [(), (1,), (3,), (16, 8), (2, 3, 5), (4, 16, 128)]
# (src device, dst device); "pinned" is host memory from the pinned pool.
DIRECTIONS = [("cpu", "cpu")]
if HAS_CUDA:
    DIRECTIONS += [("pinned", "cuda"), ("cuda", "pinned"), ("cuda", "cuda"), ("cpu", "cuda"),
                   ("cuda", "cpu"), ("pinned", "pinned")]


def random_blocks(n, block_shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, *block_shape, torch.empty((), dtype=dtype).element_size()),
                        generator=g, dtype=torch.uint8)
    t = raw.view(dtype).reshape(n, *block_shape)
    return t


def place(t, where):
    if where == "cuda":
        return t.cuda()
    if where == "pinned":
        return t.pin_memory()
    return t.clone()


def bits(t):
    """Bit pattern, so NaN codes and -0.0 compare exactly."""
    t = t.cpu().contiguous()
    return t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)


def random_mapping(n_src, n_dst, n, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, n_src, (n,), generator=g)
    d = torch.randperm(n_dst, generator=g)[:n]
    return torch.stack([s, d], 1)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_shape", BLOCK_SHAPES, ids=str)
def test_round_trip_bit_exact(direction, dtype, block_shape):
    src = place(random_blocks(12, block_shape, dtype, 1), direction[0])
    dst0 = random_blocks(9, block_shape, dtype, 2)
    dst = place(dst0, direction[1])
    mapping = random_mapping(12, 9, 6, 3)
    expected = reference.copy_blocks(src.cpu(), dst0, mapping)
    ops.copy_blocks_(src, dst, mapping)
    if dst.is_cuda or src.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(bits(dst), bits(expected))
    # Blocks not named in the mapping are untouched.
    untouched = sorted(set(range(9)) - set(mapping[:, 1].tolist()))
    assert torch.equal(bits(dst[untouched]), bits(dst0[untouched]))


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_consecutive_blocks_are_merged_and_exact(direction):
    # Runs of consecutive (src, dst) pairs become one copy; check the edges of runs.
    src = place(random_blocks(64, (4, 8), torch.bfloat16, 4), direction[0])
    dst0 = random_blocks(64, (4, 8), torch.bfloat16, 5)
    dst = place(dst0, direction[1])
    mapping = torch.tensor([[i, i + 3] for i in range(10, 30)] + [[0, 0], [1, 1], [40, 60]])
    expected = reference.copy_blocks(src.cpu(), dst0, mapping)
    ops.copy_blocks_(src, dst, mapping)
    if HAS_CUDA:
        torch.cuda.synchronize()
    assert torch.equal(bits(dst), bits(expected))


def test_strided_leading_dim_views():
    # Blocks of one layer inside a [blocks, layers, ...] buffer: stride(0) > block size.
    big_src = random_blocks(20, (3, 16, 8), torch.float16, 6)
    big_dst = random_blocks(20, (3, 16, 8), torch.float16, 7)
    src, dst = big_src[:, 1], big_dst[:, 2]
    before = big_dst.clone()
    mapping = torch.tensor([[0, 1], [1, 2], [2, 3], [19, 0]])
    expected = reference.copy_blocks(src, dst, mapping)
    ops.copy_blocks_(src, dst, mapping)
    assert torch.equal(bits(dst), bits(expected))
    # The other layers of the destination buffer are untouched.
    assert torch.equal(bits(big_dst[:, :2]), bits(before[:, :2]))


def test_same_buffer_disjoint_blocks():
    buf = random_blocks(8, (5,), torch.float32, 8)
    expected = reference.copy_blocks(buf, buf, torch.tensor([[0, 4], [1, 5]]))
    ops.copy_blocks_(buf, buf, torch.tensor([[0, 4], [1, 5]]))
    assert torch.equal(bits(buf), bits(expected))


def test_empty_mapping_and_empty_blocks():
    src = torch.ones(3, 4)
    dst = torch.zeros(3, 4)
    ops.copy_blocks_(src, dst, torch.empty(0, 2, dtype=torch.int64))
    assert dst.abs().sum() == 0
    ops.copy_blocks_(torch.ones(3, 0), torch.zeros(3, 0), torch.tensor([[0, 1]]))


def test_large_parallel_copy():
    # Many blocks over the parallel grain (exercises the multi-task CPU path).
    src = random_blocks(4096, (256,), torch.float32, 9)
    dst = torch.zeros_like(src)
    perm = torch.randperm(4096, generator=torch.Generator().manual_seed(1))
    mapping = torch.stack([torch.arange(4096), perm], 1)
    ops.copy_blocks_(src, dst, mapping)
    assert torch.equal(bits(dst[perm]), bits(src))


@settings(max_examples=60, deadline=None)
@given(n_src=st.integers(1, 20), n_dst=st.integers(1, 20), data=st.data(),
       block=st.sampled_from([(1,), (7,), (2, 4)]), dtype=st.sampled_from(DTYPES))
def test_random_mappings_match_reference(n_src, n_dst, data, block, dtype):
    n = data.draw(st.integers(0, n_dst))
    srcs = data.draw(st.lists(st.integers(0, n_src - 1), min_size=n, max_size=n))
    dsts = data.draw(st.permutations(range(n_dst)))[:n]
    mapping = torch.tensor(list(zip(srcs, dsts)), dtype=torch.int64).reshape(n, 2)
    src = random_blocks(n_src, block, dtype, n_src)
    dst = random_blocks(n_dst, block, dtype, n_dst + 100)
    expected = reference.copy_blocks(src, dst, mapping)
    ops.copy_blocks_(src, dst, mapping)
    assert torch.equal(bits(dst), bits(expected))


# --- errors ---------------------------------------------------------------------

def _args():
    return torch.zeros(4, 2, 3), torch.zeros(5, 2, 3)


@pytest.mark.parametrize("mapping, exc, words", [
    (torch.tensor([[4, 0]]), IndexError, ["block_mapping", "[0, 0] = 4", "src"]),
    (torch.tensor([[0, 5]]), IndexError, ["block_mapping", "[0, 1] = 5", "dst"]),
    (torch.tensor([[-1, 0]]), IndexError, ["block_mapping", "-1"]),
    (torch.tensor([[0, -2]]), IndexError, ["block_mapping", "-2"]),
    (torch.tensor([0, 1]), ValueError, ["block_mapping", "[N, 2]"]),
    (torch.tensor([[0, 1, 2]]), ValueError, ["block_mapping", "[N, 2]"]),
    (torch.tensor([[0, 1]], dtype=torch.int32), TypeError, ["block_mapping", "int64"]),
    (torch.tensor([[0.0, 1.0]]), TypeError, ["block_mapping", "int64"]),
    (torch.tensor([[0, 1], [2, 1]]), ValueError, ["dst block 1", "more than once"]),
])
def test_bad_mapping_raises(mapping, exc, words):
    src, dst = _args()
    with pytest.raises(exc) as info:
        ops.copy_blocks_(src, dst, mapping)
    for w in words:
        assert w in str(info.value)
    assert "copy_blocks_" in str(info.value)


def test_mismatched_blocks_raise():
    m = torch.tensor([[0, 0]])
    with pytest.raises(ValueError, match="same block shape"):
        ops.copy_blocks_(torch.zeros(4, 2, 3), torch.zeros(4, 3, 2), m)
    with pytest.raises(TypeError, match="same dtype"):
        ops.copy_blocks_(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.float16), m)
    with pytest.raises(ValueError, match="0-d"):
        ops.copy_blocks_(torch.zeros(()), torch.zeros(4), m)


def test_non_contiguous_blocks_raise():
    m = torch.tensor([[0, 0]])
    with pytest.raises(ValueError, match="`src` .*must be contiguous"):
        ops.copy_blocks_(torch.zeros(4, 3, 2).transpose(1, 2), torch.zeros(4, 2, 3), m)
    with pytest.raises(ValueError, match="`dst` .*must be contiguous"):
        ops.copy_blocks_(torch.zeros(4, 2, 3), torch.zeros(4, 3, 2).transpose(1, 2), m)
    with pytest.raises(ValueError, match="blocks of `dst` overlap"):
        ops.copy_blocks_(torch.zeros(4, 2), torch.zeros(2).expand(4, 2), m)


def test_shared_buffer_read_and_written_raises():
    buf = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="both read and written"):
        ops.copy_blocks_(buf, buf, torch.tensor([[0, 1], [1, 2]]))


def test_opcheck_cpu():
    src = random_blocks(6, (4, 8), torch.float16, 10)
    dst = random_blocks(5, (4, 8), torch.float16, 11)
    mapping = torch.tensor([[0, 4], [5, 0], [2, 1]])
    torch.library.opcheck(torch.ops.kvcompact.copy_blocks_.default, (src, dst, mapping))


# --- CUDA -----------------------------------------------------------------------

@needs_cuda
def test_mapping_on_device_raises():
    src, dst = torch.zeros(4, 2, device="cuda"), torch.zeros(4, 2, device="cuda")
    with pytest.raises(ValueError, match="`block_mapping` must be a CPU tensor"):
        ops.copy_blocks_(src, dst, torch.tensor([[0, 1]], device="cuda"))


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "kernel", "batch", "loop"])
@pytest.mark.parametrize("direction", [("pinned", "cuda"), ("cuda", "pinned"), ("cuda", "cuda")],
                         ids=lambda d: f"{d[0]}->{d[1]}")
@pytest.mark.parametrize("block_shape", [(3,), (16, 128)], ids=str)
def test_every_path_is_exact(monkeypatch, path, direction, block_shape):
    monkeypatch.setenv("KVCOMPACT_COPY_BLOCKS_PATH", path)
    monkeypatch.setenv("KVCOMPACT_COPY_BLOCKS_HOST_KERNEL_MAX_BYTES", "1048576")
    src = place(random_blocks(700, block_shape, torch.bfloat16, 12), direction[0])
    dst0 = random_blocks(1000, block_shape, torch.bfloat16, 13)
    dst = place(dst0, direction[1])
    mapping = random_mapping(700, 1000, 600, 14)  # > one kernel launch of pairs
    expected = reference.copy_blocks(src.cpu(), dst0, mapping)
    ops.copy_blocks_(src, dst, mapping)
    torch.cuda.synchronize()
    assert torch.equal(bits(dst), bits(expected))


@needs_cuda
@pytest.mark.parametrize("use_side_stream", [False, True])
def test_current_stream_ordering(use_side_stream):
    # The copy must run after work queued on the current stream (default stream
    # exercises the legacy-stream bridge of the batch API) and before later work.
    stream = torch.cuda.Stream() if use_side_stream else torch.cuda.default_stream()
    with torch.cuda.stream(stream):
        src = torch.zeros(256, 4096, device="cuda")
        dst = torch.empty(256, 4096).pin_memory()
        torch.cuda._sleep(20_000_000)       # keep the stream busy
        src.fill_(3.0)                      # must land before the copy reads
        mapping = torch.stack([torch.arange(0, 256, 2), torch.arange(0, 256, 2)], 1)
        ops.copy_blocks_(src, dst, mapping)
        src.fill_(5.0)                      # must not be seen by the copy
    stream.synchronize()
    assert (dst[::2] == 3.0).all()


@needs_cuda
def test_copies_correct_while_compute_runs_on_another_stream():
    compute = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    src = random_blocks(2048, (64, 128), torch.bfloat16, 15).pin_memory()
    dst = torch.zeros(2048, 64, 128, dtype=torch.bfloat16, device="cuda")
    back = torch.zeros_like(src).pin_memory()
    mapping = torch.stack([torch.arange(2048), torch.randperm(2048)], 1)
    inverse = torch.stack([mapping[:, 1], mapping[:, 1]], 1)
    with torch.cuda.stream(compute):
        for _ in range(20):
            a = torch.tanh(a @ a * 1e-3)
    ops.copy_blocks_(src, dst, mapping)
    ops.copy_blocks_(dst, back, inverse)
    torch.cuda.synchronize()
    assert torch.equal(bits(back[mapping[:, 1]]), bits(src[mapping[:, 0]]))
    assert torch.isfinite(a).all()


@needs_cuda
def test_pageable_host_memory_is_correct():
    src = random_blocks(32, (8, 8), torch.float32, 16)
    dst = torch.zeros(32, 8, 8, device="cuda")
    ops.copy_blocks_(src, dst, torch.tensor([[i, 31 - i] for i in range(32)]))
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src.flip(0))


@needs_cuda
def test_opcheck_cuda_mixed_devices():
    src = random_blocks(6, (4, 8), torch.float16, 17).pin_memory()
    dst = random_blocks(5, (4, 8), torch.float16, 18).cuda()
    torch.library.opcheck(torch.ops.kvcompact.copy_blocks_.default,
                          (src, dst, torch.tensor([[0, 4], [5, 0]])))
