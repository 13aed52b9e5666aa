"""The CUDA compact_/move_ tile protocol, simulated on the CPU.

compact_cuda.cu moves tokens in tiles that stage their sources, publish a
"staged" flag, wait for the flags of earlier tiles holding readers of their
destinations, then write. That ordering argument is what makes the in-place
kernel correct, and it can be checked without a GPU: this test replays the
protocol (the same index maps and `first_reader` rules as the kernel) with
adversarial random interleavings of single-token reads and writes, a bounded
number of resident tiles taken in ticket order, and checks the result against
the plain gather. It also checks that the schedule never deadlocks.
"""

from __future__ import annotations

import random

import pytest


def gather_map(keep):
    K = len(keep)

    def first_reader(a, e):  # as GatherMap::Row::first_reader
        lo, hi = 0, a
        while lo < hi:
            mid = (lo + hi) // 2
            if keep[mid] < a:
                lo = mid + 1
            else:
                hi = mid
        return lo if (lo < a and keep[lo] < e) else a

    return K, (lambda j: j), (lambda j: keep[j]), first_reader, (lambda a, e: keep[e - 1] == e - 1)


def shift_map(src_start, src_end, dst_start):
    count = src_end - src_start
    dist = abs(src_start - dst_start)
    up = dst_start > src_start

    def dst(j):
        return dst_start + count - 1 - j if up else dst_start + j

    def src(j):
        return src_start + count - 1 - j if up else src_start + j

    def first_reader(a, e):  # as ShiftMap::first_reader
        if e - dist <= 0:
            return a
        return min(max(a - dist, 0), a)

    return count, dst, src, first_reader, (lambda a, e: False)


def simulate(data, mapping, tile, resident, rng):
    count, dst, src, first_reader, identity = mapping
    mem = list(data)
    tiles = (count + tile - 1) // tile
    flags = [False] * tiles

    def program(t):  # a generator: each yield is one memory step, or a wait
        a, e = t * tile, min(t * tile + tile, count)
        if identity(a, e):
            flags[t] = True
            return
        staged = {}
        for j in range(a, e):
            if src(j) != dst(j):
                staged[j] = mem[src(j)]
                yield "step"
        flags[t] = True
        for w in range(first_reader(a, e) // tile, t):
            while not flags[w]:
                yield "wait"
        for j, v in staged.items():
            mem[dst(j)] = v
            yield "step"

    next_ticket, running = 0, []
    stalled = 0
    while next_ticket < tiles or running:
        while len(running) < resident and next_ticket < tiles:
            running.append(program(next_ticket))
            next_ticket += 1
        prog = rng.choice(running)
        try:
            kind = next(prog)
            stalled = stalled + 1 if kind == "wait" else 0
        except StopIteration:
            running.remove(prog)
            stalled = 0
        assert stalled < 10_000, "deadlock"
    return mem


def expected(data, mapping):
    count, dst, src, _, _ = mapping
    out = list(data)
    for j in range(count):
        out[dst(j)] = data[src(j)]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_gather_protocol(seed):
    rng = random.Random(seed)
    T = rng.randint(1, 120)
    kind = seed % 4
    if kind == 0:
        keep = sorted(rng.sample(range(T), rng.randint(0, T)))
    elif kind == 1:
        keep = list(range(1, T))  # shift by one: every tile waits on its neighbour
    elif kind == 2:
        cut0 = rng.randint(0, T)
        cut1 = rng.randint(cut0, T)
        keep = list(range(cut0)) + list(range(cut1, T))
    else:
        keep = sorted(rng.sample(range(T), max(1, T // 10)))
    if not keep:
        return
    data = list(range(1000, 1000 + T))
    m = gather_map(keep)
    got = simulate(data, m, tile=rng.choice([1, 2, 3, 8]), resident=rng.choice([1, 2, 5, 64]), rng=rng)
    assert got[: len(keep)] == expected(data, m)[: len(keep)]


@pytest.mark.parametrize("seed", range(40))
def test_shift_protocol(seed):
    rng = random.Random(seed)
    T = rng.randint(2, 100)
    s0 = rng.randint(0, T - 1)
    s1 = rng.randint(s0 + 1, T)
    d0 = rng.randint(0, T - (s1 - s0))
    if d0 == s0:
        return
    data = list(range(1000, 1000 + T))
    m = shift_map(s0, s1, d0)
    got = simulate(data, m, tile=rng.choice([1, 2, 3, 8]), resident=rng.choice([1, 2, 5, 64]), rng=rng)
    assert got == expected(data, m)
