"""Checkpoint directories: round trip, corruption of any byte of any file, identity checks, and crash safety
(SIGKILL during writes, a full disk, an interrupted non-atomic swap)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import sys
import time

import pytest
import torch

from kvcompact.agent import checkpoint as ckpt
from kvcompact.agent.checkpoint import (FORMAT_VERSION, MANIFEST, CheckpointError, model_identity, read_checkpoint,
                                        write_checkpoint)

IDENTITY = {"model_type": "llama", "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 8}


def _tensors(seed=0, tokens=16):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(4, 2, tokens * 2, 8, generator=g)
    x = torch.randn(1, 2, tokens, 8, generator=g)
    return {
        "keys.0": torch.randn(1, 2, tokens, 8, generator=g).to(torch.float8_e4m3fn),
        "keys.1": torch.randn(1, 2, tokens, 8, generator=g).to(torch.bfloat16),
        "values.0": big[1, :, :tokens],  # a view into a bigger storage
        "values.1": x.transpose(2, 3),  # non-contiguous
        "scales.0": torch.rand(1, 2, tokens, 1, generator=g),
        "codes.0": torch.randint(-127, 128, (1, 2, tokens, 8), generator=g, dtype=torch.int8),
        "positions": torch.arange(tokens, dtype=torch.int64),
    }


def _equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype.itemsize == 1 else a[k], b[k].view(torch.uint8)
                           if b[k].dtype.itemsize == 1 else b[k]), k


def _leftovers(tmp_path, name="ck"):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}."))


def test_round_trip_files_and_meta(tmp_path):
    t = _tensors()
    meta = {"model": IDENTITY, "step": 3, "messages": [{"id": "m1", "role": "user", "content": "héllo"}]}
    out = write_checkpoint(tmp_path / "ck", t, meta)
    files = sorted(p.name for p in out.iterdir())
    assert files == [MANIFEST, "tensors-codes.safetensors", "tensors-keys.safetensors", "tensors-positions.safetensors",
                     "tensors-scales.safetensors", "tensors-values.safetensors"]
    got, got_meta = read_checkpoint(out, expected_model_identity=IDENTITY)
    _equal(t, got)
    assert got_meta == meta
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["model"] == IDENTITY
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())
    # Replacing an existing checkpoint, sharded this time.
    t2 = _tensors(seed=1)
    write_checkpoint(out, t2, {"model": IDENTITY, "step": 4}, max_file_bytes=600)
    got, got_meta = read_checkpoint(out)
    _equal(t2, got)
    assert got_meta["step"] == 4
    assert any("-of-" in p.name for p in out.iterdir())
    assert _leftovers(tmp_path) == []


def test_custom_grouping_and_bad_inputs(tmp_path):
    t = _tensors()
    out = write_checkpoint(tmp_path / "ck", t, group=lambda name: "layer" + name.rsplit(".", 1)[-1][-1])
    assert len(list(out.glob("*.safetensors"))) == 3  # layer0, layer1, layers (positions -> "s")
    _equal(t, read_checkpoint(out)[0])
    with pytest.raises(TypeError, match="meta"):
        write_checkpoint(tmp_path / "ck", t, {"bad": object()})
    with pytest.raises(TypeError, match="tensors\\['x'\\]"):
        write_checkpoint(tmp_path / "ck", {"x": [1, 2]})
    _equal(t, read_checkpoint(out)[0])  # failed writes changed nothing
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        read_checkpoint(tmp_path / "empty")


def test_flipping_any_byte_of_any_file_is_detected(tmp_path):
    src = write_checkpoint(tmp_path / "ck", _tensors(tokens=4), {"model": IDENTITY, "note": "x"})
    rng = random.Random(0)
    names = sorted(p.name for p in src.iterdir())
    assert MANIFEST in names and len(names) == 6
    checked = 0
    for name in names:
        data = (src / name).read_bytes()
        positions = sorted({0, 1, len(data) // 2, len(data) - 1, *(rng.randrange(len(data)) for _ in range(4))})
        for pos in positions:
            for flip in (0x01, 0x80):
                corrupted = bytearray(data)
                corrupted[pos] ^= flip
                (src / name).write_bytes(bytes(corrupted))
                with pytest.raises(CheckpointError):
                    read_checkpoint(src)
                checked += 1
        (src / name).write_bytes(data)
    read_checkpoint(src)  # restored: fine again
    assert checked >= 6 * 8
    # Truncated and missing files.
    victim = src / "tensors-keys.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="size"):
        read_checkpoint(src)
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(src)


def _rewrite_manifest(path, **changes):
    m = json.loads((path / MANIFEST).read_text())
    m.pop("manifest_sha256")
    m.update(changes)
    import hashlib
    m["manifest_sha256"] = hashlib.sha256(ckpt._canonical(m)).hexdigest()
    (path / MANIFEST).write_bytes(ckpt._canonical(m))


def test_version_format_and_identity_errors(tmp_path):
    path = write_checkpoint(tmp_path / "ck", _tensors(tokens=2), {"model": IDENTITY})
    with pytest.raises(CheckpointError, match="num_key_value_heads: checkpoint has 2, expected 8"):
        read_checkpoint(path, expected_model_identity={**IDENTITY, "num_key_value_heads": 8})
    with pytest.raises(CheckpointError, match="weights_sha256: checkpoint has '<missing>'"):
        read_checkpoint(path, expected_model_identity={"weights_sha256": "abc"})
    _rewrite_manifest(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="format_version is 2"):
        read_checkpoint(path)
    _rewrite_manifest(path, format_version=FORMAT_VERSION, format="other")
    with pytest.raises(CheckpointError, match="format is 'other'"):
        read_checkpoint(path)
    anon = write_checkpoint(tmp_path / "anon", _tensors(tokens=2), {"step": 1})
    with pytest.raises(CheckpointError, match="records no model identity"):
        read_checkpoint(anon, expected_model_identity=IDENTITY)
    assert issubclass(CheckpointError, ValueError)


def test_model_identity_from_config_and_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    ident = model_identity(cfg)
    assert ident["num_key_value_heads"] == 2 and ident["head_dim"] == 8 and ident["model_type"] == "llama"
    assert "weights_sha256" not in ident
    torch.manual_seed(0)
    a = model_identity(LlamaForCausalLM(cfg))
    torch.manual_seed(1)
    b = model_identity(LlamaForCausalLM(cfg))
    assert a["dtype"] == "float32" and a["weights_sha256"] != b["weights_sha256"]  # same config, other weights
    strip = lambda ident: {k: v for k, v in ident.items() if k != "weights_sha256"}  # noqa: E731
    assert strip(a) == strip(b)


def test_disk_full_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    t = _tensors()
    write_checkpoint(path, t, {"model": IDENTITY, "step": 1})
    real = ckpt._save_file
    calls = []

    def flaky(tensors, file):
        calls.append(file)
        if len(calls) == 3:
            real(tensors, file)  # a partial file exists in the temp dir when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, file)

    monkeypatch.setattr(ckpt, "_save_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(path, _tensors(seed=5), {"model": IDENTITY, "step": 2})
    assert len(calls) == 3
    got, meta = read_checkpoint(path)
    _equal(t, got)
    assert meta["step"] == 1
    assert _leftovers(tmp_path) == []
    # The same when an fsync fails (EIO).
    monkeypatch.setattr(ckpt, "_save_file", real)
    real_fsync = os.fsync

    def fsync_fails(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ckpt.os, "fsync", fsync_fails)
    with pytest.raises(OSError):
        write_checkpoint(path, _tensors(seed=6), {"step": 3})
    monkeypatch.setattr(ckpt.os, "fsync", real_fsync)
    assert read_checkpoint(path)[1]["step"] == 1 and _leftovers(tmp_path) == []


def test_non_atomic_swap_interrupted_between_renames(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE the old checkpoint is moved aside first; dying right after that leaves
    the backup, which readers use and the next writer restores."""
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    path = tmp_path / "ck"
    write_checkpoint(path, _tensors(), {"step": 1})
    write_checkpoint(path, _tensors(seed=1), {"step": 2})  # the fallback swap works
    assert read_checkpoint(path)[1]["step"] == 2 and _leftovers(tmp_path) == []
    real_rename = os.rename

    def rename(src, dst):
        if str(dst) == str(path):
            raise OSError(errno.EIO, "killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError):
        write_checkpoint(path, _tensors(seed=2), {"step": 3})
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    assert not path.exists()
    assert read_checkpoint(path)[1]["step"] == 2  # read from the backup
    write_checkpoint(path, _tensors(seed=3), {"step": 4})
    assert read_checkpoint(path)[1]["step"] == 4 and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- SIGKILL during writes

def _writer_loop(path, sets, started):
    # Forked child: only file IO here (no torch math after fork). Alternates two tensor sets forever.
    k = 0
    while True:
        which = k % 2
        write_checkpoint(path, sets[which], {"which": which, "k": k})
        k += 1
        started.set()


@pytest.mark.skipif(sys.platform != "linux", reason="fork + SIGKILL test is Linux-only")
def test_sigkill_during_write_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ck"
    # ~6 MB per checkpoint over 3 files: a write takes long enough to be killed in the middle.
    sets = [{f"{fam}.{i}": torch.full((1, 8, 2048, 32), float(w + 1)) for fam in ("keys", "values", "scales")
             for i in range(4)} for w in range(2)]
    write_checkpoint(path, sets[0], {"which": 0, "k": -1})
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    outcomes, mid_write = [], 0
    for trial in range(20):
        started = ctx.Event()
        proc = ctx.Process(target=_writer_loop, args=(path, sets, started), daemon=True)
        proc.start()
        # Half the kills come during the very first write, half after some complete ones.
        if trial % 2:
            started.wait(10)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        tensors, meta = read_checkpoint(path)  # must never raise
        expect = float(meta["which"] + 1)
        assert all(bool((t == expect).all()) for t in tensors.values()), "tensors and meta from different writes"
        outcomes.append(meta["k"])
        mid_write += bool(_leftovers(tmp_path))  # a temp dir left: this kill interrupted a write
    # The next write cleans up the killed writers' temporary directories.
    write_checkpoint(path, sets[1], {"which": 1, "k": 99})
    assert read_checkpoint(path)[1]["k"] == 99 and _leftovers(tmp_path) == []
    assert len(set(outcomes)) > 1  # kills landed at different points
    assert mid_write >= 5, f"only {mid_write} of 20 kills interrupted a write"


# --------------------------------------------------------------------------- manifest file names

def _listing_manifest(path, fname, info):
    """Re-sign the manifest of ``path`` with ``files = {fname: info}`` (a valid checksum, so only the
    file-name check can refuse it)."""
    _rewrite_manifest(path, files={fname: info})


def _file_info(file, tensors):
    import hashlib
    data = file.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "tensors": sorted(tensors)}


