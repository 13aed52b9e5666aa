"""Session on the real embedded model: drop without re-prefill, checkpoints, incremental rendering,
PrefixCache, spawn, parking, repositioned drop and replace (positions and exactness)."""

from pathlib import Path

import pytest
import torch

from agent_fixtures import FedCounter, smollm2_model
from kvcompact.agent import CheckpointError, PrefixCache, PrefixChangedError, Session, SessionError
from kvcompact.cache import KVCompactCache

pytestmark = pytest.mark.slow

GPL = Path("/usr/share/common-licenses/GPL-3")
SYSTEM = "You are a careful coding agent. Answer briefly."


@pytest.fixture(scope="module")
def mt():
    return smollm2_model()


def tool_text(tokenizer, n_tokens):
    ids = tokenizer(GPL.read_text(), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def layer_kv(cache):
    return [(l.keys.clone(), l.values.clone()) for l in cache.layers]


def fresh(model, tokenizer, messages, **kw):
    s = Session(model, tokenizer, **kw)
    for m in messages:
        s.add_message(m)
    s.prefill()
    return s


def test_drop_long_tool_message_no_reprefill(mt):
    """Acceptance 1 (+3): a ~1,500-token tool message leaves the cache; the next turn feeds only new tokens."""
    model, tok = mt
    s = Session(model, tok)
    s.add("system", SYSTEM)
    s.add("user", "Read the license file.")
    s.generate(max_new_tokens=3)
    tool = s.add("tool", tool_text(tok, 1500), name="read_file")
    s.add("user", "Summarize it in one line.")
    s.prefill()
    assert s.token_ids == s.renderer.render_ids(s.messages)  # incremental == full render (tool, multi-turn)
    start, end = s.spans[tool]
    span = end - start
    assert span >= 1400
    before = s.cache.stats().physical_tokens[0]

    s.drop(tool)
    after = s.cache.stats().physical_tokens
    assert all(p == before - span for p in after)  # >= 90% of the span gone (here: all of it)
    assert before - after[0] >= 0.9 * span
    assert tool not in s.spans and all(m.id != tool for m in s.messages)
    # ChatML renders messages independently: the cache equals the render of the remaining messages
    assert s.token_ids == s.renderer.render_ids(s.messages)

    held = len(s.token_ids)
    counter = FedCounter(model)
    try:
        s.add("user", "Thanks. Next question: what is 3 + 4?")
        s.generate(max_new_tokens=4)
    finally:
        counter.close()
    new_tokens = len(s.token_ids) - held
    assert counter.count == new_tokens < 60  # only the new message, the prompt and the reply
    assert s.token_ids == s.renderer.render_ids(s.messages)
    spans = list(s.spans.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_incremental_render_with_tool_after_generation_prompt(mt):
    """Acceptance 3: a tool message arriving after a generation prompt retracts it; ids stay canonical."""
    model, tok = mt
    s = Session(model, tok)
    s.add("system", SYSTEM)
    s.add("user", "List the files.")
    s.next_token_logits()  # generation prompt now in the cache
    s.add("assistant", "Calling ls.")
    s.add("tool", "a.py\nb.py", name="ls")
    s.add("tool", "ok", tool_call_id="call_2")
    s.add("user", "And now?")
    s.prefill()
    assert s.token_ids == s.renderer.render_ids(s.messages)
    assert s.cache.get_seq_length() == len(s.token_ids)


def test_save_load_same_greedy_tokens_and_corruption(mt, tmp_path):
    """Acceptance 2: a loaded session continues with the same 10 greedy tokens; a flipped byte raises."""
    model, tok = mt
    s = Session(model, tok, KVCompactCache(model.config, kv_dtype="int8"))
    s.add("system", SYSTEM)
    s.add("user", "Name a prime number.")
    s.generate(max_new_tokens=3)
    gap = s.add("tool", "irrelevant output " * 20, name="noise")
    s.prefill()
    s.drop(gap, reposition=False)  # a tombstone and a position gap must survive the round trip
    s.add("user", "Another one, please.")
    path = tmp_path / "ckpt"
    s.save(path)
    s2 = Session.load(path, model, tok)
    assert s2.spans == s.spans and [m.id for m in s2.messages] == [m.id for m in s.messages]
    assert s2.cache.get_seq_length() == s.cache.get_seq_length()
    a = s.generate(max_new_tokens=10)
    b = s2.generate(max_new_tokens=10)
    assert a == b and s.token_ids == s2.token_ids

    files = sorted(p for p in path.iterdir() if p.is_file())
    assert len(files) >= 3
    for f in files:
        data = bytearray(f.read_bytes())
        i = len(data) // 2
        data[i] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            Session.load(path, model, tok)
        data[i] ^= 0x01
        f.write_bytes(bytes(data))
    Session.load(path, model, tok)  # restored bytes load again


def test_prefix_cache_same_logits_no_prefix_compute(mt):
    """Acceptance 4."""
    model, tok = mt
    tools_text = SYSTEM + "\nTools: read_file(path), ls(dir), run(cmd)."
    prefix = PrefixCache(model, tok, tools_text)
    counter = FedCounter(model)
    try:
        s = prefix.session(tools_text)
        s.add("user", "What tools do you have?")
        logits = s.next_token_logits()
    finally:
        counter.close()
    assert counter.count == len(s.token_ids) - len(prefix.token_ids)  # no prefix token computed
    ref = Session(model, tok)
    ref.add("system", tools_text)
    ref.add("user", "What tools do you have?")
    ref_logits = ref.next_token_logits()
    assert ref.token_ids == s.token_ids
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=0), (logits - ref_logits).abs().max()
    # the prefix itself is untouched by the session's growth
    assert prefix.stats.physical_tokens[0] == len(prefix.token_ids)
    with pytest.raises(PrefixChangedError, match="prefix changed"):
        prefix.session(tools_text + " Time: 12:01")
    # a sub-agent of a prefix session starts from a copy of the prefix too: no prefix token fed
    counter = FedCounter(model)
    try:
        s.spawn("Say hi.", max_new_tokens=2)
    finally:
        counter.close()
    assert counter.count < 25 and s.last_spawn.child_device_bytes_after_free == 0


def test_spawn_frees_child_and_keeps_parent(mt):
    """Acceptance 5."""
    model, tok = mt
    s = Session(model, tok)
    s.add("system", SYSTEM)
    s.add("user", "We will delegate a subtask.")
    s.prefill()
    kv = layer_kv(s.cache)
    stats = s.cache.stats()
    answer = s.spawn("Say hello.", max_new_tokens=4)
    rec = s.last_spawn
    assert rec.answer == answer and rec.child_device_bytes > 0
    assert rec.child_device_bytes_after_free == 0 and rec.child_cache_collected
    assert s.cache.stats() == stats
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kv, layer_kv(s.cache)))
    assert s.messages[-1].role == "tool" and s.messages[-1].content == answer
    assert rec.child_messages[0].content == SYSTEM  # the child started from the shared prefix


