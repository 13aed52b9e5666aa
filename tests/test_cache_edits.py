"""KVCompactCache's own edits and lifetime: crop(0), atomic crop on hybrid caches, reset, no reference
cycle, no host sync in decode, the span-edit API (drop_span, shift_keys, splice with rollback) and
whole-state export/import. Everything here drives the cache directly or through a tiny random Llama.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers

from kvcompact import ops, reference
from kvcompact.cache import KVCompactCache, compat
from kvcompact.formats import FORMATS
from kvcompact.rope import RotaryParams

_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
B, H, D = 1, 2, 16
ROPE = RotaryParams(1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), "neox")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY)).float().eval()


def _feed(cache, tokens: int, layers: int = 2, seed: int = 0, chunk: int | None = None):
    """Append ``tokens`` random K/V tokens to every layer (in chunks of ``chunk``)."""
    g = torch.Generator().manual_seed(seed)
    chunk = chunk or tokens
    for s in range(0, tokens, chunk):
        q = min(chunk, tokens - s)
        for i in range(layers):
            k = torch.randn(B, H, q, D, generator=g)
            v = torch.randn(B, H, q, D, generator=g)
            cache.update(k, v, i)


def _state(cache):
    """A deep copy of everything the cache holds (tensors and bookkeeping)."""
    tensors, layers = cache.export_state()
    return {k: t.clone() for k, t in tensors.items()}, [dict(m) if m else m for m in layers]


def _assert_same_state(a, b):
    ta, la = a
    tb, lb = b
    assert la == lb
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k].view(torch.uint8) if ta[k].dtype.itemsize == 1 else ta[k],
                           tb[k].view(torch.uint8) if tb[k].dtype.itemsize == 1 else tb[k]), k


def _cfg(**kw):
    return transformers.LlamaConfig(**{**_TINY, "head_dim": D, "num_key_value_heads": H, **kw})


# -- crop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -0])
def test_crop_zero_removes_nothing_like_dynamic_cache(llama, n):
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    ours, dense = KVCompactCache(llama.config), transformers.DynamicCache(config=llama.config)
    with torch.no_grad():
        for cache in (ours, dense):
            llama(input_ids=ids, use_cache=True, **compat.cache_kwargs(cache))
    dense.crop(n)
    ours.crop(n)
    assert dense.get_seq_length() == 12
    assert ours.get_seq_length() == 12
    assert ours.stats().physical_tokens == [12, 12]


def test_refused_crop_on_a_hybrid_cache_changes_no_layer():
    # Layer 0 full attention (croppable: nothing evicted), layer 1 sliding with window 4, which has
    # already dropped its old tokens: removing 6 must be refused by layer 1 -- and layer 0 untouched.
    config = transformers.Qwen2Config(**{**_TINY, "head_dim": D, "num_key_value_heads": H},
                                      layer_types=["full_attention", "sliding_attention"], sliding_window=4,
                                      use_sliding_window=True)
    cache = KVCompactCache(config)
    assert [layer.is_sliding for layer in cache.layers] == [False, True]
    _feed(cache, 20, chunk=1)
    before = [(layer.get_seq_length(), layer.physical_len) for layer in cache.layers]
    with pytest.raises(ValueError, match="sliding-window"):
        cache.crop(-6)
    assert [(layer.get_seq_length(), layer.physical_len) for layer in cache.layers] == before
    cache.crop(-2)  # within the window: allowed on both kinds
    assert [layer.get_seq_length() for layer in cache.layers] == [18, 18]


# -- reset and lifetime -----------------------------------------------------------------------------


def test_reset_forgets_the_padding_declaration():
    cache = KVCompactCache(_cfg(), budget=8)
    cache.note_attention_mask(torch.tensor([[0, 1, 1]]))  # padded
    cache.reset()
    _feed(cache, 20)  # batch 1, unpadded: must evict without complaint
    assert cache.stats().physical_tokens == [8, 8]
    fresh = KVCompactCache(_cfg(), budget=8)
    assert cache._padded == fresh._padded
    assert cache.observed == fresh.observed == {}


def test_deleting_the_cache_frees_it_without_the_garbage_collector():
    gc.disable()
    try:
        cache = KVCompactCache(_cfg(), kv_dtype="int8", budget=8)
        _feed(cache, 20)
        ref = weakref.ref(cache)
        del cache
        assert ref() is None, "a reference cycle keeps the cache alive until the next gc run"
    finally:
        gc.enable()


class _HostReadCounter:
    """Counts tensor -> Python conversions (each is a host sync on a GPU) made from kvcompact.cache."""

    NAMES = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.calls = []
        import inspect

        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=original, _name=name, **k):
                frame = inspect.currentframe().f_back
                mod = frame.f_globals.get("__name__", "")
                if mod.startswith("kvcompact.cache") or mod.startswith("kvcompact.policies.streaming"):
                    self.calls.append((_name, mod, frame.f_lineno))
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
def test_decode_with_budget_evictions_reads_nothing_back_to_the_host(llama, kv_dtype, monkeypatch):
    cache = KVCompactCache(llama.config, kv_dtype=kv_dtype, budget=16)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        llama(input_ids=ids[:, :20], use_cache=True, **compat.cache_kwargs(cache))
        counter = _HostReadCounter(monkeypatch)
        for i in range(20, 40):  # slack 2: evictions every other step
            llama(input_ids=ids[:, i:i + 1], use_cache=True, **compat.cache_kwargs(cache))
    assert counter.calls == []
    assert max(cache.stats().physical_tokens) <= 16 + cache.slack


# -- span edits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("reposition", [False, True])
def test_drop_span_keeps_positions_or_closes_the_gap(kv_dtype, reposition):
    cache = KVCompactCache(_cfg(), kv_dtype=kv_dtype)
    _feed(cache, 12)
    full_keys = [layer.keys.clone() for layer in cache.layers]
    full_values = [layer.values.clone() for layer in cache.layers]
    assert cache.drop_span(3, 7, reposition=reposition, rope=ROPE) == 4
    assert cache.physical_length == 8
    assert cache.get_seq_length() == (8 if reposition else 12)
    assert cache.layers[0].get_mask_sizes(1) == (9, 0 if reposition else 4)
    for layer, keys, values in zip(cache.layers, full_keys, full_values):
        want = torch.cat([keys[:, :, :3], keys[:, :, 7:]], dim=2)
        if reposition:  # the tail moves 4 positions back
            ops.rope_shift_(want[:, :, 3:], torch.full((5,), -4), ROPE.inv_freq, "neox")
        # Lossless storage is exact; int8 re-rotation requantizes the tail (error within a code step).
        tol = 0 if kv_dtype is None or not reposition else 4 * keys.abs().max().item() / 127
        torch.testing.assert_close(layer.keys, want, rtol=0, atol=tol)
        torch.testing.assert_close(layer.values, torch.cat([values[:, :, :3], values[:, :, 7:]], 2), rtol=0, atol=0)


def test_edits_are_refused_with_a_budget_or_out_of_range_and_change_nothing():
    cache = KVCompactCache(_cfg(), budget=64)
    _feed(cache, 12)
    before = _state(cache)
    with pytest.raises(ValueError, match="budget"):
        cache.drop_span(0, 2)
    _assert_same_state(_state(cache), before)

    cache = KVCompactCache(_cfg())
    _feed(cache, 12)
    before = _state(cache)
    for bad in [(5, 13), (-1, 2), (6, 5)]:
        with pytest.raises(ValueError, match="outside the 12 cached tokens"):
            cache.drop_span(*bad)
    with pytest.raises(ValueError, match="rope"):
        cache.drop_span(2, 4, reposition=True)
    _assert_same_state(_state(cache), before)


def _splice_forward(cache, new_len, *, fail_after_layers=None, extra=0, seed=7):
    def forward():
        g = torch.Generator().manual_seed(seed)
        for i in range(2):
            if fail_after_layers is not None and i == fail_after_layers:
                raise KeyboardInterrupt("interrupted mid-forward")
            k = torch.randn(B, H, new_len + extra, D, generator=g)
            cache.update(k, k.clone(), i)
    return forward


@pytest.mark.parametrize("kv_dtype", [None, "fp8_e4m3"])
@pytest.mark.parametrize("new_len", [2, 4, 9])
def test_splice_replaces_the_rows_and_shifts_the_tail(kv_dtype, new_len):
    cache = KVCompactCache(_cfg(), kv_dtype=kv_dtype)
    _feed(cache, 12)
    old_keys = [layer.keys.clone() for layer in cache.layers]
    cache.splice(3, 7, new_len, position=3, forward=_splice_forward(cache, new_len), rope=ROPE)
    assert cache.physical_length == 12 - 4 + new_len
    assert cache.get_seq_length() == 12 - 4 + new_len
    if kv_dtype is None:
        for layer, old in zip(cache.layers, old_keys):
            got = layer.keys
            torch.testing.assert_close(got[:, :, :3], old[:, :, :3], rtol=0, atol=0)
            tail = old[:, :, 7:].clone()
            ops.rope_shift_(tail, torch.full((5,), new_len - 4), ROPE.inv_freq, "neox")
            torch.testing.assert_close(got[:, :, 3 + new_len:], tail, rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype,residual", [(None, 0), ("int8", 0), ("int8", 4), ("fp8_e4m3", 16)])
@pytest.mark.parametrize("new_len", [2, 9])
@pytest.mark.parametrize("fail_after_layers", [0, 1])
def test_a_failed_splice_restores_the_cache_and_reraises_the_original_error(kv_dtype, residual, new_len,
                                                                            fail_after_layers):
    cache = KVCompactCache(_cfg(), kv_dtype=kv_dtype, residual=residual)
    _feed(cache, 12)
    before = _state(cache)
    with pytest.raises(KeyboardInterrupt, match="interrupted mid-forward"):
        cache.splice(3, 7, new_len, position=3,
                     forward=_splice_forward(cache, new_len, fail_after_layers=fail_after_layers), rope=ROPE)
    _assert_same_state(_state(cache), before)
    _feed(cache, 1, seed=3)  # still usable
    assert cache.get_seq_length() == 13


def test_a_splice_whose_forward_writes_the_wrong_count_is_rolled_back():
    cache = KVCompactCache(_cfg())
    _feed(cache, 12)
    before = _state(cache)
    with pytest.raises(RuntimeError, match="expected 3"):
        cache.splice(3, 9, 3, position=3, forward=_splice_forward(cache, 3, extra=-1), rope=ROPE)
    _assert_same_state(_state(cache), before)


# -- whole state -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype,residual", [(None, 0), ("int8", 0), ("fp8_e5m2", 4)])
def test_export_then_import_reproduces_the_cache(kv_dtype, residual):
    cache = KVCompactCache(_cfg(), kv_dtype=kv_dtype, residual=residual)
    _feed(cache, 12)
    cache.drop_span(2, 4)
    tensors, layers = cache.export_state()
    other = KVCompactCache(_cfg(), kv_dtype=kv_dtype, residual=residual)
    other.import_state({k: t.clone() for k, t in tensors.items()}, layers)
    _assert_same_state(_state(other), _state(cache))
    assert other.get_seq_length() == cache.get_seq_length() == 12
    for a, b in zip(other.layers, cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)


def test_import_state_names_the_bad_tensor_and_leaves_the_cache_empty():
    cache = KVCompactCache(_cfg(), kv_dtype="int8")
    _feed(cache, 5)
    tensors, layers = cache.export_state()
    tensors = dict(tensors)
    tensors["key_scales.1"] = tensors["key_scales.1"][:, :, :3]
    other = KVCompactCache(_cfg(), kv_dtype="int8")
    with pytest.raises(ValueError, match=r"layer 1: tensor 'key_scales'"):
        other.import_state(tensors, layers)
    assert other.get_seq_length() == 0 and other.stats().physical_tokens == [0, 0]


def test_storage_tensors_can_be_released_and_put_back():
    cache = KVCompactCache(_cfg(), kv_dtype="int8")
    _feed(cache, 6)
    saved = [t.clone() for t in cache.storage_tensors()]
    expect = [layer.keys.clone() for layer in cache.layers]
    cache.replace_storage_tensors(None)
    assert cache.stats().device_bytes == 0
    with pytest.raises(ValueError, match="expected 8 tensors"):
        cache.replace_storage_tensors(saved[:3])
    cache.replace_storage_tensors(saved)
    for layer, keys in zip(cache.layers, expect):
        torch.testing.assert_close(layer.keys, keys, rtol=0, atol=0)


# -- the format table ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_compiled_kernels_use_the_format_table(name):
    fmt = FORMATS[name]
    x = torch.tensor([[3.0, -1.5, 0.25, 0.0]])
    codes, scales = ops.quantize(x, name)
    assert codes.dtype == fmt.dtype and codes.element_size() == fmt.code_bytes
    # The scale reveals the kernel's QMAX: absmax / QMAX in fp32.
    assert scales.item() == torch.tensor(3.0, dtype=torch.float32).div(fmt.qmax).item()
    assert reference.QMAX[name] == fmt.qmax and reference.CODE_DTYPE[name] == fmt.dtype
    # The largest code is exactly +-QMAX.
    assert codes.float().abs().max().item() == fmt.qmax
