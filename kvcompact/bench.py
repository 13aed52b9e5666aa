"""``kvcompact bench``: the kernels and the cache next to their peers, measured side by side.

Everything runs in one process and prints ONE table; every row names what it is compared with
(a peer doing the same job, or a ceiling such as a ``copy_`` of the same bytes) and the ratio:

* kernels, on a Llama-3.1-8B-shaped layer (B = 1, H_kv = 8, D = 128, bf16):
  ``ops.quantize`` / ``ops.dequantize`` (fp8_e4m3 and int8, groups of 32) against torch eager
  doing the same contract (:mod:`kvcompact.reference`) and a ``copy_`` of the bf16 tensor;
  ``ops.compact_`` keeping 50% of the tokens of every head against kvpress-style ``gather`` into
  new tensors and a ``copy_`` of the moved bytes; ``ops.rope_shift_`` against
  :func:`kvcompact.reference.rope_shift` and a ``copy_`` of the keys.
* cache, on the embedded model: decode ms/token at each context for ``DynamicCache``,
  ``KVCompactCache`` (lossless, fp8_e4m3, int8), transformers' ``QuantizedCache(backend="fp8")``
  and, on a GPU, transformers' offloaded ``DynamicCache``; KV bytes beside each. The context is
  prefilled once and the same K/V are handed to every cache through ``cache.update`` (what a
  prefill forward does), then the caches decode round-robin.

Timing: every candidate of a row group runs round-robin (step i of each before step i + 1 of
any), so load from other processes hits them alike; the table shows medians of an odd number of
repeats. With ``--threads 1`` on CPU the clock is the thread's CPU time (all work then runs on the
calling thread), which other processes on a shared machine cannot inflate.

Ratios: for times, ``compared time / this time`` (above 1: this row is faster); for KV bytes,
``this / DynamicCache`` (below 1: smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from kvcompact import ops, reference

__all__ = ["BenchConfig", "Row", "config_for", "median_times", "run", "run_bench"]

H, D = 8, 128
KERNEL_DTYPE = torch.bfloat16
GROUP = 32
KERNEL_FORMATS = ("fp8_e4m3", "int8")
MiB = float(1 << 20)


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    kernel_tokens: int  # T of the [1, H, T, D] kernel tensors
    contexts: tuple[int, ...]  # decode benchmark context lengths
    repeats: int  # kernel repeats (odd: the median is a measured value)
    decode_steps: int  # timed decode steps per cache and context (odd)
    warmup_steps: int = 2  # decode steps before timing: allocation, first-call costs
    tiny_model: bool = False  # a random 2-layer Llama instead of the embedded model (tests)


def config_for(quick: bool, smoke: bool = False) -> BenchConfig:
    """The preset of ``--quick`` / the full run; ``smoke`` shrinks everything for the test suite."""
    if smoke:
        return BenchConfig(kernel_tokens=256, contexts=(64,), repeats=3, decode_steps=3,
                           warmup_steps=1, tiny_model=True)
    if quick:
        return BenchConfig(kernel_tokens=4096, contexts=(1024,), repeats=5, decode_steps=9)
    return BenchConfig(kernel_tokens=16384, contexts=(1024, 4096), repeats=9, decode_steps=15)


@dataclass
class Row:
    """One line of the summary table (and one object of the JSON ``rows``)."""

    section: str  # "kernel" or "decode"
    case: str
    value: float | None  # None: not measured (see ``note``)
    unit: str
    vs: str  # what the row is compared with
    vs_value: float | None = None
    ratio: float | None = None  # vs_value / value for times
    kv_bytes: int | None = None
    kv_ratio: float | None = None  # kv_bytes / the reference's kv_bytes
    note: str = ""
    extra: dict = field(default_factory=dict)


# -- timing ----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> Callable[[], float]:
    """Wall time, except single-threaded CPU runs, which use the calling thread's CPU time:
    at::parallel_for then runs inline, and CPU time is immune to other processes."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def median_times(fns: dict[str, Callable[[], object]], device: str, repeats: int,
                 warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each callable, measured round-robin."""
    now = clock(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            fn()
            _sync(device)
            times[name].append((now() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine_description(device: str) -> str:
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {versions}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {versions}, {torch.get_num_threads()} threads{gpu}"


def _speed_row(section, case, times, ours, vs_key, vs_label, **kw) -> Row:
    return Row(section, case, times[ours], "ms", vs_label, times[vs_key],
               times[vs_key] / times[ours], **kw)


# -- kernels ---------------------------------------------------------------------------------------


def bench_kernels(device: str, cfg: BenchConfig, log) -> list[Row]:
    T = cfg.kernel_tokens
    shape = (1, H, T, D)
    label = "x".join(map(str, shape))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, KERNEL_DTYPE)
    rows: list[Row] = []

    # Quantize reads the bf16 tensor and writes ~half its bytes; dequantize the reverse.
    # Their ceiling is the same: a copy_ of the bf16 tensor (reads and writes more bytes).
    x_copy = torch.empty_like(x)
    for fmt in KERNEL_FORMATS:
        log(f"# kernels: quantize/dequantize {fmt} g{GROUP} on {label} ...")
        codes, scales = ops.quantize(x, fmt, GROUP)
        t = median_times({
            "quantize": lambda: ops.quantize(x, fmt, GROUP),
            "quantize_eager": lambda: reference.quantize(x, fmt, GROUP),
            "dequantize": lambda: ops.dequantize(codes, scales, KERNEL_DTYPE),
            "dequantize_eager": lambda: reference.dequantize(codes, scales, KERNEL_DTYPE),
            "copy": lambda: x_copy.copy_(x),
        }, device, cfg.repeats)
        for op in ("quantize", "dequantize"):
            case = f"{op} {fmt} g{GROUP} [{label}]"
            rows.append(_speed_row("kernel", case, t, op, f"{op}_eager",
                                   f"torch eager (reference.{op})"))
            rows.append(_speed_row("kernel", case, t, op, "copy", "copy_ of the bf16 tensor (ceiling)"))

    # compact_: every head keeps its own sorted random 50% (SnapKV/AdaKV-like selection).
    log(f"# kernels: compact_ 50% per head on K and V [{label}] ...")
    k = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, KERNEL_DTYPE)
    v = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, KERNEL_DTYPE)
    K = T // 2
    keep = torch.stack([torch.sort(torch.randperm(T, generator=gen)[:K]).values for _ in range(H)])
    keep = keep.reshape(1, H, K).to(device)
    moved = int((keep != torch.arange(K, device=device)).sum())  # tokens that change slot
    moved_bytes = moved * D * k.element_size() * 2  # K and V
    src = torch.empty(max(1, moved_bytes), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    idx = keep.unsqueeze(-1).expand(1, H, K, D)
    # Re-running compact_ on compacted data repeats the same moves, so no reset is needed.
    t = median_times({
        "compact": lambda: ops.compact_([k, v], keep),
        "gather": lambda: (k.gather(2, idx), v.gather(2, idx)),
        "copy": lambda: dst.copy_(src),
    }, device, cfg.repeats)
    gather_bytes = 2 * K * H * D * k.element_size()
    case = f"compact_ keep 50%/head K+V [{label}]"
    rows.append(_speed_row("kernel", case, t, "compact", "gather", "gather into new tensors (kvpress)",
                           note=f"gather allocates {gather_bytes / MiB:.1f} MiB, compact_ 0"))
    rows.append(_speed_row("kernel", case, t, "compact", "copy", "copy_ of the moved bytes (ceiling)",
                           note=f"{moved_bytes / MiB:.1f} MiB moved"))
    del k, v, src, dst

    log(f"# kernels: rope_shift_ [{label}] ...")
    keys = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, KERNEL_DTYPE)
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))).to(device)
    delta = torch.full((T,), -(T // 4), dtype=torch.int64, device=device)  # a span of T/4 evicted
    keys_copy = torch.empty_like(keys)
    t = median_times({
        "rope": lambda: ops.rope_shift_(keys, delta, inv_freq, "neox"),
        "eager": lambda: reference.rope_shift(keys, delta, inv_freq, "neox"),
        "copy": lambda: keys_copy.copy_(keys),
    }, device, cfg.repeats)
    case = f"rope_shift_ neox [{label}]"
    rows.append(_speed_row("kernel", case, t, "rope", "eager", "torch eager (reference.rope_shift)"))
    rows.append(_speed_row("kernel", case, t, "rope", "copy", "copy_ of the keys (ceiling)"))
    return rows


# -- cache -----------------------------------------------------------------------------------------


def tensor_bytes(obj, device_type: str | None = None, seen: set | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` (only those on ``device_type`` if given)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if device_type is not None and obj.device.type != device_type:
            return 0
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, device_type, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, device_type, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(o, device_type, seen) for o in vars(obj).values())
    return 0


def cache_factories(config, device: str) -> tuple[dict, dict]:
    """(name -> constructor, name -> reason it is n/a) for every cache of the comparison."""
    from transformers import DynamicCache

    from kvcompact.cache import KVCompactCache
    from kvcompact.cache.cache import default_group_size

    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    made = {
        "DynamicCache": lambda: DynamicCache(config=config),
        "KVCompact(None)": lambda: KVCompactCache(config),
    }
    for fmt in ("fp8_e4m3", "int8"):
        # The default group size differs per format; the row says which one ran.
        group = default_group_size(fmt, head_dim) or head_dim
        made[f"KVCompact({fmt} g{group})"] = lambda fmt=fmt: KVCompactCache(config, kv_dtype=fmt)
    missing = {}
    try:
        from transformers import QuantizedCache

        QuantizedCache(backend="fp8", config=config)
        made["HF QuantizedCache(fp8)"] = lambda: QuantizedCache(backend="fp8", config=config)
    except Exception as exc:  # noqa: BLE001 -- older transformers: no class, or no fp8 backend
        missing["HF QuantizedCache(fp8)"] = _reason(exc)
    name = "HF offloaded DynamicCache"
    if device != "cuda":
        missing[name] = "needs a CUDA device (it offloads GPU layers to the CPU)"
    else:
        import inspect

        import transformers

        if "offloading" in inspect.signature(DynamicCache.__init__).parameters:
            made[name] = lambda: DynamicCache(config=config, offloading=True)
        elif hasattr(transformers, "OffloadedCache"):  # transformers 4.x
            made[name] = lambda: transformers.OffloadedCache()
        else:
            missing[name] = f"transformers {transformers.__version__} has no offloaded cache"
    return made, missing


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:120]


def _kv_bytes(cache, device: str) -> tuple[int, int]:
    """(stored bytes on the run's device, scratch workspace bytes)."""
    from kvcompact.cache import KVCompactCache

    if isinstance(cache, KVCompactCache):
        s = cache.stats()
        return s.device_bytes, s.workspace_bytes
    return tensor_bytes(getattr(cache, "layers", cache), device), 0


NOTES = {
    # What a reader needs to compare the bytes fairly.
    "KVCompact(None)": "capacity grows in chunks (counted)",
    "HF QuantizedCache(fp8)": "one per-tensor scale, frozen at prefill",
}


def bench_decode(model, device: str, context: int, cfg: BenchConfig, log) -> list[Row]:
    from transformers import DynamicCache

    from kvcompact.cache import compat

    factories, missing = cache_factories(model.config, device)
    steps = cfg.warmup_steps + cfg.decode_steps
    gen = torch.Generator().manual_seed(context)
    # Decode cost does not depend on which tokens they are: seeded random ids keep the
    # benchmark free of data files and of the tokenizer.
    ids = torch.randint(0, model.config.vocab_size, (1, context + steps), generator=gen).to(device)

    log(f"# decode @{context}: prefill ...")
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :context], **compat.cache_kwargs(dense), use_cache=True)
    caches = {}
    for name, make in factories.items():
        try:
            cache = make()
            for i, layer in enumerate(dense.layers):
                cache.update(layer.keys.clone(), layer.values.clone(), i)
            caches[name] = cache
        except Exception as exc:  # noqa: BLE001 -- a peer that cannot take this model is reported
            missing[name] = _reason(exc)
    del dense

    log(f"# decode @{context}: {len(caches)} caches x {steps} steps, round-robin ...")
    now = clock(device)
    times: dict[str, list[float]] = {name: [] for name in caches}
    with torch.no_grad():
        for step in range(steps):
            token = ids[:, context + step: context + step + 1]
            for name in list(caches):
                try:
                    _sync(device)
                    t0 = now()
                    model(input_ids=token, **compat.cache_kwargs(caches[name]), use_cache=True)
                    _sync(device)
                    times[name].append((now() - t0) * 1e3)
                except Exception as exc:  # noqa: BLE001
                    missing[name] = _reason(exc)
                    del caches[name], times[name]

    ms = {name: statistics.median(ts[cfg.warmup_steps:]) for name, ts in times.items()}
    kv = {name: _kv_bytes(cache, device) for name, cache in caches.items()}
    base = "DynamicCache"
    rows = []
    order = list(factories) + [n for n in missing if n not in factories]
    for name in order:
        case = f"decode @{context} {name}"
        if name in missing:
            rows.append(Row("decode", case, None, "ms/token", base, note=f"n/a: {missing[name]}",
                            extra={"cache": name}))
            continue
        stored, scratch = kv[name]
        note = f"+{scratch / MiB:.2f} MiB dequant scratch" if scratch else NOTES.get(name, "")
        extra = {"cache": name, "ms_per_token_all": times[name], "workspace_bytes": scratch,
                 "tokens": caches[name].get_seq_length()}
        vs = base if name != base else f"{base} (reference)"
        rows.append(Row("decode", case, ms[name], "ms/token", vs, ms[base], ms[base] / ms[name],
                        stored, stored / kv[base][0], note, extra))
        peer = "HF QuantizedCache(fp8)"
        if name.startswith("KVCompact(fp8_e4m3") and peer in ms:
            rows.append(Row("decode", case, ms[name], "ms/token", peer, ms[peer], ms[peer] / ms[name],
                            stored, stored / kv[peer][0], "KV ratio vs the peer's bytes",
                            {"cache": name}))
    return rows


