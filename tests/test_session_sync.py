"""Session.sync(messages): a resent full message list becomes in-place cache edits.

The real embedded SmolLM2 where replies and reuse matter; a tiny random Llama with the real
tokenizer for fault injection (see tests/test_session_failures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvcompact
from agent_fixtures import FedCounter, smollm2_model, smollm2_tokenizer, tiny_llama
from kvcompact.agent import Session, SyncResult

pytestmark = pytest.mark.slow

GPL = Path("/usr/share/common-licenses/GPL-3")
SYSTEM = "You are a careful coding agent. Answer briefly."


@pytest.fixture(scope="module")
def mt():
    return smollm2_model()


def counted(model, fn):
    c = FedCounter(model)
    try:
        out = fn()
    finally:
        c.close()
    return out, c.count


def license_text(tok, n_tokens):
    if GPL.exists():
        ids = tok(GPL.read_text(), add_special_tokens=False)["input_ids"][:n_tokens]
        return tok.decode(ids)
    return " ".join(f"line {i}: some tool output" for i in range(n_tokens // 6))


def conversation(tok, n_tool=120):
    """An agent turn as a client holds it: system, user, assistant tool call, tool output, user."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Read the license file."},
        {"role": "assistant", "content": "Reading it."},
        {"role": "tool", "content": license_text(tok, n_tool), "name": "read_file"},
        {"role": "user", "content": "Which license is it?"},
    ]


def fresh(model, tok, messages):
    s = Session(model, tok)
    for m in messages:
        s.add_message(m)
    s.prefill()
    return s


def synced(model, tok, messages):
    s = Session(model, tok)
    r = s.sync(messages)
    assert r.fed == len(messages) and r.tokens_reused == 0
    return s


def test_append_reuses_the_whole_context_and_generate_feeds_only_the_prompt(mt):
    model, tok = mt
    msgs = conversation(tok)
    s = synced(model, tok, msgs)
    reply = s.generate(max_new_tokens=6)
    before = len(s.token_ids)
    msgs = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks. And 3 + 4?"}]
    r, fed = counted(model, lambda: s.sync(msgs))
    assert r.paths == ("kept",) * 6 + ("fed",)
    assert (r.kept, r.fed, r.dropped, r.replaced, r.tail_from) == (6, 1, 0, 0, None)
    assert r.tokens_reused == before  # the generated reply matched the text generate returned
    assert r.tokens_fed == fed == len(s.token_ids) - before > 0
    assert s.token_ids == s.renderer.render_ids(msgs)
    _, fed = counted(model, s.next_token_logits)
    prompt = len(s.renderer.render_ids(msgs, True)) - len(s.renderer.render_ids(msgs))
    assert fed == prompt == 4  # "<|im_start|>assistant\n", nothing of the conversation again

    # Resent unchanged: nothing is fed, every row is reused.
    msgs = [m.to_dict() for m in s.messages]
    n = len(s.token_ids)
    r, fed = counted(model, lambda: s.sync(msgs))
    assert (r.kept, r.tokens_fed, fed, r.tokens_reused) == (len(msgs), 0, 0, n)


def test_dropped_tool_output_matches_a_hand_driven_session(mt):
    """The typical compaction: an old tool output disappears from the resent list, a new turn arrives."""
    model, tok = mt
    msgs = conversation(tok)
    s, hand = synced(model, tok, msgs), fresh(model, tok, msgs)
    s.generate(max_new_tokens=4)
    reply = hand.generate(max_new_tokens=4)
    tool_id = hand.messages[3].id
    start, end = s.spans[s.messages[3].id]
    kept_rows = len(s.token_ids) - (end - start)
    new = msgs[:3] + msgs[4:] + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Sure?"}]
    r = s.sync(new)
    assert r.dropped_indices == (3,) and (r.dropped, r.kept, r.fed) == (1, 5, 1)
    assert r.tokens_reused >= 0.9 * kept_rows
    assert r.tokens_reused == kept_rows  # the drop is in place: every other row stays
    hand.drop(tool_id, reposition=True)
    hand.add("user", "Sure?")
    assert r.tokens_fed == len(hand.renderer.render_ids(hand.messages)) - kept_rows
    assert s.generate(max_new_tokens=5) == hand.generate(max_new_tokens=5)
    assert s.token_ids == hand.token_ids


