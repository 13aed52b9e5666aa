"""Bounded repair after an edit (``Session.drop/replace(repair=f)``) and the cache's ``rewriting``.

A seeded 6-layer random Llama with the real SmolLM2 tokenizer: the scan (2 layers) and the
recompute (every layer) both run. What is checked: ``repair=1.0`` gives recompute_tail's K/V;
``repair=0`` changes nothing; a fraction rewrites exactly the rows it says (the scanned layers for
the whole tail, the chosen rows in every layer) and moves the logits toward the exact context;
the session's tokens, spans and positions stay; bad arguments change nothing.
"""

import math

import pytest
import torch

from agent_fixtures import smollm2_tokenizer
from kvcompact.agent import Session
from kvcompact.agent.repair import SCAN_LAYERS
from kvcompact.cache import KVCompactCache

LAYERS = 6


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def conversation(model, tok, kv_dtype=None, **kw):
    s = Session(model, tok, cache=KVCompactCache(model.config, kv_dtype=kv_dtype, **kw), prefill_chunk=48)
    s.add("system", "You are a careful agent.")
    s.add("user", "List the services and their ports.")
    tool = s.add("tool", " ".join(f"svc-{i} port {9000 + i} owner team{i % 7}" for i in range(40)))
    s.add("assistant", "payments listens on 9443.")
    s.add("user", "Now restart payments and tell me which port it uses and who owns it.")
    s.prefill()
    return s, tool


@pytest.fixture
def no_floor(monkeypatch):
    """The pure fraction: this conversation's tail (~40 tokens) is near MIN_ROWS, which would
    otherwise decide how many rows are recomputed (test_short_tails_are_recomputed_whole covers it)."""
    import kvcompact.agent.repair as repair

    monkeypatch.setattr(repair, "MIN_ROWS", 0)


def kv(cache):
    return [tuple(t.clone() for t in layer.storage.view(fresh=True)) for layer in cache.layers]


def tail_start(s, tool):
    return s.spans[tool][0]


@pytest.mark.parametrize("edit", ["drop", "replace"])
def test_full_repair_equals_recompute_tail(model, tok, edit):
    exact, tool = conversation(model, tok)
    repaired, tool2 = conversation(model, tok)
    if edit == "drop":
        exact.drop(tool, reposition=True, recompute_tail=True)
        repaired.drop(tool2, reposition=True, repair=1.0)
    else:
        exact.replace(tool, "(40 services listed)", recompute_tail=True)
        repaired.replace(tool2, "(40 services listed)", repair=1.0)
    assert repaired.token_ids == exact.token_ids and repaired.positions() == exact.positions()
    for (ka, va), (kb, vb) in zip(kv(repaired.cache), kv(exact.cache)):
        assert torch.allclose(ka, kb, atol=1e-5, rtol=0) and torch.allclose(va, vb, atol=1e-5, rtol=0)
    a, b = repaired.next_token_logits(), exact.next_token_logits()
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
    r = repaired.last_repair
    assert r.recomputed == r.tail and r.fed == r.tail  # no scan when everything is recomputed