@pytest.mark.parametrize("kind", ["parent", "absolute", "nested", "backslash", "dot", "dotdot", "empty",
                                  "symlink_out", "directory", "not_str"])
def test_manifest_entries_must_be_plain_files_inside_the_checkpoint(tmp_path, kind):
    """Defect 7: a manifest naming a file outside the checkpoint (or a directory) is refused, even
    with a valid checksum and a valid file behind the name."""
    from safetensors.torch import save_file

    path = write_checkpoint(tmp_path / "ck", {"keys.0": torch.ones(2)}, {"step": 1})
    secret = {"keys.0": torch.full((2,), 7.0)}
    outside = tmp_path / "outside.safetensors"
    save_file(secret, str(outside))
    info = _file_info(outside, secret)
    if kind == "parent":
        fname = "../outside.safetensors"
    elif kind == "absolute":
        fname = str(outside)
    elif kind == "nested":
        (path / "sub").mkdir()
        save_file(secret, str(path / "sub" / "x.safetensors"))
        fname = "sub/x.safetensors"
    elif kind == "backslash":
        fname = "..\\outside.safetensors"
    elif kind in ("dot", "dotdot", "empty"):
        fname = {"dot": ".", "dotdot": "..", "empty": ""}[kind]
    elif kind == "symlink_out":
        fname = "link.safetensors"
        os.symlink(outside, path / fname)
    elif kind == "directory":
        fname = "folder.safetensors"
        (path / fname).mkdir()
    else:
        fname = None
    if kind == "not_str":
        # JSON keys are always strings; a non-dict "files" is the structural equivalent.
        _rewrite_manifest(path, files=[["tensors-keys.safetensors", info]])
        with pytest.raises(CheckpointError, match="files"):
            read_checkpoint(path)
        return
    _listing_manifest(path, fname, info)
    with pytest.raises(CheckpointError, match="manifest entry") as err:
        read_checkpoint(path)
    assert repr(fname) in str(err.value)


def test_manifest_symlink_escaping_is_refused(tmp_path):
    """The manifest itself may not be a link to a file elsewhere."""
    path = write_checkpoint(tmp_path / "ck", {"keys.0": torch.ones(2)}, {"step": 1})
    elsewhere = tmp_path / "elsewhere.json"
    os.replace(path / MANIFEST, elsewhere)
    os.symlink(elsewhere, path / MANIFEST)
    with pytest.raises(CheckpointError, match="symlink"):
        read_checkpoint(path)


def test_manifest_entry_with_bad_info_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "ck", {"keys.0": torch.ones(2)}, {"step": 1})
    _listing_manifest(path, "tensors-keys.safetensors", {"sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="tensors-keys.safetensors"):
        read_checkpoint(path)
