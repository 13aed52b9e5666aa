"""Benchmark in-place compaction (compact_, move_) and RoPE re-rotation (rope_shift_).

A Llama-3.1-8B-shaped layer: B = 1, H_kv = 8, D = 128, bf16 keys and values, at 8k
and 32k tokens, keeping 50% and 90%. Every row carries its ceiling:

* compact_ vs ``copy_`` of the same bytes (the moved tokens of K and V, read and
  written once) and vs kvpress-style compaction (``gather`` into new tensors:
  time and the extra memory it holds while both copies are alive);
* rope_shift_ vs ``copy_`` of the keys and vs torch eager re-rotation
  (``k.copy_(k * cos + rotate_half(k) * sin)`` with fp32 cos/sin).

GB/s counts bytes read + written. Times are medians, measured round-robin;
with --threads 1 CPU times are the thread's CPU time (stable on shared VMs). Peak extra memory is
measured with torch.cuda.max_memory_allocated on GPU; on CPU it is the size of
what each method allocates (compact_ allocates nothing).

    python benchmarks/bench_compact.py [--quick] [--device cpu|cuda|all] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import kvcompact
from kvcompact import ops

B, H, D = 1, 8, 128
DTYPE = torch.bfloat16


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """Wall time, except single-threaded CPU runs, which use the calling thread's
    CPU time: all work then runs on this thread (at::parallel_for runs inline),
    and CPU time is immune to other processes on a shared machine."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def median_times(fns, device, repeats, warmup=2):
    """Median seconds of each callable in `fns`, measured round-robin so that
    load from other processes hits every candidate alike."""
    now = clock(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            fn()
            sync(device)
            times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_extra(fn, device):
    """Bytes allocated on top of what was live before `fn` (GPU only)."""
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync(device)
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return extra


def keep_indices(T, frac, pattern, device, gen):
    K = int(T * frac)
    if pattern == "per-head":  # SnapKV/AdaKV-like: each head keeps its own top-K
        rows = [torch.sort(torch.randperm(T, generator=gen)[:K]).values for _ in range(B * H)]
        keep = torch.stack(rows).reshape(B, H, K)
    else:  # "span": an agent drops one contiguous middle span (e.g. a tool output)
        drop = T - K
        start = T // 10
        idx = torch.cat([torch.arange(start), torch.arange(start + drop, T)])
        keep = idx.expand(B, H, K).contiguous()
    return keep.to(device)


def moved_tokens(keep):
    j = torch.arange(keep.shape[-1], device=keep.device)
    return int((keep != j).sum())


def bench_compact(device, T, frac, pattern, repeats, gen):
    k = torch.randn(B, H, T, D, dtype=DTYPE, device=device)
    v = torch.randn_like(k)
    keep = keep_indices(T, frac, pattern, device, gen)
    K = keep.shape[-1]
    token_bytes = D * k.element_size()
    moved = moved_tokens(keep)
    moved_bytes = 2 * 2 * moved * token_bytes  # K and V, read + written

    # Ceiling: copy_ of the same moved bytes (one buffer per tensor).
    src = torch.empty(max(1, 2 * moved * token_bytes), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # kvpress-style: gather into new tensors (the old ones are freed afterwards).
    idx = keep.unsqueeze(-1).expand(B, H, K, D)

    def gather():
        return k.gather(2, idx), v.gather(2, idx)

    # Re-running on compacted data repeats the same moves, so no reset is needed.
    t = median_times({
        "ours": lambda: ops.compact_([k, v], keep),
        "ours_novalidate": lambda: ops.compact_([k, v], keep, False),
        "copy": lambda: dst.copy_(src),
        "gather": gather,
    }, device, repeats)
    t_ours, t_novalidate, t_copy, t_gather = t["ours"], t["ours_novalidate"], t["copy"], t["gather"]
    del src, dst
    extra_ours = peak_extra(lambda: ops.compact_([k, v], keep), device)
    extra_gather = peak_extra(gather, device)
    if extra_gather is None:
        extra_gather = 2 * B * H * K * D * k.element_size()
    return {
        "op": "compact_", "device": device, "T": T, "keep": frac, "pattern": pattern,
        "moved_tokens_per_row": moved / (B * H),
        "ms": t_ours * 1e3, "ms_no_validate": t_novalidate * 1e3,
        "GBps": moved_bytes / t_ours / 1e9,
        "copy_GBps": moved_bytes / t_copy / 1e9 if moved else None,
        "ratio_to_copy": t_copy / t_ours if moved else None,
        "gather_ms": t_gather * 1e3, "speedup_vs_gather": t_gather / t_ours,
        "extra_MiB": (extra_ours or 0) / 2**20, "gather_extra_MiB": extra_gather / 2**20,
    }


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def bench_rope(device, T, delta_kind, repeats, gen):
    k = torch.randn(B, H, T, D, dtype=DTYPE, device=device)
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))).to(device)
    if delta_kind == "uniform":  # every token after an evicted span moves by -span
        delta = torch.full((T,), -T // 4, dtype=torch.int64, device=device)
    else:
        delta = torch.randint(-T, 0, (T,), generator=gen).to(device)
    nbytes = 2 * k.numel() * k.element_size()  # read + write

    def eager():
        ang = delta[:, None].float() * inv_freq[None]
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos().to(k.dtype), emb.sin().to(k.dtype)
        k.copy_(k * cos + rotate_half(k) * sin)

    dst = torch.empty_like(k)
    t = median_times({
        "ours": lambda: ops.rope_shift_(k, delta, inv_freq, "neox"),
        "eager": eager,
        "copy": lambda: dst.copy_(k),
    }, device, repeats)
    t_ours, t_eager, t_copy = t["ours"], t["eager"], t["copy"]
    return {
        "op": "rope_shift_", "device": device, "T": T, "delta": delta_kind,
        "ms": t_ours * 1e3, "GBps": nbytes / t_ours / 1e9, "copy_GBps": nbytes / t_copy / 1e9,
        "ratio_to_copy": t_copy / t_ours, "eager_ms": t_eager * 1e3,
        "speedup_vs_eager": t_eager / t_ours,
    }


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_tables(rows):
    print("\ncompact_ (K and V, bf16, B=1 H=8 D=128; GB/s of moved bytes, read + written)")
    print(f"{'dev':4} {'T':>6} {'keep':>5} {'pattern':>8} {'ms':>8} {'GB/s':>7} {'copy GB/s':>9} "
          f"{'/copy':>6} {'gather ms':>9} {'speedup':>7} {'extra MiB':>9} {'gather MiB':>10}")
    for r in rows:
        if r["op"] != "compact_":
            continue
        print(f"{r['device']:4} {r['T']:>6} {r['keep']:>5.0%} {r['pattern']:>8} {r['ms']:>8.2f} "
              f"{r['GBps']:>7.2f} {fmt(r['copy_GBps']):>9} {fmt(r['ratio_to_copy']):>6} "
              f"{r['gather_ms']:>9.2f} {r['speedup_vs_gather']:>6.2f}x {r['extra_MiB']:>9.2f} "
              f"{r['gather_extra_MiB']:>10.1f}")
    print("\nrope_shift_ (bf16 keys, B=1 H=8 D=128, neox; GB/s read + written)")
    print(f"{'dev':4} {'T':>6} {'delta':>8} {'ms':>8} {'GB/s':>7} {'copy GB/s':>9} {'/copy':>6} "
          f"{'eager ms':>9} {'speedup':>7}")
    for r in rows:
        if r["op"] != "rope_shift_":
            continue
        print(f"{r['device']:4} {r['T']:>6} {r['delta']:>8} {r['ms']:>8.2f} {r['GBps']:>7.2f} "
              f"{r['copy_GBps']:>9.2f} {r['ratio_to_copy']:>6.2f} {r['eager_ms']:>9.2f} "
              f"{r['speedup_vs_eager']:>6.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8k tokens only")
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (torch.set_num_threads); on a shared or small VM, "
                         "1 gives stable numbers")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "out",
                                                   "bench_compact.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    sizes = [8192] if args.quick else [8192, 32768]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for device in devices:
        for T in sizes:
            for frac in (0.5, 0.9):
                for pattern in ("per-head", "span"):
                    rows.append(bench_compact(device, T, frac, pattern, args.repeats, gen))
            for delta_kind in ("uniform", "random"):
                rows.append(bench_rope(device, T, delta_kind, args.repeats, gen))
    print_tables(rows)
    meta = {
        "torch": torch.__version__, "kvcompact_build": kvcompact.build_info(),
        "threads": torch.get_num_threads(),
        "cpu_clock": clock("cpu").__name__, "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
