"""Quality of eviction policies on the embedded model: perplexity and pass-key retrieval.

For every policy at 25/50/75% budgets, with lossless and fp8_e4m3 storage, against the dense
(no-budget) cache of the same storage as the reference row:

* perplexity: teacher-forced, token by token (the real decode path, evicting every ``slack``
  steps), over ``--ppl-tokens`` held-out tokens of /usr/share/common-licenses/GPL-3 after a
  ``--ppl-context``-token context; the budget is that fraction of the context;
* pass key: ``--trials`` prompts of about 900 tokens (GPL-3 filler with "The pass key is NNNNN"
  at a varying depth, then the question); greedy answer; the budget is that fraction of each
  prompt, enforced right after the prompt (prefill compaction).

Each row carries its reference beside it (dense perplexity and ratio; dense hits), as every
benchmark here does. Table on stdout, JSON under benchmarks/out/, a PNG when matplotlib imports.

Usage::

    python benchmarks/quality.py                       # everything (~15 min on 2 CPU cores)
    python benchmarks/quality.py --policies snapkv random --budgets 0.5 --trials 4

Needs the merged cache (``KVCompactCache(config, kv_dtype=, budget=, policy=)`` calling
``policy.keep_indices(..., observed=cache.observed.get(i))``) and ``kvcompact.models.load_default``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_description, print_table, write_json  # noqa: E402

from kvcompact.cache import compat  # noqa: E402

GPL3 = "/usr/share/common-licenses/GPL-3"
POLICIES = ["streaming", "knorm", "snapkv", "h2o", "tova", "random"]
FORMATS = ["none", "fp8_e4m3"]
BUDGETS = [0.25, 0.5, 0.75]
QUESTION = "What is the pass key? Answer with the number only."


def load_cache_class(spec: str):
    """``module:Class`` (default: the package's KVCompactCache)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def make_cache(cache_cls, model, fmt, budget, policy):
    from kvcompact.policies import get_policy

    kw = {"kv_dtype": None if fmt == "none" else fmt}
    if budget is not None:
        kw.update(budget=budget, policy=get_policy(policy))
    return cache_cls(model.config, **kw)


def observe(model, cache):
    from kvcompact.policies import attach

    return attach(model, cache) if getattr(cache, "policy", None) is not None else _nullcontext()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- perplexity --------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model, cache, ids: torch.Tensor, context: int) -> float:
    """exp(mean NLL) of ``ids[context:]``, fed one token at a time after a ``context`` prefill."""
    with observe(model, cache):
        out = model(ids[:, :context], **compat.cache_kwargs(cache), use_cache=True)
        logits = out.logits[:, -1]
        nll = 0.0
        n = ids.shape[1] - context
        for t in range(context, ids.shape[1]):
            nll -= float(torch.log_softmax(logits.float(), -1)[0, ids[0, t]])
            if t + 1 < ids.shape[1]:
                logits = model(ids[:, t : t + 1], **compat.cache_kwargs(cache), use_cache=True).logits[:, -1]
    return math.exp(nll / n)


# -- pass key ----------------------------------------------------------------------------------


def passkey_prompts(tokenizer, trials: int, target_tokens: int, seed: int = 0):
    """``trials`` (input_ids, key) pairs: filler with the key sentence at depths spread over the prompt."""
    rng = random.Random(seed)
    with open(GPL3) as f:
        words = f.read().split()
    prompts = []
    for i in range(trials):
        key = str(rng.randint(10000, 99999))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        start = rng.randint(0, len(words) - 2000)
        filler = words[start : start + 2000]
        # Grow the filler until the chat prompt reaches the target length.
        lo, hi = 50, len(filler)
        depth = (i + 0.5) / trials * 0.8 + 0.1  # 10% .. 90% deep
        while lo < hi:
            mid = (lo + hi + 1) // 2
            doc = filler[:mid]
            cut = int(len(doc) * depth)
            text = " ".join(doc[:cut]) + needle + " ".join(doc[cut:])
            ids = _chat_ids(tokenizer, text)
            if ids.shape[1] <= target_tokens:
                lo = mid
            else:
                hi = mid - 1
        doc = filler[:lo]
        cut = int(len(doc) * depth)
        prompts.append((_chat_ids(tokenizer, " ".join(doc[:cut]) + needle + " ".join(doc[cut:])), key))
    return prompts


def _chat_ids(tokenizer, document: str) -> torch.Tensor:
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + "The pass key is", return_tensors="pt").input_ids


