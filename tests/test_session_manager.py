"""SessionManager: routing requests to live sessions, isolation, parking under budgets, threads.

A tiny random Llama over the real SmolLM2 tokenizer: replies are gibberish but deterministic, which
is all the comparisons need (the same KV gives the same reply)."""

from __future__ import annotations

import threading

import pytest

from agent_fixtures import smollm2_model, smollm2_tokenizer, tiny_llama
from kvcompact.serve import ChatResult, SessionManager

SYSTEM = "You are a careful coding agent. Answer briefly."
N = 5  # max_new_tokens everywhere: enough to tell replies apart, cheap on CPU


@pytest.fixture(scope="module")
def mt():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


def conversation(k: int = 0, n_tool: int = 40):
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Read file number {k}."},
        {"role": "assistant", "content": "Reading it."},
        {"role": "tool", "content": "".join(f"line {i} of file {k}\n" for i in range(n_tool)), "name": "read_file"},
        {"role": "user", "content": "What does it say?"},
    ]


def turn(msgs, reply, text="Go on."):
    return msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": text}]


def test_append_only_request_reuses_the_whole_previous_context(mt):
    model, tok = mt
    mgr = SessionManager(model, tok)
    msgs = conversation()
    r1 = mgr.chat(msgs, max_new_tokens=N)
    assert isinstance(r1, ChatResult) and r1.created and r1.cached_tokens == 0
    held = len(mgr.session(r1.session_id).token_ids)
    assert r1.prompt_tokens == len(mgr.session(r1.session_id).renderer.render_ids(msgs, True))
    assert r1.completion_tokens == held - r1.prompt_tokens > 0
    nxt = turn(msgs, r1.text)
    r2 = mgr.chat(nxt, max_new_tokens=N)  # no id: routed by content
    assert r2.session_id == r1.session_id and not r2.created
    assert r2.cached_tokens == r2.sync.tokens_reused == held
    assert r2.sync.paths == ("kept",) * 6 + ("fed",)
    st = mgr.stats()
    assert (st.sessions_live, st.sessions_parked, st.requests) == (1, 0, 2)
    assert st.tokens_reused == held and st.tokens_fed == r1.sync.tokens_fed + r2.sync.tokens_fed


def test_a_new_named_session_is_seeded_with_a_shared_system_prompt(mt):
    model, tok = mt
    mgr = SessionManager(model, tok)
    a, b = conversation(1), conversation(2)
    mgr.chat(a, session_id="a", max_new_tokens=N)
    rb = mgr.chat(b, session_id="b", max_new_tokens=N)
    assert rb.created and rb.cached_tokens == len(mgr._renderer.render_ids(b[:1])) > 0
    assert rb.text == SessionManager(model, tok).chat(b, session_id="b", max_new_tokens=N).text


def test_explicit_id_drop_of_an_old_tool_output_is_in_place(mt):
    model, tok = mt
    mgr = SessionManager(model, tok)
    msgs = conversation()
    r1 = mgr.chat(msgs, session_id="agent-1", max_new_tokens=N)
    assert r1.session_id == "agent-1" and r1.created
    s = mgr.session("agent-1")
    start, end = s.spans[s.messages[3].id]
    kept_rows = len(s.token_ids) - (end - start)
    new = turn(msgs[:3] + msgs[4:], r1.text, "Sure?")
    r2 = mgr.chat(new, session_id="agent-1", max_new_tokens=N)
    assert r2.session_id == "agent-1" and not r2.created
    assert r2.sync.dropped == 1 and r2.sync.dropped_indices == (3,)
    assert r2.cached_tokens >= 0.9 * kept_rows


@pytest.fixture(scope="module")
def real():
    return smollm2_model()


