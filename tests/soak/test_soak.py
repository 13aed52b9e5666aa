"""Soak: thousands of decode steps with eviction / span edits, watching for drift (issue 9).

Two loops, because a Session refuses a budgeted cache (a budget evicts per head, so a message no
longer occupies one token range):

* cache: a tiny random Llama decoding one token per forward into an fp8 KVCompactCache with
  budget 512 (slack 64, so a compaction every 64 steps once full). Until the first eviction its
  logits equal, bit for bit, those of the same cache without a budget; after warm-up the cache's
  ``device_bytes`` and the process's Python object count stay flat from one eviction to the next.
* session: an fp8 Session on the same kind of model with the real SmolLM2 tokenizer, adding
  tool results and generating, dropping / replacing old messages every few rounds; the rendering
  stays exact and ``device_bytes`` / object counts stay flat.

* park: an int8 ``offload="idle"`` cache parked and resumed every decode step (200 cycles in CI,
  1,000 with ``--soak-steps``): exact against a never-parked cache, pool and byte counts flat.

``--soak-steps N`` (or KVCOMPACT_SOAK_STEPS) sets the decode steps of both loops (CI defaults:
1,000 for the cache, 500 for the session; 10,000 for the long run). Numbers are printed (``-s``) for docs/reliability.md.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import pytest
import torch

import kvcompact
from kvcompact.cache import compat

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from conftest import soak_steps  # noqa: E402  (tests/conftest.py)

BUDGET = 512  # slack = 64: one compaction every 64 decode steps once full
OBJ_TOLERANCE = 64  # gc object-count noise between two samples (hypothesis/pytest internals)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def _tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16)
    return LlamaForCausalLM(cfg).eval()


def _check_flat(name, samples, allowed=0):
    """samples: (step, device_bytes, objects[, explained]) at the same phase of each cycle, after
    warm-up; ``explained`` (optional 4th field) is growth the design accounts for (tombstones)."""
    assert len(samples) >= 3, f"{name}: too few samples after warm-up ({len(samples)}); raise --soak-steps"
    dev = {s[1] for s in samples}
    assert len(dev) == 1, f"{name}: device_bytes drifted: {samples}"
    objs = [s[2] - (s[3] if len(s) > 3 else 0) for s in samples]
    growth = objs[-1] - objs[0]
    assert growth <= OBJ_TOLERANCE, f"{name}: {growth} Python objects gained over {len(objs)} cycles: {objs}"
    # A slow leak of a few objects a cycle would hide under the tolerance on a short run: the
    # second half must not be above the first half's maximum by more than the tolerance either.
    half = len(objs) // 2
    assert max(objs[half:]) <= max(objs[: max(half, 1)]) + OBJ_TOLERANCE, objs
    return growth


def test_cache_soak_budget_fp8(request):
    steps = soak_steps(request.config)
    model = _tiny_llama(256)
    cache = kvcompact.KVCompactCache(model.config, kv_dtype="fp8_e4m3", budget=BUDGET)
    ref = kvcompact.KVCompactCache(model.config, kv_dtype="fp8_e4m3")  # same storage, never evicts
    assert cache.slack == 64
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 256, (1, 1), generator=gen)
    first_eviction, compared, samples, last_phys = None, 0, [], 0
    rss0, t0 = _rss_kib(), time.perf_counter()
    with torch.inference_mode():
        for step in range(steps):
            out = model(input_ids=tok, use_cache=True, **compat.cache_kwargs(cache)).logits[:, -1]
            phys = cache.stats().physical_tokens[0]
            if first_eviction is None and phys < last_phys:
                first_eviction = step
                ref = None  # free it
            if first_eviction is None:
                rout = model(input_ids=tok, use_cache=True, **compat.cache_kwargs(ref)).logits[:, -1]
                assert torch.equal(out, rout), f"step {step}: logits differ from the no-eviction reference"
                compared += 1
            if phys < last_phys and step >= first_eviction + 2 * cache.slack:  # evicted, after warm-up
                samples.append((step, cache.stats().device_bytes, _objects()))
            last_phys = phys
            assert phys <= BUDGET + cache.slack
            # Next token: argmax with a pseudo-random nudge so the sequence does not collapse.
            tok = ((out.argmax(-1) + torch.randint(0, 256, (1,), generator=gen)) % 256).reshape(1, 1)
    elapsed = time.perf_counter() - t0
    assert cache.stats().logical_tokens == steps
    assert first_eviction == BUDGET + cache.slack  # the first step that would exceed budget + slack
    growth = _check_flat("cache", samples)
    print(f"\n[soak cache] steps={steps} evictions={len(samples)} (sampled after warm-up) "
          f"compared_exact={compared} device_bytes={samples[-1][1]} object_growth={growth} "
          f"rss_growth_kib={_rss_kib() - rss0} elapsed_s={elapsed:.1f}")


def test_session_soak_drop_replace_fp8(request):
    from agent_fixtures import smollm2_tokenizer
    from kvcompact.agent import Session

    steps = soak_steps(request.config, default=500)  # a session round costs more: 500 in CI
    tokenizer = smollm2_tokenizer()
    model = _tiny_llama(len(tokenizer))
    cache = kvcompact.KVCompactCache(model.config, kv_dtype="fp8_e4m3")
    s = Session(model, tokenizer, cache)
    s.add("system", "You are a soak test.")
    decoded, rounds, samples, live = 0, 0, [], []
    rss0, t0 = _rss_kib(), time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    while decoded < steps:
        rounds += 1
        s.add("user", f"Round {rounds}: call the tool.")
        live.append(s.add("tool", f"result {rounds}: " + " ".join(str(i * rounds % 97) for i in range(12)),
                          name="probe"))
        s.prefill()  # so the count below is decode steps only
        before = len(s.token_ids)
        s.generate(max_new_tokens=16, do_sample=True, generator=gen)
        decoded += len(s.token_ids) - before
        if rounds % 4 == 0:  # keep the conversation bounded: drop the oldest tool result, edit one
            s.drop(live.pop(0))
            s.replace(live[0], f"replaced in round {rounds}")
            assert s.token_ids == s.renderer.render_ids(s.messages)
        if rounds % 4 == 0 and rounds >= 12:
            # Drop whole old rounds too, so the length is stationary and capacity must stop growing.
            for m in list(s.messages)[1:-12]:
                s.drop(m.id)
            live = [i for i in live if i in s.spans]
            # A dropped message stays in the history as a tombstone (its Message, token-id list and
            # entry: 3 gc-tracked objects) because the template rendering and the positions of a
            # gap need it; that growth is by design and subtracted here. Anything else must be flat.
            samples.append((decoded, s.cache.stats().device_bytes, _objects(), 3 * len(s._entries)))
    elapsed = time.perf_counter() - t0
    assert s.token_ids == s.renderer.render_ids(s.messages)
    growth = _check_flat("session", samples)
    raw = samples[-1][2] - samples[0][2]
    print(f"\n[soak session] decode_steps={decoded} rounds={rounds} samples={len(samples)} "
          f"device_bytes={samples[-1][1]} object_growth_beyond_tombstones={growth} raw_object_growth={raw} "
          f"history_entries={len(s._entries)} rss_growth_kib={_rss_kib() - rss0} "
          f"elapsed_s={elapsed:.1f}")



def test_park_resume_soak_int8(request):
    """``offload="idle"`` parked and resumed every step: each cycle decodes one token (exact against a
    never-parked cache), crops it back so the length is stationary, parks and resumes (explicitly on
    even cycles, by the next forward on odd ones). The pool is allocated once; its used bytes, the
    cache's device/host bytes and the object count stay flat (200 cycles in CI, 1,000 with
    --soak-steps / KVCOMPACT_SOAK_STEPS)."""
    explicit = request.config.getoption("--soak-steps") or int(os.environ.get("KVCOMPACT_SOAK_STEPS", "0"))
    cycles = 1000 if explicit else 200
    model = _tiny_llama(256)
    cache = kvcompact.KVCompactCache(model.config, kv_dtype="int8", residual=4, offload="idle")
    ref = kvcompact.KVCompactCache(model.config, kv_dtype="int8", residual=4)  # never parked
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (1, 48), generator=gen)
    samples, rss0, t0 = [], _rss_kib(), time.perf_counter()
    with torch.inference_mode():
        for c in (cache, ref):
            model(input_ids=prompt, use_cache=True, **compat.cache_kwargs(c))
        device = cache.stats().device_bytes
        pool = None
        for cycle in range(cycles):
            tok = torch.randint(0, 256, (1, 1), generator=gen)
            out = model(input_ids=tok, use_cache=True, **compat.cache_kwargs(cache)).logits[:, -1]
            rout = model(input_ids=tok, use_cache=True, **compat.cache_kwargs(ref)).logits[:, -1]
            assert torch.equal(out, rout), f"cycle {cycle}: logits differ from the never-parked cache"
            cache.crop(-1)
            ref.crop(-1)
            cache.park()
            pool = pool or cache.pool
            assert cache.pool is pool, f"cycle {cycle}: a new pool was allocated"
            parked = cache.stats()
            assert parked.device_bytes == 0 and parked.host_bytes == pool.capacity_bytes
            used = pool.used_bytes
            if cycle % 2 == 0:
                cache.resume()
                assert pool.used_bytes == 0 and cache.stats().device_bytes == device
            if cycle >= 10 and cycle % 10 == 0:
                samples.append((cycle, (used, parked.host_bytes, cache.stats().device_bytes), _objects()))
    if cache.parked:
        cache.resume()
    assert cache.get_seq_length() == 48 and pool.used_bytes == 0 and pool.num_allocations == 0
    elapsed = time.perf_counter() - t0
    growth = _check_flat("park", samples)
    print(f"\n[soak park] cycles={cycles} pool_capacity={pool.capacity_bytes} parked_used={samples[-1][1][0]} "
          f"object_growth={growth} rss_growth_kib={_rss_kib() - rss0} elapsed_s={elapsed:.1f}")
