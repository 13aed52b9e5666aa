"""``Session.tool_call(name)``: the cache is parked while a tool runs and resumed when it returns;
``Session.park`` / ``resume`` on the cache's own API; sessions sharing one pool. A tiny random
Llama with the real SmolLM2 tokenizer (fast, CPU)."""

from __future__ import annotations

import time

import pytest
import torch

import kvcompact
from agent_fixtures import smollm2_tokenizer, tiny_llama
from kvcompact.agent import Session, SessionError
from kvcompact.offload import PinnedPool, PoolExhaustedError


@pytest.fixture(scope="module")
def mt():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


def _session(mt, **cache_kwargs):
    model, tok = mt
    cache = kvcompact.KVCompactCache(model.config, **{"kv_dtype": "int8", "offload": "idle", **cache_kwargs})
    s = Session(model, tok, cache)
    s.add("system", "You are a tool-calling test.")
    s.add("user", "List the files.")
    s.generate(max_new_tokens=5)
    return s


def _finish(s, tool_output="a.py b.py c.py"):
    s.add("tool", tool_output, name="ls")
    s.generate(max_new_tokens=5)
    return s.token_ids


def test_tool_call_parks_during_the_tool_and_is_exact(mt):
    want = _finish(_session(mt))
    s = _session(mt)
    device = s.cache.stats().device_bytes
    with s.tool_call("ls") as rec:
        assert s.parked and s.cache.parked
        assert s.cache.stats().device_bytes == 0 and s.cache.stats().host_bytes > 0
        with pytest.raises(SessionError, match="parked"):
            s.prefill()
        time.sleep(0.02)
    assert not s.parked and not s.cache.parked and s.cache.stats().device_bytes == device
    assert s.last_tool_call is rec
    assert rec.name == "ls" and rec.parked_bytes == device
    assert rec.tool_seconds >= 0.02
    assert rec.resume_wait_seconds is not None and 0 <= rec.resume_wait_seconds < rec.tool_seconds  # CPU: sync
    assert _finish(s) == want


def test_a_raising_tool_still_gets_the_cache_back(mt):
    want = _finish(_session(mt))
    s = _session(mt)
    with pytest.raises(KeyError, match="no such file"):
        with s.tool_call("cat"):
            raise KeyError("no such file")
    assert not s.parked and s.cache.stats().device_bytes > 0
    assert s.last_tool_call.name == "cat" and s.last_tool_call.resume_wait_seconds is not None
    assert _finish(s) == want


class _InFlight:
    """What a CUDA resume(non_blocking=True) leaves: a copy still running for ``seconds``."""

    def __init__(self, seconds):
        self.until = time.perf_counter() + seconds

    def done(self):
        return time.perf_counter() >= self.until

    def wait(self):
        time.sleep(max(0.0, self.until - time.perf_counter()))


@pytest.mark.parametrize("copy_done_first", [False, True])
def test_resume_wait_is_measured_at_the_next_forward_when_the_copy_runs_on(mt, monkeypatch, copy_done_first):
    s = _session(mt)
    real_resume = s.cache.resume

    def async_resume(non_blocking=True):
        real_resume(non_blocking=non_blocking)
        s.cache._transfer = _InFlight(0.2)  # the device copy goes on after the call returns

    monkeypatch.setattr(s.cache, "resume", async_resume)
    with s.tool_call("grep") as rec:
        pass
    assert rec.resume_wait_seconds is None  # not known until the model needs the buffers
    if copy_done_first:
        time.sleep(0.25)  # the host's own work outlasted the copy
    s.add("tool", "no matches", name="grep")
    s.generate(max_new_tokens=2)
    assert not s.cache.transfer_in_flight
    if copy_done_first:
        assert rec.resume_wait_seconds == 0.0  # the copy had completed: the model did not wait
    else:
        assert 0.1 < rec.resume_wait_seconds < 5


def test_tool_call_with_a_pool_too_small_runs_nothing_and_changes_nothing(mt):
    want = _finish(_session(mt))
    pool = PinnedPool(4096)
    s = _session(mt, pool=pool)
    ids, ran = s.token_ids, []
    with pytest.raises(PoolExhaustedError):
        with s.tool_call("ls"):
            ran.append(1)
    assert not ran and not s.parked and s.token_ids == ids and pool.used_bytes == 0
    assert _finish(s) == want


def test_sessions_share_one_pool(mt):
    pool = PinnedPool(1 << 22)
    a, b = _session(mt, pool=pool), _session(mt, kv_dtype="fp8_e4m3", pool=pool)
    with a.tool_call("slow_tool"):
        with b.tool_call("fast_tool"):
            assert a.cache.stats().host_bytes + b.cache.stats().host_bytes == pool.used_bytes > 0
        assert b.cache.stats().host_bytes == 0 and a.cache.stats().host_bytes == pool.used_bytes
    assert pool.used_bytes == 0
    # Session.park into a pool given per call, the pre-tool_call API.
    other = PinnedPool(1 << 22)
    n = a.park(other)
    assert n > 0 and a.cache.stats().host_bytes == other.used_bytes and pool.used_bytes == 0
    a.resume()
    assert other.used_bytes == 0


def test_tool_call_misuse(mt):
    s = _session(mt)
    with pytest.raises(ValueError, match="name"):
        with s.tool_call(""):
            pass
    assert not s.parked
    s.park()
    with pytest.raises(SessionError, match="parked"):
        with s.tool_call("ls"):
            pass
    s.resume()
    s.resume()  # a session that is not parked: left as it is
    assert not s.parked
    model, tok = mt
    from transformers import DynamicCache

    append_only = Session(model, tok, DynamicCache())
    with pytest.raises(TypeError, match="KVCompactCache"):
        with append_only.tool_call("ls"):
            pass


def test_close_of_a_parked_session_returns_the_host_memory(mt):
    pool = PinnedPool(1 << 22)
    s = _session(mt, pool=pool)
    s.park()
    assert pool.used_bytes > 0
    s.close()
    assert pool.used_bytes == 0


def test_session_park_waits_for_a_resume_copy_still_in_flight(mt):
    """The cache refuses to park while a copy runs; Session.park waits for it instead."""
    s = _session(mt)
    s.park()
    s.resume()
    s.cache._transfer = fake = _InFlight(0.05)  # what CUDA leaves after a non-blocking resume
    with pytest.raises(RuntimeError, match="in flight"):
        s.cache.park()
    assert s.park() > 0 and fake.done() and s.parked
    s.resume()
    assert _finish(s) == _finish(_session(mt))


def test_session_closed_while_its_tool_runs(mt):
    pool = PinnedPool(1 << 22)
    s = _session(mt, pool=pool)
    with s.tool_call("long_tool") as rec:
        s.close()  # e.g. the agent was cancelled
    assert rec.resume_wait_seconds == 0.0 and pool.used_bytes == 0 and s.cache is None