def _tiny_model(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval().to(device)


def _load_model(device: str, cfg: BenchConfig):
    if cfg.tiny_model:
        return _tiny_model(device), "random 2-layer Llama (smoke test)"
    from kvcompact.models import load_default

    # fp32 on CPU (bf16 matmuls are slow there); bf16 on a GPU, as it would be served.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = load_default(device=device, dtype=dtype)
    return model, f"SmolLM2-135M-Instruct {str(dtype).removeprefix('torch.')} (embedded)"


# -- report ----------------------------------------------------------------------------------------


def _fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} {unit}" if v < 10 else f"{v:.1f} {unit}"


def format_table(rows: list[Row]) -> str:
    headers = ["case", "this", "compared with", "its value", "ratio", "KV bytes", "KV ratio", "note"]
    lines, prev = [], None
    for r in rows:
        kv = f"{r.kv_bytes / MiB:.2f} MiB" if r.kv_bytes is not None else ""
        lines.append([
            r.case if r.case != prev else "",  # a case's second comparison: same subject
            _fmt_value(r.value, r.unit) if r.value is not None else "n/a",
            r.vs,
            _fmt_value(r.vs_value, r.unit) if r.vs_value is not None else "",
            f"{r.ratio:.2f}x" if r.ratio is not None else "",
            kv,
            f"{r.kv_ratio:.3f}" if r.kv_ratio is not None else "",
            r.note,
        ])
        prev = r.case
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    right = {1, 3, 4, 5, 6}

    def render(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [render(headers), render(["-" * w for w in widths])]
    section = rows[0].section if rows else None
    for r, line in zip(rows, lines):
        if r.section != section:
            out.append("")
            section = r.section
        out.append(render(line))
    return "\n".join(out)


def run_bench(*, quick: bool, device: str = "auto", threads: int | None = None,
              out: str = "kvcompact-bench.json", smoke: bool = False, stream=None, log=None) -> dict:
    """Run the benchmark, print the summary table to ``stream`` and write the JSON to ``out``.

    Returns the JSON document. Raises ``ValueError`` for an unusable device or thread count and
    ``OSError`` when ``out`` cannot be written (checked before anything runs).
    """
    stream = stream or sys.stdout
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    import kvcompact

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not kvcompact.build_info()["cuda_kernels"]:
        raise ValueError("--device cuda: this build of kvcompact has no CUDA kernels; rebuild it "
                         "with CUDA (KVCOMPACT_DEVICE=cuda) or pass --device cpu")
    if threads is not None:
        if threads <= 0:
            raise ValueError(f"--threads must be a positive integer; got {threads}")
        torch.set_num_threads(threads)
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise IsADirectoryError(f"--out {out} is a directory; give a file name")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out: cannot write to {parent}")

    cfg = config_for(quick, smoke)
    start = time.perf_counter()
    machine = machine_description(device)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "--smoke" if smoke else ("--quick" if quick else "full")
    print(f"kvcompact bench ({mode}) on {device}: {machine}; {date}", file=stream, flush=True)

    rows = bench_kernels(device, cfg, log)
    log("# loading the model ...")
    model, model_name = _load_model(device, cfg)
    for context in cfg.contexts:
        rows += bench_decode(model, device, context, cfg, log)
    elapsed = time.perf_counter() - start

    print(f"medians of {cfg.repeats} kernel repeats and {cfg.decode_steps} decode steps "
          f"(after {cfg.warmup_steps} warm-up); clock: {clock(device).__name__}; "
          f"model: {model_name}", file=stream)
    print("ratio: compared time / this time (>1: this is faster); "
          "KV ratio: this / DynamicCache bytes (<1: smaller)\n", file=stream)
    print(format_table(rows), file=stream)

    import transformers

    doc = {
        "benchmark": "kvcompact bench",
        "mode": mode,
        "device": device,
        "machine": machine,
        "date": date,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvcompact_build": kvcompact.build_info(),
        "threads": torch.get_num_threads(),
        "clock": clock(device).__name__,
        "model": model_name,
        "config": asdict(cfg),
        "ratio_meaning": {"ratio": "vs_value / value (times: >1 means this row is faster)",
                          "kv_ratio": "kv_bytes / the compared cache's bytes"},
        "elapsed_s": elapsed,
        "rows": [asdict(r) for r in rows],
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    print(f"\nwrote {out} ({elapsed:.0f} s)", file=stream)
    return doc


def run(args: argparse.Namespace) -> int:
    """``kvcompact bench`` entry point (see :mod:`kvcompact.cli`)."""
    run_bench(quick=args.quick, device=args.device, threads=args.threads, out=args.out,
              smoke=getattr(args, "smoke", False))
    return 0

