"""``KVCompactCache`` is a drop-in for ``DynamicCache`` in every generation mode transformers has in core.

For tiny random Llama, Qwen2 and Mistral models (with and without a sliding window) and for the
embedded SmolLM2-135M, each mode runs once with ``DynamicCache`` and once with
``KVCompactCache(kv_dtype=None)``; the tokens must be identical. Sampling modes reseed before each
run, so both runs draw the same random numbers. 8-bit storage (int8, fp8_e4m3, fp8_e5m2) must run
every mode and give well-formed outputs; its tokens are not compared (it is lossy).

What each mode asks of the cache (transformers 5.24, ``generation/utils.py``):

* greedy / sampling (``_sample``): ``update`` and ``get_seq_length`` only.
* beam search and beam sampling (``_beam_search``): ``reorder_cache(beam_idx)`` every step; the
  prompt is repeated per beam before the prefill, so the cache never sees
  ``batch_repeat_interleave``.
* assisted decoding, prompt lookup and early exit (``_assisted_decoding``):
  ``activate_past_recording()``, a multi-token verification forward per round, ``is_croppable``
  after the prefill, then ``crop(-rejected)`` -- ``crop(-0)`` when every candidate was accepted,
  which must remove nothing. The assistant model threads its own ``DynamicCache`` (the candidate
  generator drops the user's ``cache`` from the assistant's kwargs), so only the main model's
  cache is under test.
* DoLa, contrastive search, group and constrained beam search moved to Hub repositories
  (``custom_generate``) and cannot run offline; ``test_hub_only_modes_are_not_in_core`` notices
  if one returns to core and needs covering here.

Every run passes its cache as ``compat.cache_kwargs(cache)`` and the module turns FutureWarning
into an error, so a deprecated cache keyword anywhere on these paths fails the test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.utils import GENERATION_MODES_MAPPING, GenerationMode

from _tiny_models import VOCAB, tiny_config, tiny_model
from kvcompact.cache import KVCompactCache, compat

try:
    from kvcompact import ops  # noqa: F401 -- 8-bit storage needs the quantize kernels

    HAS_OPS = True
except Exception:  # noqa: BLE001 -- any import failure means "no kernels here"
    HAS_OPS = False

requires_ops = pytest.mark.skipif(not HAS_OPS, reason="kvcompact.ops (kernels) not available in this checkout")
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

ARCHS = ["llama", "qwen2", "mistral", "mistral_window"]
QUANTIZED = ["int8", "fp8_e4m3", "fp8_e5m2"]
NEW_TOKENS = 24
SEED = 1234

# mode -> generate() arguments; "assistant" is resolved per main model by _mode_kwargs.
MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=10),
    "sample_return2": dict(do_sample=True, top_k=10, num_return_sequences=2),
    "beam": dict(do_sample=False, num_beams=3),
    "beam_return2": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam_sample": dict(do_sample=True, top_k=10, num_beams=3),
    # a second, smaller random model: it proposes badly, so most rounds crop(-n) with n > 0
    "assisted_small": dict(do_sample=False, assistant="small"),
    # speculative sampling with the small assistant (accept/reject draws from the RNG)
    "assisted_sample": dict(do_sample=True, top_k=10, assistant="small"),
    # a copy of the main model: every candidate is accepted, so every round ends in crop(-0)
    "assisted_copy": dict(do_sample=False, assistant="copy"),
    "prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=3),
    "early_exit": dict(do_sample=False, assistant_early_exit=1),
}
CANDIDATE_MODES = {"assisted_small", "assisted_sample", "assisted_copy", "prompt_lookup", "early_exit"}
_COPIES: dict = {}


@pytest.fixture(autouse=True)
def _one_thread():
    """Run on one thread: on 2 shared cores, a second intra-op thread made runs up to 20x slower
    (spinning on a core another process holds) and these models are too small to gain from it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mode_kwargs(model, mode: str) -> dict:
    kw = dict(MODES[mode])
    kind = kw.pop("assistant", None)
    if kind == "small":
        kw["assistant_model"] = tiny_model("assistant", vocab_size=model.config.vocab_size)
    elif kind == "copy":
        # A separate object with the same weights: its greedy proposals are the main model's own.
        if id(model) not in _COPIES:
            _COPIES[id(model)] = copy.deepcopy(model)
        kw["assistant_model"] = _COPIES[id(model)]
    return kw