def test_zero_repair_changes_nothing(model, tok):
    plain, tool = conversation(model, tok)
    zero, tool2 = conversation(model, tok)
    plain.drop(tool, reposition=True)
    fed = zero.fed_tokens
    zero.drop(tool2, reposition=True, repair=0.0)
    assert zero.fed_tokens == fed
    for (ka, va), (kb, vb) in zip(kv(zero.cache), kv(plain.cache)):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_fraction_rewrites_scanned_layers_and_chosen_rows(model, tok, fraction, no_floor):
    stale, tool = conversation(model, tok)
    exact, tool_e = conversation(model, tok)
    part, tool_p = conversation(model, tok)
    start = tail_start(stale, tool)
    stale.drop(tool, reposition=True)
    exact.drop(tool_e, reposition=True, recompute_tail=True)
    fed = part.fed_tokens
    part.drop(tool_p, reposition=True, repair=fraction)

    n = len(part.token_ids)
    tail = n - start
    k = math.ceil(fraction * tail)
    r = part.last_repair
    assert (r.tail, r.recomputed) == (tail, k)
    assert r.fed == k + math.ceil(tail * SCAN_LAYERS / LAYERS) == part.fed_tokens - fed
    assert part.token_ids == stale.token_ids and part.positions() == stale.positions()
    assert list(part.spans.values()) == list(stale.spans.values())

    kv_stale, kv_exact, kv_part = kv(stale.cache), kv(exact.cache), kv(part.cache)
    for i in range(LAYERS):
        (ks, vs), (ke, ve), (kp, vp) = kv_stale[i], kv_exact[i], kv_part[i]
        # rows before the edit are untouched, bit for bit
        assert torch.equal(kp[:, :, :start], ks[:, :, :start]) and torch.equal(vp[:, :, :start], vs[:, :, :start])
        if i < SCAN_LAYERS:  # scanned layers: the whole tail is exact
            assert torch.allclose(kp, ke, atol=1e-5, rtol=0) and torch.allclose(vp, ve, atol=1e-5, rtol=0)
        changed = ((kp - ks).abs().amax((0, 1, 3)) > 0) | ((vp - vs).abs().amax((0, 1, 3)) > 0)
        if i >= SCAN_LAYERS:  # later layers: exactly the chosen rows were rewritten
            assert int(changed[start:].sum()) == k
            assert not bool(changed[:start].any())

    def err(s):
        return float((s.next_token_logits() - exact.next_token_logits()).abs().max())

    assert err(part) < err(stale)


def test_repair_picks_the_newest_rows_and_the_most_changed(model, tok, no_floor):
    """Half the recomputed rows are the newest; the other half are the largest layer-1 deviations."""
    from kvcompact.agent.repair import RECENT_SHARE, _choose

    s, tool = conversation(model, tok)
    stale, tool2 = conversation(model, tok)
    start = tail_start(s, tool)
    s.drop(tool, reposition=True, repair=0.3)
    stale.drop(tool2, reposition=True)
    n, k = len(s.token_ids), s.last_repair.recomputed
    top = kv(s.cache)[LAYERS - 1][1][0, 0]
    old = kv(stale.cache)[LAYERS - 1][1][0, 0]
    changed = ((top - old).abs().amax(-1) > 0).nonzero().flatten()
    recent = int(RECENT_SHARE * k)
    assert changed.numel() == k and changed[-recent:].tolist() == list(range(n - recent, n))
    # the rule itself, on a known deviation
    dev = torch.tensor([0.0, 5.0, 1.0, 4.0, 0.0, 0.0, 0.0, 9.0])
    assert _choose(dev, 4).tolist() == [1, 3, 6, 7]  # newest 2 (6, 7), then the top 2 of the rest (1, 3)
    assert _choose(dev, 1).tolist() == [7]            # int(0.5 * 1) = 0 newest: the top deviation, row 7
    assert _choose(dev, 8).tolist() == list(range(8))


