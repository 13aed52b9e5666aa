"""The ``kvcompact`` command line: ``kvcompact <command> [options]``.

Commands live in a small registry: adding one is one decorated function::

    def _demo_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=20)

    @command("demo", help="run the scripted agent session", arguments=_demo_arguments)
    def demo(args: argparse.Namespace) -> int:
        ...
        return 0

A command returns its exit status. A ``ValueError`` or ``OSError`` it raises is
printed as ``kvcompact <command>: error: <message>`` with exit status 2, like an
argparse usage error; the user never sees a traceback for a bad input. An
``ImportError`` (an optional part that is not installed, e.g. ``gguf`` for the
embedded model) is printed the same way with exit status 1; its message names
the extra that installs it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from kvcompact import memory

__all__ = ["COMMANDS", "Command", "build_parser", "command", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments=None, description: str | None = None):
    """Register ``fn(args) -> int`` as the subcommand ``name``; ``arguments(parser)``
    adds its options."""

    def register(fn: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = Command(name, fn, help, arguments, description or fn.__doc__)
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    from kvcompact import __version__

    parser = argparse.ArgumentParser(
        prog="kvcompact",
        description="Keep long-running LLM agents inside accelerator memory.",
    )
    parser.add_argument("--version", action="version", version=f"kvcompact {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_command=cmd, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kvcompact`` and ``python -m kvcompact``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 with argparse's message
    try:
        return int(args._command.run(args) or 0)
    except BrokenPipeError:  # `kvcompact estimate ... | head`: the reader left, not an error
        # Point stdout at devnull so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        args._parser.print_usage(sys.stderr)
        print(f"kvcompact {args._command.name}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional part is not installed; its message names the extra
        print(f"kvcompact {args._command.name}: error: {e}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------
# estimate
# --------------------------------------------------------------------------------------

KV_DTYPE_CHOICES = ("bf16", "fp16", "fp32") + memory.QUANTIZED_FORMATS
GROUP_CHOICES = (None, 64, 32)  # per token-head scale, then groups of 64 and 32


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    if text.strip() == "0":
        return 0.0
    return _positive_float(text)


def _param_count(text: str) -> int:
    """"70.6B", "135M", "8030261248" -> a parameter count."""
    t = text.strip().replace(",", "").replace("_", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(t[-1:].lower())
    try:
        value = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a parameter count like 8030261248, 70.6B or 135M, got {text!r}"
        ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive parameter count, got {text!r}")
    return int(round(value))


def _estimate_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="PATH",
                     help="a model's config.json (or the directory holding it)")
    src.add_argument("--model", metavar="NAME",
                     help="a built-in config, case-insensitive: " + ", ".join(memory.builtin_names()))
    p.add_argument("--context", type=_positive_int, metavar="N",
                   help="context length in tokens (default: the config's "
                        "max_position_embeddings, else 131072)")
    p.add_argument("--kv-dtype", choices=KV_DTYPE_CHOICES,
                   help="show only this storage (beside the dense baseline); default: all")
    p.add_argument("--group-size", type=_positive_int, metavar="G",
                   help="with a quantized --kv-dtype: only this group size (elements per scale)")
    p.add_argument("--gpu-mem", type=_positive_float, metavar="GiB",
                   help="device memory in GiB: adds how many tokens fit beside the weights")
    p.add_argument("--weights-dtype", choices=memory.WEIGHTS_DTYPES, default="bf16",
                   help="how the weights are stored (default: bf16)")
    p.add_argument("--num-params", type=_param_count, metavar="N",
                   help="parameter count (e.g. 70.6B); default: estimated from the config")
    p.add_argument("--reserve", type=_non_negative_float, metavar="GiB",
                   help="memory kept free for activations and workspaces (default: 10%% of --gpu-mem)")
    p.add_argument("--tp", type=_positive_int, default=1, metavar="N",
                   help="tensor-parallel ranks: report KV bytes (and, with --gpu-mem, weights) per device")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _storage_choices(model_dtype: str, kv_dtype: str | None, group_size: int | None):
    dense_baseline = memory.storage_format(None, model_dtype=model_dtype)
    if group_size is not None and kv_dtype not in memory.QUANTIZED_FORMATS:
        raise ValueError(f"--group-size needs a quantized --kv-dtype ({', '.join(memory.QUANTIZED_FORMATS)})")
    if kv_dtype is None:
        fmts = [dense_baseline]
        if dense_baseline.name == "fp32":
            fmts.append(memory.storage_format("bf16"))
        for name in memory.QUANTIZED_FORMATS:
            fmts += [memory.storage_format(name, g) for g in GROUP_CHOICES]
        return dense_baseline, fmts
    if kv_dtype in memory.QUANTIZED_FORMATS:
        groups = GROUP_CHOICES if group_size is None else (group_size,)
        chosen = [memory.storage_format(kv_dtype, g) for g in groups]
    else:
        chosen = [memory.storage_format(kv_dtype)]
    return dense_baseline, [dense_baseline] + [f for f in chosen if f != dense_baseline]


def _dense_label(fmt: memory.StorageFormat) -> str:
    # bf16 and fp16 cost the same; say so instead of printing two identical rows.
    return "bf16/fp16" if fmt.name in ("bf16", "fp16") else fmt.name


def _estimate_report(args: argparse.Namespace) -> dict:
    if args.model is not None:
        cfg = memory.builtin_config(args.model)
        source = f"built-in config of {cfg['hf_id']}"
        name = cfg["name"]
    else:
        cfg = memory.load_config(args.config)
        source = args.config
        archs = cfg.get("architectures") or [None]
        name = str(cfg.get("_name_or_path") or archs[0] or cfg.get("model_type") or "model")
    dtype = memory.model_dtype(cfg)
    context = args.context or int(cfg.get("max_position_embeddings") or 131072)
    tp = getattr(args, "tp", 1)
    num_params_cfg = cfg
    cfg = memory.shard_config(cfg, tp)  # per device; unchanged for tp=1
    baseline, fmts = _storage_choices(dtype, args.kv_dtype, args.group_size)

    report: dict = {
        "model": name,
        "source": source,
        "model_dtype": dtype,
        "context_tokens": context,
        "tp": tp,
    }
    layout0 = memory.kv_layout(cfg, baseline.name)
    # Describe the model as it is (heads, attention kind); the figures are per device.
    report["layout"] = memory.kv_layout(num_params_cfg, baseline.name).describe()

    memory_bytes = weights = reserve = available = None
    if args.gpu_mem is not None:
        memory_bytes = int(args.gpu_mem * memory.GiB)
        num_params = args.num_params or memory.estimate_num_params(num_params_cfg)
        # Tensor parallelism splits the weights across ranks (evenly, to first order).
        weights = -(-memory.weight_bytes(num_params, args.weights_dtype) // tp)
        reserve = (memory.default_reserve(memory_bytes) if args.reserve is None
                   else int(args.reserve * memory.GiB))
        available = memory_bytes - weights - reserve
        report["planner"] = {
            "memory_bytes": memory_bytes,
            "num_params": num_params,
            "num_params_estimated": args.num_params is None,
            "weights_dtype": args.weights_dtype,
            "weights_bytes": weights,
            "reserve_bytes": reserve,
            "available_bytes": max(available, 0),
        }

    base_per_token = layout0.bytes_per_token
    rows = []
    for fmt in fmts:
        try:
            layout = memory.kv_layout(cfg, fmt.name, group_size=fmt.group_size)
        except ValueError as e:  # a group that does not divide this model's head
            rows.append({"storage": fmt.label, "error": str(e)})
            continue
        per_token = layout.bytes_per_token
        row = {
            "storage": _dense_label(fmt) if not fmt.quantized else fmt.label,
            "kv_dtype": fmt.name,
            "group_size": fmt.group_size,
            "bytes_per_token": per_token,
            "bytes_at_context": layout.bytes_at(context),
            "ratio_vs_dense": per_token / base_per_token,
        }
        if available is not None:
            if available <= 0:
                row["tokens_that_fit"] = 0
            else:
                fit = layout.max_tokens_within(available)
                row["tokens_that_fit"] = (int(cfg["max_position_embeddings"])
                                          if fit is None and cfg.get("max_position_embeddings")
                                          else fit)
                row["fit_unbounded"] = fit is None
        rows.append(row)
    report["rows"] = rows
    return report


def _params(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def _print_estimate(report: dict, out) -> None:
    lay = report["layout"]
    kinds = ", ".join(f"{n} {k}" for k, n in lay["layer_kinds"].items())
    cached = " + ".join(f"{t['role']} {t['heads']}x{t['dim']}" for t in lay["cached_per_layer"])
    print(f"{report['model']}  ({report['source']})", file=out)
    print(f"  {lay['layers']} layers ({kinds}); cached per token per layer: {cached}; "
          f"{lay['attention']}; model dtype {report['model_dtype']}", file=out)
    if report.get("tp", 1) > 1:
        print(f"  tensor parallel over {report['tp']} devices: every figure below is per device "
              "(KV heads split across ranks, at least one per rank; MLA latents replicated)", file=out)
    if lay["windows"]:
        print("  windowed layers hold at most "
              + ", ".join(f"{w:,}" for w in lay["windows"]) + " tokens", file=out)
    ctx = report["context_tokens"]
    plan = report.get("planner")
    if plan:
        est = " (estimated)" if plan["num_params_estimated"] else ""
        print(f"  memory {memory.format_bytes(plan['memory_bytes'])}: weights "
              f"{_params(plan['num_params'])} params{est} in {plan['weights_dtype']} = "
              f"{memory.format_bytes(plan['weights_bytes'])}, reserve "
              f"{memory.format_bytes(plan['reserve_bytes'])}, left for KV "
              f"{memory.format_bytes(plan['available_bytes'])}", file=out)
    print(file=out)

    headers = ["storage", "bytes/token", "", f"at {ctx:,} tokens", "vs dense"]
    if plan:
        headers.append("tokens that fit")
    table, errors = [], []
    for r in report["rows"]:
        if "error" in r:
            errors.append(r)
            continue
        line = [r["storage"], f"{r['bytes_per_token']:,}",
                f"({memory.format_bytes(r['bytes_per_token'])})",
                memory.format_bytes(r["bytes_at_context"]), f"{r['ratio_vs_dense']:.3f}x"]
        if plan:
            fit = f"{r['tokens_that_fit']:,}"
            line.append(fit + (" (any: windowed)" if r.get("fit_unbounded") else ""))
        table.append(line)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *table)]
    right = {1, 3, 4, 5}
    for line in [headers] + table:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip(), file=out)
    for r in errors:
        print(f"{r['storage'].ljust(widths[0])}  n/a: {r['error']}", file=out)
    if plan and plan["available_bytes"] == 0:
        print("\nthe weights and the reserve alone do not fit in this memory", file=out)
    print("\nfp8/int8 rows: 1 byte per element + a 4-byte fp32 scale per group "
          "(no suffix: one scale per token per head; gN: one per N elements).", file=out)


@command(
    "estimate",
    help="KV bytes per token, at a context, and what fits beside the weights",
    arguments=_estimate_arguments,
    description=(
        "Print a model's KV-cache bytes per token (GQA and MLA aware, sliding windows\n"
        "capped), the total at a context length, and, with --gpu-mem, how many tokens\n"
        "fit beside the weights, for each storage choice.\n\n"
        "example: kvcompact estimate --model Llama-3.1-70B --context 131072 --gpu-mem 80\n"
        "         kvcompact estimate --model Llama-3.1-70B --context 131072 --tp 8"
    ),
)
def estimate(args: argparse.Namespace) -> int:
    report = _estimate_report(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_estimate(report, sys.stdout)
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="kvcompact-demo", metavar="DIR",
                   help="folder for demo.json and demo.png (default: ./kvcompact-demo)")
    p.add_argument("--steps", type=_positive_int, default=24, metavar="N",
                   help="tool calls in the scripted session (default 24, at most 24)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: a GPU when there is one)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=12, metavar="N",
                   help="tokens the model generates after each observation (default 12)")
    p.add_argument("--verbose", action="store_true",
                   help="also print each scored question with both runs' replies")


@command(
    "demo",
    help="run a scripted agent session with DynamicCache and with kvcompact, side by side",
    arguments=_demo_arguments,
    description=(
        "The main job: a scripted coding-agent session (24 tool calls with real file reads,\n"
        "test logs and a docs page) on the embedded SmolLM2-135M-Instruct model, run once with\n"
        "transformers' DynamicCache and once with kvcompact (int8 KV, observation budgets and\n"
        "a token budget applied as in-place cache edits with bounded repair). Prints a live\n"
        "table, a summary, and\n"
        "writes demo.json and demo.png to --out."
    ),
)
def demo(args: argparse.Namespace) -> int:
    import torch

    from kvcompact.demo.report import NO_PLOT_NOTE, LiveTable, print_summary, write_outputs
    from kvcompact.demo.runner import DemoConfig, run_demo
    from kvcompact.demo.script import build_steps
    from kvcompact.models import load_default

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    steps = min(args.steps, len(build_steps()))
    print(f"kvcompact demo: loading the embedded model on {device} ...", flush=True)
    model, tokenizer = load_default(device=device)
    cfg = DemoConfig(steps=steps, max_new_tokens=args.max_new_tokens)
    table = LiveTable(steps)
    table.header()
    result = run_demo(model, tokenizer, cfg, on_step=table.row)
    print_summary(result, verbose=args.verbose)
    paths = write_outputs(result, args.out)
    if paths["plot"] is None:
        print(f"\nwrote {paths['json']}; {NO_PLOT_NOTE}")
    else:
        print(f"\nwrote {paths['json']} and {paths['plot']}")
    return 0


# --------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    # Names only: kvcompact.eval (torch, transformers) is imported when the command runs.
    p.add_argument("--quick", action="store_true",
                   help='only the traces marked "quick" (of the shipped set, or of --traces), and the quick '
                        "configurations unless --configs is given (about 3 minutes on a 2-core CPU)")
    p.add_argument("--traces", nargs="+", metavar="PATH",
                   help="trace files, or folders whose *.json files are traces (default: the shipped set)")
    p.add_argument("--configs", nargs="+", metavar="NAME",
                   help="configurations to compare; 'all', 'default' and 'quick' name those sets (default: the "
                        "default set; see --list-configs). The reference is added if missing; its row comes first")
    p.add_argument("--list-configs", action="store_true",
                   help="print every known configuration with its description and exit")
    p.add_argument("--reference", default="dense", metavar="NAME",
                   help="configuration the KL is measured against, its row first (default: dense; none: no KL)")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                   help="greedy tokens per answer (default: run_eval's, 24)")
    p.add_argument("--model", metavar="PATH",
                   help="a local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--jobs", type=_positive_int, metavar="N",
                   help="plays run at once, each in a worker process with its own copy of the model (default: "
                        "the CPU cores this process may use, at most 4, for the embedded model; 1 with --model; "
                        "1: everything in this process)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads per play (default: the cores left to each job, at least 1)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (EvalReport.from_json reads it)")
    p.add_argument("--png", metavar="PATH",
                   help="plot accuracy against peak KV memory (needs matplotlib: the [demo] extra)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _known_eval_configs() -> list:
    """Every configuration the eval knows (``kvcompact.eval.configs.ALL_CONFIGS``)."""
    from kvcompact.eval import get_configs

    return get_configs("all")


def _trace_paths(paths: Sequence[str]) -> list:
    """Trace files from ``--traces``: a file as given, a folder as its *.json files (sorted)."""
    from pathlib import Path

    out = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise ValueError(f"--traces {text!r}: the folder holds no *.json trace")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"--traces {text!r}: no such trace file or folder")
    return out


def _check_output_path(option: str, text: str | None) -> None:
    # Checked before the run, which can take many minutes, not when the result is written.
    if text is None:
        return
    from pathlib import Path

    parent = Path(text).expanduser().resolve().parent
    if not parent.is_dir():
        raise ValueError(f"{option} {text!r}: the folder {str(parent)!r} does not exist")
    if Path(text).expanduser().is_dir():
        raise ValueError(f"{option} {text!r}: is a folder; give a file name")


def _load_eval_model_config(path: str | None):
    """The folder of ``--model`` (None: the embedded model); ValueError if it is no model folder."""
    if path is None:
        return None
    from pathlib import Path

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {path!r}: not a local Hugging Face model folder (no config.json there; "
                         "nothing is downloaded)")
    return folder


def _load_eval_model(path: str | None):
    """``(model, tokenizer)`` in eval mode on the CPU: the embedded SmolLM2 for None (as ``demo``
    loads it), else a local Hugging Face folder. Nothing is downloaded."""
    if path is None:
        from kvcompact.models import load_default

        return load_default()
    folder = _load_eval_model_config(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcompact.models import _dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(str(folder), **_dtype_kwarg(torch.float32),
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer


def _load_eval_model_in_worker(path: str | None):
    """``_load_eval_model`` in an eval worker process, without transformers' progress bar (several
    workers load at once; their bars would interleave)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return _load_eval_model(path)


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _print_eval_configs(out) -> None:
    from kvcompact.eval import get_configs

    known = _known_eval_configs()
    default = {c.name for c in get_configs()}
    width = max(len(c.name) for c in known)
    for c in known:
        mark = "" if c.name in default else "  (not in the default run)"
        print(f"{c.name.ljust(width)}  {c.description}{mark}".rstrip(), file=out)


