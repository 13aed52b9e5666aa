"""Shared prefixes: sessions from one ``PrefixCache`` hold the prefix's KV once.

``KVCompactCache.shared_copy`` gives each session the prefix's full-attention rows by reference
(read in place by the workspace path and by ``decode_attention``) and copies them into a session
only when that session must rewrite one (copy on write). Checked here: the bytes really held
(distinct tensor storages, measured), outputs equal to unshared sessions, and every rewriting path
leaving the prefix and the other sessions untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kvcompact
from kvcompact.agent import PrefixCache, Session
from kvcompact.cache.compat import cache_kwargs

from _tiny_models import VOCAB, tiny_model


def held_bytes(caches) -> int:
    """Bytes of the distinct tensor storages the caches' layers reference (shared ones once)."""
    seen, total = set(), 0
    for cache in caches:
        for layer in cache.layers:
            store = getattr(layer, "storage", None)
            while store is not None and store.initialized:
                for t in store.buffers_view():
                    key = t.untyped_storage().data_ptr()
                    if key not in seen:
                        seen.add(key)
                        total += t.untyped_storage().nbytes()
                store = store.prefix
    return total


def state_bytes(cache) -> list[bytes]:
    """Every valid row of every layer, as raw bytes (to prove a cache did not change)."""
    out = []
    for layer in cache.layers:
        store = getattr(layer, "storage", None)
        if store is not None and store.initialized:
            for t in store.valid_rows().values():
                out.append(t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def _ids(n, seed):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _decode(model, cache, ids, steps=12, attention=False):
    with kvcompact.attach(model, cache, attention=attention):
        return model.generate(ids, **cache_kwargs(cache), max_new_tokens=steps, do_sample=False)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral_window"])
@pytest.mark.parametrize("kv_dtype,residual", [(None, 0), ("int8", 0), ("fp8_e4m3", 4)])
@pytest.mark.parametrize("attention", [False, True])
def test_shared_copy_decodes_like_a_deep_copy(arch, kv_dtype, residual, attention):
    model = tiny_model(arch, attn="eager" if arch == "gemma2" else "sdpa")
    base = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype, residual=residual)
    prompt = _ids(60, 1)
    with torch.no_grad():
        model(prompt, **cache_kwargs(base))
    before = state_bytes(base)
    ids = torch.cat([prompt, _ids(5, 2)], 1)
    want = _decode(model, copy.deepcopy(base), ids, attention=attention)
    shared = base.shared_copy()
    assert shared.get_seq_length() == base.get_seq_length()
    got = _decode(model, shared, ids, attention=attention)
    assert torch.equal(want, got)
    assert state_bytes(base) == before
    full = [layer for layer in shared.layers if not layer.is_sliding]
    assert all(layer.storage.prefix is base.layers[i].storage
               for i, layer in enumerate(shared.layers) if not layer.is_sliding)
    assert all(layer.storage.prefix_len == 60 for layer in full)
    assert bool(full) == (arch != "mistral_window")  # every Mistral-window layer is windowed: copied


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_rewrites_copy_the_prefix_first(kv_dtype):
    model = tiny_model("llama")
    base = kvcompact.KVCompactCache(model.config, kv_dtype=kv_dtype)
    with torch.no_grad():
        model(_ids(50, 3), **cache_kwargs(base))
    before = state_bytes(base)

    # A drop inside the prefix, a crop into it, a re-rotation, batch reordering, an export.
    a, b, c, d = (base.shared_copy() for _ in range(4))
    a.drop_span(10, 20)
    b.crop(-5)
    c.layers[0].rotate_keys(0, 5, 3, torch.ones(8), "neox")
    d.reorder_cache(torch.tensor([0]))
    for cache in (a, b, d):
        assert all(layer.storage.prefix is None for layer in cache.layers)
    assert c.layers[0].storage.prefix is None and c.layers[1].storage.prefix is not None  # per layer
    assert [layer.physical_len for layer in a.layers] == [40] * len(a.layers)
    assert b.get_seq_length() == 45
    assert state_bytes(base) == before
    # Exports of a shared copy equal a deep copy's, and leave it shared.
    e = base.shared_copy()
    assert state_bytes(e) == before and all(layer.storage.prefix is not None for layer in e.layers)


def test_crop_within_own_rows_keeps_sharing():
    model = tiny_model("llama")
    base = kvcompact.KVCompactCache(model.config, kv_dtype="int8")
    with torch.no_grad():
        model(_ids(30, 4), **cache_kwargs(base))
        shared = base.shared_copy()
        model(_ids(6, 5), **cache_kwargs(shared))
    shared.crop(-4)
    assert shared.get_seq_length() == 32
    assert all(layer.storage.prefix is not None and layer.storage.own_length == 2 for layer in shared.layers)


