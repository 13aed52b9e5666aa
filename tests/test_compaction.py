"""compact_messages: the seed's behaviour (system kept, recent kept, long tool outputs truncated with a
note), its token budget, and the plan a Session replays on the KV cache."""

from __future__ import annotations

import copy

import pytest

from agent_fixtures import smollm2_tokenizer
from kvcompact.agent import Message, apply_plan, compact_messages, plan_compaction
from kvcompact.agent.compaction import TokenCounter

COUNT = TokenCounter()


def _tool_output(i: int, lines: int = 600) -> str:
    return f"BEGIN-{i}\n" + "".join(f"{i}:{j} some file content here\n" for j in range(lines)) + f"END-{i}"


def _agent_run(n_steps=8, lines=600, with_ids=False, tool_calls=False):
    msgs = [{"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Refactor the project."}]
    for i in range(n_steps):
        a = {"role": "assistant", "content": f"Reading file {i}."}
        if tool_calls:
            a["tool_calls"] = [{"id": f"c{i}", "type": "function", "function": {"name": "read", "arguments": "{}"}}]
        msgs.append(a)
        msgs.append({"role": "tool", "content": _tool_output(i, lines), "tool_call_id": f"c{i}", "name": "read"})
    msgs.append({"role": "system", "content": "Reminder: be concise."})  # a mid-conversation system message
    msgs.append({"role": "user", "content": "Summarize what you found."})
    if with_ids:
        for k, m in enumerate(msgs):
            m["id"] = f"m{k}"
    return msgs


def _total(msgs, overhead=4):
    return sum(COUNT.count(m["content"] if isinstance(m, dict) else m.content) + overhead for m in msgs)


def test_seed_behaviour_truncates_old_tool_outputs_only():
    msgs = _agent_run()
    before = copy.deepcopy(msgs)
    out = compact_messages(msgs, max_tokens=10**9, keep_recent=6, observation_budget=300)
    assert msgs == before  # input untouched
    # Nothing dropped, order kept.
    assert len(out) == len(msgs) and [m["role"] for m in out] == [m["role"] for m in msgs]
    non_system = [i for i, m in enumerate(msgs) if m["role"] != "system"]
    recent = set(non_system[-6:])
    for i, (old, new) in enumerate(zip(msgs, out)):
        assert new is not old  # copies: the caller may edit the result freely
        if old["role"] != "tool" or i in recent:
            assert new == old, f"message {i} should be untouched"
            continue
        text = new["content"]
        total = COUNT.count(old["content"])
        assert COUNT.count(text) <= 300 < total
        assert text.startswith(f"BEGIN-{i // 2 - 1}\n") and text.endswith(f"END-{i // 2 - 1}")  # head and tail kept
        assert "the full output is available on request" in text
        kept = COUNT.count(text.split("\n\n[...")[0]) + COUNT.count(text.split("...]\n\n")[1])
        assert f"{total - kept:,} of {total:,} tokens" in text  # the note's count is exact
        assert new["tool_call_id"] == old["tool_call_id"] and new["name"] == "read"  # other keys kept
    assert out.plan.dropped == [] and out.plan.fits
    assert {t.index for t in out.plan.truncated} == {i for i in range(len(msgs)) if msgs[i]["role"] == "tool"} - recent
    assert all(isinstance(t.ref, int) for t in out.plan.truncated)  # dicts without ids: referred to by index


def test_budget_drops_oldest_first_never_recent_or_system():
    msgs = _agent_run(with_ids=True)
    protected = [m for m in msgs if m["role"] == "system"] + [m for m in msgs if m["role"] != "system"][-4:]
    budget = _total(protected) + 1000  # room for about three truncated outputs besides the protected ones
    out = compact_messages(msgs, max_tokens=budget, keep_recent=4, observation_budget=300)
    plan = out.plan
    assert plan.fits and _total(out) == plan.tokens_after <= budget < plan.tokens_before
    kept_ids = [m["id"] for m in out]
    assert kept_ids[0] == "m0" and "m18" in kept_ids  # both system messages, in place
    assert kept_ids[-5:] == ["m15", "m16", "m17", "m18", "m19"]  # the 4 recent (+ the system one between)
    assert out[kept_ids.index("m15")] == msgs[15]  # a recent tool output is kept whole
    dropped = [int(d.ref[1:]) for d in plan.dropped]
    assert dropped and dropped == list(range(1, 1 + len(dropped)))  # the oldest non-system messages, in order
    assert len(out) < len(msgs) - 2
    # Just enough: keeping the last dropped message would have broken the budget.
    assert plan.tokens_after + plan.dropped[-1].tokens > budget
    assert plan.dropped_ids == [d.ref for d in plan.dropped]
    assert set(plan.replacements) <= set(kept_ids) and all(r not in plan.replacements for r in plan.dropped_ids)
    assert all(out[kept_ids.index(r)]["content"] == text for r, text in plan.replacements.items())


