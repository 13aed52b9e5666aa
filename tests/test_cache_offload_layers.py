"""``KVCompactCache(offload="layers")``: storage in one pinned host pool, two device slots per forward.

Exactness against the same cache without offload (greedy, token for token; real model and a tiny
Gemma-2-style hybrid; budgets and policies; multi-turn; Session edits; crop, reset, export/import,
park), the device/host accounting during a forward, the copies being only the new rows, and
misuse failing without losing anything.
"""

from __future__ import annotations

import weakref

import pytest
import torch

import kvcompact
from kvcompact import KVCompactCache
from kvcompact.cache import compat
from kvcompact.cache import offload_layers
from kvcompact.offload import PinnedPool, PoolExhaustedError

from _tiny_models import tiny_model

# Llama has 3 layers: the two slots cannot hold every layer, so prefetch matters.
VOCAB = 96


def _model(arch):
    return tiny_model(arch, vocab_size=VOCAB, attn="eager")


def _prompt(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (1, n), generator=g)


def _gen(model, ids, cache, n=10):
    with torch.no_grad():
        return model.generate(ids, **compat.cache_kwargs(cache), max_new_tokens=n, do_sample=False)


def _turns(model, cache, turns=2, n=8, attach=False):
    """Greedy multi-turn on one cache: each turn appends 4 tokens to the output and generates ``n``."""
    ids = _prompt()
    for t in range(turns):
        if attach:
            with kvcompact.attach(model, cache):
                ids = _gen(model, ids, cache, n)
        else:
            ids = _gen(model, ids, cache, n)
        ids = torch.cat([ids, _prompt(4, seed=10 + t)], 1)
    return ids


def _host_stores(cache):
    return cache._host_stores()


# -- exact against the same cache on the device ----------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("kw", [dict(kv_dtype="int8", residual=4), dict(kv_dtype="fp8_e4m3", budget=16)],
                         ids=["int8-residual", "fp8-budget"])  # plain formats: test_layers_offload_generates_...
def test_multi_turn_greedy_equals_on_device(arch, kw):
    model = _model(arch)
    want_cache = KVCompactCache(model.config, **kw)
    want = _turns(model, want_cache)
    cache = KVCompactCache(model.config, offload="layers", **kw)
    assert torch.equal(_turns(model, cache), want)
    assert cache.stats().physical_tokens == want_cache.stats().physical_tokens
    st = cache.offload_stats()
    assert st["prefetch_hits"] > 0 and st["bytes_to_device"] > 0 and st["bytes_to_host"] > 0


@pytest.mark.parametrize("name,params", [("snapkv", dict(window=4)), ("h2o", dict(recent=4)),
                                         ("knorm", dict(recent=4))])
def test_query_aware_and_scoring_policies_match_on_device(name, params):
    from kvcompact.policies import get_policy

    model = _model("llama")
    want = _turns(model, KVCompactCache(model.config, kv_dtype="int8", budget=16, policy=get_policy(name, **params)),
                  turns=2, attach=True)
    cache = KVCompactCache(model.config, kv_dtype="int8", budget=16, policy=get_policy(name, **params),
                           offload="layers")
    assert torch.equal(_turns(model, cache, turns=2, attach=True), want)


@pytest.mark.slow
def test_real_model_two_turns_equal_on_device(smollm):
    model, tok = smollm  # tests/conftest.py: loaded once per run
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    follow = tok(" Then", return_tensors="pt", add_special_tokens=False).input_ids

    def run(cache):
        out = _gen(model, ids, cache, n=6)
        return _gen(model, torch.cat([out, follow], 1), cache, n=6)

    for kv_dtype in (None, "int8", "fp8_e4m3"):
        want = run(KVCompactCache(model.config, kv_dtype=kv_dtype))
        cache = KVCompactCache(model.config, kv_dtype=kv_dtype, offload="layers")
        assert torch.equal(run(cache), want), kv_dtype
        assert cache.stats().device_bytes < sum(s.nbytes for s in _host_stores(cache)) / 5  # 2 of 30 layers


