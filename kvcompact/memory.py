"""KV-cache bytes from a model config, and a planner for "how many tokens fit".

Pure Python on purpose: no torch, no ``kvcompact._C``, no ``kvcompact.ops``, so the
numbers can be computed (and the ``estimate`` CLI can run) anywhere, for models that
are nowhere near this machine.

What one cached token costs
---------------------------
Per attention layer the cache holds, for every token, a few tensors of ``heads x dim``
elements. Standard multi-head / grouped-query attention caches K and V::

    bytes/token/layer = 2 (K and V) x num_key_value_heads x head_dim x bytes/element

``num_key_value_heads`` is the number of *KV* heads, not query heads: with GQA
(Llama-3.1-70B: 64 query heads share 8 KV heads) a formula written with
``hidden_size`` (= query heads x head_dim) overstates the cache 8x. ``head_dim`` is
``config.head_dim`` when the config has one (Gemma-2: 256 with hidden 3584 and 16
heads), else ``hidden_size // num_attention_heads``.

Multi-head latent attention (DeepSeek-V2/V3, a config with ``kv_lora_rank``) caches
one compressed latent per token per layer, shared by every head, instead of K and V:
``kv_lora_rank`` elements of ``c_kv`` plus ``qk_rope_head_dim`` elements of the
decoupled rotary key ``k_pe``. There is no separate V and no factor 2::

    bytes/token/layer = (kv_lora_rank + qk_rope_head_dim) x bytes/element

(DeepSeek-V2 paper, arXiv:2405.04434, section 2.1: "MLA only needs to cache
c_t^KV and k_t^R", i.e. (d_c + d_h^R) elements per layer. transformers 5.23's
``DeepseekV3Attention`` caches exactly these two, as single-head tensors: ``kv_nope``
``[B, 1, T, kv_lora_rank]`` in the key slot and ``k_rot`` ``[B, 1, T,
qk_rope_head_dim]`` in the value slot, and expands them after the cache read.)
DeepSeek-V3: 61 layers x (512 + 64) x 2 bytes = 70,272 bytes/token in bf16. Code that
decompresses per-head K/V before caching pays ``num_attention_heads x
(qk_nope_head_dim + qk_rope_head_dim + v_head_dim)`` instead; ``mla="expanded"``
computes that.

Quantized storage (``kv_dtype`` "fp8_e4m3", "fp8_e5m2", "int8") keeps one byte per
element plus one fp32 scale per group of ``group_size`` consecutive elements of a
head (``group_size=None``: one scale per token per head, i.e. 4 bytes per head per
token for K and again for V). This is the layout of :func:`kvcompact.ops.quantize`.

Sliding-window and hybrid models
--------------------------------
A sliding-window layer keeps at most ``sliding_window`` tokens (a chunked-attention
layer at most ``attention_chunk_size``), so the cache at a context of N tokens is::

    sum over layers of bytes/token/layer x min(N, window of the layer)

(This is the peak: transformers' ``DynamicSlidingWindowLayer`` keeps ``window - 1``
tokens between steps and hands attention ``window`` of them, the new token included,
during a decode step. The tests check the formula against its cache, byte for byte.)

Which layers slide comes from ``config.layer_types`` when the config has it
(transformers fills it in for Gemma-2/3, Cohere-2, GPT-OSS, Qwen-2...); otherwise from
``sliding_window_pattern`` (every pattern-th layer is global), the known pattern of
the model type (Gemma-2 alternates, Gemma-3 is 5 local : 1 global), Qwen-2's
``use_sliding_window`` + ``max_window_layers``, and for any other config with a
``sliding_window`` (Mistral-7B-v0.1) every layer. Layer types that keep no per-token
cache (linear attention, Mamba) contribute nothing: their state does not grow.

:func:`kv_bytes_per_token` is the cost of one token while every layer still holds it
(contexts up to the smallest window); :func:`kv_bytes` is the total at a context.

The planner
-----------
:func:`tokens_that_fit` answers "how many tokens fit in M bytes beside the weights":
the largest N with ``kv_bytes(N) <= M - weights - reserve``. The weights are
``num_params x bytes per weight``; with ``num_params=None`` the parameter count is
*estimated* from the config (embeddings, attention incl. GQA and MLA projections, a
gated MLP or MoE experts with shared experts and routers, norms, an untied LM head).
The estimate ignores biases other than Qwen-2's QKV bias, vision towers, and extra
MTP heads; it matches the published counts of the built-in configs to within a
fraction of a percent (exactly for the Llama-style ones). Pass ``num_params`` when
you know it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from kvcompact import formats as _formats

__all__ = [
    "BUILTIN_CONFIGS",
    "CachedTensor",
    "ConfigError",
    "shard_config",
    "KVLayout",
    "LayerCache",
    "StorageFormat",
    "builtin_config",
    "builtin_names",
    "default_reserve",
    "estimate_num_params",
    "format_bytes",
    "kv_bytes",
    "kv_bytes_per_token",
    "kv_layout",
    "load_config",
    "storage_format",
    "tokens_that_fit",
    "weight_bytes",
]

GiB = 1 << 30
SCALE_BYTES = _formats.SCALE_BYTES  # one fp32 scale per group


class ConfigError(ValueError):
    """A config that cannot be read or lacks what the KV arithmetic needs."""


# --------------------------------------------------------------------------------------
# Storage formats
# --------------------------------------------------------------------------------------

# Dense element sizes, by every spelling a user or a config is likely to write.
_DENSE_BYTES = {
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2, "half": 2,
    "fp32": 4, "float32": 4, "float": 4,
}
_DENSE_CANONICAL = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
}
QUANTIZED_FORMATS = _formats.FORMAT_NAMES


@dataclass(frozen=True)
class StorageFormat:
    """How one cached element is stored: ``element_bytes`` per element and, for the
    quantized formats, an fp32 scale per ``group_size`` elements of a head
    (``group_size=None``: one scale per head vector)."""

    name: str
    element_bytes: int
    quantized: bool = False
    group_size: int | None = None

    @property
    def label(self) -> str:
        if not self.quantized:
            return self.name
        return self.name + ("" if self.group_size is None else f" g{self.group_size}")

    def vector_bytes(self, dim: int) -> int:
        """Bytes for one ``dim``-element head vector of one token, scales included."""
        data = dim * self.element_bytes
        if not self.quantized:
            return data
        if self.group_size is None:
            return data + SCALE_BYTES
        if dim % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide a cached head of {dim} elements"
            )
        return data + (dim // self.group_size) * SCALE_BYTES


def _dtype_name(dtype: Any) -> str:
    # Accept torch dtypes without importing torch: str(torch.bfloat16) == "torch.bfloat16".
    name = str(dtype).strip().lower()
    return name[len("torch."):] if name.startswith("torch.") else name


def storage_format(kv_dtype: Any = None, group_size: int | None = None, *,
                   model_dtype: Any = None) -> StorageFormat:
    """Resolve ``kv_dtype`` to a :class:`StorageFormat`.

    ``kv_dtype`` None means the model dtype (``model_dtype``, default bf16). Dense
    names: "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32" (or torch dtypes);
    quantized: "fp8_e4m3", "fp8_e5m2", "int8".
    """
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if kv_dtype is None:
        kv_dtype = model_dtype if model_dtype is not None else "bf16"
    name = _dtype_name(kv_dtype)
    if name in QUANTIZED_FORMATS:
        return StorageFormat(name, _formats.FORMATS[name].code_bytes, True, group_size)
    if name in _DENSE_BYTES:
        if group_size is not None:
            raise ValueError(f"group_size applies to quantized storage only, not {name}")
        return StorageFormat(_DENSE_CANONICAL.get(name, name), _DENSE_BYTES[name])
    raise ValueError(
        f"unknown kv_dtype {kv_dtype!r}; expected one of bf16, fp16, fp32, "
        + ", ".join(QUANTIZED_FORMATS)
    )


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------

def _cfg(**fields: Any) -> dict:
    return fields


# The fields the arithmetic needs, copied from each model's public config.json on the
# Hugging Face Hub (hf_id). Offline on purpose: nothing here may download at run time.
BUILTIN_CONFIGS: dict[str, dict] = {
    "Llama-3.1-8B": _cfg(
        hf_id="meta-llama/Llama-3.1-8B", model_type="llama", torch_dtype="bfloat16",
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "Llama-3.1-70B": _cfg(
        hf_id="meta-llama/Llama-3.1-70B", model_type="llama", torch_dtype="bfloat16",
        num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "Qwen2.5-7B": _cfg(
        hf_id="Qwen/Qwen2.5-7B", model_type="qwen2", torch_dtype="bfloat16",
        num_hidden_layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=131072,
        sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=False,
    ),
    "Qwen2.5-72B": _cfg(
        hf_id="Qwen/Qwen2.5-72B", model_type="qwen2", torch_dtype="bfloat16",
        num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=29568, vocab_size=152064, max_position_embeddings=131072,
        sliding_window=131072, use_sliding_window=False, max_window_layers=80,
        tie_word_embeddings=False,
    ),
    "Mistral-7B-v0.3": _cfg(
        hf_id="mistralai/Mistral-7B-v0.3", model_type="mistral", torch_dtype="bfloat16",
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32768, max_position_embeddings=32768,
        sliding_window=None, tie_word_embeddings=False,
    ),
    "Gemma-2-9B": _cfg(
        hf_id="google/gemma-2-9b", model_type="gemma2", torch_dtype="bfloat16",
        num_hidden_layers=42, hidden_size=3584, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, intermediate_size=14336, vocab_size=256000, max_position_embeddings=8192,
        sliding_window=4096, tie_word_embeddings=True,
    ),
    "DeepSeek-V3": _cfg(
        hf_id="deepseek-ai/DeepSeek-V3", model_type="deepseek_v3", torch_dtype="bfloat16",
        num_hidden_layers=61, hidden_size=7168, num_attention_heads=128, num_key_value_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, vocab_size=129280, max_position_embeddings=163840,
        tie_word_embeddings=False,
    ),
    # The embedded default model (kvcompact.models): SmolLM2-135M(-Instruct).
    "SmolLM2-135M": _cfg(
        hf_id="HuggingFaceTB/SmolLM2-135M", model_type="llama", torch_dtype="bfloat16",
        num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
}


def builtin_names() -> list[str]:
    """Names of the built-in configs, in table order."""
    return list(BUILTIN_CONFIGS)


def builtin_config(name: str) -> dict:
    """A copy of a built-in config, looked up case-insensitively by its name or its
    Hugging Face id (``"llama-3.1-70b"``, ``"meta-llama/Llama-3.1-70B"``)."""
    key = name.strip().lower()
    for builtin, cfg in BUILTIN_CONFIGS.items():
        if key in (builtin.lower(), cfg["hf_id"].lower()):
            return dict(cfg, name=builtin)
    raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_CONFIGS)}")


def load_config(config: Any) -> dict:
    """Turn ``config`` into a plain dict of the text model's fields.

    Accepts a ``transformers.PretrainedConfig`` (anything with ``to_dict()``), a mapping,
    or a path to a ``config.json`` (or to the directory holding one). Multimodal configs
    are unwrapped to their ``text_config`` (``llm_config``/``language_config`` too); the
    outer ``torch_dtype``/``dtype`` is kept when the inner config has none.
    """
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must hold a JSON object, not {type(raw).__name__}")
    elif isinstance(config, Mapping):
        raw = dict(config)
    elif hasattr(config, "to_dict"):
        raw = config.to_dict()
    else:
        raise TypeError(
            "config must be a transformers PretrainedConfig, a dict, or a path to config.json, "
            f"not {type(config).__name__}"
        )
    return _text_config(raw)


def _text_config(raw: dict) -> dict:
    if _get(raw, "num_hidden_layers", "n_layer", "num_layers") is not None:
        return raw
    for key in ("text_config", "llm_config", "language_config"):
        inner = raw.get(key)
        if hasattr(inner, "to_dict"):
            inner = inner.to_dict()
        if isinstance(inner, Mapping):
            inner = dict(inner)
            for dkey in ("torch_dtype", "dtype"):
                if inner.get(dkey) is None and raw.get(dkey) is not None:
                    inner[dkey] = raw[dkey]
            return _text_config(inner)
    return raw


def _get(cfg: Mapping, *names: str, default: Any = None) -> Any:
    """First of ``names`` present in ``cfg`` and not None."""
    for n in names:
        v = cfg.get(n)
        if v is not None:
            return v
    return default


def _need_int(cfg: Mapping, *names: str) -> int:
    v = _get(cfg, *names)
    if v is None:
        raise ConfigError(f"config lacks {names[0]!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"config field {names[0]!r} must be a positive int, got {v!r}")
    return v


def model_dtype(cfg: Mapping) -> str:
    """The dtype the config declares (``dtype`` in transformers 5, ``torch_dtype``
    before), canonicalized; bf16 when it declares none or an unknown one."""
    name = _dtype_name(_get(cfg, "dtype", "torch_dtype", default="bfloat16"))
    return _DENSE_CANONICAL.get(name, name) if name in _DENSE_BYTES else "bf16"


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedTensor:
    """One per-token cached tensor of a layer: ``heads`` vectors of ``dim`` elements."""

    role: str
    heads: int
    dim: int


@dataclass(frozen=True)
class LayerCache:
    """What one layer caches per token, and for how long: ``window`` None means every
    token of the context, an int means at most that many (sliding window / chunk)."""

    kind: str
    tensors: tuple[CachedTensor, ...]
    window: int | None = None

    def bytes_per_token(self, fmt: StorageFormat) -> int:
        return sum(t.heads * fmt.vector_bytes(t.dim) for t in self.tensors)


# (pattern source) -> every `pattern`-th layer is global, the others slide.
_SLIDING_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6, "cohere2": 4, "gpt_oss": 2}
_QWEN_WINDOWED = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
_NO_KV_LAYER_TYPES = ("linear_attention", "mamba", "mamba2", "conv", "recurrent", "moe_mamba")


def _layer_kinds(cfg: Mapping, n_layers: int) -> list[tuple[str, int | None]]:
    """(kind, window) for each layer; kind is "full", "sliding", "chunked" or "none"."""
    sliding = _get(cfg, "sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types:
        if len(layer_types) < n_layers:
            raise ConfigError(
                f"layer_types has {len(layer_types)} entries for {n_layers} layers"
            )
        kinds = []
        for t in layer_types[:n_layers]:
            if t == "full_attention":
                kinds.append(("full", None))
            elif t == "sliding_attention":
                if sliding is None:
                    raise ConfigError("layer_types has sliding_attention but no sliding_window")
                kinds.append(("sliding", int(sliding)))
            elif t == "chunked_attention":
                chunk = _get(cfg, "attention_chunk_size")
                if chunk is None:
                    raise ConfigError(
                        "layer_types has chunked_attention but no attention_chunk_size"
                    )
                kinds.append(("chunked", int(chunk)))
            elif t in _NO_KV_LAYER_TYPES:
                kinds.append(("none", None))
            else:
                raise ConfigError(f"unknown layer type {t!r} in layer_types")
        return kinds

    model_type = str(cfg.get("model_type") or "")
    if sliding is None or cfg.get("use_sliding_window") is False:
        return [("full", None)] * n_layers
    sliding = int(sliding)
    if model_type in _QWEN_WINDOWED:
        # transformers' Qwen2Config: layers from max_window_layers on slide.
        first = int(_get(cfg, "max_window_layers", default=n_layers))
        return [("sliding", sliding) if i >= first else ("full", None) for i in range(n_layers)]
    pattern = _get(cfg, "sliding_window_pattern", "_sliding_window_pattern")
    if pattern is None:
        pattern = _SLIDING_PATTERNS.get(model_type)
    if pattern is None:
        # Mistral-7B-v0.1 semantics: a sliding_window with no pattern applies everywhere.
        return [("sliding", sliding)] * n_layers
    pattern = int(pattern)
    return [
        ("sliding", sliding) if (i + 1) % pattern else ("full", None) for i in range(n_layers)
    ]


def _head_dim(cfg: Mapping) -> int:
    hd = _get(cfg, "head_dim")
    if hd is not None:
        return int(hd)
    hidden = _need_int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _need_int(cfg, "num_attention_heads", "n_head", "num_heads")
    if hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return hidden // heads


def _num_kv_heads(cfg: Mapping) -> int:
    if cfg.get("multi_query") is True:
        return 1
    heads = _need_int(cfg, "num_attention_heads", "n_head", "num_heads")
    # No num_key_value_heads in the config means multi-head attention (one KV head per query head).
    return int(_get(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads))


def _is_mla(cfg: Mapping) -> bool:
    return _get(cfg, "kv_lora_rank") is not None


def _attention_tensors(cfg: Mapping, mla: str) -> tuple[CachedTensor, ...]:
    if _is_mla(cfg):
        rank = _need_int(cfg, "kv_lora_rank")
        rope = _need_int(cfg, "qk_rope_head_dim")
        if mla == "latent":
            return (CachedTensor("c_kv", 1, rank), CachedTensor("k_pe", 1, rope))
        if mla == "expanded":
            heads = _need_int(cfg, "num_attention_heads")
            nope = _need_int(cfg, "qk_nope_head_dim")
            v = _need_int(cfg, "v_head_dim")
            return (CachedTensor("k", heads, nope + rope), CachedTensor("v", heads, v))
        raise ValueError(f"mla must be 'latent' or 'expanded', got {mla!r}")
    kv_heads, hd = _num_kv_heads(cfg), _head_dim(cfg)
    return (CachedTensor("k", kv_heads, hd), CachedTensor("v", kv_heads, hd))


@dataclass(frozen=True)
class KVLayout:
    """Per-layer KV cost of a model under one storage format.

    ``layers``: one :class:`LayerCache` per decoder layer; ``fmt``: the storage.
    """

    layers: tuple[LayerCache, ...]
    fmt: StorageFormat
    config: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs while every layer still holds it."""
        return sum(layer.bytes_per_token(self.fmt) for layer in self.layers)

    @property
    def unbounded_bytes_per_token(self) -> int:
        """Bytes per token once every sliding window is full (what long contexts grow by)."""
        return sum(
            layer.bytes_per_token(self.fmt)
            for layer in self.layers
            if layer.window is None and layer.kind != "none"
        )

    def bytes_at(self, tokens: int) -> int:
        """Cache bytes at a context of ``tokens`` tokens (windowed layers capped)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        total = 0
        for layer in self.layers:
            if layer.kind == "none":
                continue
            held = tokens if layer.window is None else min(tokens, layer.window)
            total += layer.bytes_per_token(self.fmt) * held
        return total

    def max_tokens_within(self, budget: int) -> int | None:
        """Largest N with ``bytes_at(N) <= budget``; None when the cache stops growing
        (every layer windowed) and its capped size fits: any N does."""
        if budget < 0:
            return 0
        growth = self.unbounded_bytes_per_token
        if growth == 0:
            longest = max((layer.window or 0 for layer in self.layers), default=0)
            if self.bytes_at(longest) <= budget:
                return None
            hi = longest
        else:
            hi = budget // growth + 1  # bytes_at(N) >= N * growth, so N <= budget // growth
        lo = 0  # invariant: bytes_at(lo) <= budget < bytes_at(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.bytes_at(mid) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def describe(self) -> dict:
        """Counts for display: layers by kind, windows, tensors of the first KV layer."""
        kinds: dict[str, int] = {}
        for layer in self.layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        windows = sorted({layer.window for layer in self.layers if layer.window is not None})
        first = next((layer for layer in self.layers if layer.kind != "none"), None)
        cfg = self.config
        if _is_mla(cfg):
            attention = "MLA (one cached latent per layer)"
        elif cfg:
            q, kv = _get(cfg, "num_attention_heads", "n_head", "num_heads"), _num_kv_heads(cfg)
            attention = "MHA" if q == kv else ("MQA" if kv == 1 else f"GQA {q // kv}:1")
        else:
            attention = "unknown"
        return {
            "attention": attention,
            "layers": len(self.layers),
            "layer_kinds": kinds,
            "windows": windows,
            "cached_per_layer": [
                {"role": t.role, "heads": t.heads, "dim": t.dim} for t in (first.tensors if first else ())
            ],
        }


def shard_config(config: Any, tp: int) -> dict:
    """The config one rank of ``tp``-way tensor parallelism sees, for KV arithmetic.

    Tensor parallelism splits attention by heads: each rank holds ``num_attention_heads / tp``
    query heads and ``num_key_value_heads / tp`` KV heads. With fewer KV heads than ranks each
    rank holds one (replicated, as transformers' and vLLM's tensor-parallel layers do). MLA's
    latent is not split by heads: every rank caches all of it. ``head_dim`` is kept.

    Raises :class:`ConfigError` when ``tp`` does not divide the query heads, or neither of
    KV heads and ``tp`` divides the other.

    Example
    -------
    >>> kv_bytes(shard_config(builtin_config("Llama-3.1-70B"), 8), 131072) == 5 * 2**30
    True
    """
    cfg = dict(load_config(config))
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tp must be an int >= 1, got {tp!r}")
    if tp == 1:
        return cfg
    heads = _need_int(cfg, "num_attention_heads", "n_head", "num_heads")
    if heads % tp:
        raise ConfigError(f"tp={tp} does not divide num_attention_heads={heads}")
    head_dim = _head_dim(cfg)
    kv = _num_kv_heads(cfg)
    if kv % tp == 0:
        kv_per_rank = kv // tp
    elif tp % kv == 0:
        kv_per_rank = 1
    else:
        raise ConfigError(f"tp={tp} and num_key_value_heads={kv}: neither divides the other")
    for name in ("num_attention_heads", "n_head", "num_heads"):
        if name in cfg:
            cfg[name] = heads // tp
    for name in ("num_key_value_heads", "num_kv_heads", "n_head_kv"):
        if name in cfg:
            cfg[name] = kv_per_rank
    cfg["num_key_value_heads"] = kv_per_rank
    cfg["multi_query"] = False
    cfg["head_dim"] = head_dim
    return cfg


def kv_layout(config: Any, kv_dtype: Any = None, *, group_size: int | None = None,
              dtype: Any = None, mla: str = "latent") -> KVLayout:
    """The per-layer KV layout of ``config`` stored as ``kv_dtype``.

    ``dtype`` overrides the model dtype the config declares (what ``kv_dtype=None``
    stores in). ``mla``: "latent" (what MLA caches) or "expanded" (per-head K/V).
    """
    cfg = load_config(config)
    fmt = storage_format(kv_dtype, group_size,
                         model_dtype=dtype if dtype is not None else model_dtype(cfg))
    n_layers = _need_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    tensors = _attention_tensors(cfg, mla)
    layers = tuple(
        LayerCache(kind, () if kind == "none" else tensors, window)
        for kind, window in _layer_kinds(cfg, n_layers)
    )
    # Validate group divisibility up front, so a bad group_size fails here, not later.
    for t in tensors:
        fmt.vector_bytes(t.dim)
    return KVLayout(layers, fmt, cfg)


def kv_bytes_per_token(config: Any, kv_dtype: Any = None, *, group_size: int | None = None,
                       dtype: Any = None, mla: str = "latent") -> int:
    """Bytes of cache one token costs across all layers (K+V, or MLA's latent).

    Parameters
    ----------
    config : PretrainedConfig | dict | str | os.PathLike
        A transformers config, its dict, or a path to ``config.json``.
    kv_dtype : None | str | torch.dtype
        None: the model dtype (``dtype`` if given, else the config's, else bf16).
        "bf16", "fp16", "fp32", or quantized "fp8_e4m3", "fp8_e5m2", "int8".
    group_size : int | None
        Quantized only: elements per fp32 scale (None: one scale per token per head).
    dtype : None | str | torch.dtype
        Overrides the model dtype for ``kv_dtype=None``.

    For sliding-window layers this counts the token while the window still holds it;
    use :func:`kv_bytes` for the total at a context longer than a window.

    Example
    -------
    >>> kv_bytes_per_token(builtin_config("Llama-3.1-70B"))
    327680
    >>> kv_bytes_per_token(builtin_config("Llama-3.1-70B"), "int8")  # 128 one-byte codes + a 4-byte scale per head
    168960
    """
    return kv_layout(config, kv_dtype, group_size=group_size, dtype=dtype, mla=mla).bytes_per_token


def kv_bytes(config: Any, tokens: int, kv_dtype: Any = None, *, group_size: int | None = None,
             dtype: Any = None, mla: str = "latent") -> int:
    """Total cache bytes at a context of ``tokens`` tokens (sliding layers capped at
    their window). Batch size 1; multiply for a batch.

    >>> kv_bytes(builtin_config("Llama-3.1-70B"), 131072) == 40 * 2**30
    True
    """
    layout = kv_layout(config, kv_dtype, group_size=group_size, dtype=dtype, mla=mla)
    return layout.bytes_at(tokens)


# --------------------------------------------------------------------------------------
# Parameters, weights and the planner
# --------------------------------------------------------------------------------------

_WEIGHT_BITS = {
    "fp32": 32, "float32": 32, "bf16": 16, "bfloat16": 16, "fp16": 16, "float16": 16,
    "fp8": 8, "fp8_e4m3": 8, "fp8_e5m2": 8, "int8": 8, "int4": 4,
}
WEIGHTS_DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8", "int4")


def estimate_num_params(config: Any) -> int:
    """Estimated parameter count of the text model described by ``config``.

    Counts: token embedding; LM head unless ``tie_word_embeddings`` (taken as False
    when the config does not say); per layer the attention projections (GQA: K/V
    sized by KV heads; MLA: the q/kv low-rank projections, their norms and the output
    projection; Qwen-2's QKV biases), a gated MLP (gate, up, down) or, on MoE layers,
    routed + shared experts and the router, the norms; the final norm. Exact for the
    transformers Llama, Qwen-2, Mistral, Mixtral, Qwen-2-MoE, Gemma-2/3 and
    DeepSeek-V3 classes (checked against ``sum(p.numel())`` in the tests). Not counted: other biases, vision/audio towers,
    multi-token-prediction heads (DeepSeek-V3's extra layer). An estimate: for exact
    memory pass ``num_params`` to the planner.
    """
    cfg = load_config(config)
    h = _need_int(cfg, "hidden_size", "n_embd", "d_model")
    n_layers = _need_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _need_int(cfg, "vocab_size")
    heads = _need_int(cfg, "num_attention_heads", "n_head", "num_heads")
    model_type = str(cfg.get("model_type") or "")

    if _is_mla(cfg):
        rank = _need_int(cfg, "kv_lora_rank")
        rope = _need_int(cfg, "qk_rope_head_dim")
        nope = _need_int(cfg, "qk_nope_head_dim")
        v_dim = _need_int(cfg, "v_head_dim")
        q_rank = _get(cfg, "q_lora_rank")
        qk = nope + rope
        q = h * heads * qk if q_rank is None else h * q_rank + q_rank + q_rank * heads * qk
        attn = q + h * (rank + rope) + rank + rank * heads * (nope + v_dim) + heads * v_dim * h
    else:
        hd, kv = _head_dim(cfg), _num_kv_heads(cfg)
        attn = 2 * h * heads * hd + 2 * h * kv * hd
        if cfg.get("attention_bias") or model_type in _QWEN_WINDOWED[:2]:
            attn += heads * hd + 2 * kv * hd  # Qwen-2 always has QKV biases

    dense_mlp = 3 * h * _need_int(cfg, "intermediate_size", "n_inner", "ffn_dim")
    experts = _get(cfg, "n_routed_experts", "num_local_experts", "num_experts")
    moe_mlp = None
    if experts:
        expert_inter = int(_get(cfg, "moe_intermediate_size", "intermediate_size"))
        moe_mlp = experts * 3 * h * expert_inter + h * experts  # experts + router
        shared = _get(cfg, "n_shared_experts")
        if shared:
            moe_mlp += shared * 3 * h * expert_inter
        shared_inter = _get(cfg, "shared_expert_intermediate_size")
        if shared_inter:
            moe_mlp += 3 * h * shared_inter + h  # Qwen-MoE shared expert + its gate
    first_dense = int(_get(cfg, "first_k_dense_replace", default=0))
    freq = int(_get(cfg, "moe_layer_freq", "decoder_sparse_step", default=1))
    mlp_only = set(cfg.get("mlp_only_layers") or ())

    norms = 2 * h
    if model_type.startswith("gemma"):
        norms = 4 * h  # Gemma-2/3 also normalize after attention and after the MLP
    if model_type.startswith(("gemma3", "qwen3")):
        norms += 2 * _head_dim(cfg)  # per-head q_norm and k_norm

    total = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h
    for i in range(n_layers):
        is_moe = moe_mlp is not None and i >= first_dense and i % freq == 0 and i not in mlp_only
        total += attn + (moe_mlp if is_moe else dense_mlp) + norms
    return total


def weight_bytes(num_params: int, weights_dtype: str = "bf16") -> int:
    """Bytes of ``num_params`` weights stored as ``weights_dtype`` (bf16, fp16, fp32,
    fp8, int8, int4; quantization scales not counted)."""
    name = _dtype_name(weights_dtype)
    if name not in _WEIGHT_BITS:
        raise ValueError(
            f"unknown weights_dtype {weights_dtype!r}; expected one of {', '.join(WEIGHTS_DTYPES)}"
        )
    return math.ceil(num_params * _WEIGHT_BITS[name] / 8)


def default_reserve(memory_bytes: int) -> int:
    """Memory kept free for activations, workspaces and the CUDA context when the
    caller names no reserve: 10% of the device (vLLM's default
    ``gpu_memory_utilization=0.9`` leaves the same)."""
    return memory_bytes // 10


def tokens_that_fit(config: Any, memory_bytes: int, *, kv_dtype: Any = None,
                    group_size: int | None = None, weights_dtype: str = "bf16",
                    num_params: int | None = None, reserve_bytes: int | None = None,
                    dtype: Any = None, mla: str = "latent") -> int:
    """How many tokens of KV cache fit in ``memory_bytes`` beside the weights.

    The largest N with ``kv_bytes(config, N, kv_dtype) <= memory_bytes - weights -
    reserve``; 0 when the weights and reserve alone do not fit. ``weights`` =
    ``num_params`` (estimated by :func:`estimate_num_params` when None) stored as
    ``weights_dtype``; ``reserve_bytes`` None = :func:`default_reserve` (10%).

    When every layer is windowed the cache stops growing; if its capped size fits,
    any context fits and the answer is the model's ``max_position_embeddings``
    (ConfigError when the config has none).
    """
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
        raise ValueError(f"memory_bytes must be a non-negative int, got {memory_bytes!r}")
    layout = kv_layout(config, kv_dtype, group_size=group_size, dtype=dtype, mla=mla)
    if num_params is None:
        num_params = estimate_num_params(layout.config)
    reserve = default_reserve(memory_bytes) if reserve_bytes is None else int(reserve_bytes)
    if reserve < 0:
        raise ValueError(f"reserve_bytes must be non-negative, got {reserve_bytes!r}")
    available = memory_bytes - weight_bytes(num_params, weights_dtype) - reserve
    if available <= 0:
        return 0
    n = layout.max_tokens_within(available)
    if n is None:
        limit = _get(layout.config, "max_position_embeddings")
        if limit is None:
            raise ConfigError(
                "every layer is windowed, so any context fits; the config has no "
                "max_position_embeddings to report instead"
            )
        return int(limit)
    return n


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------

def format_bytes(n: float) -> str:
    """Binary units with two decimals: 327680 -> "320.00 KiB", 40 GiB -> "40.00 GiB"."""
    units: Iterable[str] = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
