"""benchmarks/bench_serve.py's accounting, in process, on a tiny random Llama over SmolLM2's tokenizer.

A shortened compacting trace (6 steps, tighter budgets so the agent both truncates and drops) is
replayed against ``SessionManager(reuse=...)`` in each mode; the prefilled counts must order as the
benchmark claims: in-place edits < longest-common-prefix < stateless."""

from __future__ import annotations

import os
import sys

import pytest

from agent_fixtures import smollm2_tokenizer, tiny_llama

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import bench_serve  # noqa: E402
from kvcompact.demo.runner import DemoConfig  # noqa: E402
from kvcompact.demo.script import build_steps  # noqa: E402

STEPS = 6
CONFIG = DemoConfig(steps=STEPS, max_new_tokens=4, observation_budget=48, keep_recent=2, token_budget=700)


@pytest.fixture(scope="module")
def mt():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


@pytest.fixture(scope="module")
def replayed(mt):
    model, tok = mt
    steps = build_steps()[:STEPS]
    make = lambda mode: bench_serve._InProcess(model, tok, mode, None)  # noqa: E731
    single, multi = bench_serve.run_all(make, tok, steps=steps, config=CONFIG, concurrent=2, concurrent_steps=2)
    return {r.mode: r for r in single}, {r.mode: r for r in multi}


def test_the_trace_compacts_as_an_agent_would(mt):
    _, tok = mt
    agent = bench_serve.CompactingAgent(tok, build_steps()[:STEPS], CONFIG)
    sizes = []
    for step in agent.steps:
        msgs = agent.request(step)
        assert msgs[-1]["role"] == "tool" and msgs[-1]["content"].startswith(f"$ {step.tool}\n")
        sizes.append(len(msgs))
        agent.observe("Noted; next step.")
    assert agent.truncations > 0 and agent.drops > 0  # the shortened trace exercises both edits
    assert msgs[0]["role"] == "system" and sizes != sorted(sizes)  # drops shrank the list at some step
    # Only new or changed text counts toward the floor: a pure append costs its new message only.
    prev = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    nxt = prev + [{"role": "assistant", "content": "r"}, {"role": "tool", "content": "hello world"}]
    assert bench_serve.new_text_tokens(tok, prev, "r", nxt) == len(tok("hello world", add_special_tokens=False)
                                                                    ["input_ids"])


def test_prefilled_tokens_order_edits_below_prefix_below_stateless(replayed):
    single, _ = replayed
    edits, prefix, none = single["edits"], single["prefix"], single["none"]
    assert len(edits.steps) == len(prefix.steps) == len(none.steps) == STEPS
    assert edits.prefilled < prefix.prefilled < none.prefilled
    assert all(s.cached_tokens == 0 for s in none.steps) and none.prefilled == none.prompt_tokens
    # Stateful modes reuse the whole previous context on the second step (an append).
    assert edits.steps[1].cached_tokens == prefix.steps[1].cached_tokens > 0
    # Edits feed little beyond the new or changed text (template markers, generation prompt).
    assert edits.floor <= edits.prefilled <= edits.floor + 24 * STEPS
    assert all(r.peak_kv_bytes > 0 for r in single.values())


def test_concurrent_agents_share_the_system_prompt(replayed):
    _, multi = replayed
    assert set(multi) == set(bench_serve.MODES)
    assert all(r.requests == 4 and r.agents == 2 for r in multi.values())
    assert multi["none"].prefilled == multi["none"].prompt_tokens
    assert multi["edits"].prefilled < multi["none"].prefilled
    assert multi["prefix"].prefilled < multi["none"].prefilled
    headers, rows = bench_serve.concurrent_table(list(multi.values()))
    assert len(rows) == 3 and rows[-1][headers.index("vs none")] == "1.000"
