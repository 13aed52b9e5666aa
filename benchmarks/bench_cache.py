"""Decode speed, KV bytes and perplexity of KVCompactCache next to transformers' own caches.

Every cache runs on the embedded SmolLM2-135M-Instruct in one process, side by side:

* decode: for each context length, the context is prefilled ONCE with ``DynamicCache`` and the
  same per-layer K/V are handed to every other cache through ``cache.update`` (exactly what a
  prefill forward would do), then the caches decode in round-robin -- step i of every cache runs
  before step i+1 of any -- so a noisy shared CPU hits all of them alike. Median ms/token.
* ``+attn`` rows: the same KVCompactCache storage with decode attention computed from it by
  ``kvcompact.ops.decode_attention`` (``kvcompact.attach(model, cache, attention=True)``): 8-bit
  codes are read in place, no dequantized workspace.
* bytes: the cache's tensors after decoding (capacity included); for KVCompactCache also the
  dequantization workspace (scratch, one layer).
* perplexity: teacher-forced, token by token, over ``--held-out`` tokens of
  /usr/share/common-licenses/GPL-3 after a ``--ppl-context``-token prefill; ratio to DynamicCache.

The reference row for speed and bytes is DynamicCache (ratio 1.00); it is the ceiling a
lossless cache is measured against.

Usage::

    python benchmarks/bench_cache.py --quick            # contexts 1k and 4k
    python benchmarks/bench_cache.py --out results.json # 1k, 4k, 16k
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from kvcompact.cache import KVCompactCache, compat

GPL = Path("/usr/share/common-licenses/GPL-3")


# -- the caches under test -----------------------------------------------------------------------

ROUTED = " +attn"  # suffix of the rows whose forwards run inside kvcompact.attach(attention=True)


def forward_scope(model, name: str, cache):
    """The context a forward of cache ``name`` runs in: attach(attention=True) for routed rows."""
    if name.endswith(ROUTED):
        from kvcompact import attach

        return attach(model, cache, attention=True)
    return contextlib.nullcontext()



def cache_factories(config) -> dict:
    """name -> zero-argument constructor, for every cache this transformers install can build."""
    made = {
        "DynamicCache": lambda: DynamicCache(config=config),
        "KVCompact(None)": lambda: KVCompactCache(config),
        "KVCompact(fp8_e4m3)": lambda: KVCompactCache(config, kv_dtype="fp8_e4m3"),
        "KVCompact(int8)": lambda: KVCompactCache(config, kv_dtype="int8"),
        # The same storage, with decode attention read from it by kvcompact.ops.decode_attention
        # (kvcompact.attach(..., attention=True)) instead of a dequantized workspace.
        "KVCompact(None)" + ROUTED: lambda: KVCompactCache(config),
        "KVCompact(fp8_e4m3)" + ROUTED: lambda: KVCompactCache(config, kv_dtype="fp8_e4m3"),
        "KVCompact(int8)" + ROUTED: lambda: KVCompactCache(config, kv_dtype="int8"),
    }
    try:
        from transformers import QuantizedCache

        QuantizedCache(backend="fp8", config=config)
        made["HF QuantizedCache(fp8)"] = lambda: QuantizedCache(backend="fp8", config=config)
    except Exception as exc:  # noqa: BLE001 -- older transformers: no fp8 backend
        print(f"# HF QuantizedCache(fp8) unavailable: {exc}", file=sys.stderr)
    try:
        from transformers import QuantizedCache

        QuantizedCache(backend="quanto", config=config, nbits=4)
        made["HF QuantizedCache(quanto int4)"] = lambda: QuantizedCache(backend="quanto", config=config, nbits=4)
    except Exception as exc:  # noqa: BLE001 -- optimum-quanto missing
        print(f"# HF QuantizedCache(quanto int4) unavailable: {exc}", file=sys.stderr)
    return made


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` (tensor subclasses through their inner tensors)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if not k.startswith("__"))
    return 0


def kv_bytes(cache) -> tuple[int, int]:
    """(stored bytes, scratch workspace bytes) held by ``cache``."""
    if isinstance(cache, KVCompactCache):
        s = cache.stats()
        return s.device_bytes, s.workspace_bytes
    return sum(tensor_bytes(layer) for layer in cache.layers), 0


# -- measurements ------------------------------------------------------------------------------


def text_ids(tokenizer, n: int) -> torch.Tensor:
    """``[1, n]`` token ids of GPL-3 (repeated if ``n`` exceeds its ~7.7k tokens)."""
    ids = tokenizer(GPL.read_text(), return_tensors="pt").input_ids
    reps = -(-n // ids.shape[1])
    return ids.repeat(1, reps)[:, :n]


def decode_speed(model, tokenizer, context: int, steps: int, factories: dict) -> dict:
    ids = text_ids(tokenizer, context + steps)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :context], **compat.cache_kwargs(dense), use_cache=True)
    caches = {}
    for name, make in factories.items():
        cache = make()
        for i, layer in enumerate(dense.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), i)
        caches[name] = cache
    del dense
    times = {name: [] for name in caches}
    with torch.no_grad():
        for step in range(steps):
            token = ids[:, context + step : context + step + 1]
            for name, cache in caches.items():
                t0 = time.perf_counter()
                with forward_scope(model, name, cache):
                    model(input_ids=token, **compat.cache_kwargs(cache), use_cache=True)
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, cache in caches.items():
        stored, scratch = kv_bytes(cache)
        warm = times[name][2:] or times[name]  # the first steps pay allocation and warm-up
        out[name] = {
            "ms_per_token_median": statistics.median(warm),
            "ms_per_token_all": times[name],
            "kv_bytes": stored,
            "workspace_bytes": scratch,
            "tokens": cache.get_seq_length(),
        }
    return out


def perplexity(model, tokenizer, factories: dict, context: int, held_out: int) -> dict:
    ids = text_ids(tokenizer, 2000 + context + held_out)[:, 2000:]
    ctx, tgt = ids[:, :context], ids[:, context:]
    out = {}
    for name, make in factories.items():
        cache = make()
        nll = 0.0
        with torch.no_grad(), forward_scope(model, name, cache):
            logits = model(input_ids=ctx, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1].float()
            for i in range(held_out):
                nll += torch.nn.functional.cross_entropy(logits, tgt[:, i]).item()
                if i + 1 < held_out:
                    step = model(input_ids=tgt[:, i : i + 1], **compat.cache_kwargs(cache), use_cache=True)
                    logits = step.logits[:, -1].float()
        out[name] = {"ppl": math.exp(nll / held_out)}
        print(f"#   ppl {name}: {out[name]['ppl']:.4f}", file=sys.stderr)
    base = out["DynamicCache"]["ppl"]
    for row in out.values():
        row["ratio"] = row["ppl"] / base
    return out


# -- report ------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = []
    for context, rows in results["decode"].items():
        base = rows["DynamicCache"]
        lines.append(f"\ncontext {context} tokens (median of {len(base['ms_per_token_all']) - 2} decode steps)")
        lines.append(f"{'cache':32} {'ms/token':>9} {'x Dynamic':>10} {'KV MiB':>9} {'x Dynamic':>10} {'+scratch MiB':>13}")
        for name, r in rows.items():
            lines.append(
                f"{name:32} {r['ms_per_token_median']:9.1f} {r['ms_per_token_median'] / base['ms_per_token_median']:10.2f} "
                f"{r['kv_bytes'] / 2**20:9.1f} {r['kv_bytes'] / base['kv_bytes']:10.3f} {r['workspace_bytes'] / 2**20:13.1f}"
            )
    if results.get("perplexity"):
        p = results["perplexity_setup"]
        lines.append(f"\nperplexity: {p['held_out']} GPL-3 tokens after {p['context']}, teacher-forced token by token")
        lines.append(f"{'cache':32} {'ppl':>9} {'x Dynamic':>10}")
        for name, r in results["perplexity"].items():
            lines.append(f"{name:32} {r['ppl']:9.4f} {r['ratio']:10.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 1k and 4k only")
    parser.add_argument("--contexts", type=int, nargs="*", help="override the context lengths")
    parser.add_argument("--steps", type=int, default=18, help="decode steps per cache and context")
    parser.add_argument("--ppl-context", type=int, default=1024)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--no-ppl", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_cache.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvcompact.models import load_default

    model, tokenizer = load_default()
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    factories = cache_factories(model.config)
    results = {
        "env": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "model": "SmolLM2-135M-Instruct fp32 (CPU)",
        },
        "decode": {},
    }
    for context in contexts:
        print(f"# decode at {context} tokens ...", file=sys.stderr)
        results["decode"][str(context)] = decode_speed(model, tokenizer, context, args.steps, factories)
    if not args.no_ppl:
        print("# perplexity ...", file=sys.stderr)
        results["perplexity_setup"] = {"context": args.ppl_context, "held_out": args.held_out}
        results["perplexity"] = perplexity(model, tokenizer, factories, args.ppl_context, args.held_out)
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
