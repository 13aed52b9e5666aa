"""A forward that raises never leaves a Session believing its cache holds other tokens than it does
(defect 6): a failed ``replace`` restores cache and session exactly and re-raises the original
error; a failed feed (prefill chunk, decode step) crops the cache back to ``token_ids`` or, when the
forward stopped between layers, marks the session unusable.

Tiny random Llama models with the real SmolLM2 tokenizer; faults are injected by wrapping the
model's (or one decoder layer's) ``forward``, or by a token id past the model's vocabulary.
"""

from __future__ import annotations

import pytest
import torch

import kvcompact
from agent_fixtures import smollm2_tokenizer, tiny_llama
from kvcompact.agent import Session, SessionError

BAD_TEXT = "see xylophone"  # SmolLM2 encodes " xyl" as 45749, past SMALL_VOCAB
SMALL_VOCAB = 45_000


@pytest.fixture(scope="module")
def mt():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


class Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch, module, n, exc, *, after=False):
    """Make ``module.forward`` raise ``exc`` on its ``n``-th call from now (``after``: once it ran)."""
    real, calls = module.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and not after:
            raise exc
        out = real(*args, **kwargs)
        if len(calls) == n:
            raise exc
        return out

    monkeypatch.setattr(module, "forward", forward)
    return calls


def _session(model, tok, kv_dtype=None, **kw):
    s = Session(model, tok, kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype), **kw)
    s.add("system", "You are a fault-injection test.")
    s.add("user", "Say something.")
    s.generate(max_new_tokens=5)
    tool = s.add("tool", "tool output line\n" * 12, name="probe")
    s.add("user", "And now summarize the tool output.")
    s.prefill()
    return s, tool


def _bytes(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


def _state(s):
    tensors, layers = s.cache.export_state()
    return ({k: _bytes(v).clone() for k, v in tensors.items()}, layers, s.token_ids, dict(s.spans), s.positions(),
            [(m.id, m.role, m.content) for m in s.messages], s.cache.get_seq_length())


def _assert_same_state(a, b):
    ta, la, *rest_a = a
    tb, lb, *rest_b = b
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]), k
    assert la == lb
    assert rest_a == rest_b


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("exc", [Boom("CUDA out of memory (simulated)"), KeyboardInterrupt()],
                         ids=["oom", "interrupt"])
@pytest.mark.parametrize("fail_call", [1, 2], ids=["first_chunk", "second_chunk"])
def test_failed_replace_restores_everything_and_raises_the_original(mt, monkeypatch, kv_dtype, exc, fail_call):
    model, tok = mt
    s, tool = _session(model, tok, kv_dtype, prefill_chunk=8)
    twin, _ = _session(model, tok, kv_dtype, prefill_chunk=8)
    before = _state(s)
    _fail_on_call(monkeypatch, model, fail_call, exc, after=True)  # the chunk's KV is written, then it raises
    with pytest.raises(type(exc)) as err:
        s.replace(tool, "a much longer replacement text, written so it needs several chunks " * 2)
    monkeypatch.undo()
    assert err.value is exc  # the original exception, not a RuntimeError from the rollback
    _assert_same_state(before, _state(s))
    a = s.generate(max_new_tokens=8)
    b = twin.generate(max_new_tokens=8)
    assert a == b and s.token_ids == twin.token_ids
    assert s.token_ids == s.renderer.render_ids(s.messages)


def test_failed_replace_between_layers_rolls_back(mt, monkeypatch):
    """The forward dies inside decoder layer 1: layer 0 already wrote the new rows."""
    model, tok = mt
    s, tool = _session(model, tok)
    twin, _ = _session(model, tok)
    before = _state(s)
    _fail_on_call(monkeypatch, model.model.layers[1], 1, Boom("layer 1 failed"))
    with pytest.raises(Boom, match="layer 1 failed"):
        s.replace(tool, "(elided)")
    monkeypatch.undo()
    _assert_same_state(before, _state(s))
    assert s.generate(max_new_tokens=6) == twin.generate(max_new_tokens=6)


