"""Offload benchmarks: batched block copies and layer-offloaded decode.

Copies (every row has its ceiling beside it): GB/s of ``copy_blocks_`` moving
``--total-mib`` of KV in blocks of a given size along a scattered mapping (a
random permutation, so nothing merges) and a contiguous one (merged into one
run), against ONE large ``copy_`` of the same bytes (the ceiling; pinned and
non_blocking on a GPU) and a Python loop of per-block ``copy_`` (what naive
offload code does). CPU: host -> host. GPU: pinned -> device, device -> pinned,
device -> device, and each copy_blocks_ path (auto, batch, loop, kernel).

Park / resume (every device): ``KVCompactCache.park()`` and ``resume()`` of a cache holding
``--park-tokens`` tokens of ``--park-layers`` Llama-3.1-8B-shaped layers (8 KV heads, head_dim 128,
bf16 model dtype), lossless and int8, against ONE copy of the same bytes into a pinned pool tensor
and back (the ceiling): GB/s and the ratio.

Decode (GPU only): time per decode step of a Llama-3.1-8B-shaped random-weight
decoder (hidden 4096, 32 query heads, 8 KV heads, head_dim 128, MLP 14336;
``--layers`` of them) at a given context, with (a) all KV on the device, (b)
kvcompact layer offload (LayerPrefetcher, KV in a PinnedPool), and the same
model in transformers with (c) DynamicCache and (d) DynamicCache(offloading=True)
(skipped when the installed transformers lacks it).

Cache decode (every device): ms per decode token of a transformers model with random weights and
a real config at ``--cache-contexts`` tokens of context (default 1k, 4k, 16k; ``--quick``: 1k, 4k),
side by side: ``KVCompactCache`` on the device (the ceiling), ``KVCompactCache(offload="layers")``,
transformers' ``DynamicCache`` and ``DynamicCache(offloading=True)`` (CUDA only: it uses CUDA
streams). Columns: the ratio to the on-device KVCompactCache, and offload="layers" against
transformers' offloaded cache. On CUDA each row also reports ``torch.cuda.max_memory_allocated``
during the decode steps minus the weights, beside the cache's own accounting (two layer slots plus
the workspace). Model: SmolLM2-135M's config on CPU, a Llama-3.1-8B-shaped one (``--layers`` layers)
on CUDA (``--cache-model``).

    python benchmarks/bench_offload.py [--quick] [--device auto|cpu|cuda] [--json PATH]
    python benchmarks/bench_offload.py --only-cache-decode --cache-contexts 1024,4096 --device cpu
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kvcompact  # noqa: E402
from kvcompact import ops  # noqa: E402
from kvcompact.cache import compat  # noqa: E402
from kvcompact.offload import LayerPrefetcher, PinnedPool  # noqa: E402

GiB = 1 << 30


# --- timing ------------------------------------------------------------------------

def time_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms (CUDA: events on the current stream)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# --- copies ------------------------------------------------------------------------

def make_side(where: str, nbytes: int, pool: PinnedPool | None):
    n = nbytes // 2
    if where == "cuda":
        return torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    if where == "pinned" and pool is not None:
        t = pool.tensor((n,), torch.bfloat16)
        t.normal_()
        return t
    return torch.empty(n, dtype=torch.bfloat16).normal_()


def bench_copies(device: torch.device, total_mib: int, block_kib: list[int], reps: int,
                 per_block_limit: int) -> list[dict]:
    rows = []
    nbytes = total_mib << 20
    if device.type == "cuda":
        directions = [("pinned", "cuda"), ("cuda", "pinned"), ("cuda", "cuda")]
        pool = PinnedPool(2 * nbytes + (1 << 20))
        paths = ["auto", "batch", "loop", "kernel"]
    else:
        directions = [("cpu", "cpu")]
        pool = None
        paths = ["auto"]
    for src_where, dst_where in directions:
        src_flat = make_side(src_where, nbytes, pool)
        dst_flat = make_side(dst_where, nbytes, pool)
        for kib in block_kib:
            block_elems = (kib << 10) // 2
            nblocks = nbytes // (kib << 10)
            src = src_flat[: nblocks * block_elems].view(nblocks, block_elems)
            dst = dst_flat[: nblocks * block_elems].view(nblocks, block_elems)
            moved = nblocks * (kib << 10)
            # The ceiling is measured next to each row (the CI VM is shared and noisy).
            src_all, dst_all = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
            nb = device.type == "cuda"  # non_blocking on CPU only adds pinned-memory probing
            ceiling_ms = time_ms(lambda: dst_all.copy_(src_all, non_blocking=nb), device, reps)
            # The same bytes as ONE run of copy_blocks_ (one memcpy / cudaMemcpyAsync).
            one_run = torch.tensor([[0, 0]])
            src_one, dst_one = src_all.view(1, -1), dst_all.view(1, -1)
            one_ms = time_ms(lambda: ops.copy_blocks_(src_one, dst_one, one_run), device, reps)
            ceiling = max(gbps(moved, ceiling_ms), gbps(moved, one_ms))
            g = torch.Generator().manual_seed(0)
            perm = torch.randperm(nblocks, generator=g)
            scattered = torch.stack([torch.arange(nblocks), perm], 1)
            contiguous = torch.stack([torch.arange(nblocks), torch.arange(nblocks)], 1)
            per_block = None
            if nblocks <= per_block_limit:
                pairs = scattered.tolist()

                def loop():
                    for s, d in pairs:
                        dst[d].copy_(src[s], non_blocking=nb)
                per_block = gbps(moved, time_ms(loop, device, max(3, reps // 4), warmup=1))
            for path in paths:
                if path == "loop" and nblocks > 32768:
                    continue  # one driver call per block: minutes at this count, and the
                              # per-block copy_ column already shows that regime
                os.environ["KVCOMPACT_COPY_BLOCKS_PATH"] = path
                if path == "kernel":
                    os.environ["KVCOMPACT_COPY_BLOCKS_HOST_KERNEL_MAX_BYTES"] = str(1 << 30)
                for mapping_name, mapping in (("scattered", scattered), ("contiguous", contiguous)):
                    if mapping_name == "contiguous" and path not in ("auto",):
                        continue
                    ms = time_ms(lambda: ops.copy_blocks_(src, dst, mapping), device, reps)
                    rows.append(dict(
                        direction=f"{src_where}->{dst_where}", block_kib=kib, blocks=nblocks,
                        mapping=mapping_name, path=path, gbps=gbps(moved, ms),
                        ceiling_gbps=ceiling, one_copy_gbps=gbps(moved, ceiling_ms),
                        one_memcpy_gbps=gbps(moved, one_ms), ratio=gbps(moved, ms) / ceiling,
                        per_block_copy_gbps=per_block if mapping_name == "scattered" else None))
                os.environ.pop("KVCOMPACT_COPY_BLOCKS_HOST_KERNEL_MAX_BYTES", None)
            os.environ.pop("KVCOMPACT_COPY_BLOCKS_PATH", None)
        del src_flat, dst_flat
    return rows


def print_copy_table(rows: list[dict]) -> None:
    print("\n## Block copies (median GB/s; ceiling = the faster of ONE copy_ and ONE memcpy "
          "of the same bytes)\n")
    print("| direction | block | blocks | mapping | path | copy_blocks_ | ceiling | ratio "
          "| one copy_ | one memcpy | per-block copy_ |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pb = f"{r['per_block_copy_gbps']:.2f}" if r["per_block_copy_gbps"] else "-"
        print(f"| {r['direction']} | {r['block_kib']} KiB | {r['blocks']} | {r['mapping']} "
              f"| {r['path']} | {r['gbps']:.2f} | {r['ceiling_gbps']:.2f} | {r['ratio']:.2f} "
              f"| {r['one_copy_gbps']:.2f} | {r['one_memcpy_gbps']:.2f} | {pb} |")


# --- park / resume -----------------------------------------------------------------

def _filled_cache(device, layers: int, tokens: int, kv_dtype):
    import transformers

    from kvcompact import KVCompactCache

    cfg = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                                   head_dim=128, num_hidden_layers=layers, vocab_size=64,
                                   intermediate_size=64)
    cache = KVCompactCache(cfg, kv_dtype=kv_dtype, offload="idle")
    g = torch.Generator(device="cpu").manual_seed(0)
    chunk = 1024
    for start in range(0, tokens, chunk):
        q = min(chunk, tokens - start)
        for i in range(layers):
            k = torch.randn(1, 8, q, 128, generator=g).to(device, torch.bfloat16)
            cache.update(k, k, i)
    return cache


def bench_park(device: torch.device, layers: int, tokens: int, reps: int) -> list[dict]:
    rows = []
    for kv_dtype in (None, "int8"):
        cache = _filled_cache(device, layers, tokens, kv_dtype)
        cache.release_workspace()
        tensors = cache.storage_tensors()
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        # The ceiling: one copy of the same bytes to a pinned pool tensor and one back.
        pool = PinnedPool(nbytes + (1 << 20), allow_pageable_fallback=True)
        flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        flat_host = pool.tensor((nbytes,), torch.uint8)
        nb = device.type == "cuda"
        to_host_ms = time_ms(lambda: flat_host.copy_(flat_dev, non_blocking=nb), device, reps)
        to_dev_ms = time_ms(lambda: flat_dev.copy_(flat_host, non_blocking=nb), device, reps)
        del flat_dev, flat_host, pool, tensors

        def park():
            cache.park(non_blocking=False)

        def resume():
            cache.resume(non_blocking=False)

        park_samples, resume_samples = [], []
        for _ in range(reps + 1):  # the first cycle sizes the cache's own pool
            park_samples.append(time_ms(park, device, 1, warmup=0))
            resume_samples.append(time_ms(resume, device, 1, warmup=0))
        park_ms = statistics.median(park_samples[1:])
        resume_ms = statistics.median(resume_samples[1:])
        for op, ms, ceil_ms in (("park", park_ms, to_host_ms), ("resume", resume_ms, to_dev_ms)):
            rows.append(dict(kv_dtype=kv_dtype or "bf16", layers=layers, tokens=tokens, op=op, bytes=nbytes,
                             ms=ms, gbps=gbps(nbytes, ms), ceiling_gbps=gbps(nbytes, ceil_ms),
                             ratio=ceil_ms / ms))
        del cache
    return rows


def print_park_table(rows: list[dict]) -> None:
    print("\n## Park / resume of a whole cache (median; ceiling = ONE copy of the same bytes to/from "
          "a pinned pool tensor)\n")
    print("| storage | layers | tokens | op | bytes | ms | GB/s | ceiling GB/s | ratio |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kv_dtype']} | {r['layers']} | {r['tokens']} | {r['op']} | {r['bytes']:,} | {r['ms']:.2f} "
              f"| {r['gbps']:.2f} | {r['ceiling_gbps']:.2f} | {r['ratio']:.2f} |")


# --- decode ------------------------------------------------------------------------

LLAMA_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336)


class Layer:
    """One Llama-shaped decoder layer with random bf16 weights (no RoPE: timing only)."""

    def __init__(self, cfg: dict, device, dtype=torch.bfloat16):
        h, hd = cfg["hidden"], cfg["head_dim"]
        q, kv = cfg["heads"] * hd, cfg["kv_heads"] * hd

        def w(o, i):
            return torch.randn(o, i, device=device, dtype=dtype) * (i ** -0.5)
        self.qkv = w(q + 2 * kv, h)
        self.o = w(h, q)
        self.gate_up = w(2 * cfg["mlp"], h)
        self.down = w(h, cfg["mlp"])
        self.cfg = cfg

    def forward(self, x, k_buf, v_buf, pos: int):
        """x [B, 1, hidden]; k_buf/v_buf [B, kv_heads, T_max, head_dim]; writes token `pos`."""
        cfg = self.cfg
        B = x.shape[0]
        hd, nh, nkv = cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],))
        qkv = y @ self.qkv.t()
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        k_buf[:, :, pos] = k.view(B, nkv, hd)
        v_buf[:, :, pos] = v.view(B, nkv, hd)
        q = q.view(B, 1, nh, hd).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(
            q, k_buf[:, :, : pos + 1], v_buf[:, :, : pos + 1], enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(B, 1, nh * hd) @ self.o.t()
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],))
        g, u = (y @ self.gate_up.t()).chunk(2, dim=-1)
        return x + (torch.nn.functional.silu(g) * u) @ self.down.t()


def bench_decode(device: torch.device, layers: int, context: int, batch: int, steps: int,
                 cfg: dict = LLAMA_8B) -> list[dict]:
    torch.manual_seed(0)
    model = [Layer(cfg, device) for _ in range(layers)]
    t_max = context + steps + 8
    shape = (batch, cfg["kv_heads"], t_max, cfg["head_dim"])
    kv_bytes_layer = 2 * batch * cfg["kv_heads"] * t_max * cfg["head_dim"] * 2
    x0 = torch.randn(batch, 1, cfg["hidden"], device=device, dtype=torch.bfloat16)
    rows = []

    # (a) all KV on the device
    dev_kv = [[torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in "kv"]
              for _ in range(layers)]
    pos = [context]

    def step_device():
        x = x0
        for layer, (k, v) in zip(model, dev_kv):
            x = layer.forward(x, k, v, pos[0])
        return x
    ms_dev = time_ms(step_device, device, steps)
    rows.append(dict(variant="all on device", ms=ms_dev, device_kv_bytes=layers * kv_bytes_layer))

    # (b) kvcompact layer offload
    pool = PinnedPool(layers * kv_bytes_layer + (1 << 20))
    host = []
    for k, v in dev_kv:
        hk, hv = pool.tensor(shape, torch.bfloat16), pool.tensor(shape, torch.bfloat16)
        hk.copy_(k)
        hv.copy_(v)
        host.append([hk, hv])
    del dev_kv
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    valid = (slice(None), slice(None), slice(0, context + 1))
    pf = LayerPrefetcher(host, device, extent=lambda i: valid)
    token = (slice(None), slice(None), slice(context, context + 1))

    def step_offload():
        x = x0
        for i, layer in enumerate(model):
            k, v = pf.acquire(i)
            x = layer.forward(x, k, v, pos[0])
            pf.release(i, writeback=token)
        return x
    ms_off = time_ms(step_offload, device, steps)
    pf.synchronize()
    st = pf.stats_dict()
    rows.append(dict(variant="kvcompact layer offload", ms=ms_off,
                     device_kv_bytes=st["device_staging_bytes"],
                     compute_wait_ms_per_step=st["compute_wait_ms"] / max(1, steps + 2)))
    pf.close()
    del pf, host, pool

    # (c), (d) transformers' DynamicCache on device and offloaded
    rows += bench_decode_transformers(device, layers, context, batch, steps, cfg)
    for r in rows:
        r.update(layers=layers, context=context, batch=batch, ratio_to_device=r["ms"] / ms_dev)
    return rows


def bench_decode_transformers(device, layers, context, batch, steps, cfg) -> list[dict]:
    try:
        from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # pragma: no cover
        return [dict(variant="transformers", ms=float("nan"), skipped=f"import failed: {e}")]
    config = LlamaConfig(hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                         intermediate_size=cfg["mlp"], num_hidden_layers=layers, vocab_size=1024,
                         max_position_embeddings=context + steps + 64)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    has_offloading = "offloading" in inspect.signature(DynamicCache.__init__).parameters
    rows = []
    for variant, offloading in (("transformers DynamicCache", False),
                                ("transformers DynamicCache(offloading=True)", True)):
        if offloading and device.type != "cuda":
            rows.append(dict(variant=variant, ms=float("nan"), skipped="offloading needs CUDA"))
            continue
        if offloading and not has_offloading:
            rows.append(dict(variant=variant, ms=float("nan"),
                             skipped="DynamicCache has no `offloading` in this transformers"))
            continue
        kwargs = dict(config=config, offloading=True) if offloading else dict(config=config)
        ids = torch.randint(0, 1024, (batch, context), device=device)
        with torch.no_grad():
            cache = DynamicCache(**kwargs)
            model(input_ids=ids, **compat.cache_kwargs(cache), use_cache=True)
            nxt = torch.randint(0, 1024, (batch, 1), device=device)

            def step():
                # Decode one token, then drop it so every timed step sees `context` tokens.
                model(input_ids=nxt, **compat.cache_kwargs(cache), use_cache=True)
                cache.crop(-1)  # negative: remove 1 token (works on every supported version)
            ms = time_ms(step, device, steps)
        rows.append(dict(variant=variant, ms=ms))
        del cache
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_decode_table(rows: list[dict]) -> None:
    print("\n## Decode step (median ms; ceiling = the same model with all KV on the device)\n")
    print("| layers | context | batch | variant | ms/step | vs all-on-device | device KV bytes "
          "| compute wait ms/step |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['layers']} | {r['context']} | {r['batch']} | {r['variant']} "
                  f"| skipped: {r['skipped']} | | | |")
            continue
        dkv = r.get("device_kv_bytes")
        wait = r.get("compute_wait_ms_per_step")
        print(f"| {r['layers']} | {r['context']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} "
              f"| {r['ratio_to_device']:.2f}x | {dkv if dkv is not None else '-'} "
              f"| {f'{wait:.3f}' if wait is not None else '-'} |")


# --- cache decode: KVCompactCache(offload="layers") against the device and transformers -----

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
LLAMA_8B_CONFIG = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=1024, rope_theta=500000.0)


def _cache_model(kind: str, layers: int | None, context: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SMOLLM2_135M if kind == "smollm2" else LLAMA_8B_CONFIG)
    if layers:
        cfg["num_hidden_layers"] = layers
    elif kind == "llama8b":
        cfg["num_hidden_layers"] = 8
    config = LlamaConfig(**cfg, max_position_embeddings=max(8192, 2 * context))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, config


def _prefill(model, cache, ids) -> torch.Tensor:
    """Feed ``ids`` in chunks plus one warm-up decode token; returns the token the timed steps feed."""
    chunk = 2048
    with torch.no_grad():
        for a in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, a:a + chunk], **compat.cache_kwargs(cache), use_cache=True)
        nxt = ids[:, -1:]
        model(input_ids=nxt, **compat.cache_kwargs(cache), use_cache=True)
    return nxt


def _step_ms(model, cache, nxt, device) -> float:
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=nxt, **compat.cache_kwargs(cache), use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench_cache_decode(device, contexts: list[int], steps: int, kind: str, layers: int | None,
                       kv_dtype: str | None = None) -> list[dict]:
    """Rows per context and variant. On CPU the variants' caches are all filled first and their
    timed steps interleaved (one step of each in turn), so load from other processes hits every
    variant alike; on CUDA each variant runs alone (its peak memory is measured)."""
    from transformers import DynamicCache

    from kvcompact import KVCompactCache

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    has_offloading = "offloading" in inspect.signature(DynamicCache.__init__).parameters
    rows = []
    for ctx in contexts:
        model, config = _cache_model(kind, layers, ctx, device, dtype)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        ids = torch.randint(0, config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0)).to(device)
        variants = [
            ("KVCompactCache (on device)", lambda: KVCompactCache(config, kv_dtype=kv_dtype)),
            ("KVCompactCache(offload='layers')", lambda: KVCompactCache(config, kv_dtype=kv_dtype, offload="layers")),
            ("transformers DynamicCache", lambda: DynamicCache(config=config)),
            ("transformers DynamicCache(offloading=True)", lambda: DynamicCache(config=config, offloading=True)),
        ]
        runnable, ctx_rows = [], []
        for name, make in variants:
            row = dict(context=ctx, variant=name, model=kind, layers=config.num_hidden_layers,
                       kv_dtype=kv_dtype or "model dtype")
            ctx_rows.append(row)
            if "offloading" in name and (device.type != "cuda" or not has_offloading):
                row["skipped"] = ("transformers' offloading uses CUDA streams" if device.type != "cuda"
                                  else "DynamicCache has no `offloading` in this transformers")
                continue
            runnable.append((row, make))

        def measure(row, cache, nxt, times):
            row["ms"] = statistics.median(times)
            if isinstance(cache, KVCompactCache):
                st = cache.stats()
                row.update(cache_device_bytes=st.device_bytes, cache_workspace_bytes=st.workspace_bytes,
                           cache_host_bytes=st.host_bytes)
                off = cache.offload_stats()
                if off is not None:
                    row["compute_wait_ms_per_step"] = off["compute_wait_ms"] / (steps + 1)
                    row["staged_on_demand"] = off["staged_on_demand"]

        if device.type == "cuda":
            for row, make in runnable:
                cache = make()
                nxt = _prefill(model, cache, ids)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times = [_step_ms(model, cache, nxt, device) for _ in range(steps)]
                peak = torch.cuda.max_memory_allocated()
                row.update(decode_peak_bytes=peak, weights_bytes=weights, decode_peak_bytes_over_weights=peak - weights)
                measure(row, cache, nxt, times)
                del cache
                torch.cuda.empty_cache()
        else:
            live = [(row, make()) for row, make in runnable]
            nxts = [_prefill(model, cache, ids) for _, cache in live]
            times = [[] for _ in live]
            for _ in range(steps):
                for k, ((row, cache), nxt) in enumerate(zip(live, nxts)):
                    times[k].append(_step_ms(model, cache, nxt, device))
            for (row, cache), nxt, t in zip(live, nxts, times):
                measure(row, cache, nxt, t)
            del live
        base = ctx_rows[0]["ms"]
        for row in ctx_rows:
            if "ms" in row:
                row["vs_on_device"] = row["ms"] / base
        ours, hf_off = ctx_rows[1], ctx_rows[3]
        if "ms" in ours and "ms" in hf_off:
            ours["vs_transformers_offloaded"] = ours["ms"] / hf_off["ms"]
        rows += ctx_rows
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_cache_decode_table(rows: list[dict]) -> None:
    print("\n## Cache decode (median ms/token; ceiling = KVCompactCache on the device)\n")
    print("| context | variant | ms/token | vs on device | vs transformers offloaded | cache device bytes "
          "| workspace | decode peak over weights |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['context']} | {r['variant']} | skipped: {r['skipped']} | | | | | |")
            continue
        vt = r.get("vs_transformers_offloaded")
        dev, ws, peak = (r.get(k) for k in ("cache_device_bytes", "cache_workspace_bytes",
                                           "decode_peak_bytes_over_weights"))
        print(f"| {r['context']} | {r['variant']} | {r['ms']:.1f} | {r['vs_on_device']:.2f}x "
              f"| {f'{vt:.2f}x' if vt is not None else '-'} | {dev if dev is not None else '-'} "
              f"| {ws if ws is not None else '-'} | {peak if peak is not None else '-'} |")
    for r in rows:
        if r.get("variant") == "KVCompactCache(offload='layers')" and "decode_peak_bytes" in r:
            vt = r.get("vs_transformers_offloaded")
            print(f"\noffload='layers' at {r['context']}: torch.cuda.max_memory_allocated during decode "
                  f"{r['decode_peak_bytes']} B = weights {r['weights_bytes']} + {r['decode_peak_bytes_over_weights']} B; "
                  f"cache accounting: slots {r['cache_device_bytes']} + workspace {r['cache_workspace_bytes']} B; "
                  f"{r['vs_on_device']:.2f}x on-device ms/token (target <= 1.3x at 16k)"
                  + (f", {vt:.2f}x transformers' offloaded cache (target < 1)" if vt is not None else ""))


# --- main --------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "out", "offload.json"))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--contexts", default=None, help="comma-separated decode contexts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU rows; on an oversubscribed VM use 1)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--park-layers", type=int, default=None, help="layers of the parked cache")
    p.add_argument("--park-tokens", type=int, default=None, help="tokens of the parked cache")
    p.add_argument("--decode-smoke", action="store_true",
                   help="run the decode section on any device with a tiny config (checks the code)")
    p.add_argument("--cache-contexts", default=None,
                   help="comma-separated contexts of the cache decode section (default 1024,4096,16384; "
                        "--quick: 1024,4096)")
    p.add_argument("--cache-model", default=None, choices=["smollm2", "llama8b"],
                   help="config of the cache decode model (default: smollm2 on CPU, llama8b on CUDA)")
    p.add_argument("--cache-steps", type=int, default=None, help="timed decode steps per cache decode row")
    p.add_argument("--cache-kv-dtype", default=None, help="kv_dtype of the KVCompactCache rows (default: model dtype)")
    p.add_argument("--skip-cache-decode", action="store_true")
    p.add_argument("--only-cache-decode", action="store_true", help="run only the cache decode section")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not kvcompact.build_info()["cuda_kernels"]:
        print("this kvcompact build has no CUDA kernels", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    if device.type == "cuda":
        total_mib, blocks, reps = (256, [4, 64, 1024], 10) if quick else \
            (512, [4, 16, 64, 256, 1024, 4096], 20)
    else:
        total_mib, blocks, reps = (16, [4, 64, 1024], 5) if quick else \
            (64, [4, 16, 64, 256, 1024], 9)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{os.cpu_count()}-core {platform.machine()} CPU")
    print(f"# bench_offload on {machine}, torch {torch.__version__}, "
          f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
          f"{torch.get_num_threads()} torch threads")

    copy_rows, park_rows = [], []
    if not args.only_cache_decode:
        copy_rows = bench_copies(device, total_mib, blocks, reps, per_block_limit=20000)
        print_copy_table(copy_rows)

        park_layers = args.park_layers or (4 if quick or device.type == "cpu" else 32)
        park_tokens = args.park_tokens or (2048 if quick else (4096 if device.type == "cpu" else 16384))
        park_rows = bench_park(device, park_layers, park_tokens, reps)
        print_park_table(park_rows)

    cache_rows = []
    if not args.skip_cache_decode:
        if args.cache_contexts:
            cctx = [int(c) for c in args.cache_contexts.split(",")]
        else:
            cctx = [1024, 4096] if quick else [1024, 4096, 16384]
        kind = args.cache_model or ("llama8b" if device.type == "cuda" else "smollm2")
        csteps = args.cache_steps or (8 if quick else 16)
        cache_rows = bench_cache_decode(device, cctx, csteps, kind, args.layers if kind == "llama8b" else None,
                                        args.cache_kv_dtype)
        print_cache_decode_table(cache_rows)

    decode_rows = []
    if not args.only_cache_decode and not args.skip_decode and (device.type == "cuda" or args.decode_smoke):
        if args.decode_smoke:
            cfg = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=512)
            layers, contexts, steps = 3, [64], 3
        else:
            cfg = LLAMA_8B
            layers = args.layers or (4 if quick else 8)
            contexts = ([1024, 8192] if quick else [1024, 4096, 16384, 32768])
            steps = 10 if quick else 30
        if args.contexts:
            contexts = [int(c) for c in args.contexts.split(",")]
        for ctx in contexts:
            decode_rows += bench_decode(device, layers, ctx, args.batch, steps, cfg)
        print_decode_table(decode_rows)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(machine=machine, torch=torch.__version__, threads=torch.get_num_threads(),
                       device=str(device), quick=quick,
                       build=kvcompact.build_info(), copies=copy_rows, park=park_rows, decode=decode_rows,
                       cache_decode=cache_rows), f,
                  indent=1)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
