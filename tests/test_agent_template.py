"""Messages and incremental chat-template rendering (real SmolLM2 tokenizer + hand-written templates)."""

from __future__ import annotations

import dataclasses

import pytest

from agent_fixtures import smollm2_tokenizer
from kvcompact.agent import (IdGenerator, Message, RenderState, TemplateError, TemplateNotPrefixStable,
                             TemplateRenderer, new_message_id)

# --------------------------------------------------------------------------- messages


def test_message_roles_and_validation():
    for role in ("system", "user", "assistant", "tool"):
        assert Message(role, "x").role == role
    with pytest.raises(ValueError, match="role"):
        Message("bot", "x")
    with pytest.raises(ValueError, match="role"):
        Message.from_dict({"role": "function", "content": "x"})
    with pytest.raises(TypeError, match="content"):
        Message("user", ["a", "b"])
    with pytest.raises(ValueError, match="role"):
        Message.from_dict({"content": "x"})


def test_message_ids_and_dicts():
    a, b = Message("user", "same"), Message("user", "same")
    assert a.id != b.id and a.id.startswith("msg_")
    assert new_message_id("m").startswith("m_")
    ids = IdGenerator("t", start=5)
    assert [ids(), ids()] == ["t_5", "t_6"]
    m = Message.from_dict({"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}], "refusal": None,
                           "id": "given"})
    assert m.content == "" and m.id == "given" and m.metadata["extra"] == {"refusal": None}
    assert m.to_dict() == {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}
    t = Message("tool", "out", name="ls", tool_call_id="c1", id="x")
    assert t.to_dict(include_id=True) == {"id": "x", "role": "tool", "content": "out", "name": "ls",
                                          "tool_call_id": "c1"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.content = "changed"


# --------------------------------------------------------------------------- conversations

SYSTEM = Message("system", "You are a careful coding agent.", id="s")
SEQUENCES = {
    "system+user": [SYSTEM, Message("user", "List the files.", id="u1")],
    "user only (template adds its default system prompt)": [Message("user", "Hi!", id="u1")],
    "multi-turn": [SYSTEM, Message("user", "Hi", id="u1"), Message("assistant", "Hello! How can I help?", id="a1"),
                   Message("user", "Count to 3.", id="u2"), Message("assistant", "1, 2, 3.", id="a2"),
                   Message("user", "Thanks", id="u3")],
    "tool messages": [SYSTEM, Message("user", "What is in src/?", id="u1"),
                      Message("assistant", "Calling ls.", id="a1", tool_calls=[{"type": "function", "function": {
                          "name": "ls", "arguments": {"path": "src"}}}]),
                      Message("tool", "main.py\nutil.py\n", id="t1", name="ls", tool_call_id="call_1"),
                      Message("assistant", "Two files.", id="a2")],
    "consecutive tool messages": [SYSTEM, Message("user", "Read both files.", id="u1"),
                                  Message("assistant", "Reading.", id="a1"),
                                  Message("tool", "def main(): pass", id="t1", name="read"),
                                  Message("tool", "def util(): return 1\n", id="t2", name="read"),
                                  Message("tool", "", id="t3", tool_call_id="call_9")],
    "assistant then tool then user": [SYSTEM, Message("user", "Run the tests.", id="u1"),
                                      Message("assistant", "Running pytest.", id="a1"),
                                      Message("tool", "3 passed", id="t1", name="pytest"),
                                      Message("user", "Now lint.", id="u2")],
    # Contents that tokenize differently when glued to what precedes them ("\n" + "\n\n" -> "\n\n\n").
    "boundary merges": [SYSTEM, Message("user", "\n\n  indented", id="u1"),
                        Message("assistant", "\n\nAnswer with a leading blank line ", id="a1"),
                        Message("tool", "  \n\n\ttrailing spaces   ", id="t1", name="x"),
                        Message("user", " \n", id="u2"), Message("assistant", "", id="a2")],
}


def _full_ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _simulate(renderer, messages):
    """Add messages one at a time; before each assistant message and at the end, render with the
    generation prompt (as a session does before generate). Check the state after every step."""
    state = RenderState(renderer)
    incs = []
    for k in range(1, len(messages) + 1):
        gp = k == len(messages) or messages[k].role == "assistant"
        inc = state.advance(messages[:k], add_generation_prompt=gp)
        incs.append(inc)
        full = renderer.render(messages[:k], gp)
        assert state.text == full == inc.full_text
        assert state.ids == _full_ids(renderer.tokenizer, full), f"token mismatch after message {k}"
    return state, incs


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.mark.parametrize("verify_tokens", [True, False])
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_incremental_equals_full_render_smollm2(tokenizer, name, verify_tokens):
    messages = SEQUENCES[name]
    renderer = TemplateRenderer(tokenizer, verify_tokens=verify_tokens)
    assert renderer.supports_tool_role and not renderer.uses_tool_fallback  # ChatML renders any role
    state, _ = _simulate(renderer, messages)
    assert renderer.boundary_mismatches == 0
    dicts = [m.to_dict() for m in messages]
    assert state.text == tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
    hf_ids = tokenizer.apply_chat_template(dicts, tokenize=True, add_generation_prompt=True)
    hf_ids = list(hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids)
    assert state.ids == hf_ids
    # Without generation prompts, all at once and in two halves.
    half = len(messages) // 2
    a = renderer.render_increment(messages[:half], 0)
    b = renderer.render_increment(messages, half)
    assert a.text + b.text == tokenizer.apply_chat_template(dicts, tokenize=False)
    assert a.token_ids[:len(a.token_ids) - b.retract_tokens] + b.token_ids == _full_ids(tokenizer, a.text + b.text)


def test_generation_prompt_is_retracted_when_a_tool_message_follows(tokenizer):
    r = TemplateRenderer(tokenizer)
    msgs = SEQUENCES["assistant then tool then user"]
    first = r.render_increment(msgs[:3], 0, add_generation_prompt=True)
    assert first.generation_prompt == "<|im_start|>assistant\n"
    assert first.full_text.endswith("Running pytest.<|im_end|>\n<|im_start|>assistant\n")
    nxt = r.render_increment(msgs[:4], 3, previous_generation_prompt=True)
    # Minimal edit: "<|im_start|>" is shared by the old header and the tool message, so it stays.
    assert nxt.retract_text == "assistant\n"
    assert nxt.retract_tokens == len(_full_ids(tokenizer, "assistant\n")) == 3
    assert nxt.text == "tool\n3 passed<|im_end|>\n"
    assert first.token_ids[:-3] + nxt.token_ids == r.render_ids(msgs[:4])
    # ... and kept when the assistant reply is what follows.
    msgs = SEQUENCES["multi-turn"]
    gp = r.render_increment(msgs[:2], 0, add_generation_prompt=True)
    reply = r.render_increment(msgs[:3], 2, previous_generation_prompt=True)
    assert reply.retract_tokens == 0 and reply.retract_text == ""
    assert reply.text == "Hello! How can I help?<|im_end|>\n"
    assert gp.token_ids + reply.token_ids == r.render_ids(msgs[:3])


def test_boundary_merge_retracts_tokens(tokenizer):
    """``"...\\n"`` then ``"\\n\\nx"``: the cached trailing newline must be re-fed as part of ``\\n\\n\\n``."""
    r = TemplateRenderer(tokenizer, verify_tokens=False)
    msgs = [Message("user", "q", id="u"), Message("assistant", "\n\nreply", id="a")]
    gp = r.render_increment(msgs[:1], 0, add_generation_prompt=True)
    assert gp.full_text.endswith("assistant\n")
    reply = r.render_increment(msgs, 1, previous_generation_prompt=True)
    assert reply.retract_text == "" and reply.retract_tokens == 1  # text appends, tokens do not
    assert gp.token_ids[:-1] + reply.token_ids == r.render_ids(msgs)
    assert r.boundary_tokenization


def test_previous_ids_from_generation_are_reconciled(tokenizer):
    """The cache may hold a non-canonical tokenization of a generated reply: retract to the common prefix."""
    r = TemplateRenderer(tokenizer)
    msgs = SEQUENCES["multi-turn"][:3]
    prompt = r.render_ids(msgs[:2], True)
    reply_chars = [i for ch in msgs[2].content for i in _full_ids(tokenizer, ch)]  # one token per character
    eos = _full_ids(tokenizer, "<|im_end|>")
    cached = prompt + reply_chars + eos
    inc = r.render_increment(SEQUENCES["multi-turn"][:4], 3, previous_ids=cached)
    assert inc.verified
    full = r.render_ids(SEQUENCES["multi-turn"][:4])
    assert cached[:len(cached) - inc.retract_tokens] + inc.token_ids == full
    assert inc.retract_tokens == len(reply_chars) + len(eos)  # back to the start of the reply


# --------------------------------------------------------------------------- templates without a tool role

NO_TOOL_RAISES = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "### {{ m['role'] | capitalize }}\n{{ m['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}### Assistant\n{% endif %}"
)
NO_TOOL_DROPS = (
    "{% for m in messages %}{% if m['role'] in ['system', 'user', 'assistant'] %}"
    "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
NOT_PREFIX_STABLE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [latest]{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize("template", [NO_TOOL_RAISES, NO_TOOL_DROPS], ids=["raises", "drops"])
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_tool_role_fallback(tokenizer, template, name):
    messages = SEQUENCES[name]
    r = TemplateRenderer(tokenizer, chat_template=template)
    assert not r.supports_tool_role and r.uses_tool_fallback
    state, _ = _simulate(r, messages)
    mapped = []
    for m in messages:
        if m.role == "tool":
            label = m.name or m.tool_call_id or "tool"
            mapped.append({"role": "user", "content": f"Tool output ({label}):\n{m.content}"})
        else:
            mapped.append({"role": m.role, "content": m.content})
    assert state.text == tokenizer.apply_chat_template(mapped, chat_template=template, tokenize=False,
                                                       add_generation_prompt=True)
    for m in messages:
        if m.role == "tool":
            assert f"Tool output ({m.name or m.tool_call_id}):\n{m.content}" in state.text


def test_fallback_modes(tokenizer):
    msgs = SEQUENCES["assistant then tool then user"]
    always = TemplateRenderer(tokenizer, tool_fallback="always")
    assert always.supports_tool_role and always.uses_tool_fallback
    assert "<|im_start|>user\nTool output (pytest):\n3 passed<|im_end|>" in always.render(msgs)
    never = TemplateRenderer(tokenizer, chat_template=NO_TOOL_RAISES, tool_fallback="never")
    with pytest.raises(Exception, match="Unknown role: tool"):
        never.render(msgs)
    with pytest.raises(ValueError, match="tool_fallback"):
        TemplateRenderer(tokenizer, tool_fallback="sometimes")


def test_not_prefix_stable_template_raises(tokenizer):
    r = TemplateRenderer(tokenizer, chat_template=NOT_PREFIX_STABLE)
    msgs = SEQUENCES["multi-turn"]
    r.render_increment(msgs[:2], 0)
    with pytest.raises(TemplateNotPrefixStable, match="changed the text of the first 2"):
        r.render_increment(msgs[:3], 2)
    assert issubclass(TemplateNotPrefixStable, TemplateError) and issubclass(TemplateError, ValueError)


def test_bad_arguments(tokenizer):
    r = TemplateRenderer(tokenizer)
    with pytest.raises(ValueError, match="n_already"):
        r.render_increment(SEQUENCES["system+user"], 3)
    assert r.render([]) == ""
    assert r.render_increment([], 0).token_ids == []


def test_message_docstring_examples():
    import doctest

    from kvcompact.agent import messages
    failed, attempted = doctest.testmod(messages, verbose=False)
    assert attempted >= 3 and failed == 0


def test_message_spans_tile_the_render(tokenizer):
    r = TemplateRenderer(tokenizer)
    for name, msgs in SEQUENCES.items():
        ids = r.render_ids(msgs)
        spans = r.message_spans(msgs)
        assert len(spans) == len(msgs) and spans[0][0] == 0 and spans[-1][1] == len(ids), name
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), name
        for m, (s, e) in zip(msgs, spans):
            if m.content.strip():
                assert m.content.strip() in tokenizer.decode(ids[s:e]), (name, m.id)
    spans = r.message_spans(SEQUENCES["multi-turn"])
    ids = r.render_ids(SEQUENCES["multi-turn"])
    assert tokenizer.decode(ids[slice(*spans[2])]) == "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"


# --------------------------------------------------------------------------- property test

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import FUZZ_EXAMPLES  # noqa: E402

_PIECES = ["", " ", "\n", "\n\n", "  \n", "word", " word", "héllo", "🙂", "<|im_end|>", "<|im_start|>x", "\t",
           "```py\nx = 1\n```", "1234567", "!!", "'s"]
_contents = st.lists(st.sampled_from(_PIECES), min_size=0, max_size=5).map("".join)
_messages = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), _contents, st.booleans()),
                     min_size=1, max_size=7)


@settings(max_examples=FUZZ_EXAMPLES or 40, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=_messages, fallback=st.booleans(), verify=st.booleans())
def test_random_conversations_render_incrementally(tokenizer, spec, fallback, verify):
    """Any role order, adversarial contents (whitespace runs, special-token text, emoji), generation
    prompts on or off at every step: the accumulated ids always equal tokenizing the full render."""
    key = (fallback, verify)
    if key not in _RENDERERS:  # hypothesis runs the body many times; build each renderer once
        _RENDERERS[key] = TemplateRenderer(tokenizer, tool_fallback="always" if fallback else "auto",
                                           verify_tokens=verify)
    r = _RENDERERS[key]
    msgs = [Message(role, content, id=f"m{k}", name="t" if role == "tool" else None)
            for k, (role, content, _) in enumerate(spec)]
    state = RenderState(r)
    for k in range(1, len(msgs) + 1):
        gp = spec[k - 1][2]
        state.advance(msgs[:k], add_generation_prompt=gp)
        full = r.render(msgs[:k], gp)
        assert state.text == full
        assert state.ids == _full_ids(tokenizer, full)
    assert r.boundary_mismatches == 0


_RENDERERS: dict = {}
