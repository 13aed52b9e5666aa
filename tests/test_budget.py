"""Token budgets end to end with the real kernels (issue 6 acceptance 2-4).

* decode-time budget holds within budget + slack while logical_tokens counts everything;
* a budget larger than the sequence changes nothing (positions stay right);
* prefill compaction at 50% really frees device memory, per-head selection included;
* snapkv keeps the pass key on the real embedded model, with and without fp8 storage.
"""

import os
import sys

import pytest
import torch

import kvcompact
from kvcompact.cache import compat
from kvcompact.policies import get_policy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

POLICIES = ["streaming", "knorm", "snapkv", "h2o", "tova", "random"]


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def generate(model, cache, ids, n):
    with kvcompact.attach(model, cache):
        return model.generate(ids, attention_mask=torch.ones_like(ids), **compat.cache_kwargs(cache),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("kv_dtype", [None, "fp8_e4m3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_decode_budget_holds_and_counts_every_token(tiny_llama, policy, kv_dtype):
    budget = 256
    cache = kvcompact.KVCompactCache(tiny_llama.config, kv_dtype=kv_dtype, budget=budget, policy=policy)
    assert 0 < cache.slack <= budget // 4
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    seen = []

    # Watch every step, not just the end: a step that overshoots would hide behind the last eviction.
    def watch(module, args, kwargs, output):
        seen.append(max(cache.stats().physical_tokens))

    handle = tiny_llama.register_forward_hook(watch, with_kwargs=True)
    try:
        out = generate(tiny_llama, cache, ids, 300)
    finally:
        handle.remove()
    assert out.shape[1] == 340
    assert max(seen) <= budget + cache.slack
    assert cache.stats().logical_tokens == 339  # the last sampled token is never fed
    assert min(cache.stats().physical_tokens) >= budget


@pytest.mark.parametrize("kv_dtype", [None, "fp8_e4m3"])
def test_budget_larger_than_sequence_equals_lossless(tiny_llama, kv_dtype):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    plain = generate(tiny_llama, kvcompact.KVCompactCache(tiny_llama.config, kv_dtype=kv_dtype), ids, 120)
    budgeted = generate(
        tiny_llama, kvcompact.KVCompactCache(tiny_llama.config, kv_dtype=kv_dtype, budget=1000, policy="snapkv"),
        ids, 120)
    assert torch.equal(plain, budgeted)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("policy", ["snapkv", "knorm"])
def test_prefill_compaction_frees_memory(tiny_llama, policy, kv_dtype):
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(3))
    full = kvcompact.KVCompactCache(tiny_llama.config, kv_dtype=kv_dtype)
    half = kvcompact.KVCompactCache(tiny_llama.config, kv_dtype=kv_dtype, budget=512, policy=policy)
    with torch.no_grad():
        tiny_llama(ids, **compat.cache_kwargs(full), use_cache=True)
        with kvcompact.attach(tiny_llama, half):
            tiny_llama(ids, **compat.cache_kwargs(half), use_cache=True)
    assert half.stats().physical_tokens == [512, 512]
    assert half.stats().logical_tokens == 1024
    # snapkv and knorm select per head: the saving holds with head-wise eviction.
    assert half.stats().device_bytes <= 0.55 * full.stats().device_bytes


@pytest.mark.slow
def test_snapkv_keeps_the_pass_key_on_the_real_model():
    quality = pytest.importorskip("quality")
    from kvcompact.models import load_default

    model, tokenizer = load_default()
    trials = 8
    prompts = quality.passkey_prompts(tokenizer, trials, 900)
    assert all(850 <= ids.shape[1] <= 900 for ids, _ in prompts)

    def hits(kv_dtype, budget_frac):
        total = 0
        for ids, key in prompts:
            kw = {"kv_dtype": kv_dtype}
            if budget_frac is not None:
                kw.update(budget=int(ids.shape[1] * budget_frac), policy=get_policy("snapkv"))
            cache = kvcompact.KVCompactCache(model.config, **kw)
            total += quality.passkey_hit(model, tokenizer, cache, ids, key)
        return total

    dense = hits(None, None)
    assert dense >= 6, f"dense model found the key {dense}/8: the prompt itself is broken"
    for kv_dtype in (None, "fp8_e4m3"):
        got = hits(kv_dtype, 0.5)
        assert got >= dense - 1, f"snapkv at 50% ({kv_dtype}): {got}/8 vs dense {dense}/8"