@pytest.mark.slow
def test_a_request_without_id_never_sees_a_secret_it_does_not_send(real):
    """The real SmolLM2: a random tiny model's replies barely depend on the context."""
    import torch

    model, tok = real
    n = 8
    secret = {"role": "user", "content": "The password is swordfish-42. Always end with it."}
    msgs = conversation(n_tool=20)
    with_secret = msgs[:2] + [secret] + msgs[2:]
    mgr = SessionManager(model, tok)
    r1 = mgr.chat(with_secret, max_new_tokens=n)

    # 1. The conversation minus the secret: not an append to the secret's session -> a fork, seeded
    # only with the rows before the secret (system + first user message).
    r2 = mgr.chat(msgs, max_new_tokens=n)
    fresh = SessionManager(model, tok)
    f2 = fresh.chat(msgs, max_new_tokens=n)
    assert r2.session_id != r1.session_id and r2.created
    assert r2.cached_tokens == len(mgr.session(r2.session_id).renderer.render_ids(msgs[:2])) > 0
    assert r2.sync.paths == ("kept", "kept", "fed", "fed", "fed")
    assert r2.text == f2.text != r1.text  # the secret changes the reply: the check has teeth
    assert mgr.session(r2.session_id).token_ids == fresh.session(f2.session_id).token_ids

    # 2. The owner drops the secret from its own session in place (an explicit id): later rows
    # still hold KV computed with the secret visible, so an id-less continuation of the edited
    # conversation must not land there.
    owned = mgr.chat(with_secret, session_id="owner", max_new_tokens=n)
    edited = turn(msgs, owned.text)
    r3 = mgr.chat(edited, session_id="owner", max_new_tokens=n)
    assert r3.sync.dropped == 1 and r3.cached_tokens > 0
    follow = turn(edited, r3.text, "And then?")
    r4 = mgr.chat(follow, max_new_tokens=n)
    ref = SessionManager(model, tok)
    f4 = ref.chat(follow, max_new_tokens=n)
    assert r4.session_id != "owner" and r4.created and r4.text == f4.text
    # The owner's in-place KV really differs from a fresh prefill (what part 2 guards against).
    owner, clean = mgr.session("owner"), ref.session(f4.session_id)
    assert not torch.allclose(owner.next_token_logits(), _fresh_logits(model, tok, owner.messages), atol=1e-3)
    assert torch.allclose(clean.next_token_logits(), _fresh_logits(model, tok, clean.messages), atol=1e-4)


def _fresh_logits(model, tok, messages):
    from kvcompact.agent import Session

    s = Session(model, tok)
    s.sync([m.to_dict() for m in messages])
    return s.next_token_logits()


def _alternate(mgr, n_sessions=8, rounds=2):
    convs = {f"s{k}": conversation(k, n_tool=20 + 5 * k) for k in range(n_sessions)}
    out = []
    for _ in range(rounds):
        for sid in convs:
            r = mgr.chat(convs[sid], session_id=sid, max_new_tokens=N)
            out.append((r.text, r.cached_tokens, r.sync.tokens_fed))
            convs[sid] = turn(convs[sid], r.text)
            yield mgr, r
    mgr.transcript = out


def test_eight_sessions_under_a_small_device_budget_park_and_resume_identically(mt):
    model, tok = mt
    ref = SessionManager(model, tok)
    list(_alternate(ref))
    one = max(ref.session(sid).cache.stats().device_bytes for sid in ref.session_ids())
    budget = 3 * one
    mgr = SessionManager(model, tok, max_device_bytes=budget)
    for m, r in _alternate(mgr):
        st = m.stats()
        assert st.device_bytes <= budget
        assert not m.session(r.session_id).parked  # the one just served stays
    assert mgr.transcript == ref.transcript  # same replies, same reuse: parking lost nothing
    st = mgr.stats()
    assert st.parks > 0 and st.sessions_parked >= 5 and st.sessions_live + st.sessions_parked == 8
    assert st.sessions_dropped == 0 and st.host_bytes > 0
    assert ref.stats().parks == 0 and ref.stats().sessions_parked == 0