@command(
    "eval",
    help="replay scripted agent traces under each configuration and score the answers",
    arguments=_eval_arguments,
    description=(
        "Task-level quality (docs/eval.md): scripted multi-turn agent traces whose questions have\n"
        "known answers are replayed under each configuration (dense, re-prefill, in-place edits,\n"
        "8-bit storage, ...) on the same model; every answer is scored by one rule. Prints one\n"
        "line per trace and configuration on stderr, then a table (accuracy per question kind,\n"
        "KL to the reference, peak KV, tokens prefilled); --json and --png save the report.\n\n"
        "example: kvcompact eval --quick --json eval.json --png eval.png\n"
        "         kvcompact eval --configs dense reprefill inplace-gap --traces my-traces/"
    ),
)
def eval_command(args: argparse.Namespace) -> int:
    if args.list_configs:
        _print_eval_configs(sys.stdout)
        return 0

    from kvcompact.eval import get_configs, load_traces, run_eval

    # Everything a user can get wrong is checked before the model loads and the run starts.
    if args.configs is None:
        configs = get_configs("quick" if args.quick else None)
    else:
        configs = get_configs(list(args.configs))
    reference = None if args.reference.lower() == "none" else args.reference
    names = [c.name for c in configs]
    if reference is not None and reference not in names:
        try:
            get_configs([reference])
        except ValueError as err:
            raise ValueError(f"--reference {reference!r}: {err} (or none: no KL)") from None
    paths = None if args.traces is None else _trace_paths(args.traces)
    traces = load_traces(paths, quick=args.quick)
    _check_output_path("--json", args.json)
    _check_output_path("--png", args.png)
    if args.png is not None:
        from kvcompact.eval.plot import require_matplotlib

        require_matplotlib()  # ImportError naming the extra, before a long run rather than after it

    import torch

    cores = _usable_cores()
    # Each job holds its own copy of the model: several for the 135M embedded one, one for a
    # --model of unknown size unless asked.
    jobs = args.jobs if args.jobs is not None else (min(cores, 4) if args.model is None else 1)
    threads = args.threads if args.threads is not None else max(1, cores // jobs)
    if jobs == 1:
        torch.set_num_threads(threads)

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    runs = len(traces) * (len(names) + (reference is not None and reference not in names))
    done = 0

    def progress(message: str) -> None:
        nonlocal done
        done += 1
        say(f"[{done}/{runs}] {message}")

    questions = sum(len(t.questions) for t in traces)
    model = tokenizer = None
    if jobs == 1:
        say(f"kvcompact eval: loading {args.model or 'the embedded model'} ...")
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if args.quiet:  # transformers' own "Loading weights" bar too
            hf_logging.disable_progress_bar()
        try:
            model, tokenizer = _load_eval_model(args.model)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    else:
        if args.model is None:  # convert the embedded GGUF once here, not in every worker
            from kvcompact.models import prepare_default

            prepare_default()
        _load_eval_model_config(args.model)  # a bad --model fails here, not in every worker
        say(f"kvcompact eval: {jobs} worker processes ({_count(threads, 'thread')} each), each loading "
            f"{args.model or 'the embedded model'} ...")
    say(f"kvcompact eval: {_count(len(traces), 'trace')}, {_count(questions, 'question')}, "
        f"{_count(runs // len(traces), 'configuration')}")
    kwargs = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    report = run_eval(model, tokenizer, configs, traces, reference=reference,
                      on_progress=None if args.quiet else progress, jobs=jobs, threads=threads,
                      load_model=functools.partial(_load_eval_model_in_worker, args.model), **kwargs)
    print(report.table(), flush=True)
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
            f.write("\n")
        say(f"wrote {args.json}")
    if args.png is not None:
        report.plot(args.png)
        say(f"wrote {args.png}")
    return 0


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="4k-token kernel tensors and a 1k context only (about a minute on 2 CPU cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where everything runs (auto: a GPU when there is one)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads (default: torch's); 1 gives stable numbers on a shared machine")
    p.add_argument("--out", default="kvcompact-bench.json", metavar="FILE",
                   help="where the JSON report goes (default: ./kvcompact-bench.json)")
    # Tiny shapes and a random 2-layer Llama: lets the test suite run the whole command in seconds.
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)


