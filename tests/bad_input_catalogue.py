"""The bad-input catalogue: (name, expected exception, substring the message must contain, thunk).

Run as a script it executes every entry in this one process and prints one JSON
line per entry; tests/test_bad_input.py runs it in a subprocess so a crash
(segfault, abort) fails the test instead of the test runner. Each substring is
the argument's name (or the value it rejected), so a message that does not say
what was wrong fails too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

import kvcompact
from kvcompact import ops
from kvcompact.agent.checkpoint import CheckpointError
from kvcompact.offload import PoolExhaustedError

F32, BF16, I64 = torch.float32, torch.bfloat16, torch.int64
E4M3 = torch.float8_e4m3fn


def _q(fmt="int8", shape=(1, 2, 4, 8), g=None):
    return ops.quantize(torch.randn(shape), fmt, g)


def _inv(half=4):
    return 1.0 / (10000 ** (torch.arange(0, 2 * half, 2, dtype=F32) / (2 * half)))


def _tiny_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _cache(**kw):
    return kvcompact.KVCompactCache(_tiny_config(), **kw)


def _policy(name, **kw):
    from kvcompact.policies import get_policy
    return get_policy(name, **kw)


def _cli(*argv):
    """The CLI's argparse exits with status 2 on a bad argument; surface the message."""
    import contextlib
    import io
    from kvcompact.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
    if rc:
        raise ValueError(f"exit {rc}: {err.getvalue()}")


def _ckpt_dir(mutate):
    from kvcompact.agent.checkpoint import read_checkpoint, write_checkpoint
    d = Path(tempfile.mkdtemp()) / "ck"
    write_checkpoint(d, {"k": torch.arange(64, dtype=F32).reshape(4, 16)}, {"note": "x"})
    mutate(d)
    read_checkpoint(d)


def _flip_byte(d):
    f = next(p for p in sorted(d.iterdir()) if p.suffix != ".json")
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _truncate_tensor_file(d):
    f = next(p for p in sorted(d.iterdir()) if p.suffix != ".json")
    f.write_bytes(f.read_bytes()[:10])


def _manifest(d):
    from kvcompact.agent.checkpoint import MANIFEST
    return d / MANIFEST


def _garbage_manifest(d):
    _manifest(d).write_text("{not json")


def _version_bump(d):
    m = json.loads(_manifest(d).read_text())
    m["format_version"] = 999
    _manifest(d).write_text(json.dumps(m))


def _delete_tensor_file(d):
    next(p for p in sorted(d.iterdir()) if p.suffix != ".json").unlink()


def _missing_dir():
    from kvcompact.agent.checkpoint import read_checkpoint
    read_checkpoint(Path(tempfile.mkdtemp()) / "nope")


def _session_cls():
    from kvcompact.agent import Session
    return Session


class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _tiny_config()
        self.w = torch.nn.Parameter(torch.zeros(1))


def _session(cache=None):
    return _session_cls()(_FakeModel(), None, cache)


def _session_nonempty_cache():
    c = _cache()
    c.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    c.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 1)
    _session(c)


def _pool_tensor_too_big():
    from kvcompact.offload import PinnedPool
    PinnedPool(4096).tensor((1 << 20,), F32)


def _pool_negative():
    from kvcompact.offload import PinnedPool
    PinnedPool(-5)


codes_i8, scales_i8 = _q("int8")