@pytest.mark.parametrize("exact", [False, True], ids=["in_place", "exact"])
def test_truncated_tool_output_is_a_replace(mt, exact):
    model, tok = mt
    msgs = conversation(tok)
    s, hand = synced(model, tok, msgs), fresh(model, tok, msgs)
    short = msgs[3]["content"][:200] + "\n[output truncated]"
    new = msgs[:3] + [dict(msgs[3], content=short)] + msgs[4:]
    before = len(s.token_ids)
    start, end = s.spans[s.messages[3].id]
    r = s.sync(new, exact=exact)
    assert s.token_ids == s.renderer.render_ids(new)
    if not exact:
        assert r.paths == ("kept",) * 3 + ("replaced", "kept") and r.tail_from is None
        new_span = s.spans[s.messages[3].id]
        assert r.tokens_fed == new_span[1] - new_span[0]
        assert r.tokens_reused == before - (end - start)
        hand.replace(hand.messages[3].id, short)
        assert s.generate(max_new_tokens=5) == hand.generate(max_new_tokens=5)
    else:
        assert r.paths == ("kept",) * 3 + ("refed", "refed") and r.tail_from == 3
        assert r.tokens_reused == start and r.tokens_fed == len(s.token_ids) - start
        ref = fresh(model, tok, new)
        a, b = s.next_token_logits(), ref.next_token_logits()
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
        assert s.generate(max_new_tokens=5) == ref.generate(max_new_tokens=5)


def test_exact_drop_equals_a_fresh_prefill(mt):
    model, tok = mt
    msgs = conversation(tok)
    s = synced(model, tok, msgs)
    start = s.spans[s.messages[3].id][0]
    new = msgs[:3] + msgs[4:]
    r = s.sync(new, exact=True)
    assert (r.dropped, r.tail_from, r.tokens_reused) == (1, 3, start)
    ref = fresh(model, tok, new)
    assert s.token_ids == ref.token_ids and s.positions() == list(range(len(s.token_ids)))
    a, b = s.next_token_logits(), ref.next_token_logits()
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("edit", ["insert", "reorder"])
def test_insertion_and_reordering_refeed_the_shortest_exact_tail(mt, edit):
    model, tok = mt
    msgs = conversation(tok)
    s = synced(model, tok, msgs)
    spans = [s.spans[m.id] for m in s.messages]
    if edit == "insert":
        new = msgs[:2] + [{"role": "user", "content": "Also: be concise."}] + msgs[2:]
        cut_msg, cut_in = 2, 2
    else:  # the assistant turn and the tool output swap places
        new = msgs[:2] + [msgs[3], msgs[2]] + msgs[4:]
        cut_msg, cut_in = 2, 2
    r = s.sync(new)
    assert r.tail_from == cut_in and r.reason and "insert" in r.reason
    assert r.tokens_reused == spans[cut_msg][0]
    assert r.tokens_fed == len(s.renderer.render_ids(new)) - r.tokens_reused
    assert s.token_ids == s.renderer.render_ids(new)
    assert [m.content for m in s.messages] == [m["content"] for m in new]
    ref = fresh(model, tok, new)
    a, b = s.next_token_logits(), ref.next_token_logits()
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_tool_calls_and_tool_call_ids_round_trip(mt):
    model, tok = mt
    calls = [{"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{\"path\": \"src\"}"}}]
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is in src/?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "a.py\nb.py", "tool_call_id": "call_1", "name": "ls"},
            {"role": "user", "content": "And the first?"}]
    s = synced(model, tok, msgs)
    assert s.messages[2].tool_calls == calls and s.messages[3].tool_call_id == "call_1"
    assert s.token_ids == s.renderer.render_ids(msgs)
    # Sent back as a client would (key order differs): all kept, nothing fed.
    back = [dict(reversed(list(m.items()))) for m in msgs]
    r = s.sync(back)
    assert (r.kept, r.tokens_fed) == (5, 0)
    # Another call id is another message: not a content replacement.
    other = msgs[:3] + [dict(msgs[3], tool_call_id="call_2")] + msgs[4:]
    r = s.sync(other)
    assert r.replaced == 0 and r.paths[3] in ("fed", "refed")
    assert s.messages[3].tool_call_id == "call_2" and s.token_ids == s.renderer.render_ids(other)