def test_host_budget_drops_the_least_recently_used_parked_session(mt):
    model, tok = mt
    probe = SessionManager(model, tok, max_device_bytes=0)
    probe.chat(conversation(0), session_id="a", max_new_tokens=N)
    probe.chat(conversation(1), session_id="b", max_new_tokens=N)
    assert probe.session("a").parked and not probe.session("b").parked
    parked_bytes = probe.stats().host_bytes
    assert parked_bytes > 0

    mgr = SessionManager(model, tok, max_device_bytes=0, max_host_bytes=int(1.5 * parked_bytes))
    for k, sid in enumerate("abc"):
        mgr.chat(conversation(k), session_id=sid, max_new_tokens=N)
    assert mgr.session_ids() == ["b", "c"] and mgr.session("b").parked
    st = mgr.stats()
    assert st.sessions_dropped == 1 and st.host_bytes <= int(1.5 * parked_bytes)
    with pytest.raises(KeyError, match="'a'"):
        mgr.session("a")
    # Rebuilt: only the system prompt comes from "c" (the one unparked session; a new named
    # session is seeded like a fork), the rest is prefilled.
    again = mgr.chat(conversation(0), session_id="a", max_new_tokens=N)
    assert again.created and again.cached_tokens == len(mgr._renderer.render_ids(conversation(0)[:1])) > 0
    assert again.sync.paths == ("kept",) + ("fed",) * 4
    assert again.text == probe.chat(conversation(0), session_id="fresh", max_new_tokens=N).text