# (name, exception type, substring of the message, thunk)
CATALOGUE = [
    # -- quantize / dequantize
    ("quantize bad fmt", ValueError, "fmt", lambda: ops.quantize(torch.randn(2, 8), "int4")),
    ("quantize group not divisor", ValueError, "group_size", lambda: ops.quantize(torch.randn(2, 8), "int8", 3)),
    ("quantize group zero", ValueError, "group_size", lambda: ops.quantize(torch.randn(2, 8), "int8", 0)),
    ("quantize group negative", ValueError, "group_size", lambda: ops.quantize(torch.randn(2, 8), "int8", -8)),
    ("quantize int input", TypeError, "x", lambda: ops.quantize(torch.ones(2, 8, dtype=I64), "int8")),
    ("quantize 0-dim", ValueError, "x", lambda: ops.quantize(torch.tensor(1.0), "int8")),
    ("quantize_into_ codes dtype", TypeError, "codes",
     lambda: ops.quantize_into_(torch.randn(2, 8), torch.empty(2, 8, dtype=E4M3), torch.empty(2, 1), "int8")),
    ("quantize_into_ codes shape", ValueError, "codes",
     lambda: ops.quantize_into_(torch.randn(2, 8), torch.empty(3, 8, dtype=torch.int8), torch.empty(3, 1), "int8")),
    ("quantize_into_ scales dtype", TypeError, "scales",
     lambda: ops.quantize_into_(torch.randn(2, 8), torch.empty(2, 8, dtype=torch.int8), torch.empty(2, 1, dtype=BF16), "int8")),
    ("quantize_into_ scales groups", ValueError, "scales",
     lambda: ops.quantize_into_(torch.randn(2, 8), torch.empty(2, 8, dtype=torch.int8), torch.empty(2, 3), "int8")),
    ("quantize_into_ overlapping codes", ValueError, "codes",
     lambda: ops.quantize_into_(torch.randn(2, 8), torch.empty(8, dtype=torch.int8).expand(2, 8), torch.empty(2, 1), "int8")),
    ("quantize_into_ overlapping scales", ValueError, "scales",
     lambda: ops.quantize_into_(torch.randn(2, 8), torch.empty(2, 8, dtype=torch.int8), torch.empty(1, 1).expand(2, 1), "int8")),
    ("dequantize_into_ overlapping out", ValueError, "out",
     lambda: ops.dequantize_into_(codes_i8, scales_i8, torch.empty(8).expand(1, 2, 4, 8))),
    ("dequantize float codes", TypeError, "codes", lambda: ops.dequantize(torch.randn(2, 8), torch.ones(2, 1))),
    ("dequantize scales shape", ValueError, "scales", lambda: ops.dequantize(codes_i8, torch.ones(1, 2, 4, 3))),
    ("dequantize int dtype", TypeError, "dtype", lambda: ops.dequantize(codes_i8, scales_i8, torch.int32)),
    ("dequantize_into_ out shape", ValueError, "out",
     lambda: ops.dequantize_into_(codes_i8, scales_i8, torch.empty(1, 2, 4, 4))),
    ("dequantize_into_ out int", TypeError, "out",
     lambda: ops.dequantize_into_(codes_i8, scales_i8, torch.empty(1, 2, 4, 8, dtype=I64))),
    # -- compact_
    ("compact_ empty list", ValueError, "tensors", lambda: ops.compact_([], torch.zeros(1, 1, 0, dtype=I64))),
    ("compact_ keep dtype", TypeError, "keep_idx", lambda: ops.compact_([torch.randn(1, 2, 4, 8)], torch.zeros(1, 2, 1, dtype=torch.int32))),
    ("compact_ keep out of range", IndexError, "keep_idx", lambda: ops.compact_([torch.randn(1, 2, 4, 8)], torch.full((1, 2, 1), 4, dtype=I64))),
    ("compact_ keep negative", IndexError, "keep_idx", lambda: ops.compact_([torch.randn(1, 2, 4, 8)], torch.full((1, 2, 1), -1, dtype=I64))),
    ("compact_ keep not increasing", ValueError, "keep_idx",
     lambda: ops.compact_([torch.randn(1, 1, 4, 8)], torch.tensor([[[2, 1]]]))),
    ("compact_ keep too long", ValueError, "keep_idx", lambda: ops.compact_([torch.randn(1, 1, 2, 8)], torch.zeros(1, 1, 3, dtype=I64))),
    ("compact_ keep B/H mismatch", ValueError, "keep_idx", lambda: ops.compact_([torch.randn(1, 2, 4, 8)], torch.zeros(1, 3, 1, dtype=I64))),
    ("compact_ tensors disagree on T", ValueError, "tensors",
     lambda: ops.compact_([torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8)], torch.zeros(1, 2, 1, dtype=I64))),
    ("compact_ 2-D tensor", ValueError, "tensors", lambda: ops.compact_([torch.randn(4, 8)], torch.zeros(1, 1, 1, dtype=I64))),
    ("compact_ overlapping tensor", ValueError, "tensors",
     lambda: ops.compact_([torch.randn(1, 1, 1, 8).expand(1, 1, 4, 8)], torch.tensor([[[1, 2]]]))),
    # -- move_
    ("move_ empty list", ValueError, "tensors", lambda: ops.move_([], 0, 1, 0)),
    ("move_ src_end < src_start", ValueError, "src_end", lambda: ops.move_([torch.randn(1, 1, 4, 2)], 3, 1, 0)),
    ("move_ src_end > T", IndexError, "src_end", lambda: ops.move_([torch.randn(1, 1, 4, 2)], 0, 5, 0)),
    ("move_ dst past T", IndexError, "dst_start", lambda: ops.move_([torch.randn(1, 1, 4, 2)], 0, 2, 3)),
    ("move_ negative src_start", IndexError, "src_start", lambda: ops.move_([torch.randn(1, 1, 4, 2)], -1, 2, 0)),
    # -- rope_shift_ / rope_shift_quantized_
    ("rope_shift_ bad style", ValueError, "style", lambda: ops.rope_shift_(torch.randn(1, 1, 2, 8), torch.zeros(2, dtype=I64), _inv(), "rotate")),
    ("rope_shift_ delta float", TypeError, "delta", lambda: ops.rope_shift_(torch.randn(1, 1, 2, 8), torch.zeros(2), _inv())),
    ("rope_shift_ delta length", ValueError, "delta", lambda: ops.rope_shift_(torch.randn(1, 1, 2, 8), torch.zeros(3, dtype=I64), _inv())),
    ("rope_shift_ rotary > D", ValueError, "inv_freq", lambda: ops.rope_shift_(torch.randn(1, 1, 2, 8), torch.zeros(2, dtype=I64), _inv(5))),
    ("rope_shift_ inv_freq dtype", TypeError, "inv_freq", lambda: ops.rope_shift_(torch.randn(1, 1, 2, 8), torch.zeros(2, dtype=I64), _inv().double())),
    ("rope_shift_ int keys", TypeError, "keys", lambda: ops.rope_shift_(torch.zeros(1, 1, 2, 8, dtype=I64), torch.zeros(2, dtype=I64), _inv())),
    ("rope_shift_ 3-D keys", ValueError, "keys", lambda: ops.rope_shift_(torch.randn(1, 2, 8), torch.zeros(2, dtype=I64), _inv())),
    ("rope_shift_quantized_ float codes", TypeError, "codes",
     lambda: ops.rope_shift_quantized_(torch.randn(1, 2, 4, 8), scales_i8, torch.zeros(4, dtype=I64), _inv())),
    ("rope_shift_quantized_ scales shape", ValueError, "scales",
     lambda: ops.rope_shift_quantized_(codes_i8, torch.ones(1, 2, 4, 3), torch.zeros(4, dtype=I64), _inv())),
    # -- copy_blocks_
    ("copy_blocks_ mapping dtype", TypeError, "block_mapping", lambda: ops.copy_blocks_(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(1, 2, dtype=torch.int32))),
    ("copy_blocks_ mapping shape", ValueError, "block_mapping", lambda: ops.copy_blocks_(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(1, 3, dtype=I64))),
    ("copy_blocks_ src index", IndexError, "block_mapping", lambda: ops.copy_blocks_(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([[4, 0]]))),
    ("copy_blocks_ dst index", IndexError, "block_mapping", lambda: ops.copy_blocks_(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([[0, -1]]))),
    ("copy_blocks_ dtype mismatch", TypeError, "dst", lambda: ops.copy_blocks_(torch.randn(4, 8), torch.randn(4, 8, dtype=BF16), torch.tensor([[0, 0]]))),
    ("copy_blocks_ block shape mismatch", ValueError, "dst", lambda: ops.copy_blocks_(torch.randn(4, 8), torch.randn(4, 9), torch.tensor([[0, 0]]))),
    # -- cache
    ("cache kv_dtype", ValueError, "kv_dtype", lambda: _cache(kv_dtype="int4")),
    ("cache group_size not divisor", ValueError, "group_size", lambda: _cache(kv_dtype="int8", group_size=3)),
    ("cache group_size without kv_dtype", ValueError, "group_size", lambda: _cache(group_size=4)),
    ("cache budget too small", ValueError, "budget", lambda: _cache(budget=2)),
    ("cache budget float", ValueError, "budget", lambda: _cache(budget=64.0)),
    ("cache residual negative", ValueError, "residual", lambda: _cache(kv_dtype="int8", residual=-1)),
    ("cache policy without budget", ValueError, "budget", lambda: _cache(policy="streaming")),
    ("cache policy object", ValueError, "policy", lambda: _cache(budget=64, policy=object())),
    ("cache offload layers pool", ValueError, "pool", lambda: _cache(offload="layers", pool=object())),
    ("cache offload unknown", ValueError, "offload", lambda: _cache(offload="always")),
    ("cache pool not a pool", ValueError, "pool", lambda: _cache(offload="idle", pool=object())),
    ("cache resume not parked", ValueError, "park", lambda: _cache(offload="idle").resume()),
    # -- policies
    ("policy unknown name", ValueError, "nonexistent", lambda: _policy("nonexistent")),
    # -- session
    ("session non-empty cache", ValueError, "cache", _session_nonempty_cache),
    ("session budget cache", ValueError, "budget", lambda: _session(_cache(budget=64))),
    # -- pinned pool
    ("pool exhausted", PoolExhaustedError, "PinnedPool", _pool_tensor_too_big),
    ("pool negative capacity", ValueError, "capacity", _pool_negative),
    # -- checkpoints
    ("checkpoint flipped byte", CheckpointError, "sha256", lambda: _ckpt_dir(_flip_byte)),
    ("checkpoint truncated file", CheckpointError, "truncated", lambda: _ckpt_dir(_truncate_tensor_file)),
    ("checkpoint garbage manifest", CheckpointError, "manifest", lambda: _ckpt_dir(_garbage_manifest)),
    ("checkpoint future version", CheckpointError, "version", lambda: _ckpt_dir(_version_bump)),
    ("checkpoint missing tensor file", CheckpointError, "missing", lambda: _ckpt_dir(_delete_tensor_file)),
    ("checkpoint missing dir", CheckpointError, "nope", _missing_dir),
    # -- CLI
    ("cli estimate negative context", ValueError, "--context", lambda: _cli("estimate", "--model", "llama3-8b", "--context", "-5")),
    ("cli estimate bad kv-dtype", ValueError, "--kv-dtype", lambda: _cli("estimate", "--model", "llama3-8b", "--kv-dtype", "int3")),
    ("cli estimate zero group", ValueError, "--group-size", lambda: _cli("estimate", "--model", "llama3-8b", "--group-size", "0")),
    ("cli estimate bad gpu-mem", ValueError, "--gpu-mem", lambda: _cli("estimate", "--model", "llama3-8b", "--gpu-mem", "lots")),
    ("cli estimate unknown model", ValueError, "model", lambda: _cli("estimate", "--model", "no-such-model-xyz")),
    ("cli estimate missing config", ValueError, "config", lambda: _cli("estimate", "--config", "/nonexistent/config.json")),
    ("cli demo zero steps", ValueError, "--steps", lambda: _cli("demo", "--steps", "0")),
    ("cli demo bad device", ValueError, "--device", lambda: _cli("demo", "--device", "tpu")),
    ("cli unknown command", ValueError, "invalid choice", lambda: _cli("frobnicate")),
]


def run_one(entry):
    name, exc, needle, thunk = entry
    try:
        thunk()
    except BaseException as e:  # noqa: BLE001 - recorded, judged by the test
        msg = str(e)
        ok = isinstance(e, exc) and needle.lower() in msg.lower()
        return {"name": name, "ok": ok, "raised": type(e).__name__, "expected": exc.__name__,
                "needle": needle, "message": msg[:400]}
    return {"name": name, "ok": False, "raised": None, "expected": exc.__name__, "needle": needle,
            "message": "no exception"}


if __name__ == "__main__":
    only = set(sys.argv[1:])
    for entry in CATALOGUE:
        if only and entry[0] not in only:
            continue
        print(json.dumps(run_one(entry)), flush=True)