# -- edits, crop, reset, export/import, park -------------------------------------------------------


def test_crop_reset_and_export_import_match_on_device():
    model = _model("llama")
    ref, cache = KVCompactCache(model.config, kv_dtype="int8"), KVCompactCache(model.config, kv_dtype="int8",
                                                                                offload="layers")
    outs = []
    for c in (ref, cache):
        ids = _gen(model, _prompt(), c)
        c.crop(-3)
        outs.append(_gen(model, ids[:, :-3], c))
    assert torch.equal(outs[0], outs[1])

    # export from the offloaded cache, import into an on-device one and the other way round
    tensors, layers = cache.export_state()
    assert all(t.device.type == "cpu" for t in tensors.values())
    moved = KVCompactCache(model.config, kv_dtype="int8")
    moved.import_state({k: v.clone() for k, v in tensors.items()}, layers)
    back = KVCompactCache(model.config, kv_dtype="int8", offload="layers")
    back.import_state(*ref.export_state())
    assert all(back.pool.owns(t) for s in _host_stores(back) for t in s.buffers() if t.numel())
    nxt = torch.cat([outs[0], _prompt(4, seed=7)], 1)
    want = _gen(model, nxt, ref)
    assert torch.equal(_gen(model, nxt, moved), want)
    assert torch.equal(_gen(model, nxt, back), want)
    assert torch.equal(_gen(model, nxt, cache), want)

    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats().device_bytes == 0
    assert torch.equal(_gen(model, _prompt(seed=3), cache), _gen(model, _prompt(seed=3), KVCompactCache(
        model.config, kv_dtype="int8")))


def test_beam_search_reorders_the_host_copies_like_the_device_ones():
    model = _model("llama")
    outs = []
    for offload in (None, "layers"):
        c = KVCompactCache(model.config, kv_dtype="int8", offload=offload)
        with torch.no_grad():
            outs.append(model.generate(_prompt(), **compat.cache_kwargs(c), max_new_tokens=6, num_beams=3,
                                       do_sample=False))
    assert torch.equal(outs[0], outs[1])
    assert all(c.pool.owns(t) for s in _host_stores(c) for t in s.buffers() if t.numel())  # still in the pool


def test_span_edits_on_the_cache_match_on_device():
    from kvcompact.rope import rope_params

    model = _model("llama")
    rope = rope_params(model)
    results = []
    for offload in (None, "layers"):
        c = KVCompactCache(model.config, offload=offload)
        ids = _gen(model, _prompt(30), c, n=4)
        c.drop_span(5, 12, reposition=True, rope=rope)
        c.shift_keys(0, 3, 2, rope)
        c.shift_keys(0, 3, -2, rope)
        new = _prompt(6, seed=5)

        def forward(c=c, new=new):
            pos = c.get_seq_length()
            with torch.no_grad():
                model(new, **compat.cache_kwargs(c), position_ids=torch.arange(pos, pos + 6)[None])

        c.splice(2, 4, 6, position=2, forward=forward, rope=rope)
        tensors, _ = c.export_state()
        nxt = torch.cat([ids, _prompt(3, seed=8)], 1)[:, -3:]
        with torch.no_grad():
            logits = model(nxt, **compat.cache_kwargs(c)).logits
        results.append(({k: v.clone() for k, v in tensors.items()}, logits))
    (t0, l0), (t1, l1) = results
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert torch.equal(l0, l1)