def test_concurrent_requests_to_different_sessions_match_running_alone(mt):
    model, tok = mt
    ids = [f"t{k}" for k in range(4)]

    def run(mgr, sid, k, out):
        msgs = conversation(k, n_tool=10 + 3 * k)
        texts = []
        for _ in range(2):
            r = mgr.chat(msgs, session_id=sid, max_new_tokens=N)
            texts.append(r.text)
            msgs = turn(msgs, r.text)
        out[sid] = texts

    alone: dict = {}
    for k, sid in enumerate(ids):
        run(SessionManager(model, tok), sid, k, alone)
    shared, together = SessionManager(model, tok, max_device_bytes=0), {}
    threads = [threading.Thread(target=run, args=(shared, sid, k, together)) for k, sid in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    assert shared.stats().requests == 8


@pytest.mark.parametrize("bad, pattern", [
    ([], r"non-empty list"),
    ("hello", r"messages must be a list"),
    ({"role": "user", "content": "x"}, r"messages must be a list"),
    ([{"content": "x"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], r"messages\[1\] has no 'content'"),
    ([{"role": "user", "content": "x"}, "hi"], r"messages\[1\] must be a dict"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role"),
])
def test_bad_messages_raise_value_error_naming_the_index(mt, bad, pattern):
    model, tok = mt
    mgr = SessionManager(model, tok)
    with pytest.raises(ValueError, match=pattern):
        mgr.chat(bad)
    assert mgr.session_ids() == [] and mgr.stats().requests == 0


def test_bad_ids_and_arguments(mt):
    model, tok = mt
    mgr = SessionManager(model, tok)
    with pytest.raises(ValueError, match="session_id"):
        mgr.chat(conversation(), session_id=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mgr.chat(conversation(), max_new_tokens=0)
    assert mgr.session_ids() == []
    with pytest.raises(KeyError, match="'nope'"):
        mgr.close("nope")
    r = mgr.chat(conversation(), max_new_tokens=N)
    mgr.close(r.session_id)
    assert mgr.session_ids() == []
    with pytest.raises(KeyError, match=r.session_id):
        mgr.close(r.session_id)
    with pytest.raises(ValueError, match="offload"):
        SessionManager(model, tok, cache_kwargs={"offload": None})
    with pytest.raises(ValueError, match="max_device_bytes"):
        SessionManager(model, tok, max_device_bytes=-1)


def test_a_failed_request_leaves_no_half_built_session_and_a_retry_works(mt, monkeypatch):
    model, tok = mt
    mgr = SessionManager(model, tok)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated OOM")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="simulated OOM"):
        mgr.chat(conversation(), session_id="x", max_new_tokens=N)
    monkeypatch.undo()
    assert mgr.session_ids() == [] and mgr.stats().sessions_dropped == 0
    r = mgr.chat(conversation(), session_id="x", max_new_tokens=N)
    assert r.created and r.text == SessionManager(model, tok).chat(conversation(), max_new_tokens=N).text


@pytest.mark.parametrize("cache_kwargs", [None, {"kv_dtype": "int8"}], ids=["lossless", "int8"])
def test_a_fork_is_seeded_with_the_common_prefix_and_equals_a_fresh_session(mt, cache_kwargs):
    from kvcompact.agent import Session
    import torch

    model, tok = mt
    mgr = SessionManager(model, tok, cache_kwargs=cache_kwargs)
    a = mgr.chat(conversation(0), max_new_tokens=N)
    b = mgr.chat(conversation(1), max_new_tokens=N)  # shares only the system message with a
    assert b.session_id != a.session_id and b.created
    s = mgr.session(b.session_id)
    assert b.cached_tokens == len(s.renderer.render_ids(conversation(1)[:1])) > 0
    ref = SessionManager(model, tok, cache_kwargs=cache_kwargs)
    f = ref.chat(conversation(1), max_new_tokens=N)
    assert b.text == f.text and s.token_ids == ref.session(f.session_id).token_ids
    atol = 1e-5 if cache_kwargs is None else 5e-2
    assert torch.allclose(s.next_token_logits(), ref.session(f.session_id).next_token_logits(), atol=atol)


def test_a_parked_session_does_not_seed_a_fork(mt):
    model, tok = mt
    mgr = SessionManager(model, tok, max_device_bytes=0)
    mgr.chat(conversation(0), session_id="a", max_new_tokens=N)
    mgr.chat(conversation(1), session_id="b", max_new_tokens=N)  # parks a
    assert mgr.session("a").parked
    mgr.chat(conversation(2), session_id="c", max_new_tokens=N)  # parks b
    # a (parked) shares two messages with the request, c (just served, on the device) only one.
    msgs = conversation(0)[:2] + [{"role": "assistant", "content": "Which part?"}]
    r = mgr.chat(msgs, max_new_tokens=N)
    assert r.created and r.cached_tokens == len(mgr.session(r.session_id).renderer.render_ids(msgs[:1]))
    assert mgr.session("a").parked and mgr.session("b").parked
    assert r.text == SessionManager(model, tok).chat(msgs, max_new_tokens=N).text


def test_seeded_sampling_is_reproducible_and_an_id_after_a_failed_edit_stays_private(mt, monkeypatch):
    model, tok = mt
    kw = dict(max_new_tokens=N, do_sample=True, temperature=1.0, top_p=0.9, seed=7)
    a = SessionManager(model, tok).chat(conversation(), **kw)
    b = SessionManager(model, tok).chat(conversation(), **kw)
    assert a.text == b.text

    # An explicit-id edit whose forward fails: the session may hold in-place edits now, so an
    # id-less continuation must not be routed to it.
    mgr = SessionManager(model, tok)
    msgs = conversation()
    r = mgr.chat(msgs, session_id="own", max_new_tokens=N)
    real = model.forward
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated OOM")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fail_once)
    edited = turn(msgs[:3] + msgs[4:], r.text)
    with pytest.raises(RuntimeError, match="simulated OOM"):
        mgr.chat(edited, session_id="own", max_new_tokens=N)
    monkeypatch.undo()
    assert "own" in mgr.session_ids()
    cont = turn([m.to_dict() for m in mgr.session("own").messages], "x", "y")
    nxt = mgr.chat(cont, max_new_tokens=N)
    assert nxt.session_id != "own" and nxt.created


def test_a_park_the_shared_pool_cannot_hold_drops_instead_of_failing(mt):
    from kvcompact.offload import PinnedPool

    model, tok = mt
    pool = PinnedPool(4096)  # far less than one session's KV
    mgr = SessionManager(model, tok, max_device_bytes=0, pool=pool)
    mgr.chat(conversation(0), session_id="a", max_new_tokens=N)
    r = mgr.chat(conversation(1), session_id="b", max_new_tokens=N)  # parking a cannot fit: a goes
    assert mgr.session_ids() == ["b"] and not mgr.session("b").parked
    st = mgr.stats()
    assert (st.sessions_dropped, st.parks, st.host_bytes, pool.used_bytes) == (1, 0, 0, 0)
    assert r.text == SessionManager(model, tok).chat(conversation(1), max_new_tokens=N).text


# ---------------------------------------------------------------------- reuse modes


def test_reuse_must_be_a_known_mode(mt):
    model, tok = mt
    for bad in ("prefixes", "", None, 1, "EDITS"):
        with pytest.raises(ValueError, match=r"reuse must be one of 'edits', 'prefix', 'none'"):
            SessionManager(model, tok, reuse=bad)
    assert SessionManager(model, tok).reuse == "edits"


def _hand_session(model, tok, *lists):
    """A Session driven by hand: sync each list, generate; the replies."""
    from kvcompact.agent import Session

    s = Session(model, tok)
    out = []
    for msgs in lists:
        s.sync(msgs)
        out.append(s.generate(N))
    s.close()
    return out


def _three_requests(mgr):
    """A first request, an append, then a drop of the early tool output (one conversation id)."""
    from kvcompact.agent.prefix import common_prefix

    msgs = conversation()
    r1 = mgr.chat(msgs, session_id="agent", max_new_tokens=N)
    appended = turn(msgs, r1.text)
    before_append = list(mgr.session("agent").token_ids) if mgr.reuse != "none" else None
    r2 = mgr.chat(appended, session_id="agent", max_new_tokens=N)
    dropped = turn(appended[:3] + appended[4:], r2.text, "Sure?")
    facts = {"before_append": before_append, "lists": (msgs, appended, dropped)}
    if mgr.reuse != "none":
        s = mgr.session("agent")
        start, end = s.spans[s.messages[3].id]
        facts["kept_rows"] = len(s.token_ids) - (end - start)
        facts["lcp"] = common_prefix(s.token_ids, s.renderer.render_ids(dropped))
        facts["tool_start"] = start
    r3 = mgr.chat(dropped, session_id="agent", max_new_tokens=N)
    return (r1, r2, r3), facts


def test_reuse_modes_cached_and_fed_counts_and_replies(mt):
    model, tok = mt
    runs = {mode: _three_requests(SessionManager(model, tok, reuse=mode)) for mode in ("edits", "prefix", "none")}
    prompts = {mode: [r.prompt_tokens for r in rs] for mode, (rs, _) in runs.items()}
    assert prompts["edits"][:2] == prompts["prefix"][:2] == prompts["none"][:2]  # the same renders

    (e1, e2, e3), ef = runs["edits"]
    (p1, p2, p3), pf = runs["prefix"]
    (n1, n2, n3), _ = runs["none"]
    # First request: nothing to reuse anywhere.
    assert e1.cached_tokens == p1.cached_tokens == n1.cached_tokens == 0
    # Append: both stateful modes reuse the whole previous context; stateless reuses nothing.
    assert e2.cached_tokens == len(ef["before_append"]) == p2.cached_tokens == len(pf["before_append"])
    assert e2.sync.tokens_fed == p2.sync.tokens_fed < n2.sync.tokens_fed
    render = SessionManager(model, tok)._renderer.render_ids  # a request's render, no generation prompt
    assert n2.cached_tokens == 0 and n2.sync.tokens_fed == len(render(ef["lists"][1]))
    # Drop of the early tool output: edits drops it in place and keeps (almost) every other row;
    # prefix keeps exactly the common token prefix (up to the dropped message) and recomputes the
    # rest; stateless recomputes everything.
    assert e3.sync.dropped == 1 and e3.cached_tokens >= 0.9 * ef["kept_rows"]
    assert e3.sync.tokens_fed < 20  # the new user message and the reply's markers only
    assert ef["tool_start"] <= pf["lcp"] < ef["tool_start"] + 8  # at most the tool's role header
    assert p3.cached_tokens == pf["lcp"] and p3.sync.tokens_fed == len(render(pf["lists"][2])) - pf["lcp"]
    assert p3.sync.tail_from == 3 and p3.sync.dropped == 1 and p3.sync.replaced == 0
    assert n3.cached_tokens == 0 and n3.sync.tokens_fed > p3.sync.tokens_fed > e3.sync.tokens_fed
    prefilled = {m: rs[2].prompt_tokens - rs[2].cached_tokens for m, (rs, _) in runs.items()}
    assert prefilled["edits"] < prefilled["prefix"] < prefilled["none"]

    # Replies: on the first request and the append every mode holds the same KV -> the same reply.
    assert e1.text == p1.text == n1.text and e2.text == p2.text == n2.text
    # After the drop, prefix and stateless hold a fresh prefill of the list (exact) -> equal; edits
    # keeps KV computed while the tool output was visible, so it equals a Session doing the same
    # syncs by hand (not necessarily a fresh prefill).
    assert p3.text == n3.text
    lists = ef["lists"]
    assert [e1.text, e2.text, e3.text] == _hand_session(model, tok, *lists)
    fresh = SessionManager(model, tok, reuse="none").chat(lists[2], max_new_tokens=N)
    assert p3.text == fresh.text


def test_prefix_mode_cache_equals_a_fresh_prefill_after_an_edit(mt):
    import torch

    model, tok = mt
    mgr = SessionManager(model, tok, reuse="prefix")
    msgs = conversation()
    r1 = mgr.chat(msgs, session_id="a", max_new_tokens=N)
    truncated = [dict(m) for m in turn(msgs, r1.text)]
    truncated[3]["content"] = truncated[3]["content"][:60] + "\n[... truncated ...]"
    mgr.chat(truncated, session_id="a", max_new_tokens=N)
    s = mgr.session("a")
    ref = SessionManager(model, tok, reuse="edits")
    ref.chat(truncated, session_id="b", max_new_tokens=N)  # the same list, fresh, and the same reply
    clean = ref.session("b")
    assert s.token_ids == clean.token_ids
    assert s.cache.get_seq_length() == len(s.token_ids)  # no in-place edit: logical == physical
    assert torch.allclose(s.next_token_logits(), clean.next_token_logits(), atol=1e-4)


def test_prefix_mode_id_less_requests_share_a_system_prompt_without_touching_each_other(mt):
    from kvcompact.agent.prefix import common_prefix

    model, tok = mt
    mgr = SessionManager(model, tok, reuse="prefix")
    a, b = conversation(1), conversation(2)
    ra = mgr.chat(a, max_new_tokens=N)
    held_a = mgr.session(ra.session_id).token_ids
    rb = mgr.chat(b, max_new_tokens=N)
    render = mgr._renderer
    shared = common_prefix(render.render_ids(a), render.render_ids(b))
    assert rb.created and rb.session_id != ra.session_id
    assert rb.cached_tokens == shared > len(render.render_ids(a[:1])) - 2  # the system prompt at least
    assert mgr.session(ra.session_id).token_ids == held_a  # the source was copied, not cut
    # An exact continuation without an id extends its session in place.
    rc = mgr.chat(turn(a, ra.text), max_new_tokens=N)
    assert rc.session_id == ra.session_id and not rc.created and rc.cached_tokens == len(held_a)
    assert rb.text == SessionManager(model, tok, reuse="none").chat(b, max_new_tokens=N).text


def test_stateless_mode_holds_no_session_after_a_request(mt):
    model, tok = mt
    mgr = SessionManager(model, tok, reuse="none")
    msgs = conversation()
    r1 = mgr.chat(msgs, session_id="agent", max_new_tokens=N)
    assert r1.created and r1.cached_tokens == 0
    assert mgr.session_ids() == [] and mgr.stats().sessions_live == 0 and mgr.stats().device_bytes == 0
    assert mgr.stats().peak_device_bytes > 0  # the request did hold KV while it ran
    r2 = mgr.chat(turn(msgs, r1.text), session_id="agent", max_new_tokens=N)
    r3 = mgr.chat(turn(msgs, r1.text), max_new_tokens=N)
    assert r2.created and r2.cached_tokens == 0 and r3.cached_tokens == 0 and r2.text == r3.text
    assert mgr.session_ids() == [] and mgr.stats().requests == 3
    assert mgr.stats().tokens_reused == 0
