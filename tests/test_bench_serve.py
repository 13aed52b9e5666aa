"""benchmarks/bench_serve.py's accounting, in process, on a tiny random Llama over SmolLM2's tokenizer.

A shortened compacting trace (6 steps, tighter budgets so the agent both truncates and drops) is
replayed against ``SessionManager(reuse=...)`` in each mode; the prefilled counts must order as the
benchmark claims: in-place edits < longest-common-prefix < stateless. The ``--tools`` agent is
replayed too, with the reply parser forced to see a tool call in every reply (the tiny model writes
no JSON): the calls go back as ``tool_calls``, are answered by id, and keep their cache rows."""

from __future__ import annotations

import itertools
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


# ---------------------------------------------------------------------- the realistic agent (--tools)


def test_the_tool_schemas_cover_the_demo_tools():
    names = [t["function"]["name"] for t in bench_serve.TOOLS]
    assert sorted(names) == sorted({s.tool.split()[0] for s in build_steps()})
    for t in bench_serve.TOOLS:
        fn = t["function"]
        assert t["type"] == "function" and fn["description"] and fn["parameters"]["type"] == "object"
        assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])
        assert all(p["description"] for p in fn["parameters"]["properties"].values())


def test_the_options_override_the_demo_settings_and_default_to_them():
    assert bench_serve.agent_config(bench_serve.parse_args([]), 24) == DemoConfig(steps=24)
    args = bench_serve.parse_args(["--tools", "--context-budget", "4000", "--observation-budget", "256",
                                   "--keep-recent", "6", "--max-tokens", "32"])
    cfg = bench_serve.agent_config(args, 8)
    assert args.tools and (cfg.steps, cfg.token_budget, cfg.observation_budget) == (8, 4000, 256)
    assert (cfg.keep_recent, cfg.max_new_tokens, cfg.kv_dtype) == (6, 32, DemoConfig().kv_dtype)


def _calls(*ids):
    return [{"id": i, "type": "function", "function": {"name": "run", "arguments": "{}"}} for i in ids]


def test_a_tool_call_reply_goes_back_as_tool_calls_and_the_observation_answers_it_by_id(mt):
    _, tok = mt
    steps = build_steps()[:3]
    agent = bench_serve.CompactingAgent(tok, steps, DemoConfig(token_budget=100_000))
    agent.request(steps[0])
    agent.observe("", _calls("call_a", "call_b"))
    assert agent.messages[-1] == {"role": "assistant", "content": None, "tool_calls": _calls("call_a", "call_b")}
    msgs = agent.request(steps[1])
    assert msgs[-2]["tool_call_id"] == "call_a" and msgs[-2]["content"].startswith(f"$ {steps[1].tool}\n")
    assert msgs[-1] == {"role": "tool", "tool_call_id": "call_b", "content": bench_serve.SKIPPED_CALL}
    agent.observe("a text reply")
    assert "tool_call_id" not in agent.request(steps[2])[-1]  # a text reply is not a call to answer


def test_the_floor_counts_the_tool_schemas_once(mt):
    _, tok = mt
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    first = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    tools = bench_serve.TOOLS
    served = bench_serve.with_tools(first, tools)[0]["content"]
    assert bench_serve.new_text_tokens(tok, [], None, first, tools) == count(served) + count("u")
    reply = bench_serve.reply_message("", _calls("call_a"))
    nxt = first + [reply, {"role": "tool", "tool_call_id": "call_a", "content": "hello world"}]
    assert bench_serve.new_text_tokens(tok, first, reply, nxt, tools) == count("hello world")


def test_with_tools_edits_keep_the_schemas_and_the_restored_calls_cached(mt, monkeypatch):
    model, tok = mt
    ids = itertools.count()
    # Every reply is taken for a tool call, as a tool-calling model's would be.
    monkeypatch.setattr(bench_serve, "parse_tool_calls", lambda text, names: _calls(f"call_{next(ids)}"))
    steps = build_steps()[:4]
    backends = {}

    def make(mode):
        ctx = bench_serve._InProcess(model, tok, mode, None)
        syncs = backends[mode] = []
        chat = ctx.backend.manager.chat
        ctx.backend.manager.chat = lambda *a, **kw: syncs.append(chat(*a, **kw)) or syncs[-1]
        return ctx

    single, _ = bench_serve.run_all(make, tok, modes=("edits", "none"), steps=steps, config=CONFIG,
                                    tools=bench_serve.TOOLS)
    edits, none = single
    tools_tokens = len(tok(bench_serve.tools_text(bench_serve.TOOLS), add_special_tokens=False)["input_ids"])
    assert all(s.tool_call for s in edits.steps) and edits.tool_calls == len(steps)
    assert edits.steps[0].new_text_tokens > tools_tokens and edits.steps[0].prompt_tokens > tools_tokens
    # Step 2 appends the answer to a tool call: the schemas and the reply sent back as tool_calls
    # (the model's own text, restored by the server) keep their rows; only the answer is fed.
    second = backends["edits"][1].sync
    assert second.paths == ("kept",) * 4 + ("fed",) and second.dropped == 0
    assert edits.steps[1].cached_tokens == backends["edits"][0].prompt_tokens + backends["edits"][0].completion_tokens
    assert none.prefilled == none.prompt_tokens and edits.prefilled < none.prefilled / 2