def test_splice_rollback_leaves_host_copies_as_they_were():
    from kvcompact.rope import rope_params

    model = _model("llama")
    c = KVCompactCache(model.config, kv_dtype="int8", residual=4, offload="layers")
    _gen(model, _prompt(), c, n=4)
    before = {k: v.clone() for k, v in c.export_state()[0].items()}

    def forward():
        with torch.no_grad():
            model(_prompt(3, seed=4), **compat.cache_kwargs(c))
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        c.splice(3, 6, 3, position=3, forward=forward, rope=rope_params(model))
    after = c.export_state()[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_session_drop_and_replace_match_on_device():
    from agent_fixtures import smollm2_tokenizer, tiny_llama
    from kvcompact.agent import Session

    tok = smollm2_tokenizer()
    model = tiny_llama(len(tok))
    texts = []
    for offload in (None, "layers"):
        s = Session(model, tok, KVCompactCache(model.config, kv_dtype="int8", offload=offload))
        s.add("system", "You are terse.")
        s.add("user", "Read the file.")
        s.generate(max_new_tokens=4)
        tool = s.add("tool", "alpha beta gamma delta " * 20, name="read_file")
        note = s.add("user", "And this note: one two three.")
        s.generate(max_new_tokens=4)
        s.drop(tool)
        s.replace(note, "A shorter note.")
        out = s.generate(max_new_tokens=6)
        with s.tool_call("search"):
            pass
        s.add("tool", "result", name="search")
        texts.append((out, s.generate(max_new_tokens=4), list(s.token_ids)))
    assert texts[0] == texts[1]


def test_park_frees_the_slots_and_keeps_the_host_copy():
    model = _model("gemma2")
    ref = KVCompactCache(model.config, kv_dtype="int8")
    cache = KVCompactCache(model.config, kv_dtype="int8", offload="layers")
    ids = _gen(model, _prompt(), cache)
    _gen(model, _prompt(), ref)
    host = cache.stats().host_bytes
    assert cache.park() == 0  # nothing moves: the storage is on the host already
    st = cache.stats()
    assert cache.parked and st.device_bytes == 0 and st.workspace_bytes == 0 and st.host_bytes == host
    with pytest.raises(ValueError, match="already parked"):
        cache.park()
    cache.resume()
    with pytest.raises(ValueError, match="not parked"):
        cache.resume()
    cache.park()
    nxt = torch.cat([ids, _prompt(4, seed=9)], 1)
    assert torch.equal(_gen(model, nxt, cache), _gen(model, nxt, ref))  # resumes by itself
    assert not cache.parked and cache.stats().device_bytes > 0


# -- accounting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kw", [("llama", dict()), ("gemma2", dict(kv_dtype="int8", residual=4)),
                                     ("llama", dict(kv_dtype="fp8_e4m3", budget=16))])
def test_device_holds_at_most_two_layers_during_a_forward(arch, kw):
    model = _model(arch)
    cache = KVCompactCache(model.config, offload="layers", **kw)
    seen = []

    def check(module, args):
        st = cache.stats()
        stores = _host_stores(cache)
        largest = max((s.nbytes for s in stores), default=0)
        seen.append(st.device_bytes)
        assert st.device_bytes <= 2 * largest, (st.device_bytes, largest)
        # the storage itself is in the pool; the slots are separate tensors
        held = [t for s in stores if s.initialized for t in s.buffers() if t.numel()]
        assert all(cache.pool.owns(t) for t in held)  # (no tensor held before the pool exists)
        pool = cache.pool  # None before the first update allocates it
        assert st.host_bytes == (pool.capacity_bytes if pool is not None else 0)  # owned: all of it counts
        slots = [s.buf for s in cache._streamer._slots if s.buf is not None]
        assert not any(t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                       for t in held for b in slots)

    handles = [layer.self_attn.register_forward_pre_hook(check) for layer in model.model.layers]
    handles += [layer.register_forward_pre_hook(check) for layer in model.model.layers]
    try:
        _turns(model, cache, turns=2, n=12)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) > 40 and max(seen) > 0


def test_shared_pool_host_bytes_equal_the_pools_used_bytes():
    model = _model("gemma2")
    pool = PinnedPool(4 << 20)
    cache = KVCompactCache(model.config, kv_dtype="int8", residual=2, offload="layers", pool=pool)
    assert cache.stats().host_bytes == 0
    _turns(model, cache, turns=2)
    assert cache.pool is pool and cache.stats().host_bytes == pool.used_bytes > 0
    del cache
    assert pool.used_bytes == 0  # every range returned, without a garbage-collection pass