def test_replace_with_a_token_id_past_the_vocabulary(monkeypatch):
    """A text whose tokens the model does not have: the embedding's IndexError comes out unmasked."""
    tok = smollm2_tokenizer()
    model = tiny_llama(SMALL_VOCAB)
    assert max(tok(BAD_TEXT, add_special_tokens=False)["input_ids"]) >= SMALL_VOCAB
    s, tool = _session(model, tok)
    assert max(s.token_ids) < SMALL_VOCAB
    twin, _ = _session(model, tok)
    before = _state(s)
    with pytest.raises(IndexError, match="index out of range"):
        s.replace(tool, BAD_TEXT)
    _assert_same_state(before, _state(s))
    assert s.generate(max_new_tokens=6) == twin.generate(max_new_tokens=6)
    assert s.token_ids == twin.token_ids


@pytest.mark.parametrize("after", [False, True], ids=["before_any_layer", "after_every_layer"])
def test_failed_prefill_chunk_is_cropped_back(mt, monkeypatch, after):
    """Prefill in chunks of 8; the 3rd chunk fails. The 2 chunks that completed stay, the cache holds
    exactly token_ids, and the next call feeds the rest: same logits as a session that never failed."""
    model, tok = mt
    s = Session(model, tok, prefill_chunk=8)
    s.add("system", "You are a fault-injection test.")
    s.add("user", "word " * 40)
    _fail_on_call(monkeypatch, model, 3, KeyboardInterrupt(), after=after)
    with pytest.raises(KeyboardInterrupt):
        s.prefill()
    monkeypatch.undo()
    assert len(s.token_ids) == 16
    assert s.cache.get_seq_length() == s.cache.physical_length == 16
    assert s.token_ids == s.renderer.render_ids(s.messages)[:16]
    logits = s.next_token_logits()
    ref = Session(model, tok, prefill_chunk=8)
    for m in s.messages:
        ref.add_message(m)
    ref_logits = ref.next_token_logits()
    assert s.token_ids == ref.token_ids
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)


def test_failed_decode_step_keeps_cache_and_ids_in_step(mt, monkeypatch):
    model, tok = mt
    s, _ = _session(model, tok)
    s.add("user", "Go on.")
    # prefill, 2 decode steps, then one whose forward wrote every layer before raising (a Ctrl-C in
    # the logits, say): that token must not stay in the cache unaccounted for.
    _fail_on_call(monkeypatch, model, 4, Boom("decode step failed"), after=True)
    with pytest.raises(Boom, match="decode step failed"):
        s.generate(max_new_tokens=10)
    monkeypatch.undo()
    assert s.cache.physical_length == s.cache.get_seq_length() == len(s.token_ids)
    s.add("user", "Once more.")
    s.generate(max_new_tokens=4)
    assert s.token_ids == s.renderer.render_ids(s.messages)
    assert s.cache.physical_length == len(s.token_ids)


def test_feed_stopped_between_layers_marks_the_session_unusable(mt, monkeypatch):
    model, tok = mt
    s, _ = _session(model, tok)
    s.add("user", "One more message.")
    _fail_on_call(monkeypatch, model.model.layers[1], 1, Boom("layer 1 failed"))
    with pytest.raises(Boom, match="layer 1 failed"):
        s.prefill()
    monkeypatch.undo()
    for call in (s.prefill, lambda: s.generate(max_new_tokens=2), s.next_token_logits):
        with pytest.raises(SessionError, match="unusable.*Boom: layer 1 failed"):
            call()
    with pytest.raises(SessionError, match="unusable"):
        s.drop(next(iter(s.spans)))
    s.close()  # still possible: frees the buffers
    assert s.cache is None


def test_failed_recompute_tail_keeps_the_replacement_and_refeeds_later(mt, monkeypatch):
    """replace(recompute_tail=True): the splice succeeded, the tail's re-feed fails. The replacement
    stands, the cache holds exactly token_ids, and the next call re-feeds the tail."""
    model, tok = mt
    s, tool = _session(model, tok)
    _fail_on_call(monkeypatch, model, 2, Boom("tail feed failed"))  # 1: the splice, 2: the tail
    with pytest.raises(Boom):
        s.replace(tool, "(elided)", recompute_tail=True)
    monkeypatch.undo()
    assert any(m.content == "(elided)" for m in s.messages)
    assert s.cache.physical_length == len(s.token_ids) < len(s.renderer.render_ids(s.messages))
    s.prefill()
    assert s.token_ids == s.renderer.render_ids(s.messages)
    ref = Session(model, tok)
    for m in s.messages:
        ref.add_message(m)
    assert torch.allclose(s.next_token_logits(), ref.next_token_logits(), atol=1e-4, rtol=0)