def test_sync_is_deterministic(mt):
    model, tok = mt
    msgs = conversation(tok)
    a, b = synced(model, tok, msgs), synced(model, tok, msgs)
    new = msgs[:1] + [{"role": "user", "content": "Hi."}] + msgs[1:3] + [dict(msgs[3], content="(elided)")]
    ra, rb = a.sync(new), b.sync(new)
    assert isinstance(ra, SyncResult) and ra == rb
    assert ra.ids != rb.ids  # fresh random ids for the re-fed messages, left out of the comparison
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("bad, pattern, exc", [
    ([{"content": "x"}], r"messages\[0\] has no 'role'", ValueError),
    ([{"role": "system", "content": "x"}, {"role": "robot", "content": "y"}], r"messages\[1\]\.role", ValueError),
    ([{"role": "user"}], r"messages\[0\] has no 'content'", ValueError),
    ([{"role": "user", "content": None}], r"messages\[0\]\.content is None", ValueError),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a str", ValueError),
    ([{"role": "tool", "content": "x", "tool_call_id": 7}], r"messages\[0\]\.tool_call_id", ValueError),
    ([{"role": "user", "content": "x"}, "hi"], r"messages\[1\] must be a dict", TypeError),
    ({"role": "user", "content": "x"}, r"messages must be a list", TypeError),
])
def test_bad_input_names_the_index_and_field(bad, pattern, exc):
    tok = smollm2_tokenizer()
    s = Session(tiny_llama(len(tok)), tok)
    with pytest.raises(exc, match=pattern):
        s.sync(bad)
    assert s.messages == [] and s.token_ids == []


# ---------------------------------------------------------------------- tiny model: faults, gaps


@pytest.fixture(scope="module")
def tiny():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


class Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch, module, n, exc):
    """Make ``module.forward`` raise ``exc`` after its ``n``-th call from now wrote the cache."""
    real, calls = module.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == n:
            raise exc
        return out

    monkeypatch.setattr(module, "forward", forward)


def _tiny_msgs():
    return [{"role": "system", "content": "You are a fault-injection test."},
            {"role": "user", "content": "Say something."},
            {"role": "tool", "content": "tool output line\n" * 12, "name": "probe"},
            {"role": "user", "content": "And now summarize."}]


@pytest.mark.parametrize("where", ["replace", "append"])
def test_failed_forward_during_sync_leaves_the_session_consistent(tiny, monkeypatch, where):
    """replace: the splice's forward fails (the cache rolls back); append: the 2nd prefill chunk fails
    (the chunk is cropped back out). Either way the cache holds exactly token_ids, and the same sync
    again finishes the job: the session equals one driven by hand without a failure."""
    model, tok = tiny
    msgs = _tiny_msgs()
    s, hand = Session(model, tok, prefill_chunk=8), Session(model, tok, prefill_chunk=8)
    s.sync(msgs)
    hand.sync(msgs)
    if where == "replace":
        new = msgs[:2] + [dict(msgs[2], content="(elided)")] + msgs[3:]
        hand.replace(hand.messages[2].id, "(elided)")
    else:
        new = msgs + [{"role": "user", "content": "word " * 30}]
        hand.add_message(new[-1])
    _fail_on_call(monkeypatch, model, 1 if where == "replace" else 2, Boom("simulated OOM"))
    with pytest.raises(Boom):
        s.sync(new)
    monkeypatch.undo()
    assert s.cache.physical_length == s.cache.get_seq_length() == len(s.token_ids)
    assert s.token_ids == s.renderer.render_ids(s.messages)[:len(s.token_ids)]
    expected = msgs if where == "replace" else new
    assert [m.content for m in s.messages] == [m["content"] for m in expected]
    r = s.sync(new)
    assert s.token_ids == s.renderer.render_ids(new)
    assert r.paths == (("kept", "kept", "replaced", "kept") if where == "replace" else ("kept",) * 5)
    assert r.tokens_fed > 0
    assert torch.allclose(s.next_token_logits(), hand.next_token_logits(), atol=1e-5, rtol=0)
    assert s.token_ids == hand.token_ids