def test_a_decode_step_writes_back_only_the_new_rows():
    model = _model("llama")  # 3 layers, 2 KV heads, head_dim 16
    cache = KVCompactCache(model.config, offload="layers")
    ids = _gen(model, _prompt(), cache, n=2)
    before = cache.offload_stats()
    with torch.no_grad():
        model(ids[:, -1:] * 0 + 5, **compat.cache_kwargs(cache))
    after = cache.offload_stats()
    row = 2 * 2 * 16 * 4  # K and V, 2 heads x 16 floats each
    assert after["bytes_to_host"] - before["bytes_to_host"] == 3 * row
    assert after["transfers_to_host"] - before["transfers_to_host"] == 3
    # every layer but the first was prefetched during the previous layer; the first at the end of
    # the previous forward
    assert after["staged_on_demand"] == before["staged_on_demand"]
    assert after["prefetch_hits"] - before["prefetch_hits"] == 3


def test_owned_pool_grows_geometrically_and_stays_exact(monkeypatch):
    monkeypatch.setattr(offload_layers, "_MIN_POOL", 4096)
    model = _model("llama")
    cache = KVCompactCache(model.config, kv_dtype="int8", offload="layers")
    want = _turns(model, KVCompactCache(model.config, kv_dtype="int8"), turns=2, n=24)
    assert torch.equal(_turns(model, cache, turns=2, n=24), want)
    st = cache.offload_stats()
    assert st["pool_growths"] >= 1
    assert cache.stats().host_bytes == cache.pool.capacity_bytes >= cache.pool.used_bytes
    ref = weakref.ref(cache.pool)
    del cache
    assert ref() is None  # no reference cycle keeps the pinned pool alive


# -- bad use ---------------------------------------------------------------------------------------


def test_pool_too_small_at_the_first_update_changes_nothing():
    model = _model("gemma2")
    pool = PinnedPool(1 << 20)
    hog = pool.tensor(((1 << 20) - 1024,), torch.uint8)
    cache = KVCompactCache(model.config, kv_dtype="int8", offload="layers", pool=pool)
    with pytest.raises(PoolExhaustedError):
        _gen(model, _prompt(), cache)
    assert cache.get_seq_length() == 0 and cache.stats().host_bytes == 0
    assert pool.used_bytes == _granule(hog)
    del hog
    want = _gen(model, _prompt(), KVCompactCache(model.config, kv_dtype="int8"))
    assert torch.equal(_gen(model, _prompt(), cache), want)  # usable once there is room