def _repeating_prompt(batch: int = 1, period: int = 6, length: int = 16, seed: int = 0) -> torch.Tensor:
    """``[batch, length]`` ids that repeat every ``period`` tokens, so prompt lookup finds n-grams."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, VOCAB, (batch, period), generator=g)
    return base.repeat(1, -(-length // period))[:, :length]


def _record_crops(cache) -> list:
    """Wrap ``cache.crop`` on the instance; returns the list its arguments are appended to."""
    calls, crop = [], cache.crop

    def recording_crop(n):
        calls.append(n)
        return crop(n)

    cache.crop = recording_crop
    return calls


def _generate(model, cache, mode, ids, mask=None, new_tokens=NEW_TOKENS):
    """``generate`` in ``mode``: ``(sequences [B*R, T+new], logits [new, rows, V], crop arguments)``.

    ``R`` is ``num_return_sequences``; ``rows`` is ``B * max(num_beams, R)``, the rows scored per step.
    """
    crops = _record_crops(cache)
    torch.manual_seed(SEED)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids) if mask is None else mask,
            max_new_tokens=new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            **_mode_kwargs(model, mode),
            **compat.cache_kwargs(cache),
        )
    return out.sequences, torch.stack(out.logits), crops


def _check_candidates_exercised(mode: str, crops: list, new_tokens: int = NEW_TOKENS) -> None:
    """The candidate path really ran: rounds were verified and rolled back (or fully accepted)."""
    assert crops, f"{mode}: generate never called cache.crop, so no candidates were verified"
    rejected = [n for n in crops if n != 0]
    accepted_all = len(crops) - len(rejected)
    if mode == "assisted_copy":
        # every proposal accepted: crop(-0) each round, at least two tokens per round
        assert not rejected and len(crops) <= new_tokens // 2, crops
    elif mode == "prompt_lookup":
        assert rejected and accepted_all and len(crops) < new_tokens, crops
    else:
        assert rejected, crops


def _check_well_formed(seqs, ids, cache, expand: int, new_tokens: int = NEW_TOKENS) -> None:
    b, t = ids.shape
    assert seqs.shape == (b * expand, t + new_tokens)
    assert torch.equal(seqs[:, :t], ids.repeat_interleave(expand, 0))  # the prompt comes back untouched
    assert int(seqs.min()) >= 0 and int(seqs.max()) < VOCAB
    assert cache.get_seq_length() == t + new_tokens - 1  # the last token is sampled, never fed


def _expand(mode: str) -> int:
    return MODES[mode].get("num_return_sequences", 1)


# ---------------------------------------------------------------------------------------------------
# tiny random models: lossless storage gives DynamicCache's tokens in every mode
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # eager fails loudly on a K/V length the mask did not announce
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_matches_dynamic_cache(arch, mode, attn):
    model = tiny_model(arch, attn=attn)
    ids = _repeating_prompt()
    ref_cache, cache = DynamicCache(config=model.config), KVCompactCache(model.config)
    ref, ref_logits, ref_crops = _generate(model, ref_cache, mode, ids)
    got, got_logits, crops = _generate(model, cache, mode, ids)
    assert torch.equal(got, ref)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    assert crops == ref_crops  # the same candidates were accepted and rolled back
    if mode in CANDIDATE_MODES:
        _check_candidates_exercised(mode, crops)
    _check_well_formed(got, ids, cache, _expand(mode))


def test_sliding_window_is_crossed_during_generation():
    # The windowed Mistral only tests the window if generation outgrows it, starting inside it.
    config = tiny_config("mistral_window")
    assert _repeating_prompt().shape[1] < config.sliding_window < _repeating_prompt().shape[1] + NEW_TOKENS
    assert all(KVCompactCache(config).is_sliding) and all(DynamicCache(config=config).is_sliding)
    assert not any(KVCompactCache(tiny_config("mistral")).is_sliding)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assisted_small", "assisted_copy"])
@pytest.mark.parametrize("edge_offset", [-17, -1, 0, 1, 19])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_candidate_modes_across_the_window_edge(attn, edge_offset, mode):
    # Verification chunks of several tokens straddle the window edge at different offsets.
    model = tiny_model("mistral_window", attn=attn)
    prompt_len = model.config.sliding_window + edge_offset
    ids = _repeating_prompt(length=prompt_len, seed=prompt_len)
    ref, ref_logits, ref_crops = _generate(model, DynamicCache(config=model.config), mode, ids)
    got, got_logits, crops = _generate(model, KVCompactCache(model.config), mode, ids)
    assert torch.equal(got, ref)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=0)
    assert crops == ref_crops


TURN_MODES = ["greedy", "sample", "prompt_lookup", "assisted_small", "assisted_copy", "early_exit"]


@pytest.mark.parametrize("mode", TURN_MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_second_turn_reuses_the_cache_like_dynamic_cache(arch, mode):
    # A chat's next turn hands generate the same cache with the whole history: generate feeds only
    # the ids past get_seq_length(), and the candidate path crops from a cache that already held a turn.
    model = tiny_model(arch)
    follow_up = _repeating_prompt(length=7, seed=9)
    results = {}
    for name, cache in (("dynamic", DynamicCache(config=model.config)), ("kvcompact", KVCompactCache(model.config))):
        first, _, _ = _generate(model, cache, mode, _repeating_prompt())
        second, logits, crops = _generate(model, cache, mode, torch.cat([first, follow_up], 1))
        results[name] = (second, logits, crops, cache.get_seq_length())
    (ref, ref_logits, ref_crops, ref_len), (got, got_logits, crops, length) = results["dynamic"], results["kvcompact"]
    assert torch.equal(got, ref)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=0)
    assert crops == ref_crops and length == ref_len
    if mode not in CANDIDATE_MODES:
        assert length == got.shape[1] - 1
    # No absolute length for the candidate modes: transformers 5.24's _assisted_decoding does not
    # slice its first forward by get_seq_length() the way _prefill does, so a second turn feeds the
    # whole history again on top of the cache -- with DynamicCache too; only equality is asked here.


# ---------------------------------------------------------------------------------------------------
# left-padded batches (no eviction)
# ---------------------------------------------------------------------------------------------------


def _left_padded(lengths=(20, 13, 7), seed=5):
    total = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, total - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, total - n :] = 1
    return ids, mask


BATCH_MODES = ["greedy", "sample", "beam", "beam_return2", "beam_sample"]


@pytest.mark.parametrize("mode", BATCH_MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_dynamic_cache(arch, mode):
    model = tiny_model(arch)
    ids, mask = _left_padded()
    ref, ref_logits, _ = _generate(model, DynamicCache(config=model.config), mode, ids, mask)
    cache = KVCompactCache(model.config)
    got, got_logits, _ = _generate(model, cache, mode, ids, mask)
    assert torch.equal(got, ref)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=0)
    _check_well_formed(got, ids, cache, _expand(mode))


# ---------------------------------------------------------------------------------------------------
# 8-bit storage runs every mode
# ---------------------------------------------------------------------------------------------------


@requires_ops
@pytest.mark.parametrize("kv_dtype", QUANTIZED)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_runs_every_mode(arch, mode, kv_dtype):
    model = tiny_model(arch)
    ids = _repeating_prompt()
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype)
    seqs, logits, crops = _generate(model, cache, mode, ids)
    _check_well_formed(seqs, ids, cache, _expand(mode))
    rows = max(MODES[mode].get("num_beams", 1), _expand(mode))  # beams (or samples) scored per step
    assert logits.shape == (NEW_TOKENS, rows, VOCAB)
    assert bool(torch.isfinite(logits).all())
    if mode in CANDIDATE_MODES:
        assert crops  # candidates were verified against the 8-bit cache and rolled back


@requires_ops
@pytest.mark.parametrize("kv_dtype", QUANTIZED)
@pytest.mark.parametrize("mode", ["greedy", "beam_return2", "sample"])
def test_quantized_left_padded_batch_runs(mode, kv_dtype):
    model = tiny_model("llama")
    ids, mask = _left_padded()
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype)
    seqs, _, _ = _generate(model, cache, mode, ids, mask)
    _check_well_formed(seqs, ids, cache, _expand(mode))


# ---------------------------------------------------------------------------------------------------
# crop(-0) / crop(0): what assisted and prompt-lookup decoding call when every candidate is accepted
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", [None, *QUANTIZED])
@pytest.mark.parametrize("arch", ARCHS)
def test_crop_zero_removes_nothing_like_dynamic_cache(arch, kv_dtype):
    if kv_dtype is not None and not HAS_OPS:
        pytest.skip("kvcompact.ops (kernels) not available in this checkout")
    model = tiny_model(arch)
    ids = _repeating_prompt(length=12)  # below the 20-token window: DynamicCache allows crop(0) there
    ref, cache = DynamicCache(config=model.config), KVCompactCache(model.config, kv_dtype=kv_dtype)
    with torch.no_grad():
        for c in (ref, cache):
            model(input_ids=ids, use_cache=True, **compat.cache_kwargs(c))
    before = [layer.keys.clone() for layer in cache.layers]
    for n in (-0, 0):
        ref.crop(n)
        cache.crop(n)
        assert cache.get_seq_length() == ref.get_seq_length() == 12
    for layer, keys, ref_layer in zip(cache.layers, before, ref.layers):
        assert layer.keys.shape[2] == 12
        assert torch.equal(layer.keys, keys)
        if kv_dtype is None:
            torch.testing.assert_close(layer.keys, ref_layer.keys, atol=0, rtol=0)
    # One real removal still works after the no-op crops.
    ref.crop(-3)
    cache.crop(-3)
    assert cache.get_seq_length() == ref.get_seq_length() == 9


def test_hub_only_modes_are_not_in_core():
    # These modes run Hub code (custom_generate) that cannot be fetched offline; if one moves back
    # into transformers' core, it uses the cache directly and needs a case in MODES above.
    for mode in (
        GenerationMode.DOLA_GENERATION,
        GenerationMode.CONTRASTIVE_SEARCH,
        GenerationMode.GROUP_BEAM_SEARCH,
        GenerationMode.CONSTRAINED_BEAM_SEARCH,
    ):
        assert "/" in GENERATION_MODES_MAPPING[mode], f"{mode} is in core again: cover it in MODES"


# ---------------------------------------------------------------------------------------------------
# the real embedded model (SmolLM2-135M-Instruct)
# ---------------------------------------------------------------------------------------------------

REAL_MODES = ["greedy", "assisted_small", "prompt_lookup", "beam", "sample"]
REAL_NEW_TOKENS = 20
_REAL_REFS: dict = {}


@pytest.fixture(scope="module")
def poem_prompt(smollm):
    """A chat prompt the model answers by copying the poem, so prompt lookup's candidates are accepted."""
    _, tok = smollm
    messages = [{"role": "user", "content": "Here is a poem:\nRoses are red,\nViolets are blue,\n"
                                            "Sugar is sweet,\nAnd so are you.\nPlease write the poem again."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"], enc["attention_mask"]


def _real_generate(model, cache, mode, ids, mask):
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        seqs, _, crops = _generate(model, cache, mode, ids, mask, new_tokens=REAL_NEW_TOKENS)
    finally:
        hook.remove()
    return seqs, crops, len(calls)


def _real_reference(model, mode, ids, mask):
    if mode not in _REAL_REFS:
        _REAL_REFS[mode] = _real_generate(model, DynamicCache(config=model.config), mode, ids, mask)
    return _REAL_REFS[mode]


@pytest.mark.slow
@pytest.mark.parametrize("mode", REAL_MODES)
def test_real_model_lossless_matches_dynamic_cache(smollm, poem_prompt, mode):
    model, tok = smollm
    ids, mask = poem_prompt
    ref, ref_crops, ref_forwards = _real_reference(model, mode, ids, mask)
    got, crops, forwards = _real_generate(model, KVCompactCache(model.config), mode, ids, mask)
    assert torch.equal(got, ref), (tok.decode(ref[0, ids.shape[1]:]), tok.decode(got[0, ids.shape[1]:]))
    assert crops == ref_crops and forwards == ref_forwards
    assert got.shape[1] == ids.shape[1] + REAL_NEW_TOKENS  # the poem is longer than 20 tokens: no EOS
    if mode == "prompt_lookup":
        # the copied poem is proposed from the prompt and accepted several tokens per forward
        assert forwards < REAL_NEW_TOKENS - 5 and 0 in crops
    if mode == "assisted_small":
        # a random assistant is almost always wrong; the result must still be plain greedy
        assert crops and torch.equal(got, _real_reference(model, "greedy", ids, mask)[0])


@pytest.mark.slow
@requires_ops
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("mode", REAL_MODES)
def test_real_model_quantized_runs_every_mode(smollm, poem_prompt, mode, kv_dtype):
    model, tok = smollm
    ids, mask = poem_prompt
    cache = KVCompactCache(model.config, kv_dtype=kv_dtype)
    got, crops, _ = _real_generate(model, cache, mode, ids, mask)
    assert got.shape[0] == 1 and ids.shape[1] < got.shape[1] <= ids.shape[1] + REAL_NEW_TOKENS
    assert torch.equal(got[:, : ids.shape[1]], ids)
    assert int(got.max()) < model.config.vocab_size
    if mode in ("assisted_small", "prompt_lookup"):
        assert crops
    # 8-bit keys barely move a 135M model's greedy choice on a copy task
    if mode == "greedy":
        text = tok.decode(got[0, ids.shape[1]:])
        assert "Roses are red" in text, text
