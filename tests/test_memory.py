"""kvcompact.memory: KV bytes from configs, the planner, the offline config table.

Known values are exact ints from the public configs; the formulas are cross-checked
byte for byte against the caches transformers itself builds for tiny random models.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

try:
    from kvcompact import memory
except ImportError:  # extension not built here: memory.py itself needs no _C
    _spec = importlib.util.spec_from_file_location("kvcompact_memory", ROOT / "kvcompact" / "memory.py")
    memory = importlib.util.module_from_spec(_spec)
    sys.modules["kvcompact_memory"] = memory
    _spec.loader.exec_module(memory)

GiB = 1 << 30
KiB = 1 << 10


def cfg(name):
    return memory.builtin_config(name)


# ----------------------------------------------------------------------------- known values

@pytest.mark.parametrize(
    "name, per_token",
    [
        ("Llama-3.1-70B", 327_680),   # 2 x 80 layers x 8 KV heads x 128 x 2 B = 320 KiB
        ("Llama-3.1-8B", 131_072),    # 2 x 32 x 8 x 128 x 2 = 128 KiB
        ("SmolLM2-135M", 23_040),     # 2 x 30 x 3 x 64 x 2 = 22.5 KiB
        ("Qwen2.5-7B", 57_344),       # 2 x 28 x 4 x 128 x 2
        ("Qwen2.5-72B", 327_680),     # 2 x 80 x 8 x 128 x 2
        ("Mistral-7B-v0.3", 131_072),  # 2 x 32 x 8 x 128 x 2
        ("Gemma-2-9B", 344_064),      # 2 x 42 x 8 x 256 x 2 (head_dim 256 from the config)
        ("DeepSeek-V3", 70_272),      # 61 x (512 + 64) x 2: one MLA latent, no K/V pair
    ],
)
def test_known_bytes_per_token_bf16(name, per_token):
    assert memory.kv_bytes_per_token(cfg(name)) == per_token
    assert memory.kv_bytes_per_token(cfg(name), "bf16") == per_token
    assert memory.kv_bytes_per_token(cfg(name), "fp16") == per_token


def test_llama_70b_at_128k_is_40_gib():
    assert memory.kv_bytes(cfg("Llama-3.1-70B"), 131_072) == 40 * GiB
    assert memory.kv_bytes_per_token(cfg("Llama-3.1-70B")) == 320 * KiB
    assert memory.kv_bytes(cfg("Llama-3.1-8B"), 131_072) == 16 * GiB


def test_seed_article_hidden_size_formula_overstates_gqa_8x():
    c = cfg("Llama-3.1-70B")
    seed = 2 * c["num_hidden_layers"] * c["hidden_size"] * 2  # what the article computed
    assert seed == 2_621_440  # "~2.5 MB"
    assert seed == 8 * memory.kv_bytes_per_token(c)  # 64 query heads share 8 KV heads


def test_gqa_vs_mha():
    gqa = cfg("Llama-3.1-8B")
    mha = dict(gqa, num_key_value_heads=gqa["num_attention_heads"])
    assert memory.kv_bytes_per_token(mha) == 4 * memory.kv_bytes_per_token(gqa)
    no_kv_field = {k: v for k, v in gqa.items() if k != "num_key_value_heads"}
    assert memory.kv_bytes_per_token(no_kv_field) == memory.kv_bytes_per_token(mha)
    mqa = dict(gqa, num_key_value_heads=1)
    assert memory.kv_bytes_per_token(mqa) == 2 * 32 * 1 * 128 * 2


def test_head_dim_from_config_wins_over_hidden_over_heads():
    g = cfg("Gemma-2-9B")  # 3584 / 16 = 224, but head_dim is 256
    derived = {k: v for k, v in g.items() if k != "head_dim"}
    assert memory.kv_bytes_per_token(g) * 224 == memory.kv_bytes_per_token(derived) * 256
    assert memory.kv_bytes_per_token(dict(g, head_dim=None)) == memory.kv_bytes_per_token(derived)


# ----------------------------------------------------------------------------- MLA

def test_mla_deepseek_v3_latent():
    c = cfg("DeepSeek-V3")
    # DeepSeek-V2 paper (arXiv:2405.04434) sec. 2.1: MLA caches c_kv (kv_lora_rank) and
    # the decoupled rope key (qk_rope_head_dim) per layer, shared by all 128 heads.
    assert memory.kv_bytes_per_token(c) == (512 + 64) * 61 * 2
    # Per-token-"head" scales: c_kv and k_pe are two single-head tensors (as transformers caches them).
    assert memory.kv_bytes_per_token(c, "fp8_e4m3") == 61 * (576 + 2 * 4)
    assert memory.kv_bytes_per_token(c, "int8", group_size=64) == 61 * (576 + (8 + 1) * 4)
    with pytest.raises(ValueError, match="does not divide"):
        memory.kv_bytes_per_token(c, "int8", group_size=128)  # 64-wide k_pe


def test_mla_expanded_is_what_per_head_caching_would_cost():
    c = cfg("DeepSeek-V3")
    expanded = memory.kv_bytes_per_token(c, mla="expanded")
    assert expanded == 61 * 128 * ((128 + 64) + 128) * 2
    assert expanded // memory.kv_bytes_per_token(c) == 71  # what MLA saves
    with pytest.raises(ValueError, match="mla"):
        memory.kv_bytes_per_token(c, mla="nope")


# ----------------------------------------------------------------------------- windows

def test_gemma2_sliding_layers_capped_beyond_window():
    c = cfg("Gemma-2-9B")
    layer = 2 * 8 * 256 * 2  # bytes per token per layer
    layout = memory.kv_layout(c)
    assert layout.describe()["layer_kinds"] == {"sliding": 21, "full": 21}
    assert layout.describe()["windows"] == [4096]
    # Within the window every layer holds every token.
    assert memory.kv_bytes(c, 4096) == 4096 * memory.kv_bytes_per_token(c) == 42 * 4096 * layer
    # Beyond it the 21 sliding layers stop at 4,096 tokens, the 21 global ones keep growing.
    n = 32_768
    assert memory.kv_bytes(c, n) == 21 * n * layer + 21 * 4096 * layer
    assert memory.kv_bytes(c, n) < n * memory.kv_bytes_per_token(c)
    assert layout.unbounded_bytes_per_token == 21 * layer
    # Same growth rate once past the window.
    assert memory.kv_bytes(c, n + 1) - memory.kv_bytes(c, n) == 21 * layer


def test_layer_types_and_patterns():
    base = dict(num_hidden_layers=12, hidden_size=256, num_attention_heads=4,
                num_key_value_heads=1, head_dim=64, sliding_window=100)
    per_layer = 2 * 64 * 2
    # Gemma-3 style: every 6th layer global.
    g3 = dict(base, model_type="gemma3_text", sliding_window_pattern=6)
    assert memory.kv_layout(g3).describe()["layer_kinds"] == {"sliding": 10, "full": 2}
    assert memory.kv_bytes(g3, 1000) == 2 * 1000 * per_layer + 10 * 100 * per_layer
    # The model-type default for gemma3 is the same 5:1 pattern.
    assert memory.kv_bytes(dict(base, model_type="gemma3_text"), 1000) == memory.kv_bytes(g3, 1000)
    # Explicit layer_types win over everything.
    lt = dict(g3, layer_types=["full_attention"] * 3 + ["sliding_attention"] * 9)
    assert memory.kv_bytes(lt, 1000) == 3 * 1000 * per_layer + 9 * 100 * per_layer
    # Chunked attention (Llama-4) is capped at attention_chunk_size; linear attention adds nothing.
    mixed = dict(base, attention_chunk_size=50,
                 layer_types=["chunked_attention", "linear_attention", "full_attention"] * 4)
    assert memory.kv_bytes(mixed, 1000) == 4 * 50 * per_layer + 4 * 1000 * per_layer
    # Qwen-2: a sliding_window that is switched off is ignored...
    qwen = cfg("Qwen2.5-7B")
    assert memory.kv_bytes(qwen, 200_000) == 200_000 * memory.kv_bytes_per_token(qwen)
    # ...and when on, layers from max_window_layers slide.
    qwen_on = dict(qwen, use_sliding_window=True, sliding_window=4096, max_window_layers=20)
    assert memory.kv_layout(qwen_on).describe()["layer_kinds"] == {"full": 20, "sliding": 8}
    # Mistral-7B-v0.1 style: a sliding_window with no pattern applies to every layer.
    mistral01 = dict(cfg("Mistral-7B-v0.3"), sliding_window=4096)
    assert memory.kv_bytes(mistral01, 10**6) == memory.kv_bytes(mistral01, 4096)
    with pytest.raises(memory.ConfigError, match="unknown layer type"):
        memory.kv_bytes(dict(base, layer_types=["weird"] * 12), 10)


# ----------------------------------------------------------------------------- storage

@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_quantized_storage_with_scales(fmt):
    c = cfg("Llama-3.1-70B")
    dense = memory.kv_bytes_per_token(c)
    kv_vectors = 2 * 80 * 8  # K and V head vectors per token
    # One fp32 scale per token per head: 128 one-byte codes + 4 bytes.
    assert memory.kv_bytes_per_token(c, fmt) == kv_vectors * (128 + 4) == 168_960
    assert memory.kv_bytes_per_token(c, fmt, group_size=64) == kv_vectors * (128 + 2 * 4)
    assert memory.kv_bytes_per_token(c, fmt, group_size=32) == kv_vectors * (128 + 4 * 4)
    assert memory.kv_bytes_per_token(c, fmt, group_size=128) == memory.kv_bytes_per_token(c, fmt)
    # Ratios vs bf16: (128 + 4 g) / 256 for g scales per head.
    assert memory.kv_bytes_per_token(c, fmt) / dense == 132 / 256
    assert memory.kv_bytes_per_token(c, fmt, group_size=32) / dense == 144 / 256
    # Quantized sliding layers are capped the same way.
    g = cfg("Gemma-2-9B")
    assert memory.kv_bytes(g, 8192, fmt) == memory.kv_layout(g, fmt).bytes_per_token * (8192 + 4096) // 2


def test_storage_arguments():
    c = cfg("SmolLM2-135M")
    assert memory.kv_bytes_per_token(c, "fp32") == 2 * 23_040
    assert memory.kv_bytes_per_token(c, dtype="float32") == 2 * 23_040  # model dtype override
    assert memory.kv_bytes_per_token(dict(c, torch_dtype="float32")) == 2 * 23_040
    assert memory.kv_bytes_per_token(dict(c, torch_dtype=None, dtype="float16")) == 23_040
    assert memory.kv_bytes_per_token(dict(c, torch_dtype=None)) == 23_040  # default bf16
    torch = pytest.importorskip("torch")
    assert memory.kv_bytes_per_token(c, torch.float32) == 2 * 23_040
    with pytest.raises(ValueError, match="unknown kv_dtype"):
        memory.kv_bytes_per_token(c, "int4")
    with pytest.raises(ValueError, match="quantized storage only"):
        memory.kv_bytes_per_token(c, "bf16", group_size=32)
    with pytest.raises(ValueError, match="does not divide"):
        memory.kv_bytes_per_token(c, "int8", group_size=48)
    with pytest.raises(ValueError, match="positive int"):
        memory.kv_bytes_per_token(c, "int8", group_size=0)
    with pytest.raises(ValueError, match="non-negative"):
        memory.kv_bytes(c, -1)


# ----------------------------------------------------------------------------- inputs

def test_config_forms(tmp_path):
    c = cfg("Llama-3.1-70B")
    raw = {k: v for k, v in c.items() if k not in ("name", "hf_id")}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    expect = 327_680
    assert memory.kv_bytes_per_token(raw) == expect
    assert memory.kv_bytes_per_token(tmp_path / "config.json") == expect
    assert memory.kv_bytes_per_token(str(tmp_path)) == expect  # the directory holding it
    nested = {"model_type": "llava", "torch_dtype": "float32",
              "text_config": {k: v for k, v in raw.items() if k != "torch_dtype"}}
    assert memory.kv_bytes_per_token(nested) == 2 * expect  # outer fp32 carried inward
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert memory.kv_bytes_per_token(hf, dtype="bf16") == expect
    assert memory.kv_bytes(hf, 131_072, "bf16") == 40 * GiB


def test_config_errors(tmp_path):
    with pytest.raises(memory.ConfigError, match="not found"):
        memory.load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(memory.ConfigError, match="not valid JSON"):
        memory.load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(memory.ConfigError, match="JSON object"):
        memory.load_config(bad)
    with pytest.raises(memory.ConfigError, match="num_hidden_layers"):
        memory.kv_bytes_per_token({"hidden_size": 64})
    with pytest.raises(memory.ConfigError, match="positive int"):
        memory.kv_bytes_per_token(dict(cfg("SmolLM2-135M"), num_hidden_layers="30"))
    with pytest.raises(TypeError, match="PretrainedConfig"):
        memory.kv_bytes_per_token(42)
    assert issubclass(memory.ConfigError, ValueError)


def test_builtin_lookup():
    assert memory.builtin_config("llama-3.1-70b")["name"] == "Llama-3.1-70B"
    assert memory.builtin_config("meta-llama/Llama-3.1-70B")["name"] == "Llama-3.1-70B"
    assert memory.builtin_config(" DEEPSEEK-V3 ")["name"] == "DeepSeek-V3"
    with pytest.raises(memory.ConfigError) as e:
        memory.builtin_config("gpt-5")
    for name in memory.builtin_names():
        assert name in str(e.value)
    # Copies: a caller mutating one cannot corrupt the table.
    memory.builtin_config("Llama-3.1-8B")["num_hidden_layers"] = 1
    assert memory.kv_bytes_per_token(cfg("Llama-3.1-8B")) == 131_072


# ----------------------------------------------------------------------------- params, planner

@pytest.mark.parametrize(
    "name, params",
    [
        ("Llama-3.1-8B", 8_030_261_248),    # published exact counts
        ("Llama-3.1-70B", 70_553_706_496),
        ("SmolLM2-135M", 134_515_008),
        ("Qwen2.5-7B", 7_615_616_512),
        ("Mistral-7B-v0.3", 7_248_023_552),
        ("Gemma-2-9B", 9_241_705_984),
    ],
)
def test_param_estimate_exact_for_dense_models(name, params):
    assert memory.estimate_num_params(cfg(name)) == params


def test_param_estimate_deepseek_v3_moe():
    # 671B main model (the 14B multi-token-prediction module is not loaded for inference).
    assert memory.estimate_num_params(cfg("DeepSeek-V3")) == pytest.approx(671e9, rel=0.002)


def test_planner_consistent_and_monotonic():
    c = cfg("Llama-3.1-8B")
    weights = memory.weight_bytes(memory.estimate_num_params(c), "bf16")
    per_token = memory.kv_bytes_per_token(c)
    previous = -1
    for gib in (16, 20, 24, 40, 48, 80, 141):
        mem = gib * GiB
        n = memory.tokens_that_fit(c, mem, reserve_bytes=0)
        available = mem - weights
        assert n * per_token <= available < (n + 1) * per_token
        assert n >= previous
        previous = n
        # Default reserve is 10% of the memory.
        assert memory.tokens_that_fit(c, mem) == max(0, (available - mem // 10)) // per_token
        # Smaller storage fits more.
        n8 = memory.tokens_that_fit(c, mem, kv_dtype="fp8_e4m3", reserve_bytes=0)
        assert n8 * memory.kv_bytes_per_token(c, "fp8_e4m3") <= available
        assert n8 > n or n == 0
    # 80 GiB beside bf16 8B weights: 80 GiB - 14.96 GiB of weights, 128 KiB per token.
    assert memory.tokens_that_fit(c, 80 * GiB, reserve_bytes=0) == (80 * GiB - 16_060_522_496) // 131_072


def test_planner_edges():
    c = cfg("Llama-3.1-70B")
    assert memory.tokens_that_fit(c, 80 * GiB) == 0  # 131 GiB of bf16 weights do not fit
    assert memory.tokens_that_fit(c, 80 * GiB, weights_dtype="int4", reserve_bytes=0) == (
        (80 * GiB - memory.weight_bytes(70_553_706_496, "int4")) // 327_680
    )
    assert memory.tokens_that_fit(c, 10 * GiB, num_params=0, reserve_bytes=0) == 32_768
    assert memory.tokens_that_fit(c, 0) == 0
    with pytest.raises(ValueError, match="weights_dtype"):
        memory.tokens_that_fit(c, GiB, weights_dtype="fp4")
    with pytest.raises(ValueError, match="memory_bytes"):
        memory.tokens_that_fit(c, -1)
    with pytest.raises(ValueError, match="reserve"):
        memory.tokens_that_fit(c, GiB, reserve_bytes=-1)


def test_planner_with_sliding_windows():
    g = cfg("Gemma-2-9B")
    for budget in (10**6, 4095 * 344_064, 4096 * 344_064, 5 * GiB, 20 * GiB):
        n = memory.tokens_that_fit(g, budget, num_params=0, reserve_bytes=0)
        assert memory.kv_bytes(g, n) <= budget < memory.kv_bytes(g, n + 1)
    # All layers windowed: the cache stops growing, so the model's context limit is the answer.
    mistral01 = dict(cfg("Mistral-7B-v0.3"), sliding_window=4096)
    assert memory.tokens_that_fit(mistral01, GiB, num_params=0, reserve_bytes=0) == 32_768
    small = memory.tokens_that_fit(mistral01, 100 * 131_072, num_params=0, reserve_bytes=0)
    assert small == 100


def test_docstring_examples():
    import doctest

    failed, attempted = doctest.testmod(memory, verbose=False)
    assert attempted >= 3 and failed == 0


def test_format_bytes():
    assert memory.format_bytes(327_680) == "320.00 KiB"
    assert memory.format_bytes(40 * GiB) == "40.00 GiB"
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(1536 * GiB) == "1.50 TiB"


# ----------------------------------------------------------------------------- against transformers

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
TINY_CASES = {
    "llama": dict(TINY),
    "qwen2": dict(TINY),
    "qwen3": dict(TINY, head_dim=16),
    "mistral": dict(TINY, sliding_window=16),
    "gemma2": dict(TINY, head_dim=32, sliding_window=16),
    "gemma3_text": dict(TINY, head_dim=32, sliding_window=16, num_hidden_layers=7),
    "mixtral": dict(TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(TINY, num_experts=4, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts_per_tok=2),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, vocab_size=128,
                        n_group=1, topk_group=1, max_position_embeddings=512),
}


@pytest.mark.parametrize("model_type", list(TINY_CASES))
def test_matches_transformers_cache_and_params(model_type):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        config = transformers.AutoConfig.for_model(model_type, **TINY_CASES[model_type])
    except (KeyError, ValueError):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert memory.estimate_num_params(config) == sum(p.numel() for p in model.parameters())

    cache = transformers.DynamicCache(config=config)
    ids = torch.randint(0, config.vocab_size, (1, 41))
    with torch.no_grad():
        model(ids[:, :40], past_key_values=cache, use_cache=True)
        model(ids[:, 40:], past_key_values=cache, use_cache=True)
    held = sum(t.numel() * t.element_size()
               for layer in cache.layers for t in (layer.keys, layer.values))
    # transformers keeps window - 1 tokens between steps (the next query brings the
    # window's last one); kvcompact.memory reports the in-step peak of `window`.
    layout = memory.kv_layout(config, "fp32")
    expect = sum(layer.bytes_per_token(layout.fmt) * (41 if layer.window is None else min(41, layer.window - 1))
                 for layer in layout.layers)
    assert held == expect
    assert layout.bytes_at(41) - held == sum(
        layer.bytes_per_token(layout.fmt) for layer in layout.layers if layer.window is not None
    )


def test_the_format_table_needs_neither_torch_nor_the_extension():
    # memory.py reads its quantized formats from kvcompact/formats.py (the one table ops and the
    # cache share); the table itself must stay torch-free so the estimator's numbers need no torch.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('f', {str(ROOT / 'kvcompact' / 'formats.py')!r})\n"
        "f = sys.modules['f'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(f)\n"
        "assert f.FORMATS['fp8_e4m3'].qmax == 448.0 and f.FORMATS['int8'].code_bytes == 1\n"
        "assert 'torch' not in sys.modules and 'kvcompact._C' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_estimator_uses_the_format_table():
    from kvcompact import formats

    assert memory.QUANTIZED_FORMATS == formats.FORMAT_NAMES
    assert memory.SCALE_BYTES == formats.SCALE_BYTES
    for name, fmt in formats.FORMATS.items():
        assert memory.storage_format(name).element_bytes == fmt.code_bytes
