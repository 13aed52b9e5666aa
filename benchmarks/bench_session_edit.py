"""Quality and cost of Session.drop / Session.replace against a full re-prefill of the edited chat.

Conversation (SmolLM2-135M-Instruct, fp32, lossless cache): system, user, tool A (GPL-3 text,
``--a-tokens``), user, tool B (the next ``--b-tokens`` of GPL-3), user asking to quote part B.
Each edit touches tool A; its peer is a fresh session prefilled with the edited messages (what an
agent would otherwise do). Tokens after A keep KV computed while A was visible: that is the
approximation measured here.

Columns: edit ms vs re-prefill ms (the peer) and their ratio; greedy agreement = length of the
common prefix of 20 greedy tokens / 20; top-1 = teacher-forced agreement with the peer's greedy
tokens; ppl ratio = teacher-forced perplexity of a fixed continuation (the first 64 tokens of part
B as the assistant's reply) under the edited cache / under the peer's cache; next-token KL =
KL(peer || edited) of the next token's distribution, in nats. ``repair=f`` rows recompute the
fraction ``f`` of the tail the edit changed most (kvcompact.agent.repair). One run per case,
median of ``--repeats`` timings (3: the first run of a new input shape pays oneDNN setup).

Run: ``python benchmarks/bench_session_edit.py`` (writes benchmarks/out/session_edit.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from kvcompact.agent import Session
from kvcompact.cache import compat
from kvcompact.models import load_default

GPL = Path("/usr/share/common-licenses/GPL-3")


def build(model, tok, a_text, b_text):
    s = Session(model, tok)
    s.add("system", "You are a careful assistant. Quote exactly when asked.")
    s.add("user", "Here is the first part of a file.")
    a = s.add("tool", a_text, name="read_file")
    s.add("user", "And here is the second part.")
    s.add("tool", b_text, name="read_file")
    s.add("user", "Quote the first sentence of the second part.")
    s.prefill()
    return s, a


@torch.no_grad()
def greedy(session, n):
    logits = session.next_token_logits()
    cache = copy.deepcopy(session.cache)
    out = []
    for _ in range(n):
        t = int(torch.argmax(logits))
        out.append(t)
        logits = session.model(input_ids=torch.tensor([[t]]), **compat.cache_kwargs(cache), use_cache=True).logits[0, -1]
    return out


@torch.no_grad()
def teacher_forced(session, ids):
    """Logits predicting each of ``ids`` after the generation prompt, ``[len(ids), V]``."""
    first = session.next_token_logits()
    cache = copy.deepcopy(session.cache)
    rest = session.model(input_ids=torch.tensor([ids[:-1]]), **compat.cache_kwargs(cache), use_cache=True).logits[0]
    return torch.cat([first[None], rest])


def nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a-tokens", type=int, default=800)
    ap.add_argument("--b-tokens", type=int, default=200)
    ap.add_argument("--gen", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/session_edit.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_default()
    ids = tok(GPL.read_text(), add_special_tokens=False)["input_ids"]
    a_text = tok.decode(ids[: args.a_tokens])
    b_ids = ids[args.a_tokens: args.a_tokens + args.b_tokens]
    b_text = tok.decode(b_ids)
    target = tok(tok.decode(b_ids[:64]), add_special_tokens=False)["input_ids"]

    summary = "(GPL-3 preamble: copying allowed, changes not; 800 tokens elided, full text on request)"
    similar = tok.decode(ids[5000: 5000 + args.a_tokens // 2])
    cases = {
        "replace A by a 1-line summary": lambda s, a: s.replace(a, summary),
        "replace A by other text (half length)": lambda s, a: s.replace(a, similar),
        "drop A, reposition=True": lambda s, a: s.drop(a, reposition=True),
        "drop A, reposition=False": lambda s, a: s.drop(a, reposition=False),
        "replace A by summary, recompute_tail": lambda s, a: s.replace(a, summary, recompute_tail=True),
        "drop A, reposition, recompute_tail": lambda s, a: s.drop(a, reposition=True, recompute_tail=True),
        "replace A by summary, repair=0.1": lambda s, a: s.replace(a, summary, repair=0.1),
        "drop A, reposition, repair=0.1": lambda s, a: s.drop(a, reposition=True, repair=0.1),
        "drop A, reposition, repair=0.25": lambda s, a: s.drop(a, reposition=True, repair=0.25),
    }
    rows = []
    refs: dict = {}  # edited token ids -> (ref session, its greedy tokens, its target nll, prefill ms)
    for name, edit in cases.items():
        edit_ms = []
        for _ in range(args.repeats):
            s, a = build(model, tok, a_text, b_text)
            t0 = time.perf_counter()
            edit(s, a)
            edit_ms.append((time.perf_counter() - t0) * 1e3)
        key = tuple(s.token_ids)
        if key not in refs:
            prefill_ms = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ref = Session(model, tok)
                for m in s.messages:
                    ref.add_message(m)
                ref.prefill()
                prefill_ms.append((time.perf_counter() - t0) * 1e3)
            assert ref.token_ids == s.token_ids
            refs[key] = (ref, greedy(ref, args.gen), nll(teacher_forced(ref, target), target), prefill_ms)
        ref, g_ref, ref_nll, prefill_ms = refs[key]
        g_edit = greedy(s, args.gen)
        agree = next((i for i, (x, y) in enumerate(zip(g_ref, g_edit)) if x != y), args.gen) / args.gen
        top1 = (teacher_forced(s, g_ref).argmax(-1) == torch.tensor(g_ref)).float().mean().item()
        ppl_ratio = float(torch.tensor(nll(teacher_forced(s, target), target) - ref_nll).exp())
        p_ref = torch.log_softmax(ref.next_token_logits().double(), -1)
        p_edit = torch.log_softmax(s.next_token_logits().double(), -1)
        kl = float((p_ref.exp() * (p_ref - p_edit)).sum())
        row = dict(case=name, tokens=len(s.token_ids), edit_ms=statistics.median(edit_ms), kl=kl,
                   reprefill_ms=statistics.median(prefill_ms), greedy_agreement=agree, top1_tf=top1,
                   ppl_ratio=ppl_ratio, greedy_ref=tok.decode(g_ref), greedy_edit=tok.decode(g_edit))
        row["ratio"] = row["reprefill_ms"] / row["edit_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print(f"| case | tokens after edit | edit ms | re-prefill ms (peer) | speedup | greedy agree (of {args.gen}) "
          "| top-1 TF | ppl ratio | next-token KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['tokens']} | {r['edit_ms']:.0f} | {r['reprefill_ms']:.0f} | {r['ratio']:.1f}x | "
              f"{r['greedy_agreement']:.2f} | {r['top1_tf']:.2f} | {r['ppl_ratio']:.4f} | {r['kl']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