@pytest.mark.parametrize("floor, expect", [(1000, "all"), (24, "floor"), (1, "fraction")])
def test_short_tails_are_recomputed_whole(model, tok, monkeypatch, floor, expect):
    """k = max(ceil(f * tail), MIN_ROWS), at most the tail: a tail no longer than the floor is
    recomputed whole (exact, no scan); above it the floor or the fraction decides."""
    import kvcompact.agent.repair as repair

    monkeypatch.setattr(repair, "MIN_ROWS", floor)
    s, tool = conversation(model, tok)
    exact, tool_e = conversation(model, tok)
    start = tail_start(s, tool)
    s.drop(tool, reposition=True, repair=0.1)
    exact.drop(tool_e, reposition=True, recompute_tail=True)
    tail = len(s.token_ids) - start
    assert 24 < tail  # the floor of 24 is below this tail, so it is what picks k
    r = s.last_repair
    k = {"all": tail, "floor": 24, "fraction": math.ceil(0.1 * tail)}[expect]
    assert (r.tail, r.recomputed) == (tail, k)
    assert r.fed == (tail if expect == "all" else k + math.ceil(tail * SCAN_LAYERS / LAYERS))
    if expect == "all":
        for (ka, va), (kb, vb) in zip(kv(s.cache), kv(exact.cache)):
            assert torch.allclose(ka, kb, atol=1e-5, rtol=0) and torch.allclose(va, vb, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_repair_on_8bit_storage(model, tok, kv_dtype):
    stale, tool = conversation(model, tok, kv_dtype, residual=8)
    exact, tool_e = conversation(model, tok, kv_dtype, residual=8)
    full, tool_f = conversation(model, tok, kv_dtype, residual=8)
    stale.drop(tool, reposition=True)
    exact.drop(tool_e, reposition=True, recompute_tail=True)
    full.drop(tool_f, reposition=True, repair=1.0)
    ref = exact.next_token_logits()
    e_full = float((full.next_token_logits() - ref).abs().max())
    e_stale = float((stale.next_token_logits() - ref).abs().max())
    assert e_full < e_stale


@pytest.mark.parametrize("fmt", [None, "int8", "fp8_e4m3", "fp8_e5m2"])
def test_overwrite_rows_reads_back_like_append(fmt):
    """TokenStore.overwrite_rows: rewritten rows read back as if appended with the new values
    (quantized the same way; exact inside the residual window); other rows are untouched."""
    from kvcompact import reference
    from kvcompact.cache.storage import TokenStore, Workspace

    torch.manual_seed(1)
    store = TokenStore(fmt, 16 if fmt else None, 4, Workspace())
    k, v = torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32)
    store.init(k)
    store.append(k, v)
    rows = torch.tensor([0, 7, 8, 17, 19])  # 17 and 19 are inside the residual window (rows 16..19)
    nk, nv = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    before_k, before_v = (t.clone() for t in store.view(fresh=True))
    store.overwrite_rows(rows, nk, nv)
    after_k, after_v = store.view(fresh=True)
    other = torch.tensor([i for i in range(20) if i not in rows.tolist()])
    assert torch.equal(after_k[:, :, other], before_k[:, :, other])
    assert torch.equal(after_v[:, :, other], before_v[:, :, other])
    if fmt is None or store.residual == 0:
        expect_k, expect_v = nk, nv
    else:
        expect_k = reference.dequantize(*reference.quantize(nk, fmt, 16), torch.float32)
        expect_v = reference.dequantize(*reference.quantize(nv, fmt, 16), torch.float32)
        expect_k[:, :, 3:], expect_v[:, :, 3:] = nk[:, :, 3:], nv[:, :, 3:]  # rows 17, 19: the exact window
    assert torch.equal(after_k[:, :, rows], expect_k) and torch.equal(after_v[:, :, rows], expect_v)


@pytest.mark.parametrize("bad", [1.5, -0.1, True, "0.1", float("nan")])
def test_bad_repair_is_refused_and_changes_nothing(model, tok, bad):
    s, tool = conversation(model, tok)
    before = (s.token_ids, s.spans, kv(s.cache))
    with pytest.raises(ValueError, match="repair"):
        s.drop(tool, repair=bad)
    with pytest.raises(ValueError, match="repair"):
        s.replace(tool, "x", repair=bad)
    assert s.token_ids == before[0] and s.spans == before[1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(kv(s.cache), before[2]))


def test_repair_and_recompute_tail_are_exclusive(model, tok):
    s, tool = conversation(model, tok)
    with pytest.raises(ValueError, match="not both"):
        s.drop(tool, recompute_tail=True, repair=0.1)
    assert tool in s.spans


def test_rewriting_unchanged_context_is_identity(model, tok):
    """Recomputing rows whose context did not change writes the values they already held."""
    from kvcompact.agent.repair import repair_tail

    s, _ = conversation(model, tok)
    before = kv(s.cache)
    repair_tail(s, 5, 1.0)
    for (ka, va), (kb, vb) in zip(kv(s.cache), before):
        assert torch.allclose(ka, kb, atol=1e-5, rtol=0) and torch.allclose(va, vb, atol=1e-5, rtol=0)


def test_rewriting_checks_rows(model, tok):
    s, _ = conversation(model, tok)
    n = s.cache.physical_length
    for rows in ([n], [-1], [3, 2], [1, 1]):
        with pytest.raises(ValueError, match="rows"):
            with s.cache.rewriting(rows):
                pass
    with s.cache.rewriting([0]):
        with pytest.raises(ValueError, match="nest"):
            with s.cache.rewriting([1]):
                pass
    budget = KVCompactCache(model.config, budget=64)
    with pytest.raises(ValueError, match="budget"):
        with budget.rewriting([]):
            pass
