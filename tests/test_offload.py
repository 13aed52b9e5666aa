"""PinnedPool, LayerPrefetcher and SessionParker (CPU logic everywhere, CUDA behaviour on a GPU)."""

import gc
import threading
import time
import weakref

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvcompact
from kvcompact.offload import LayerPrefetcher, PinnedPool, PoolExhaustedError, SessionParker
from kvcompact.offload import _streams

HAS_CUDA = torch.cuda.is_available() and kvcompact.build_info()["cuda_kernels"]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

ALIGN = 256


def span(t):
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


# --- PinnedPool -------------------------------------------------------------------

def test_pool_basics():
    pool = PinnedPool(1 << 20)
    assert pool.capacity_bytes == 1 << 20 and pool.used_bytes == 0
    t = pool.tensor((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    assert t.is_contiguous() and t.data_ptr() % ALIGN == 0
    assert t.is_pinned() == pool.pinned
    assert pool.pinned == HAS_CUDA
    assert pool.used_bytes == ALIGN and pool.num_allocations == 1
    assert pool.owns(t) and not pool.owns(torch.zeros(3))
    assert "PinnedPool" in repr(pool)
    del t
    assert pool.used_bytes == 0  # the range returns when the tensor dies


def test_pool_capacity_rounds_down_and_rejects_tiny():
    assert PinnedPool(1000).capacity_bytes == 768
    with pytest.raises(ValueError, match="capacity_bytes"):
        PinnedPool(10)


def test_pool_refuses_to_overcommit():
    pool = PinnedPool(4096)
    a = pool.tensor((1024,), torch.float32)  # the whole pool
    with pytest.raises(PoolExhaustedError) as info:
        pool.tensor((1,), torch.int8)
    msg = str(info.value)
    assert "1 bytes" in msg and "0 bytes free of 4096" in msg
    assert isinstance(info.value, MemoryError)
    with pytest.raises(PoolExhaustedError, match="8192 bytes"):
        PinnedPool(4096).tensor((2048,), torch.float32)
    del a


def test_pool_exhaustion_names_fragmentation():
    pool = PinnedPool(4 * ALIGN)
    ts = [pool.tensor((ALIGN,), torch.uint8) for _ in range(4)]
    del ts[0], ts[1]  # free ranges 0 and 2 (not adjacent)
    with pytest.raises(PoolExhaustedError, match=r"512 bytes free of 1024 \(largest free range 256"):
        pool.tensor((2 * ALIGN,), torch.uint8)


def test_pool_reuses_released_space_and_coalesces():
    pool = PinnedPool(8 * ALIGN)
    a = pool.tensor((2 * ALIGN,), torch.uint8)
    b = pool.tensor((ALIGN,), torch.uint8)
    a_ptr = a.data_ptr()
    pool.release(a)
    c = pool.tensor((2 * ALIGN,), torch.uint8)
    assert c.data_ptr() == a_ptr  # best fit takes the released range
    del b, c
    assert pool.used_bytes == 0
    full = pool.tensor((8 * ALIGN,), torch.uint8)  # only possible if ranges coalesced
    assert full.data_ptr() == a_ptr


def test_release_foreign_double_and_viewed():
    pool, other = PinnedPool(1 << 16), PinnedPool(1 << 16)
    t = pool.tensor((64,), torch.float32)
    with pytest.raises(ValueError, match="not handed out by this pool"):
        pool.release(torch.zeros(64))
    with pytest.raises(ValueError, match="not handed out by this pool"):
        other.release(t)
    v = t[10:20]
    with pytest.raises(ValueError, match="other tensor"):
        pool.release(t)
    del v
    pool.release(t)
    assert t.numel() == 0 and pool.used_bytes == 0  # t no longer reaches pool memory
    with pytest.raises(ValueError, match="already released"):
        pool.release(t)


def test_release_of_a_view_is_refused_while_its_base_lives():
    # A view keeps its base alive (``v._base``), so the range is still reachable.
    pool = PinnedPool(1 << 16)
    t = pool.tensor((8, 8), torch.float32)
    v = t.view(64)
    del t
    with pytest.raises(ValueError, match="other tensor"):
        pool.release(v)
    del v
    assert pool.used_bytes == 0


def test_pool_memory_outlives_pool_object():
    pool = PinnedPool(1 << 16)
    t = pool.tensor((1000,), torch.int32)
    t.copy_(torch.arange(1000, dtype=torch.int32))
    del pool
    gc.collect()
    # Touch the memory after the Python pool is gone (the storage holds the range).
    t.add_(1)
    assert torch.equal(t, torch.arange(1, 1001, dtype=torch.int32))


def test_zero_and_bad_shapes():
    pool = PinnedPool(1 << 12)
    z = pool.tensor((0, 4), torch.float32)
    assert z.numel() == 0 and pool.used_bytes == ALIGN  # a distinct range all the same
    with pytest.raises(ValueError, match="non-negative"):
        pool.tensor((-1, 4), torch.float32)
    with pytest.raises(ValueError, match="overflows"):
        pool.tensor((1 << 62, 1 << 62), torch.float32)


def test_pageable_fallback_on_exhaustion():
    pool = PinnedPool(1024, allow_pageable_fallback=True)
    a = pool.tensor((256,), torch.float32)
    with pytest.warns(ResourceWarning, match="pageable"):
        b = pool.tensor((16,), torch.float32)
    assert not pool.owns(b) and pool.used_bytes == 1024
    pool.release(b)  # accepted: handed out by this pool object
    assert b.numel() == 0
    del a


def test_pool_threads():
    pool = PinnedPool(1 << 20)
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            live = []
            for _ in range(300):
                if live and torch.rand((), generator=g) < 0.5:
                    t, val = live.pop(int(torch.randint(len(live), (), generator=g)))
                    assert (t == val).all(), "another thread wrote into this range"
                    pool.release(t)
                else:
                    n = int(torch.randint(1, 2000, (), generator=g))
                    try:
                        t = pool.tensor((n,), torch.uint8)
                    except PoolExhaustedError:
                        continue
                    t.fill_(seed)
                    live.append((t, seed))
            for t, val in live:
                assert (t == val).all()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i + 1,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert pool.used_bytes == 0 and pool.largest_free_block == pool.capacity_bytes


class PoolMachine(RuleBasedStateMachine):
    """Random alloc/release sequences: ranges never overlap, accounting is exact."""

    def __init__(self):
        super().__init__()
        self.pool = PinnedPool(64 * ALIGN)
        self.live = []  # (tensor, fill value)
        self.counter = 0

    @rule(n=st.integers(0, 20 * ALIGN), dtype=st.sampled_from([torch.uint8, torch.float32,
                                                               torch.bfloat16, torch.float8_e4m3fn]))
    def alloc(self, n, dtype):
        item = torch.empty((), dtype=dtype).element_size()
        numel = n // item
        free_before = self.pool.free_bytes
        try:
            t = self.pool.tensor((numel,), dtype)
        except PoolExhaustedError:
            assert self.pool.largest_free_block < max(numel * item, 1)
            assert self.pool.free_bytes == free_before
            return
        assert t.data_ptr() % ALIGN == 0
        self.counter = (self.counter + 1) % 250
        t.view(torch.uint8).fill_(self.counter)
        self.live.append((t, self.counter))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 1000), explicit=st.booleans())
    def release(self, i, explicit):
        t, _ = self.live.pop(i % len(self.live))
        if explicit:
            self.pool.release(t)
        else:
            del t

    @invariant()
    def no_overlap_and_exact_accounting(self):
        spans = sorted(span(t) for t, _ in self.live)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start
        rounded = sum(max(-(-(e - s) // ALIGN), 1) * ALIGN for s, e in spans)
        assert self.pool.used_bytes == rounded
        assert self.pool.num_allocations == len(self.live)
        for t, val in self.live:
            assert (t.view(torch.uint8) == val).all()  # nobody wrote into a live range


PoolMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase


# --- LayerPrefetcher ---------------------------------------------------------------

def make_layers(pool, num_layers, shape=(1, 2, 16, 8), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        row = []
        for _ in range(2):
            t = pool.tensor(shape, dtype)
            t.copy_(torch.randn(shape, generator=g).to(dtype))
            row.append(t)
        layers.append(row)
    return layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_layers", [1, 2, 3, 5])
def test_prefetcher_serves_every_layer_and_writes_back(device, num_layers):
    pool = PinnedPool(8 << 20)
    host = make_layers(pool, num_layers)
    expected = [[t.clone() for t in ts] for ts in host]
    pf = LayerPrefetcher(host, device)
    for step in range(3):
        for i in range(num_layers):
            k, v = pf.acquire(i)
            assert k.device.type == device
            assert torch.equal(k.cpu(), expected[i][0]) and torch.equal(v.cpu(), expected[i][1])
            k[:, :, step] = float(100 * step + i)     # "append" a token on the device
            expected[i][0][:, :, step] = float(100 * step + i)
            pf.release(i, writeback=(slice(None), slice(None), slice(step, step + 1)))
    pf.synchronize()
    for i in range(num_layers):
        assert torch.equal(host[i][0], expected[i][0])
    s = pf.stats_dict()
    assert s["bytes_to_host"] == 3 * num_layers * 2 * (2 * 8 * 4)
    assert s["device_staging_bytes"] == 2 * 2 * (2 * 16 * 8 * 4)
    pf.close()


def test_prefetcher_mixed_layer_shapes_and_extent():
    pool = PinnedPool(1 << 20)
    host = [[pool.tensor((2, 8), torch.float16).fill_(1)],
            [pool.tensor((2, 4), torch.float16).fill_(2)],
            [pool.tensor((2, 8), torch.float16).fill_(3)]]
    pf = LayerPrefetcher(host, "cpu", extent=lambda i: (slice(None), slice(0, 2)))
    (a,) = pf.acquire(0)
    assert a.shape == (2, 8) and (a[:, :2] == 1).all()
    pf.release(0)
    (b,) = pf.acquire(1)
    assert b.shape == (2, 4) and (b[:, :2] == 2).all()
    pf.release(1)
    assert pf.stats.bytes_to_device == 3 * 2 * 2 * 2  # only the extent moved (0, 1, 2 prefetched)


def test_prefetcher_misuse_raises():
    pool = PinnedPool(1 << 20)
    pf = LayerPrefetcher(make_layers(pool, 3), "cpu")
    pf.acquire(0)
    with pytest.raises(RuntimeError, match="already acquired"):
        pf.acquire(0)
    with pytest.raises(ValueError, match="not acquired"):
        pf.release(2)
    pf.acquire(1, prefetch_next=False)
    with pytest.raises(RuntimeError, match="both slots are in use"):
        pf.prefetch(2)
    with pytest.raises(IndexError):
        pf.acquire(3)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        LayerPrefetcher([[torch.zeros(4, 4).t()]], "cpu")


# --- SessionParker ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_park_resume_round_trip(device):
    pool = PinnedPool(4 << 20)
    parker = SessionParker(pool)
    dtypes = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.int64]
    tensors = [torch.randn(4, 8, 16).to(dt) if dt.is_floating_point else
               torch.randint(-100, 100, (4, 8, 16)).to(dt) for dt in dtypes]
    originals = [t.clone() for t in tensors]
    tensors = [t.to(device) for t in tensors]
    h = parker.park(tensors)
    del tensors
    h.wait()
    assert h.done() and pool.used_bytes >= h.nbytes
    r = parker.resume(h)
    r.wait()
    for got, want in zip(r.tensors, originals):
        assert got.device.type == device
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
    parker.synchronize()
    assert pool.used_bytes == 0
    with pytest.raises(ValueError, match="already resumed"):
        parker.resume(h)
    s = parker.stats_dict()
    assert s["bytes_to_host"] == s["bytes_to_device"] == h.nbytes


def test_park_exhaustion_leaks_nothing_and_discard_frees():
    pool = PinnedPool(64 * 1024)
    parker = SessionParker(pool)
    with pytest.raises(PoolExhaustedError):
        parker.park([torch.zeros(8 * 1024), torch.zeros(16 * 1024)])  # 32 KiB fits, 64 KiB not
    assert pool.used_bytes == 0
    h = parker.park([torch.ones(1000)])
    assert pool.used_bytes > 0
    parker.discard(h)
    parker.synchronize()
    assert pool.used_bytes == 0


class _FakeEvent:
    """A CUDA event stand-in whose copy "completes" ``delay`` seconds after ``record``; ``query``
    yields the GIL, so a sweep over many of them interleaves with other threads."""

    delay = 0.003

    def __init__(self, *args, **kwargs):
        self.done_at = None

    def record(self, stream=None):
        self.done_at = time.perf_counter() + self.delay

    def complete(self):
        return self.done_at is not None and time.perf_counter() >= self.done_at

    def query(self):
        time.sleep(0)
        return self.complete()

    def synchronize(self):
        while not self.complete():
            time.sleep(self.delay / 4)


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        time.sleep(_FakeEvent.delay * 2)


class _FakeTorch:
    """``torch`` as parking.py sees it, with a fake CUDA stream API over CPU tensors, and a slow
    ``empty`` (the allocation between a resume's check of its handle and its copy)."""

    def __init__(self):
        import contextlib
        import types

        self.cuda = types.SimpleNamespace(Stream=_FakeStream, Event=_FakeEvent, stream=lambda s: contextlib.nullcontext(),
                                          current_stream=lambda device=None: _FakeStream())

    def empty(self, *args, **kwargs):
        time.sleep(0.0005)
        return torch.empty(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def fake_async_parker(monkeypatch):
    """Make SessionParker take its asynchronous (CUDA) path on CPU tensors, with slow fake events,
    and report every pool tensor whose Python object dies before the fake copy touching it completed
    (that is when its range goes back to the pool)."""
    from kvcompact.offload import parking

    violations, pool_ptrs = [], set()
    real_copy = parking.copy_whole_

    def copy(dst, src):
        n = real_copy(dst, src)
        ev = _FakeEvent()
        ev.record()  # an upper bound: the parker's own event is recorded after this one
        for t in (dst, src):
            if t.data_ptr() in pool_ptrs:
                weakref.finalize(t, lambda ev=ev, p=t.data_ptr(): None if ev.complete()
                                 else violations.append(f"range at {p:#x} freed while its copy runs"))
        return n

    monkeypatch.setattr(parking, "torch", _FakeTorch())
    monkeypatch.setattr(parking, "is_async", lambda device: True)
    monkeypatch.setattr(parking, "copy_whole_", copy)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)

    class TrackedPool(PinnedPool):
        def tensor(self, shape, dtype):
            t = super().tensor(shape, dtype)
            pool_ptrs.add(t.data_ptr())
            return t

    return TrackedPool, violations


class _SlowInflight(SessionParker):
    """Widens the window of a read-modify-write on the in-flight list: a reader holds the list it
    read across a GIL switch (what a preempted thread does, only reliably)."""

    @property
    def _inflight(self):
        lst = self.__dict__["_inflight"]
        time.sleep(0.0002)
        return lst

    @_inflight.setter
    def _inflight(self, value):
        self.__dict__["_inflight"] = value


def test_parker_threads_never_free_a_range_before_its_copy_completes(fake_async_parker):
    """Defect 8: threads hammering park/resume on one parker; no host range may return to the pool
    while a copy into or out of it is still running (the in-flight list keeps it)."""
    TrackedPool, violations = fake_async_parker
    pool = TrackedPool(8 << 20)
    parker = _SlowInflight(pool)
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for i in range(40):
                data = [torch.randn(64, generator=g), torch.randn(32, generator=g)]
                want = [d.clone() for d in data]
                h = parker.park(data)
                del data
                if i % 5 == 4:
                    parker.discard(h)
                    continue
                r = parker.resume(h)
                got = r.tensors
                del r, h  # the parker alone keeps the host ranges alive now
                assert all(torch.equal(a, b) for a, b in zip(got, want))
                if i % 7 == 0:
                    parker.stats_dict()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    gc.collect()
    assert violations == [], violations[:5]
    parker.synchronize()
    gc.collect()
    assert pool.used_bytes == 0
    s = parker.stats_dict()
    assert s["inflight"] == 0 and s["transfers_to_host"] == 6 * 40 and s["transfers_to_device"] == 6 * 32


def test_parker_failed_park_keeps_ranges_of_copies_already_issued(fake_async_parker, monkeypatch):
    """The second copy of a park fails to enqueue: the first one's host range stays reserved until
    its copy completes, then returns to the pool."""
    from kvcompact.offload import parking

    TrackedPool, violations = fake_async_parker
    pool = TrackedPool(1 << 20)
    parker = SessionParker(pool)
    real, calls = parking.copy_whole_, []

    def flaky(dst, src):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("enqueue failed")
        return real(dst, src)

    monkeypatch.setattr(parking, "copy_whole_", flaky)
    with pytest.raises(RuntimeError, match="enqueue failed"):
        parker.park([torch.ones(256), torch.ones(256)])
    gc.collect()
    assert violations == []
    parker.synchronize()
    gc.collect()
    assert pool.used_bytes == 0 and violations == []


def test_parker_concurrent_resume_of_one_handle_succeeds_once(fake_async_parker):
    """Two threads resuming the same handle: exactly one gets the tensors, the other a ValueError
    (never two copies out of one host range, one of them racing its return to the pool)."""
    TrackedPool, violations = fake_async_parker
    parker = SessionParker(TrackedPool(1 << 20))
    for _ in range(10):
        h = parker.park([torch.arange(16.0)])
        results, barrier = [], threading.Barrier(2)

        def go():
            barrier.wait()
            try:
                results.append(parker.resume(h).tensors[0])
            except ValueError as e:
                results.append(e)

        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in results if isinstance(r, torch.Tensor)]
        assert len(ok) == 1 and torch.equal(ok[0], torch.arange(16.0)), results
        assert any(isinstance(r, ValueError) and "already resumed" in str(r) for r in results)
    parker.synchronize()
    gc.collect()
    assert violations == []


# --- CUDA behaviour ------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("skip_wait", [False, True])
def test_prefetched_layer_never_read_before_copy_completes(monkeypatch, skip_wait):
    """With the event wait the read sees the new layer; without it (control) it does not.

    The side stream is stalled with a sleep kernel before the copy is queued, so the
    copy is certainly unfinished when the compute stream reads the slot.
    """
    if skip_wait:
        monkeypatch.setattr(_streams.TimedWait, "wait", lambda *a, **k: None)
    pool = PinnedPool(64 << 20)
    host = [[pool.tensor((4 << 20,), torch.float32).fill_(float(i + 1))] for i in range(3)]
    pf = LayerPrefetcher(host, "cuda")
    (a,) = pf.acquire(0)                      # slot 0: layer 0; layer 1 prefetched to slot 1
    pf.release(0)
    pf.synchronize()
    pf.invalidate(1)                          # force a fresh copy of layer 1 ...
    (pf._slots[1][0]).zero_()                 # ... over a slot holding zeros
    torch.cuda.synchronize()
    with torch.cuda.stream(pf._side):
        torch.cuda._sleep(100_000_000)        # ~50 ms before the side stream copies
    (b,) = pf.acquire(1)
    total = b.sum()                           # on the current stream, right away
    torch.cuda.synchronize()
    correct = total.item() == 2.0 * (4 << 20)
    assert correct != skip_wait
    pf.release(1)
    pf.synchronize()
    if not skip_wait:
        assert pf.stats_dict()["compute_wait_ms"] > 10  # the stall was measured


@needs_cuda
def test_prefetch_orders_against_a_non_default_current_stream():
    pool = PinnedPool(64 << 20)
    host = [[pool.tensor((1 << 20,), torch.float32).fill_(float(i))] for i in range(4)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pf = LayerPrefetcher(host, "cuda")
        sums = []
        for step in range(3):
            for i in range(4):
                (k,) = pf.acquire(i)
                torch.cuda._sleep(1_000_000)
                sums.append(k.sum())
                k.add_(1)                     # the device copy changes ...
                pf.release(i, writeback=True)  # ... and is written back after the add
    stream.synchronize()
    pf.synchronize()
    got = [s.item() for s in sums]
    want = [float((i + step) * (1 << 20)) for step in range(3) for i in range(4)]
    assert got == want


@needs_cuda
def test_no_pinned_leak_over_1000_park_resume_cycles():
    pool = PinnedPool(64 << 20)
    parker = SessionParker(pool)
    k = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16)
    ref_k, ref_v = k.clone(), v.clone()
    torch.cuda.synchronize()
    base_alloc = torch.cuda.memory_allocated()
    for _ in range(1000):
        h = parker.park([k, v])
        del k, v
        k, v = parker.resume(h).tensors
    parker.synchronize()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # processes the record_stream frees still pending
    assert pool.used_bytes == 0 and pool.num_allocations == 0
    assert torch.cuda.memory_allocated() == base_alloc
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    s = parker.stats_dict()
    assert s["transfers_to_host"] == 1000 and s["inflight"] == 0


@pytest.mark.parametrize("index", [
    (slice(None), slice(None), slice(2, 5)),
    (slice(None), slice(1, 2)),
    (slice(3, 4),),
    (slice(None), slice(None), slice(0, 16), slice(None)),
    (slice(None), slice(None), slice(7, 7)),
    (slice(None), slice(None), slice(0, 8, 2)),   # strided: falls back to copy_
    (0, slice(None)),                              # an int: falls back to copy_
])
def test_copy_index_matches_indexing(index):
    src = torch.randn(2, 3, 16, 4)
    dst = torch.zeros(2, 3, 16, 4)
    want = dst.clone()
    want[index] = src[index]
    moved = _streams.copy_index_(dst, src, index)
    assert torch.equal(dst, want)
    assert moved == src[index].numel() * 4
