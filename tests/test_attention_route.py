"""``attach(model, cache, attention=True)``: decode steps read the cache's storage with ``decode_attention``.

The routed path must give the tokens of the workspace path (the model's own attention over the
dequantized view) in every generation mode it takes part in, must really run (the op is counted),
must leave the dequantization workspace untouched, and must hand every other forward (long chunks,
evicting steps, padded batches, other caches) to the model's own attention unchanged.
"""

from __future__ import annotations

import pytest
import torch

import kvcompact
from kvcompact import ops
from kvcompact.cache.compat import cache_kwargs
from kvcompact.cache.attention import SUPPORTED_IMPLEMENTATIONS

from _tiny_models import VOCAB, tiny_model

STORAGE = [(None, 0), ("int8", 0), ("fp8_e4m3", 0), ("fp8_e5m2", 0), ("int8", 4), ("fp8_e4m3", 8)]
ARCHS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral_window", "sdpa"), ("gemma2", "eager")]


@pytest.fixture
def op_calls(monkeypatch):
    """Counts decode_attention calls (the routed path's only way to attend)."""
    calls = []
    real = ops.decode_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "decode_attention", counting)
    return calls


def _prompt(n, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=gen)


def _generate(model, ids, cache, attention, **kw):
    with kvcompact.attach(model, cache, attention=attention):
        return model.generate(ids, **cache_kwargs(cache), do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,attn", ARCHS)
@pytest.mark.parametrize("kv_dtype,residual", STORAGE)
def test_greedy_equals_workspace_path(arch, attn, kv_dtype, residual, op_calls):
    model = tiny_model(arch, attn=attn)
    ids = _prompt(45)  # longer than MAX_DEFERRED_QUERIES: the prefill keeps the model's attention
    new = 30  # past mistral_window's and gemma2's windows
    ref = _generate(model, ids, kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype, residual=residual),
                    attention=False, max_new_tokens=new)
    assert not op_calls
    cache = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype, residual=residual)
    got = _generate(model, ids, cache, attention=True, max_new_tokens=new)
    _assert_same(ref, got)
    layers = len(cache.layers)
    assert len(op_calls) >= (new - 1) * layers  # every decode step of every layer read storage
    assert set(op_calls) == {1}
    assert cache.stats().workspace_bytes == 0
    assert model.config._attn_implementation == attn  # restored on exit


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_no_workspace_and_the_old_path_has_one(kv_dtype):
    model = tiny_model("llama")
    ids = _prompt(60)
    routed = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype)
    _generate(model, ids, routed, attention=None, max_new_tokens=8)  # None: on for quantized storage
    assert routed.stats().workspace_bytes == 0
    plain = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype)
    _generate(model, ids, plain, attention=False, max_new_tokens=8)
    assert plain.stats().workspace_bytes > 0


def test_default_is_off_for_lossless(op_calls):
    model = tiny_model("llama")
    _generate(model, _prompt(10), kvcompact.KVCompactCache(model.config), attention=None, max_new_tokens=4)
    assert not op_calls


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("policy", ["streaming", "snapkv", "h2o"])
def test_budget_eviction_steps_fall_back(kv_dtype, policy, op_calls):
    model = tiny_model("llama")
    ids = _prompt(70)
    ref = _generate(model, ids, kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype, budget=48, policy=policy),
                    attention=False, max_new_tokens=30)
    op_calls.clear()
    cache = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype, budget=48, policy=policy)
    got = _generate(model, ids, cache, attention=True, max_new_tokens=30)
    _assert_same(ref, got)
    assert op_calls  # steps between evictions were routed
    assert max(cache.stats().physical_tokens) <= 48 + cache.slack


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_second_turn_short_and_long(kv_dtype, op_calls):
    model = tiny_model("qwen2")
    first, short, long = _prompt(40, seed=1), _prompt(6, seed=2), _prompt(50, seed=3)
    outs = []
    for attention in (False, True):
        cache = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype)
        a = _generate(model, first, cache, attention, max_new_tokens=5).sequences
        b = _generate(model, torch.cat([a, short], 1), cache, attention, max_new_tokens=5).sequences
        c = _generate(model, torch.cat([b, long], 1), cache, attention, max_new_tokens=5).sequences
        outs.append(c)
    assert torch.equal(outs[0], outs[1])
    # The short turn (its 6 tokens + the last reply token) is routed, the 50-token one is not.
    assert 7 in op_calls and max(op_calls) <= 32


