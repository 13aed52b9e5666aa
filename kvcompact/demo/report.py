"""What ``kvcompact demo`` shows: a live per-step table, a summary, JSON and a plot."""

from __future__ import annotations

import json
import os
import sys

from kvcompact.memory import format_bytes

COLUMNS = ("step", "tool", "ctx dense", "ctx kvc", "KV dense", "KV kvc", "ratio", "prefill avoided")


def _fmt_bytes(n: int) -> str:
    return format_bytes(n)


class LiveTable:
    """Prints one row per step with a progress counter, flushed as it goes."""

    def __init__(self, total_steps: int, out=None):
        self.total = total_steps
        # None: whatever sys.stdout is when a row prints (a default of sys.stdout would bind the
        # stream of import time and miss later redirections).
        self._out = out
        self.avoided = 0

    @property
    def out(self):
        return self._out if self._out is not None else sys.stdout

    def header(self) -> None:
        print(f"{'step':>7} {'tool':<34} {'ctx dense':>9} {'ctx kvc':>8} {'KV dense':>11} "
              f"{'KV kvc':>11} {'ratio':>6} {'prefill avoided':>15}", file=self.out)

    def row(self, r) -> None:
        self.avoided += r.prefill_avoided
        tool = r.tool if len(r.tool) <= 34 else r.tool[:31] + "..."
        ratio = r.compact_kv_bytes / max(r.dense_kv_bytes, 1)
        print(f"{r.step:>3}/{self.total:<3} {tool:<34} {r.dense_context:>9,} {r.compact_context:>8,} "
              f"{_fmt_bytes(r.dense_kv_bytes):>11} {_fmt_bytes(r.compact_kv_bytes):>11} {ratio:>6.2f} "
              f"{self.avoided:>15,}", file=self.out, flush=True)


def _accuracy_line(result) -> str:
    acc = result.accuracy()
    n = acc["dense"]["questions"]
    if n == 0:
        return "none asked (the scored questions come at later steps)"
    return (f"dense {acc['dense']['correct']}/{n}  kvcompact {acc['kvcompact']['correct']}/{n}  "
            f"(scored questions, asked and taken back)")


def _reply(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def print_questions(result, out=None) -> None:
    """One block per scored question: step, kind, the question, each run's reply and verdict."""
    out = out if out is not None else sys.stdout
    for q in result.questions:
        print(f"    step {q.step:>2} {q.kind:<11} {q.question}  (accepts: {', '.join(q.answers)})", file=out)
        for run, reply, ok, why in (("dense", q.dense_reply, q.dense_correct, q.dense_reason),
                                    ("kvcompact", q.compact_reply, q.compact_correct, q.compact_reason)):
            verdict = "right" if ok else f"wrong: {why}"
            print(f"      {run:<10} {verdict:<40} {_reply(reply)}", file=out)


def print_summary(result, out=None, verbose: bool = False) -> None:
    """The summary block; ``verbose`` adds every scored question under the accuracy line."""
    out = out if out is not None else sys.stdout
    s = result.summary()
    print("\nSummary", file=out)
    print(f"  model                 {result.model} on {result.device}", file=out)
    print(f"  steps                 {s['steps']} tool calls, each followed by a model reply", file=out)
    print(f"  peak KV bytes         dense {_fmt_bytes(s['peak_kv_bytes_dense'])}  kvcompact "
          f"{_fmt_bytes(s['peak_kv_bytes_kvcompact'])}  ({100 * s['peak_kv_ratio']:.1f}% of dense)", file=out)
    print(f"  final context         dense {s['final_context_dense']:,} tokens  kvcompact "
          f"{s['final_context_kvcompact']:,} tokens", file=out)
    print(f"  edits in place        {s['edits'].get('replaced', 0)} tool outputs truncated, "
          f"{s['edits'].get('dropped', 0)} dropped", file=out)
    print(f"  tokens re-prefilled   {s['tokens_reprefilled']} (a message-level compactor without KV "
          f"editing would have re-prefilled {s['prefill_tokens_avoided']:,})", file=out)
    if result.config.repair:
        print(f"  tokens repaired       {s['tokens_repaired']:,} (bounded repair, repair={result.config.repair:g}: "
              "the later tokens each edit changed most, recomputed in place)", file=out)
    print(f"  task accuracy         {_accuracy_line(result)}", file=out)
    if verbose:
        print_questions(result, out)
    print(f"  wall time             dense {s['dense_seconds']:.1f} s, kvcompact {s['kvcompact_seconds']:.1f} s "
          f"(+ {s['question_seconds']:.1f} s answering the scored questions)", file=out)


# Printed instead of a plot when matplotlib is missing: the run itself needs nothing from it.
NO_PLOT_NOTE = "no demo.png: matplotlib is not installed (pip install \"kvcompact[demo]\" adds it)"


def matplotlib_available() -> bool:
    """Whether ``import matplotlib`` works (the only thing the plot needs beyond the demo itself)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_outputs(result, out_dir: str) -> dict:
    """Writes demo.json, and demo.png when matplotlib is installed, into out_dir.

    Returns
    -------
    dict
        ``{"json": path, "plot": path or None}``; ``plot`` is None without matplotlib.
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "demo.json")
    with open(json_path, "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    png_path = os.path.join(out_dir, "demo.png")
    if not matplotlib_available():
        return {"json": json_path, "plot": None}
    plot(result, png_path)
    return {"json": json_path, "plot": png_path}


def plot(result, path: str) -> None:
    """Draws KV bytes and context tokens per step into ``path`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in result.steps]
    mib = 1024 * 1024
    fig, (ax_bytes, ax_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    ax_bytes.plot(steps, [r.dense_kv_bytes / mib for r in result.steps], "o-", label="DynamicCache")
    ax_bytes.plot(steps, [r.compact_kv_bytes / mib for r in result.steps], "s-",
                  label=f"kvcompact ({result.config.kv_dtype}, in-place edits)")
    ax_bytes.set_xlabel("agent step")
    ax_bytes.set_ylabel("KV cache (MiB)")
    ax_bytes.set_title("KV bytes per step")
    ax_bytes.legend()
    ax_bytes.grid(alpha=0.3)
    ax_tokens.plot(steps, [r.dense_context for r in result.steps], "o-", label="DynamicCache")
    ax_tokens.plot(steps, [r.compact_context for r in result.steps], "s-", label="kvcompact")
    ax_tokens.set_xlabel("agent step")
    ax_tokens.set_ylabel("tokens in context")
    ax_tokens.set_title("Context tokens per step")
    ax_tokens.legend()
    ax_tokens.grid(alpha=0.3)
    fig.suptitle(f"kvcompact demo: {result.model}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