def test_park_resume_roundtrip(mt):
    model, tok = mt
    s = Session(model, tok)
    s.add("user", "Hello there.")
    s.prefill()
    kv = layer_kv(s.cache)
    nbytes = s.park()
    assert nbytes > 0 and s.parked and s.cache.stats().device_bytes == 0
    with pytest.raises(SessionError, match="parked"):
        s.generate(max_new_tokens=1)
    s.resume()
    assert not s.parked
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kv, layer_kv(s.cache)))


def _conversation(s, tok):
    s.add("system", SYSTEM)
    s.add("user", "Look at this file.")
    mid = s.add("tool", tool_text(tok, 200), name="read_file")
    s.add("user", "What is the first word of it?")
    s.prefill()
    return mid


def test_drop_reposition_positions_and_logits(mt):
    """Acceptance 6: positions after a repositioned drop equal a fresh prefill's."""
    model, tok = mt
    s = Session(model, tok)
    mid = _conversation(s, tok)
    start, end = s.spans[mid]
    s.drop(mid, reposition=True)
    ref = fresh(model, tok, s.messages)
    assert s.token_ids == ref.token_ids
    assert s.cache.get_seq_length() == ref.cache.get_seq_length() == len(s.token_ids)
    assert s.positions() == list(range(len(s.token_ids)))
    ours, theirs = layer_kv(s.cache), layer_kv(ref.cache)
    # Tokens before the span are untouched in every layer.
    for (k, v), (rk, rv) in zip(ours, theirs):
        assert torch.equal(k[:, :, :start], rk[:, :, :start]) and torch.equal(v[:, :, :start], rv[:, :, :start])
    # Layer 0's K/V depend only on token and position: re-rotated keys equal the fresh ones.
    k0, v0 = ours[0]
    rk0, rv0 = theirs[0]
    assert torch.equal(v0, rv0)
    diff = (k0 - rk0).abs().max().item()
    assert diff < 1e-3 * rk0.abs().max().item(), diff

    # Dropping the newest message (nothing after it) is exact at the logits level.
    # (A middle drop cannot be: the tokens after the span were computed attending to it.)
    t = fresh(model, tok, s.messages)
    last = t.add("tool", "temporary output " * 10, name="tmp")
    t.prefill()
    t.drop(last, reposition=True)
    a, b = t.next_token_logits(), ref.next_token_logits()
    assert t.token_ids == ref.token_ids
    assert torch.allclose(a, b, atol=1e-3, rtol=0), (a - b).abs().max()

    # Without reposition the gap stays: same physical tokens, later positions unchanged.
    g = Session(model, tok)
    mid = _conversation(g, tok)
    gs, ge = g.spans[mid]
    logical = g.cache.get_seq_length()
    g.drop(mid, reposition=False)
    assert g.cache.get_seq_length() == logical
    assert g.positions()[gs] == ge  # the first token after the gap kept its position


