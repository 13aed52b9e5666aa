"""kvcompact under transformers tensor parallelism (``tp_plan="auto"``), two ranks on CPU (gloo).

One ``torchrun --nproc-per-node 2`` launch of ``tp_worker.py`` runs every configuration on a tiny
random Llama whose two KV heads are split across the ranks (each rank's cache holds one); this
process runs the same code unsharded as the reference. Set ``KVCOMPACT_TP_BACKEND=nccl`` on a
machine with two GPUs to run the ranks on CUDA instead (``benchmarks/gpu_check.sh`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import tp_worker
from agent_fixtures import smollm2_tokenizer
from kvcompact.agent import CheckpointError, Session
from kvcompact.agent.checkpoint import MANIFEST, model_identity, read_checkpoint

WORLD = 2
BACKEND = os.environ.get("KVCOMPACT_TP_BACKEND", "gloo")
LAUNCH_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_llama(vocab_size: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                      num_attention_heads=4, num_key_value_heads=WORLD, num_hidden_layers=2,
                                      max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    model.generation_config.eos_token_id = None
    return model


def _launch(model_dir: Path, tok_dir: Path, out: Path) -> tuple[float, str]:
    """Run the worker on ``WORLD`` ranks bound to 127.0.0.1; kill the whole process group on timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if BACKEND == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # transformers picks gloo for CPU ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(Path(tp_worker.__file__)), str(model_dir), str(tok_dir), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s:\n{log[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{log[-4000:]}"
    return time.perf_counter() - t0, log


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    """(reference results, per-rank results, model, tokenizer, work dir, launch seconds)."""
    root = tmp_path_factory.mktemp("tp")
    tokenizer = smollm2_tokenizer()
    model = _tiny_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "out").mkdir()
    (root / "ref").mkdir()
    # On NCCL the ranks run on CUDA: the reference runs there too, so both use the same kernels.
    ref_model = model.to("cuda") if BACKEND == "nccl" else model
    reference = tp_worker.run_configs(ref_model, tokenizer, checkpoint_dir=root / "ref" / "ckpt")
    model = ref_model.to("cpu")
    wall, _ = _launch(root / "model", root / "tokenizer", root / "out")
    ranks = [json.loads((root / "out" / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    return reference, ranks, model, tokenizer, root, wall


CONFIGS = ("lossless", "int8", "snapkv", "session")


def test_launch_is_tensor_parallel(tp):
    _, ranks, _, _, _, wall = tp
    assert [r["rank"] for r in ranks] == list(range(WORLD))
    assert all(r["world_size"] == WORLD and r["backend"] == BACKEND for r in ranks)
    for name in ("lossless", "int8", "snapkv"):
        # the KV heads are split: each rank's cache holds one of the model's two
        assert all(r[name]["heads"] == [1, 1] for r in ranks), name
    print(f"torchrun launch (2 ranks, every configuration): {wall:.1f} s; model load "
          f"{max(r['load_s'] for r in ranks):.1f} s; per configuration on rank 0: {ranks[0]['timings_s']}")


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_single_process(tp, name):
    reference, ranks, _, _, _, _ = tp
    assert reference[name]["physical_tokens"]  # the reference ran and cached something
    for r in ranks:
        got = {k: v for k, v in r[name].items() if k != "heads"}
        want = {k: v for k, v in reference[name].items() if k != "heads"}
        assert got == want, f"rank {r['rank']}: {name}"


def test_budget_keeps_same_token_count_on_every_rank(tp):
    reference, ranks, _, _, _, _ = tp
    counts = [r["snapkv"]["physical_tokens"] for r in ranks]
    assert counts[0] == counts[1] == reference["snapkv"]["physical_tokens"]
    # the budget evicted: fewer tokens than the lossless cache holds, and other tokens decoded
    assert max(counts[0]) < min(ranks[0]["lossless"]["physical_tokens"])
    assert ranks[0]["snapkv"]["tokens"] != ranks[0]["lossless"]["tokens"]


def test_checkpoint_per_rank_resumes_equal(tp):
    reference, ranks, model, _, root, _ = tp
    ckpt = root / "out" / "ckpt"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    # hashed from gathered shards: the same identity as the unsharded model's
    assert manifest["model"] == model_identity(model)
    assert manifest["world_size"] == WORLD and sorted(manifest["ranks"]) == ["rank-00000", "rank-00001"]
    assert manifest["files"] == {}  # the tensors are in the parts only
    for r in ranks:
        c = r["checkpoint"]
        assert c["loaded"] == c["original"] and c["loaded_ids"] == c["original_ids"]
        assert c == reference["checkpoint"]
    for r in range(WORLD):
        tensors, meta = read_checkpoint(ckpt, world=(r, WORLD))
        assert all(t.shape[1] == 1 for t in tensors.values())  # one KV head per rank
        assert meta["session"]["cache"]["layers"][0]["shape"][1] == 1


@pytest.mark.parametrize("hook,failing_rank", [("_save_file", WORLD - 1), ("_install", 0)],
                         ids=["last rank's write fails", "rank 0's install fails"])
def test_failed_save_on_one_rank_leaves_previous_checkpoint(tp, hook, failing_rank):
    reference, ranks, _, _, _, _ = tp
    for r in ranks:
        assert r["failed_save"]["differs_from_session"]  # a save that went through would be seen
        f = r["failed_save"][hook]
        assert f["raised"] and "No space left" in f["raised"], f
        if r["rank"] != failing_rank:  # told which rank failed
            assert f"rank {failing_rank}" in f["raised"], f
        assert f["still_first_save"] and f["leftovers"] == [], f
    assert reference["failed_save"][hook]["still_first_save"]


def test_checkpoint_refused_at_other_world_size(tp):
    _, _, model, tokenizer, root, _ = tp
    with pytest.raises(CheckpointError, match="saved at world size 2, loading at world size 1"):
        Session.load(root / "out" / "ckpt", model, tokenizer)
    with pytest.raises(CheckpointError, match="saved at world size 1, loading at world size 2"):
        read_checkpoint(root / "ref" / "ckpt", world=(0, WORLD))
    with pytest.raises(ValueError, match="world must be"):
        read_checkpoint(root / "ref" / "ckpt", world=(2, 2))


def test_mixed_parts_refused(tp):
    _, _, _, _, root, _ = tp
    mixed = root / "mixed"
    shutil.copytree(root / "out" / "ckpt", mixed)
    shutil.copy(mixed / "rank-00000" / MANIFEST, mixed / "rank-00001" / MANIFEST)
    read_checkpoint(mixed, world=(0, WORLD))  # rank 0's part is untouched
    with pytest.raises(CheckpointError, match="parts of different saves were mixed"):
        read_checkpoint(mixed, world=(1, WORLD))