@command(
    "bench",
    help="kernel and cache benchmarks beside their peers, in one table",
    arguments=_bench_arguments,
    description=(
        "Measure kvcompact's kernels (quantize, dequantize, compact_, rope_shift_) beside torch\n"
        "eager doing the same contract and a copy_ of the same bytes, and decode speed and KV\n"
        "bytes of KVCompactCache beside DynamicCache, transformers' QuantizedCache(fp8) and (on a\n"
        "GPU) the offloaded DynamicCache, side by side in one process. Prints one table where\n"
        "each row has what it is compared with and the ratio; writes JSON to --out."
    ),
)
def bench(args: argparse.Namespace) -> int:
    from kvcompact.bench import run

    return run(args)


# --------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return value


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    # Names only: the server module (and the web stack) is imported when the command runs.
    p.add_argument("--model", metavar="PATH",
                   help="a local Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--kv-dtype", choices=("auto",) + memory.QUANTIZED_FORMATS, default="auto",
                   help="KV storage of every session (auto: the model's dtype, lossless)")
    p.add_argument("--group-size", type=_positive_int, metavar="G",
                   help="with a quantized --kv-dtype: elements per scale (default: 32 for fp8, one scale per "
                        "token-head for int8)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--max-device-gib", type=_positive_float, metavar="GiB",
                   help="device KV budget: least recently used idle sessions are parked to host memory beyond it")
    p.add_argument("--max-host-gib", type=_positive_float, metavar="GiB",
                   help="host budget for parked sessions: the least recently used are dropped beyond it")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $KVCOMPACT_API_KEY)")
    p.add_argument("--reuse", choices=("edits", "prefix", "none"), default="edits",
                   help="KV reuse across requests: in-place edits (default), common token prefix only, or none")
    p.add_argument("--max-context", type=_positive_int, metavar="N",
                   help="longest prompt + reply in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-body-bytes", type=_positive_int, metavar="N",
                   help="largest chat request body; a longer one gets 413 before it is parsed (default: "
                        "max(1 MiB, 64 bytes per context token))")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: a GPU when there is one)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads (default: torch's)")


@command(
    "serve",
    help="an OpenAI-compatible HTTP server whose sessions keep their KV across requests",
    arguments=_serve_arguments,
    description=(
        "Serve /v1/chat/completions (streaming too), /v1/models, /health and /metrics. Each\n"
        "request's whole message list is reconciled with a live session: unchanged messages keep\n"
        "their KV, dropped or shortened ones are edited in place, only new text is prefilled\n"
        "(usage.prompt_tokens_details.cached_tokens says how much was reused). Send a session id\n"
        "(X-Session-Id header or the request's user field) to allow in-place edits; without one\n"
        "a request may only continue an exact prefix. See docs/serve.md.\n\n"
        "example: kvcompact serve --port 8000 --max-device-gib 2 --api-key $KEY"
    ),
)
def serve(args: argparse.Namespace) -> int:
    from kvcompact.serve.server import serve as run_server

    return run_server(args)