def _granule(t):
    return -(-t.numel() * t.element_size() // 256) * 256


def test_pool_exhausted_in_a_later_turn_leaves_every_layer_as_it_was():
    model = _model("llama")
    pool = PinnedPool(1 << 20)
    ref = KVCompactCache(model.config)
    cache = KVCompactCache(model.config, offload="layers", pool=pool)
    ids = _gen(model, _prompt(), cache, n=4)
    _gen(model, _prompt(), ref, n=4)
    snap = {k: v.clone() for k, v in cache.export_state()[0].items()}
    lengths = cache.stats().physical_tokens, cache.get_seq_length()
    hog = pool.tensor((pool.largest_free_block,), torch.uint8)
    long_turn = torch.cat([ids, _prompt(200, seed=6)], 1)  # every layer must grow
    with pytest.raises(PoolExhaustedError):
        _gen(model, long_turn, cache, n=2)
    assert (cache.stats().physical_tokens, cache.get_seq_length()) == lengths
    now = cache.export_state()[0]
    assert all(torch.equal(snap[k], now[k]) for k in snap)
    del hog
    assert torch.equal(_gen(model, long_turn, cache, n=4), _gen(model, long_turn, ref, n=4))


def test_misuse_raises_clear_errors():
    model = _model("llama")
    cache = KVCompactCache(model.config, offload="layers")
    _gen(model, _prompt(), cache, n=2)
    with pytest.raises(ValueError, match="pool= cannot be used with offload='layers'"):
        cache.park(pool=PinnedPool(1 << 16))
    with pytest.raises(ValueError, match="pool must be None or a kvcompact.offload.PinnedPool"):
        cache.park(pool="host")
    assert not cache.parked
    with pytest.raises(ValueError, match="replace_storage_tensors"):
        cache.replace_storage_tensors(None)
    with pytest.raises(ValueError, match="pool must be None or a kvcompact.offload.PinnedPool"):
        KVCompactCache(model.config, offload="layers", pool=1 << 20)
    with pytest.raises(ValueError, match="offload must be None, 'idle' or 'layers'"):
        KVCompactCache(model.config, offload="layer")
    # nothing above changed the cache
    ref = KVCompactCache(model.config)
    ids = _gen(model, _prompt(), ref, n=2)
    assert torch.equal(_gen(model, ids, cache, n=3), _gen(model, ids, ref, n=3))


# -- two turns on the parking tests' models (Llama 2 layers, Gemma-2 hybrid 4), and a 6-layer Llama ---

from test_cache_park import _model as _park_model, _prompt as _park_prompt  # noqa: E402


def _two_turns(arch, **cache_kwargs):
    model = _park_model(arch)
    cache = KVCompactCache(model.config, **cache_kwargs)
    kw = dict(do_sample=False, pad_token_id=0)
    out = model.generate(_park_prompt(40), **compat.cache_kwargs(cache), max_new_tokens=12, **kw)
    more = torch.cat([out, _park_prompt(9, seed=2)], dim=1)
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


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_layers_offload_device_holds_at_most_two_layers(kv_dtype):
    model = _model("llama_deep")
    ref = KVCompactCache(model.config, kv_dtype=kv_dtype)
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype, offload="layers")
    seen = []
    hooks = [m.register_forward_hook(lambda *_: seen.append(cache.stats().device_bytes))
             for name, m in model.named_modules() if name.endswith("self_attn")]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    try:
        got = model.generate(_park_prompt(150), **compat.cache_kwargs(cache), **kw)
    finally:
        for h in hooks:
            h.remove()
    want = model.generate(_park_prompt(150), **compat.cache_kwargs(ref), **kw)
    assert torch.equal(got, want)
    per_layer = max(l.storage.nbytes for l in ref.layers)
    total = sum(l.storage.nbytes for l in ref.layers)
    assert len(seen) == 6 * 6  # every attention layer of every step was observed
    assert 0 < max(seen) <= 2 * per_layer < total  # the two slots, never the whole cache
    s = cache.stats()
    assert s.host_bytes >= total  # every layer's storage is on the host
    assert s.host_bytes == cache.pool.capacity_bytes  # the cache's own pool, counted whole


# -- the CUDA code path, driven on the CPU with stand-in streams and events -------------------------


class _Event:
    def __init__(self, *args, **kwargs):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        pass

    def query(self):
        return True


class _Stream:
    waits = 0

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        assert event.recorded, "a stream waited on an event that was never recorded"
        _Stream.waits += 1

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class _TorchWithFakeCuda:
    def __init__(self):
        import contextlib
        import types

        self.cuda = types.SimpleNamespace(Stream=_Stream, Event=_Event, stream=lambda s: contextlib.nullcontext(),
                                          current_stream=lambda device=None: _Stream())

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("arch,kw", [("llama", dict(kv_dtype="int8", residual=4)), ("gemma2", dict(budget=16))])
def test_the_asynchronous_path_runs_and_stays_exact(monkeypatch, arch, kw):
    """No GPU here: the stream/event branch (what runs on CUDA) with copies done at once, so its
    bookkeeping (events recorded before they are awaited, write-back events, slot growth) runs."""
    monkeypatch.setattr(offload_layers, "torch", _TorchWithFakeCuda())
    monkeypatch.setattr(offload_layers, "is_async", lambda device: True)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    model = _model(arch)
    want = _turns(model, KVCompactCache(model.config, **kw))
    _Stream.waits = 0
    cache = KVCompactCache(model.config, offload="layers", **kw)
    assert torch.equal(_turns(model, cache), want)
    assert _Stream.waits > 0 and cache._streamer._async
    assert all(s.pending_write is None or s.pending_write.recorded for s in _host_stores(cache))
