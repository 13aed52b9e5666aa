"""``KVCompactCache(offload="layers")``: the same tokens as on-device storage, and honest accounting.

Tiny random Llama and Gemma-2-style hybrid (sliding + full layers) models; greedy generation over
two turns on one cache, lossless and 8-bit, with and without a budget.
"""

from __future__ import annotations

import pytest
import torch

from kvcompact import KVCompactCache
from kvcompact.cache import compat
from kvcompact.cache.layer import KVCompactLayer
from test_cache_park import _model, _prompt


def _two_turns(arch, **cache_kwargs):
    model = _model(arch)
    cache = KVCompactCache(model.config, **cache_kwargs)
    kw = dict(do_sample=False, pad_token_id=0)
    out = model.generate(_prompt(40), **compat.cache_kwargs(cache), max_new_tokens=12, **kw)
    more = torch.cat([out, _prompt(9, seed=2)], dim=1)
    out = model.generate(more, **compat.cache_kwargs(cache), max_new_tokens=12, **kw)
    return out, cache


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
def test_layers_offload_generates_the_same_tokens(arch, kv_dtype):
    want, _ = _two_turns(arch, kv_dtype=kv_dtype)
    got, cache = _two_turns(arch, kv_dtype=kv_dtype, offload="layers")
    assert torch.equal(got, want)
    assert cache.get_seq_length() == got.shape[1] - 1


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_layers_offload_with_a_budget_generates_the_same_tokens(kv_dtype):
    want, ref = _two_turns("llama", kv_dtype=kv_dtype, budget=24)
    got, cache = _two_turns("llama", kv_dtype=kv_dtype, budget=24, offload="layers")
    assert torch.equal(got, want)
    assert cache.stats().physical_tokens == ref.stats().physical_tokens


def _deep_llama(layers=6):
    import transformers

    from test_cache_park import _COMMON

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**_COMMON, "num_hidden_layers": layers})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_layers_offload_device_holds_at_most_two_layers(kv_dtype):
    model = _deep_llama(6)
    ref = KVCompactCache(model.config, kv_dtype=kv_dtype)
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype, offload="layers")
    seen = []
    hooks = [m.register_forward_hook(lambda *_: seen.append(cache.stats().device_bytes))
             for name, m in model.named_modules() if name.endswith("self_attn")]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    try:
        got = model.generate(_prompt(150), **compat.cache_kwargs(cache), **kw)
    finally:
        for h in hooks:
            h.remove()
    want = model.generate(_prompt(150), **compat.cache_kwargs(ref), **kw)
    assert torch.equal(got, want)
    per_layer = max(l.storage.nbytes for l in ref.layers)
    total = sum(l.storage.nbytes for l in ref.layers)
    assert len(seen) == 6 * 6  # every attention layer of every step was observed
    assert 0 < max(seen) <= 2 * per_layer < total  # the two slots, never the whole cache
    s = cache.stats()
    assert s.host_bytes >= total  # every layer's storage is on the host
    assert s.host_bytes == cache.pool.capacity_bytes  # the cache's own pool, counted whole