def test_budget_eviction_unshares_and_keeps_the_prefix():
    model = tiny_model("llama")
    base = kvcompact.KVCompactCache(model.config, kv_dtype="int8", budget=40)
    with torch.no_grad():
        model(_ids(36, 6), **cache_kwargs(base))
    before = state_bytes(base)
    want = _decode(model, copy.deepcopy(base), torch.cat([_ids(36, 6), _ids(4, 7)], 1), steps=20)
    shared = base.shared_copy()
    got = _decode(model, shared, torch.cat([_ids(36, 6), _ids(4, 7)], 1), steps=20)
    assert torch.equal(want, got)
    assert all(layer.storage.prefix is None for layer in shared.layers)  # evicted: copied on write
    assert state_bytes(base) == before


def test_park_resume_of_a_shared_copy():
    model = tiny_model("llama")
    base = kvcompact.KVCompactCache(model.config, kv_dtype="fp8_e4m3")
    with torch.no_grad():
        model(_ids(40, 8), **cache_kwargs(base))
    ids = torch.cat([_ids(40, 8), _ids(3, 9)], 1)
    want = _decode(model, copy.deepcopy(base), ids)
    shared = base.shared_copy()
    shared.park()
    assert shared.stats().device_bytes == 0
    shared.resume()
    assert torch.equal(want, _decode(model, shared, ids))


def test_stats_count_own_buffers_only():
    model = tiny_model("llama")
    base = kvcompact.KVCompactCache(model.config, kv_dtype="int8")
    with torch.no_grad():
        model(_ids(300, 10), **cache_kwargs(base))
    copies = [base.shared_copy() for _ in range(5)]
    with torch.no_grad():
        for i, c in enumerate(copies):
            model(_ids(7, 11 + i), **cache_kwargs(c))
    own = sum(c.stats().device_bytes for c in copies)
    assert held_bytes([base, *copies]) == base.stats().device_bytes + own
    # Each copy holds a 64-row capacity of its own, not the 300 prefix rows.
    assert all(c.stats().device_bytes * 4 < base.stats().device_bytes for c in copies)


def test_sixteen_sessions_hold_the_prefix_once(smollm):
    model, tokenizer = smollm
    system = "You are the release assistant of a build system. " + " ".join(
        f"Rule {i}: when asked about step {i}, answer with the step number and one short sentence." for i in range(48))
    prefix = PrefixCache(model, tokenizer, system, cache_kwargs={"kv_dtype": "int8"})
    assert 950 <= len(prefix.token_ids) <= 1100
    sessions, unshared = [], []
    for i in range(16):
        s = prefix.session()
        s.add("user", f"What do you do at step {i}?")
        sessions.append(s.generate(max_new_tokens=6))
        unshared.append(s)
    total = held_bytes([prefix._base.cache, *(s.cache for s in unshared)])
    parts = prefix.stats.device_bytes + sum(s.cache.stats().device_bytes for s in unshared)
    assert total <= 1.1 * parts
    # Unshared (the old way: a deep copy of the prefix cache per session) gives the same replies.
    for i in range(16):
        s = Session(model, tokenizer, prefix._base._new_cache())
        s._adopt(copy.deepcopy(prefix._base.cache), [e.copy() for e in prefix._base._entries], prefix=prefix)
        s.add("user", f"What do you do at step {i}?")
        assert s.generate(max_new_tokens=6) == sessions[i]
    # And sharing is what saves the memory: 16 deep copies hold the prefix 16 times.
    assert parts < 0.3 * 16 * prefix.stats.device_bytes


def test_session_edit_inside_the_prefix(smollm):
    model, tokenizer = smollm
    prefix = PrefixCache(model, tokenizer, [{"role": "system", "content": "You are terse."},
                                            {"role": "user", "content": "The code word is PLUM."},
                                            {"role": "assistant", "content": "Noted."}])
    base_before = state_bytes(prefix._base.cache)
    editor, reader = prefix.session(), prefix.session()
    word = next(m for m in editor.messages if "PLUM" in m.content)
    editor.drop(word.id)  # rewrites prefix rows: this session copies the prefix first
    assert all(layer.storage.prefix is None for layer in editor.cache.layers)
    assert all(layer.storage.prefix is not None for layer in reader.cache.layers)
    assert state_bytes(prefix._base.cache) == base_before
    reader.add("user", "What is the code word?")
    fresh = prefix.session()
    fresh.add("user", "What is the code word?")
    assert reader.generate(max_new_tokens=8) == fresh.generate(max_new_tokens=8)