def test_assisted_and_prompt_lookup(op_calls):
    model, assistant = tiny_model("llama"), tiny_model("assistant")
    ids = _prompt(40)
    for extra in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=4)):
        ref = _generate(model, ids, kvcompact.KVCompactCache(model.config, kv_dtype="int8"), False,
                        max_new_tokens=20, **extra)
        op_calls.clear()
        got = _generate(model, ids, kvcompact.KVCompactCache(model.config, kv_dtype="int8"), True,
                        max_new_tokens=20, **extra)
        assert torch.equal(ref.sequences, got.sequences)
        assert any(q > 1 for q in op_calls), extra  # candidate chunks were routed


def test_batches(op_calls):
    model = tiny_model("llama")
    ids = _prompt(40, batch=2)
    ref = _generate(model, ids, kvcompact.KVCompactCache(model.config, kv_dtype="int8"), False, max_new_tokens=6)
    # Undeclared padding: the model's attention (with its mask) runs; declared unpadded: routed.
    undeclared = _generate(model, ids, kvcompact.KVCompactCache(model.config, kv_dtype="int8"), True,
                           max_new_tokens=6)
    assert not op_calls
    cache = kvcompact.KVCompactCache(model.config, kv_dtype="int8")
    cache.note_attention_mask(torch.ones_like(ids))
    declared = _generate(model, ids, cache, True, max_new_tokens=6)
    assert op_calls
    assert torch.equal(ref.sequences, undeclared.sequences) and torch.equal(ref.sequences, declared.sequences)


def test_other_caches_pass_through(op_calls):
    model = tiny_model("llama")
    cache = kvcompact.KVCompactCache(model.config, kv_dtype="int8")
    ids = _prompt(12)
    with kvcompact.attach(model, cache, attention=True):
        other = model(ids, **cache_kwargs(kvcompact.KVCompactCache(model.config, kv_dtype="int8"))).logits
        none = model(ids, use_cache=False).logits
    assert not op_calls
    torch.testing.assert_close(other, none, atol=1e-5, rtol=1e-5)


def test_refusals():
    model = tiny_model("llama")
    cache = kvcompact.KVCompactCache(model.config, kv_dtype="int8")
    with pytest.raises(ValueError, match="`attention` must be"):
        with kvcompact.attach(model, cache, attention="yes"):
            pass
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="needs a KVCompactCache"):
        with kvcompact.attach(model, DynamicCache(), attention=True):
            pass
    original = model.config._attn_implementation
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="cannot route"):
            with kvcompact.attach(model, cache, attention=True):
                pass
    finally:
        model.config._attn_implementation = original
    assert original in SUPPORTED_IMPLEMENTATIONS


def test_restored_after_an_exception():
    model = tiny_model("llama")
    cache = kvcompact.KVCompactCache(model.config, kv_dtype="int8")
    with pytest.raises(RuntimeError, match="boom"):
        with kvcompact.attach(model, cache, attention=True):
            model(_prompt(5), **cache_kwargs(cache))
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not cache._attention_route
    assert all(getattr(layer, "_pending", None) is None for layer in cache.layers)
    # The cache is still usable outside attach.
    model(_prompt(3), **cache_kwargs(cache))
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("kv_dtype", [None, "fp8_e4m3", "int8"])
def test_real_model_greedy(smollm, kv_dtype, op_calls):
    model, tokenizer = smollm
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "List three uses of a hash map."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    ref = _generate(model, ids, kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype), False, max_new_tokens=24)
    cache = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype)
    got = _generate(model, ids, cache, True, max_new_tokens=24)
    assert torch.equal(ref.sequences, got.sequences)
    assert len(op_calls) >= 23 * model.config.num_hidden_layers
    assert cache.stats().workspace_bytes == 0
