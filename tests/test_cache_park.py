"""``KVCompactCache`` parking: ``offload="idle"``, ``park()`` / ``resume()``, host/device accounting,
and every misuse failing loudly without losing the cache."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvcompact import KVCompactCache
from kvcompact.cache import compat
from kvcompact.offload import PinnedPool, PoolExhaustedError

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
_MODELS: dict = {}


def _config(arch):
    if arch == "llama":
        return transformers.LlamaConfig(**_COMMON)
    # Hybrid as in tests/test_cache.py: sliding (window 16) and full layers alternate.
    return transformers.Gemma2Config(**{**_COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=16,
                                     query_pre_attn_scalar=16)


def _model(arch):
    if arch not in _MODELS:
        torch.manual_seed(0)
        cfg = _config(arch)
        m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
        _MODELS[arch] = m
    return _MODELS[arch]


def _prompt(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (1, n), generator=g)


def _gen(model, ids, cache, n=8):
    with torch.no_grad():
        return model.generate(ids, **compat.cache_kwargs(cache), max_new_tokens=n, do_sample=False)


def _turns(model, cache, between=None, turns=3):
    """Greedy multi-turn: each turn appends 4 user tokens to the output and generates 8."""
    ids = _prompt()
    for t in range(turns):
        ids = _gen(model, ids, cache)
        if between is not None and t < turns - 1:
            between(t)
        ids = torch.cat([ids, _prompt(4, seed=10 + t)], 1)
    return ids


def _pool_granules(tensors):
    return sum(-(-t.numel() * t.element_size() // 256) * 256 for t in tensors)


# -- lossless to the last token -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("kv_dtype,residual", [(None, 0), ("int8", 0), ("int8", 4), ("fp8_e4m3", 0)])
def test_parked_between_turns_equals_never_parked(arch, kv_dtype, residual):
    model = _model(arch)
    want = _turns(model, KVCompactCache(model.config, kv_dtype=kv_dtype, residual=residual), turns=4)
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype, residual=residual, offload="idle")
    seen = []

    def park_between(turn):
        tensors = cache.storage_tensors()
        device_before = cache.stats().device_bytes
        assert device_before == sum(t.numel() * t.element_size() for t in tensors) > 0
        nbytes = cache.park()
        s = cache.stats()
        assert cache.parked and nbytes == device_before
        assert s.device_bytes == 0 and s.workspace_bytes == 0  # storage and scratch both left
        assert s.host_bytes == cache.pool.capacity_bytes > 0
        assert cache.pool.used_bytes == _pool_granules(tensors)  # every buffer, sliding layers too
        assert s.logical_tokens == cache.get_seq_length() > 0  # bookkeeping stays
        seen.append(s.physical_tokens)
        if turn == 1:
            cache.resume()  # explicit; turn 0 resumes itself at the next update (offload="idle")
            assert not cache.parked and cache.stats().device_bytes == device_before

    got = _turns(model, cache, park_between, turns=4)
    assert torch.equal(got, want)
    assert not cache.parked and cache.pool.used_bytes == 0
    if arch == "gemma2":  # the sliding layers held (and parked) a trimmed window
        assert any(min(p) < max(p) for p in seen)


def test_offload_none_cache_parks_but_refuses_use_until_resume():
    model = _model("llama")
    want = _turns(model, KVCompactCache(model.config, kv_dtype="int8"))
    cache = KVCompactCache(model.config, kv_dtype="int8")

    def park_between(turn):
        cache.park()
        with pytest.raises(RuntimeError, match="parked.*resume"), torch.no_grad():
            model(input_ids=_prompt(1), **compat.cache_kwargs(cache))
        for op in (lambda: cache.crop(-1), cache.export_state, cache.storage_tensors):
            with pytest.raises(RuntimeError, match="resume"):
                op()
        assert cache.parked
        cache.resume()

    assert torch.equal(_turns(model, cache, park_between), want)


def test_idle_cache_resumes_itself_for_edits_and_exports():
    model = _model("llama")
    cache = KVCompactCache(model.config, offload="idle")
    _gen(model, _prompt(), cache)
    state = {k: v.clone() for k, v in cache.export_state()[0].items()}
    cache.park()
    tensors, _ = cache.export_state()  # resumes first
    assert not cache.parked
    assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in state)
    n = cache.get_seq_length()
    cache.park()
    cache.crop(-2)
    assert not cache.parked and cache.get_seq_length() == n - 2


# -- pool: reuse, growth, sharing, flat over many cycles --------------------------------------------


def test_owned_pool_is_made_once_and_reused_then_grows_geometrically():
    model = _model("llama")
    cache = KVCompactCache(model.config, kv_dtype="fp8_e4m3", offload="idle")
    assert cache.pool is None and cache.stats().host_bytes == 0
    out = _gen(model, _prompt(), cache)
    cache.park()
    pool, cap = cache.pool, cache.pool.capacity_bytes
    for _ in range(3):
        cache.resume()
        assert cache.stats().host_bytes == cap  # kept for the next park
        cache.park()
        assert cache.pool is pool
    cache.resume()
    _gen(model, torch.cat([out, _prompt(100, seed=3)], 1), cache, n=1)  # the buffers grow
    need = _pool_granules(cache.storage_tensors())
    assert need > cap
    cache.park()
    assert cache.pool is not pool and cache.pool.capacity_bytes == max(need, 2 * cap)
    assert cache.pool.used_bytes == need


def test_park_resume_cycles_keep_pool_and_cache_bytes_flat():
    model = _model("llama")
    cache = KVCompactCache(model.config, kv_dtype="int8", residual=4, offload="idle")
    _gen(model, _prompt(), cache)
    device = cache.stats().device_bytes
    cache.park()
    pool, parked_used, host = cache.pool, cache.pool.used_bytes, cache.stats().host_bytes
    cache.resume()
    for _ in range(200):
        cache.park()
        s = cache.stats()
        assert (cache.pool.used_bytes, s.host_bytes, s.device_bytes) == (parked_used, host, 0)
        cache.resume()
        s = cache.stats()
        assert (cache.pool.used_bytes, s.host_bytes, s.device_bytes) == (0, host, device)
    assert cache.pool is pool and pool.num_allocations == 0


def test_shared_pool_host_bytes_add_up_to_the_pools_accounting():
    model = _model("llama")
    pool = PinnedPool(1 << 20)
    a = KVCompactCache(model.config, kv_dtype="int8", offload="idle", pool=pool)
    b = KVCompactCache(model.config, offload="idle", pool=pool)
    _gen(model, _prompt(), a)
    _gen(model, _prompt(20), b)
    assert a.stats().host_bytes == b.stats().host_bytes == 0
    a.park(non_blocking=False)  # the host waits for the copy (the same on CPU, where copies are sync)
    assert a.stats().host_bytes == pool.used_bytes > 0 and not a.transfer_in_flight
    b.park()
    assert a.stats().host_bytes + b.stats().host_bytes == pool.used_bytes
    assert a.pool is b.pool is pool
    a.resume(non_blocking=False)
    assert a.stats().host_bytes == 0 and b.stats().host_bytes == pool.used_bytes
    b.resume()
    assert pool.used_bytes == 0


def test_park_into_a_pool_given_per_call():
    model = _model("llama")
    cache = KVCompactCache(model.config, offload="idle")
    _gen(model, _prompt(), cache)
    pool = PinnedPool(1 << 20)
    n = cache.park(pool=pool)
    assert cache.pool is None  # the cache allocated nothing of its own
    assert cache.stats().host_bytes == pool.used_bytes >= n > 0
    cache.resume()
    assert pool.used_bytes == 0 and cache.stats().host_bytes == 0


# -- misuse: clear errors, nothing lost -------------------------------------------------------------


def test_resume_of_a_cache_not_parked_and_park_of_a_parked_one_raise():
    model = _model("llama")
    cache = KVCompactCache(model.config, kv_dtype="int8", offload="idle")
    with pytest.raises(ValueError, match="not parked"):
        cache.resume()
    _gen(model, _prompt(), cache)
    cache.park()
    used = cache.pool.used_bytes
    with pytest.raises(ValueError, match="already parked"):
        cache.park()
    assert cache.parked and cache.pool.used_bytes == used
    cache.resume()
    with pytest.raises(ValueError, match="not parked"):
        cache.resume()


class _InFlight:
    """A transfer handle whose copy has not completed (what CUDA leaves after resume(non_blocking))."""

    def __init__(self):
        self.waited = False

    def done(self):
        return self.waited

    def wait(self):
        self.waited = True


def test_park_while_a_copy_is_in_flight_raises_until_waited():
    model = _model("llama")
    want = _turns(model, KVCompactCache(model.config, kv_dtype="int8"), turns=2)
    cache = KVCompactCache(model.config, kv_dtype="int8", offload="idle")

    def between(turn):
        cache.park()
        cache.resume()
        cache._transfer = fake = _InFlight()
        assert cache.transfer_in_flight
        device = cache.stats().device_bytes
        with pytest.raises(RuntimeError, match="in flight.*wait_transfer"):
            cache.park()
        assert not cache.parked and cache.stats().device_bytes == device
        cache.wait_transfer()
        assert fake.waited and not cache.transfer_in_flight
        cache.park()

    assert torch.equal(_turns(model, cache, between, turns=2), want)


@pytest.mark.parametrize("kv_dtype", [None, "fp8_e4m3"])
def test_pool_too_small_leaves_the_cache_on_the_device_and_usable(kv_dtype):
    model = _model("llama")
    want = _turns(model, KVCompactCache(model.config, kv_dtype=kv_dtype), turns=2)
    pool = PinnedPool(4096)  # smaller than the cache; no pageable fallback
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype, offload="idle", pool=pool)

    def between(turn):
        device = cache.stats().device_bytes
        with pytest.raises(PoolExhaustedError):
            cache.park()
        assert not cache.parked and cache.stats().device_bytes == device and cache.stats().host_bytes == 0
        assert pool.used_bytes == 0 and pool.num_allocations == 0

    assert torch.equal(_turns(model, cache, between, turns=2), want)


def test_park_of_an_empty_cache_and_reset_of_a_parked_one():
    model = _model("llama")
    cache = KVCompactCache(model.config, offload="idle")
    assert cache.park() == 0 and cache.parked and cache.stats().host_bytes == 0
    cache.resume()
    _gen(model, _prompt(), cache)
    cache.park()
    assert cache.pool.used_bytes > 0
    cache.reset()  # discards the parked copy
    assert not cache.parked and cache.pool.used_bytes == 0 and cache.get_seq_length() == 0
    fresh = KVCompactCache(model.config)
    assert torch.equal(_gen(model, _prompt(), cache), _gen(model, _prompt(), fresh))


@pytest.mark.parametrize("kwargs,match", [
    (dict(offload="always"), "offload must be None, 'idle' or 'layers'"),
    (dict(offload="idle", pool=1 << 20), "pool must be None or a kvcompact.offload.PinnedPool"),
])
def test_bad_offload_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVCompactCache(_config("llama"), **kwargs)


def test_park_with_a_bad_pool_argument_changes_nothing():
    model = _model("llama")
    cache = KVCompactCache(model.config, offload="idle")
    _gen(model, _prompt(), cache)
    with pytest.raises(ValueError, match="pool"):
        cache.park(pool="host")
    assert not cache.parked and cache.stats().device_bytes > 0


# -- the real embedded model ------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_parked_between_turns_is_exact(smollm):
    model, tok = smollm  # tests/conftest.py: loaded once per run
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids

    def run(cache, park):
        out = _gen(model, ids, cache, n=12)
        if park:
            cache.park()
            assert cache.stats().device_bytes == 0
        follow = torch.cat([out, tok(" Then", return_tensors="pt", add_special_tokens=False).input_ids], 1)
        return _gen(model, follow, cache, n=12)

    want = run(KVCompactCache(model.config, kv_dtype="int8"), park=False)
    assert torch.equal(run(KVCompactCache(model.config, kv_dtype="int8", offload="idle"), park=True), want)


def test_the_parking_docstring_example_runs():
    import doctest

    from kvcompact.cache import parking

    failed, attempted = doctest.testmod(parking, verbose=False)
    assert attempted >= 8 and failed == 0


def test_resume_keeps_no_reference_to_the_buffers_it_restored():
    """Buffers the storage later replaces (growth) must be freed: the cache's record of the last
    copy must not keep the restored tensors alive (device memory no stats() would show)."""
    import gc
    import weakref

    model = _model("llama")
    cache = KVCompactCache(model.config, kv_dtype="int8", offload="idle")
    out = _gen(model, _prompt(), cache)
    cache.park()
    cache.resume()
    restored = [weakref.ref(t) for t in cache.storage_tensors()]
    _gen(model, torch.cat([out, _prompt(100, seed=3)], 1), cache, n=1)  # the buffers are reallocated
    gc.collect()
    assert all(r() is None for r in restored)


def test_reading_a_parked_layers_tokens_names_resume():
    model = _model("llama")
    cache = KVCompactCache(model.config, kv_dtype="int8", offload="idle")
    _gen(model, _prompt(), cache, n=2)
    expect = cache.layers[0].keys.clone()
    cache.park()
    with pytest.raises(RuntimeError, match=r"parked .*cache\.resume\(\)"):
        cache.layers[0].keys
    cache.resume()
    torch.testing.assert_close(cache.layers[0].keys, expect, rtol=0, atol=0)
