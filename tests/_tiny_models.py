"""Seeded tiny random-weight decoders for generation tests (no download, fp32, eval mode).

Every model here shares one vocabulary size, so any of them can be the assistant of any other in
assisted decoding (``generate`` requires the same token space when no tokenizers are passed).
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128

# hidden 64, 4 query heads over 2 KV heads (GQA), head_dim 16.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class, extra config arguments)
ARCHS = {
    "llama": (transformers.LlamaConfig, dict(num_hidden_layers=3)),
    "llama_deep": (transformers.LlamaConfig, dict(num_hidden_layers=6)),  # many layers per two slots
    "qwen2": (transformers.Qwen2Config, dict(num_hidden_layers=2, use_sliding_window=False)),
    # window 20: longer than the tests' prompts, shorter than prompt + new tokens
    "mistral_window": (transformers.MistralConfig, dict(num_hidden_layers=2, sliding_window=20)),
    "mistral": (transformers.MistralConfig, dict(num_hidden_layers=4, sliding_window=None)),
    # Gemma-2 style hybrid: sliding (window 16) and full-attention layers alternate
    "gemma2": (transformers.Gemma2Config, dict(num_hidden_layers=4, head_dim=16, sliding_window=16,
                                               query_pre_attn_scalar=16)),
    # the assistant: one layer, smaller MLP, same vocabulary
    "assistant": (transformers.LlamaConfig, dict(num_hidden_layers=1, intermediate_size=48)),
}

_MODELS: dict = {}


def tiny_config(name: str, vocab_size: int = VOCAB):
    cls, extra = ARCHS[name]
    return cls(**{**_COMMON, **extra, "vocab_size": vocab_size})


def tiny_model(name: str, vocab_size: int = VOCAB, attn: str = "sdpa"):
    """The seeded model ``name`` (built once per process; weights depend only on the arguments).

    The generation config never stops on EOS (``eos_token_id=None``), so every run produces
    exactly ``max_new_tokens`` and outputs of two runs can be compared with ``torch.equal``.
    """
    key = (name, vocab_size, attn)
    if key not in _MODELS:
        torch.manual_seed(0)
        config = tiny_config(name, vocab_size)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        model = model.float().eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        _MODELS[key] = model
    return _MODELS[key]
