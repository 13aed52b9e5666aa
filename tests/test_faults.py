"""Fault injection at the Session level (issue 9): each fault fails loudly and leaves the session
usable and the previous checkpoint loadable.

The raw checkpoint writer's faults (ENOSPC / EIO mid-write, SIGKILL at random moments, a crash
between renames) are covered in tests/test_checkpoint.py; here the same faults hit Session.save and
Session.park, on a tiny random Llama with the real SmolLM2 tokenizer and fp8 storage.
"""

from __future__ import annotations

import errno

import pytest
import torch

import kvcompact
from agent_fixtures import smollm2_tokenizer, tiny_llama
from kvcompact.agent import Session
from kvcompact.agent import checkpoint as ckpt
from kvcompact.offload import PinnedPool, PoolExhaustedError


@pytest.fixture(scope="module")
def mt():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


def _session(mt):
    model, tok = mt
    s = Session(model, tok, kvcompact.KVCompactCache(model.config, kv_dtype="fp8_e4m3"))
    s.add("system", "You are a fault-injection test.")
    s.add("user", "Say something.")
    s.generate(max_new_tokens=6)
    s.add("tool", "tool output " * 20, name="probe")
    s.prefill()
    return s


def _kv(s):
    return [(l.keys.clone(), l.values.clone()) for l in s.cache.layers]


def test_pool_exhaustion_during_park_leaves_session_usable(mt):
    s = _session(mt)
    before_ids, before_kv = list(s.token_ids), _kv(s)
    pool = PinnedPool(4096)  # far smaller than the cache; no pageable fallback
    with pytest.raises(PoolExhaustedError):
        s.park(pool)
    assert not s.parked
    assert pool.used_bytes == 0 and pool.num_allocations == 0  # ranges taken so far were returned
    for (k0, v0), (k1, v1) in zip(before_kv, _kv(s)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert s.token_ids == before_ids
    s.add("user", "Still there?")
    s.generate(max_new_tokens=4)  # usable
    assert s.token_ids == s.renderer.render_ids(s.messages)
    # A pool that fits works afterwards, and resume restores the same bytes.
    kv = _kv(s)
    s.park(PinnedPool(1 << 22))
    s.resume()
    for (k0, v0), (k1, v1) in zip(kv, _kv(s)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_disk_full_during_session_save_keeps_previous(mt, tmp_path, monkeypatch, fail_at):
    model, tok = mt
    s = _session(mt)
    path = tmp_path / "ck"
    s.save(path)
    saved_ids = list(s.token_ids)
    s.add("user", "More text after the first save.")
    s.generate(max_new_tokens=4)

    real, calls = ckpt._save_file, []

    def flaky(tensors, file):
        calls.append(file)
        if len(calls) == fail_at:
            real(tensors, file)  # a partial file sits in the temp dir when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, file)

    monkeypatch.setattr(ckpt, "_save_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        s.save(path)
    monkeypatch.setattr(ckpt, "_save_file", real)
    if len(calls) < fail_at:
        pytest.skip(f"a session checkpoint writes {len(calls)} tensor files")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left behind
    loaded = Session.load(path, model, tok)
    assert loaded.token_ids == saved_ids  # the previous checkpoint, intact
    # The live session is unharmed and a retry succeeds.
    s.add("user", "Retry.")
    s.generate(max_new_tokens=3)
    s.save(path)
    assert Session.load(path, model, tok).token_ids == s.token_ids


def test_park_before_anything_was_fed(mt):
    """A session that has fed nothing holds no buffer: park moves 0 bytes and resume works."""
    model, tok = mt
    s = Session(model, tok, kvcompact.KVCompactCache(model.config, kv_dtype="fp8_e4m3"))
    assert s.park() == 0 and s.parked
    with pytest.raises(kvcompact.agent.SessionError, match="parked"):
        s.prefill()
    s.resume()
    s.add("user", "Hello.")
    s.generate(max_new_tokens=2)
    assert s.token_ids == s.renderer.render_ids(s.messages)


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_load_of_a_consistent_checkpoint_with_a_bad_tensor(mt, tmp_path, damage):
    """A checkpoint whose checksums are fine but whose tensors do not fit the saved layers (a
    re-signed edit): CheckpointError naming the tensor, not a ValueError from the cache."""
    model, tok = mt
    s = _session(mt)
    path = tmp_path / "ck"
    s.save(path)
    tensors, meta = ckpt.read_checkpoint(path)
    if damage == "missing":
        del tensors["key_codes.1"]
    else:
        tensors["key_codes.1"] = tensors["key_codes.1"][:, :, :-1]
    ckpt.write_checkpoint(path, tensors, meta)
    with pytest.raises(ckpt.CheckpointError, match="key_codes"):
        Session.load(path, model, tok)