def test_infeasible_budget_keeps_system_and_recent():
    msgs = _agent_run(n_steps=3)
    out = compact_messages(msgs, max_tokens=10, keep_recent=2, observation_budget=200)
    assert not out.plan.fits and out.plan.tokens_after > 10
    assert [m for m in out if m["role"] == "system"] == [m for m in msgs if m["role"] == "system"]
    assert [m for m in out if m["role"] != "system"] == [m for m in msgs if m["role"] != "system"][-2:]


def test_tool_call_groups_are_dropped_together():
    msgs = _agent_run(with_ids=True, tool_calls=True)
    out = compact_messages(msgs, max_tokens=3000, keep_recent=3, observation_budget=300)
    kept = {m["id"] for m in out}
    for k, m in enumerate(msgs):
        if m.get("tool_calls"):
            assert (m["id"] in kept) == (msgs[k + 1]["id"] in kept), "assistant call and its result go together"
    # A group straddling the recent boundary is never dropped (it would orphan a recent tool result).
    out = compact_messages(msgs, max_tokens=0, keep_recent=2, observation_budget=300)
    ids = [m["id"] for m in out]
    # keep_recent=2 protects m17 (tool) and m19 (user); m16 (the call m17 answers) is older but stays.
    assert ids == ["m0", "m16", "m17", "m18", "m19"]


def test_messages_in_messages_out_with_ids_and_metadata():
    msgs = [Message.from_dict(m, id=f"x{k}") for k, m in enumerate(_agent_run(n_steps=4))]
    out = compact_messages(msgs, max_tokens=None, keep_recent=2, observation_budget=200)
    assert all(isinstance(m, Message) for m in out)
    t = out.plan.truncated[0]
    assert t.ref == "x3" and out[3].content == t.text and out[3].id == "x3"
    assert out[3].metadata["compaction"] == {"original_tokens": t.original_tokens, "removed_tokens": t.removed_tokens}
    assert msgs[3].content == _tool_output(0)  # frozen original unchanged


def test_deterministic_idempotent_and_replayable():
    msgs = _agent_run(with_ids=True)
    a = compact_messages(msgs, 4000, 6, 400)
    b = compact_messages(copy.deepcopy(msgs), 4000, 6, 400)
    assert a == b and a.plan == b.plan
    again = compact_messages(a, 4000, 6, 400)
    assert again == a and not again.plan.changed  # compacted output is a fixed point
    assert apply_plan(msgs, plan_compaction(msgs, 4000, 6, 400)) == a


def test_with_the_model_tokenizer():
    tok = smollm2_tokenizer()
    msgs = _agent_run(n_steps=3, lines=300)
    out = compact_messages(msgs, max_tokens=None, keep_recent=2, observation_budget=256, tokenizer=tok)
    for t in out.plan.truncated:
        n = len(tok(t.text, add_special_tokens=False)["input_ids"])
        assert t.tokens == n <= 256
        assert t.original_tokens == len(tok(msgs[t.index]["content"], add_special_tokens=False)["input_ids"])
    assert len(out.plan.truncated) == 2


def test_head_fraction_and_bad_arguments():
    msgs = _agent_run(n_steps=3)
    head_only = compact_messages(msgs, None, 2, 200, head_fraction=1.0)
    t = head_only.plan.truncated[0].text
    assert t.startswith("BEGIN-0") and t.endswith("...]\n\n")
    for kwargs, name in [(dict(max_tokens=-1), "max_tokens"), (dict(keep_recent=-1), "keep_recent"),
                         (dict(observation_budget=0), "observation_budget"), (dict(head_fraction=2), "head_fraction")]:
        args = dict(max_tokens=100, keep_recent=2, observation_budget=100)
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            compact_messages(msgs, **args)
    with pytest.raises(ValueError, match="role"):
        compact_messages([{"role": "robot", "content": "x"}], 10)
