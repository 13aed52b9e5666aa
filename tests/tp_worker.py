"""Tensor-parallel worker for ``test_tensor_parallel.py``: one launch runs every configuration.

Run by ``torchrun --nproc-per-node N tp_worker.py MODEL_DIR TOKENIZER_DIR OUT_DIR`` (gloo on CPU,
NCCL on CUDA when ``KVCOMPACT_TP_DEVICE=cuda``); each rank writes ``OUT_DIR/rank-<r>.json``. The
test process imports :func:`run_configs` to compute the single-process reference with the same code,
so this module must not import pytest.

Configurations (greedy decoding, the tiny model never stops on EOS):

* ``lossless``, ``int8``: ``model.generate`` with a ``KVCompactCache``.
* ``snapkv``: a SnapKV budget through ``kvcompact.attach``; every rank must keep as many tokens.
* ``session``: a ``Session`` conversation with a drop and a replace, then two replies.
* ``checkpoint`` (only with a checkpoint directory): the session is saved, loaded back, and both
  continue with one more turn; the continuations must be equal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

PROMPT = [1, 17, 33, 5, 90, 41, 7, 64, 12, 3, 77, 18, 29, 50, 8, 61, 44, 9, 100, 21, 36, 14, 70, 55,
          26, 91, 13, 48, 6, 80, 37, 19]
NEW_TOKENS = 12
TOOL_TEXT = "line one of the log\nline two of the log\nline three: error at step 42\n" * 3


def _generate(model, cache, attach=False) -> list:
    import kvcompact
    from kvcompact.cache.compat import cache_kwargs

    ids = torch.tensor([PROMPT], device=model.device)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, **cache_kwargs(cache))
    if attach:
        with kvcompact.attach(model, cache):
            out = model.generate(ids, **kwargs)
    else:
        out = model.generate(ids, **kwargs)
    return out[0, len(PROMPT):].tolist()


def _conversation(model, tokenizer):
    from kvcompact.agent import Session

    s = Session(model, tokenizer)
    s.add("system", "You are a terse agent.")
    s.add("user", "Read the log and summarize it.")
    tool = s.add("tool", TOOL_TEXT)
    s.add("user", "And the step?")
    s.prefill()
    first = s.generate(6)
    dropped = s.drop(tool)
    s.add("user", "Now say it again.")
    second = s.generate(6)
    user_id = s.messages[1].id
    old_new = s.replace(user_id, "Read the log, then summarize it in one line.")
    return s, {"first": first, "dropped": dropped, "second": second, "replaced": list(old_new)}


def _failed_save(session, model, tokenizer, checkpoint_dir) -> dict:
    """Two saves that fail: the last rank's tensor write (a full disk), then rank 0's install of the
    staged directory. Every rank must raise each time, no staging directory may remain, and the
    checkpoint at ``checkpoint_dir`` must still be the first save (what ``Session.load`` returns)."""
    from kvcompact.agent import Session
    from kvcompact.agent import checkpoint as ckpt
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    before = list(Session.load(checkpoint_dir, model, tokenizer).token_ids)
    parent = Path(checkpoint_dir).parent
    report = {"differs_from_session": before != list(session.token_ids)}

    def full_disk(*args):
        raise OSError(28, "No space left on device (injected)")

    for hook, failing_rank in (("_save_file", world - 1), ("_install", 0)):
        real = getattr(ckpt, hook)
        if rank == failing_rank:
            setattr(ckpt, hook, full_disk)
        try:
            session.save(checkpoint_dir)
            raised = None
        except OSError as err:
            raised = str(err)
        finally:
            setattr(ckpt, hook, real)
        report[hook] = {"raised": raised, "still_first_save": list(
            Session.load(checkpoint_dir, model, tokenizer).token_ids) == before,
            "leftovers": sorted(p.name for p in parent.iterdir() if p.name.startswith("."))}
    return report


def run_configs(model, tokenizer, checkpoint_dir=None) -> dict:
    """Every configuration's outputs as JSON-able values (see the module docstring)."""
    from kvcompact.agent import Session
    from kvcompact.cache import KVCompactCache
    from kvcompact.policies.snapkv import SnapKVPolicy

    results: dict = {}
    timings: dict = {}
    for name, kwargs, attach in (("lossless", {}, False), ("int8", {"kv_dtype": "int8"}, False),
                                 ("snapkv", {"budget": 20, "policy": SnapKVPolicy(window=8)}, True)):
        t0 = time.perf_counter()
        cache = KVCompactCache(model.config, **kwargs)
        tokens = _generate(model, cache, attach)
        stats = cache.stats()
        results[name] = {"tokens": tokens, "physical_tokens": list(stats.physical_tokens),
                         "heads": [layer.keys.shape[1] for layer in cache.layers]}
        timings[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    s, info = _conversation(model, tokenizer)
    info["third"] = s.generate(6)
    info["token_ids"] = list(s.token_ids)
    info["physical_tokens"] = list(s.cache.stats().physical_tokens)
    results["session"] = info
    timings["session"] = time.perf_counter() - t0

    if checkpoint_dir is not None:
        t0 = time.perf_counter()
        s, _ = _conversation(model, tokenizer)
        s.save(checkpoint_dir)
        loaded = Session.load(checkpoint_dir, model, tokenizer)
        s.add("user", "Continue.")
        loaded.add("user", "Continue.")
        results["checkpoint"] = {"original": s.generate(6), "loaded": loaded.generate(6),
                                 "original_ids": list(s.token_ids), "loaded_ids": list(loaded.token_ids)}
        results["failed_save"] = _failed_save(s, model, tokenizer, checkpoint_dir)
        timings["checkpoint"] = time.perf_counter() - t0
    results["timings_s"] = timings
    return results


def main(argv) -> int:
    model_dir, tokenizer_dir, out_dir = argv[1:4]
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.distributed import DistributedConfig

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_plan="auto")).eval()
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    load_s = time.perf_counter() - t0
    rank, world = dist.get_rank(), dist.get_world_size()
    results = run_configs(model, tokenizer, checkpoint_dir=os.path.join(out_dir, "ckpt"))
    results.update(rank=rank, world_size=world, backend=dist.get_backend(), load_s=load_s)
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