def test_system_prompt_and_adjacent_messages_are_replaced_in_place(tiny):
    model, tok = tiny
    msgs = _tiny_msgs() + [{"role": "tool", "content": "second output\n" * 5, "name": "probe"}]
    s, hand = Session(model, tok), Session(model, tok)
    s.sync(msgs)
    hand.sync(msgs)
    new = [dict(msgs[0], content="You are a different test.")] + msgs[1:3] + [
        dict(msgs[3], content="Summarize, please."), dict(msgs[4], content="(elided)")]
    r = s.sync(new)
    assert r.paths == ("replaced", "kept", "kept", "replaced", "replaced") and r.tail_from is None
    for k, m in ((0, new[0]), (3, new[3]), (4, new[4])):
        hand.replace(hand.messages[k].id, m["content"])
    assert s.token_ids == hand.token_ids == s.renderer.render_ids(new)
    assert r.tokens_reused == len(s.token_ids) - r.tokens_fed
    assert torch.allclose(s.next_token_logits(), hand.next_token_logits(), atol=1e-6, rtol=0)


def test_refused_replace_starts_the_exact_tail_there(tiny, monkeypatch):
    """A replace refused at a non-token boundary (simulated: ChatML always splits at <|im_start|>)."""
    from kvcompact.agent import edits
    from kvcompact.agent.entries import SessionError

    model, tok = tiny
    msgs = _tiny_msgs()
    s = Session(model, tok)
    s.sync(msgs)
    start = s.spans[s.messages[2].id][0]

    def refuse(session, msg_id, text, **kw):
        raise SessionError("replace: the new text merges with the tokens before it")

    monkeypatch.setattr(edits, "replace", refuse)
    new = msgs[:2] + [dict(msgs[2], content="(elided)")] + msgs[3:]
    r = s.sync(new)
    monkeypatch.undo()
    assert r.paths == ("kept", "kept", "refed", "refed") and r.tail_from == 2 and "refused" in r.reason
    assert r.tokens_reused == start and r.tokens_fed == len(s.token_ids) - start
    ref = fresh(model, tok, new)
    assert s.token_ids == ref.token_ids
    assert torch.allclose(s.next_token_logits(), ref.next_token_logits(), atol=1e-5, rtol=0)


def test_tail_across_a_gap_drop_recomputes_from_the_start(tiny):
    """A hand-made drop(reposition=False) leaves positions the cache cannot close: the tail starts at 0."""
    model, tok = tiny
    msgs = _tiny_msgs()
    s = Session(model, tok)
    s.sync(msgs)
    s.drop(s.messages[2].id, reposition=False)  # a gap: later tokens keep their positions
    kept = msgs[:2] + msgs[3:]
    new = kept[:1] + [{"role": "user", "content": "Inserted."}] + kept[1:]
    r = s.sync(new)
    assert r.tail_from == 0 and r.tokens_reused == 0 and r.paths == ("refed", "fed", "refed", "refed")
    ref = fresh(model, tok, new)
    assert s.token_ids == ref.token_ids and s.positions() == list(range(len(s.token_ids)))
    assert s.cache.get_seq_length() == len(s.token_ids)
    assert torch.allclose(s.next_token_logits(), ref.next_token_logits(), atol=1e-5, rtol=0)


def test_sync_needs_an_editable_cache(tiny):
    from transformers import DynamicCache

    model, tok = tiny
    s = Session(model, tok, DynamicCache())
    with pytest.raises(TypeError, match="sync"):
        s.sync(_tiny_msgs())