@torch.no_grad()
def passkey_hit(model, tokenizer, cache, ids: torch.Tensor, key: str) -> bool:
    with observe(model, cache):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), **compat.cache_kwargs(cache), max_new_tokens=10, do_sample=False
        )
    return key in tokenizer.decode(out[0, ids.shape[1] :])


# -- driver ------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS, help="fractions of the context")
    ap.add_argument("--formats", nargs="+", default=FORMATS, help="'none' (model dtype) and/or fp8_e4m3, int8...")
    ap.add_argument("--trials", type=int, default=8, help="pass-key prompts per configuration")
    ap.add_argument("--prompt-tokens", type=int, default=900)
    ap.add_argument("--ppl-context", type=int, default=768)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--cache", default="kvcompact:KVCompactCache", help="module:Class of the cache")
    ap.add_argument("--out", default="benchmarks/out/quality.json")
    ap.add_argument("--png", default="benchmarks/out/quality.png")
    args = ap.parse_args(argv)

    from kvcompact.models import load_default

    torch.manual_seed(0)
    cache_cls = load_cache_class(args.cache)
    model, tokenizer = load_default()
    model.eval()
    with open(GPL3) as f:
        text_ids = tokenizer(f.read(), return_tensors="pt").input_ids
    # Held-out: the second half of the file (the pass-key filler draws from anywhere; it is not scored).
    start = text_ids.shape[1] // 2
    ppl_ids = text_ids[:, start : start + args.ppl_context + args.ppl_tokens]
    prompts = passkey_prompts(tokenizer, args.trials, args.prompt_tokens)
    lengths = [p.shape[1] for p, _ in prompts]
    print(f"model loaded; pass-key prompts of {min(lengths)}..{max(lengths)} tokens; {machine_description('cpu')}")

    def run(fmt, policy, frac):
        t0 = time.perf_counter()
        ppl_budget = None if frac is None else int(frac * args.ppl_context)
        ppl = perplexity(model, make_cache(cache_cls, model, fmt, ppl_budget, policy), ppl_ids, args.ppl_context)
        hits = 0
        for ids, key in prompts:
            budget = None if frac is None else int(frac * ids.shape[1])
            hits += passkey_hit(model, tokenizer, make_cache(cache_cls, model, fmt, budget, policy), ids, key)
        return ppl, hits, time.perf_counter() - t0

    headers = ["storage", "policy", "budget", "ppl", "dense ppl", "ppl ratio", "passkey", "dense passkey", "s"]
    rows = []
    for fmt in args.formats:
        dense_ppl, dense_hits, secs = run(fmt, None, None)
        rows.append([fmt, "dense", "100%", dense_ppl, dense_ppl, 1.0, f"{dense_hits}/{args.trials}", f"{dense_hits}/{args.trials}", secs])
        print(rows[-1], flush=True)
        for policy in args.policies:
            for frac in args.budgets:
                ppl, hits, secs = run(fmt, policy, frac)
                rows.append(
                    [fmt, policy, f"{frac:.0%}", ppl, dense_ppl, ppl / dense_ppl, f"{hits}/{args.trials}",
                     f"{dense_hits}/{args.trials}", secs]
                )
                print(rows[-1], flush=True)
    print()
    print_table(headers, rows)
    write_json(args.out, "quality", "cpu", headers, rows)
    plot(rows, args.png)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    fmts = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(2, len(fmts), figsize=(6 * len(fmts), 8), squeeze=False)
    for col, fmt in enumerate(fmts):
        dense = next(r for r in rows if r[0] == fmt and r[1] == "dense")
        for policy in sorted({r[1] for r in rows if r[1] != "dense"}):
            pts = [r for r in rows if r[0] == fmt and r[1] == policy]
            x = [float(r[2].rstrip("%")) for r in pts]
            axes[0][col].plot(x, [r[5] for r in pts], marker="o", label=policy)
            axes[1][col].plot(x, [int(r[6].split("/")[0]) / int(r[6].split("/")[1]) for r in pts], marker="o", label=policy)
        axes[0][col].axhline(1.0, color="k", ls="--", lw=0.8, label="dense")
        axes[1][col].axhline(int(dense[6].split("/")[0]) / int(dense[6].split("/")[1]), color="k", ls="--", lw=0.8, label="dense")
        axes[0][col].set(title=f"storage: {fmt}", xlabel="budget (% of context)", ylabel="perplexity / dense")
        axes[1][col].set(xlabel="budget (% of prompt)", ylabel="pass-key retrieval rate", ylim=(-0.05, 1.05))
        axes[0][col].set_yscale("log")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("kvcompact eviction policies, SmolLM2-135M-Instruct (CPU)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