@pytest.mark.parametrize("new_text", ["(output elided: 200 lines of license text)",
                                      "The file begins: " + "GNU GENERAL PUBLIC LICENSE, version 3. " * 12])
def test_replace_splices_exact_prefix_and_positions(mt, new_text):
    """replace: the new message's KV equals a fresh prefill's; later keys re-rotated to fresh positions."""
    model, tok = mt
    s = Session(model, tok)
    mid = _conversation(s, tok)
    old_start, old_end = s.spans[mid]
    old_n, new_n = s.replace(mid, new_text)
    start, end = s.spans[mid]
    assert (start, old_n) == (old_start, old_end - old_start) and end - start == new_n
    ref = fresh(model, tok, s.messages)
    assert s.token_ids == ref.token_ids
    assert s.cache.get_seq_length() == ref.cache.get_seq_length()
    ours, theirs = layer_kv(s.cache), layer_kv(ref.cache)
    worst = 0.0
    for (k, v), (rk, rv) in zip(ours, theirs):  # everything up to the end of the new text: recomputed
        worst = max(worst, (k[:, :, :end] - rk[:, :, :end]).abs().max().item(),
                    (v[:, :, :end] - rv[:, :, :end]).abs().max().item())
    assert worst < 1e-3, worst
    k0, rk0 = ours[0][0], theirs[0][0]
    assert (k0 - rk0).abs().max().item() < 1e-3 * rk0.abs().max().item()
    assert torch.equal(ours[0][1], theirs[0][1])
    # the session keeps working after the splice
    s.add("user", "ok")
    s.prefill()
    assert s.token_ids == s.renderer.render_ids(s.messages)


def test_session_refuses_budget_cache(mt):
    model, tok = mt
    with pytest.raises(ValueError, match="budget"):
        Session(model, tok, KVCompactCache(model.config, budget=64))


def test_recompute_tail_is_exact(mt):
    """drop/replace with recompute_tail equal a re-prefill of the edited conversation."""
    model, tok = mt
    s = Session(model, tok)
    mid = _conversation(s, tok)
    s.replace(mid, "(elided)", recompute_tail=True)
    ref = fresh(model, tok, s.messages)
    assert s.token_ids == ref.token_ids and s.cache.get_seq_length() == ref.cache.get_seq_length()
    a, b = s.next_token_logits(), ref.next_token_logits()
    assert torch.allclose(a, b, atol=1e-3, rtol=0), (a - b).abs().max()
    s.drop(mid, reposition=True, recompute_tail=True)
    ref = fresh(model, tok, s.messages)
    a, b = s.next_token_logits(), ref.next_token_logits()
    assert s.token_ids == ref.token_ids
    assert torch.allclose(a, b, atol=1e-3, rtol=0), (a - b).abs().max()


def test_failed_save_keeps_previous_checkpoint(mt, tmp_path, monkeypatch):
    """A save that dies mid-write (here: the second tensor file fails) leaves the last checkpoint loadable."""
    from kvcompact.agent import checkpoint

    model, tok = mt
    s = Session(model, tok)
    s.add("user", "First turn.")
    s.prefill()
    path = tmp_path / "ckpt"
    s.save(path)
    s.add("user", "Second turn, never saved.")
    s.prefill()
    real, calls = checkpoint._save_file, []

    def failing(tensors, p):
        calls.append(p)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, p)

    monkeypatch.setattr(checkpoint, "_save_file", failing)
    with pytest.raises(OSError):
        s.save(path)
    monkeypatch.undo()
    back = Session.load(path, model, tok)
    assert [m.content for m in back.messages] == ["First turn."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left


def test_quantized_cache_reposition_and_replace(mt):
    """int8 storage: re-rotation goes through rope_shift_quantized_; positions still match a fresh prefill."""
    model, tok = mt
    s = Session(model, tok, KVCompactCache(model.config, kv_dtype="int8"))
    mid = _conversation(s, tok)
    s.drop(mid, reposition=True)
    ref = fresh(model, tok, s.messages, cache=KVCompactCache(model.config, kv_dtype="int8"))
    assert s.token_ids == ref.token_ids and s.cache.get_seq_length() == ref.cache.get_seq_length()
    k0, rk0 = layer_kv(s.cache)[0][0], layer_kv(ref.cache)[0][0]
    # requantized after rotation: within a few int8 steps of the per-token-head scale
    assert (k0 - rk0).abs().max().item() < 3e-2 * rk0.abs().max().item()
    q = s.add("user", "Which license is it?")
    s.prefill()
    s.replace(q, "Which version of the license is it?")
    s.generate(max_new_tokens=2)
    assert s.token_ids == s.renderer.render_ids(s.messages)
