"""Eviction policies: each selection against a plain-torch statement of its rule, per head.

References below are written independently of kvcompact.policies: python loops over (batch, head),
explicit softmaxes and pooling, sets of kept positions. They state the rules of docs/policies.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import kvcompact.policies as P
from kvcompact import reference
from kvcompact.cache.compat import cache_kwargs
from kvcompact.policies import ObservedQueries, get_policy, select_keep_idx

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# plain-torch statements of the rules


def ref_select(scores: torch.Tensor, budget: int, sinks: int, recent: int, protected=None) -> torch.Tensor:
    """Per row: sinks, recent window and protected kept; then highest scores, ties to the newer token."""
    b, h, t = scores.shape
    if budget >= t:
        return torch.arange(t).expand(b, h, t)
    out = torch.empty(b, h, budget, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            row = [(-math.inf if math.isnan(x) else x) for x in scores[bi, hi].tolist()]
            keep = set(range(min(sinks, t))) | set(range(t - recent, t))
            if protected is not None:
                keep |= {j for j in range(t) if bool(protected[j])}
            rest = sorted((j for j in range(t) if j not in keep), key=lambda j: (-row[j], -j))
            keep |= set(rest[: budget - len(keep)])
            out[bi, hi] = torch.tensor(sorted(keep))
    return out


def ref_probs_row(q: torch.Tensor, keys: torch.Tensor, pos: int, scaling: float) -> torch.Tensor:
    """Softmax of one query [D] over keys [T, D] visible up to physical position ``pos``."""
    logits = torch.tensor([float(q.double() @ keys[j].double()) * scaling for j in range(pos + 1)])
    p = torch.softmax(logits, dim=0)
    return torch.cat([p, torch.zeros(keys.shape[0] - pos - 1, dtype=p.dtype)])


def ref_snapkv_scores(queries, keys, window, pool, pooling):
    """SnapKV per KV head: window attention summed over queries, pooled on the prefix, group-averaged."""
    b, hq, _, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    w = min(window, queries.shape[2], t)
    q = queries[:, :, -w:]
    out = torch.zeros(b, hkv, t, dtype=torch.float64)
    for bi in range(b):
        for hk in range(hkv):
            for gi in range(g):
                s = sum(ref_probs_row(q[bi, hk * g + gi, i], keys[bi, hk], t - w + i, d**-0.5) for i in range(w))
                pooled = s.clone()
                half = pool // 2
                for j in range(t - w):
                    lo, hi = max(0, j - half), min(t - w, j + half + 1)
                    if pooling == "max":
                        pooled[j] = s[lo:hi].max()
                    else:  # zero padding counted, as F.avg_pool1d(count_include_pad=True)
                        pooled[j] = s[lo:hi].sum() / pool
                out[bi, hk] += pooled / g
    return out.float()


def ref_tova_scores(queries, keys):
    b, hq, _, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hkv, t, dtype=torch.float64)
    for bi in range(b):
        for hk in range(hkv):
            for gi in range(g):
                out[bi, hk] += ref_probs_row(queries[bi, hk * g + gi, -1], keys[bi, hk], t - 1, d**-0.5) / g
    return out.float()


def keep_sets(keep_idx: torch.Tensor):
    return [[set(row) for row in head] for head in keep_idx.tolist()]


def check_keep_idx(keep_idx, b, h, k, t):
    assert keep_idx.dtype == torch.int64 and tuple(keep_idx.shape) == (b, h, k)
    assert keep_idx.is_contiguous()
    if k > 1:
        assert bool((keep_idx[..., 1:] > keep_idx[..., :-1]).all()), "rows must be strictly increasing"
    assert int(keep_idx.min()) >= 0 and int(keep_idx.max()) < t


def rand_kv(b=2, h=2, t=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


def observed_with(queries, **kw):
    obs = ObservedQueries(queries.shape[2], **kw)
    obs.observe(queries)
    return obs


# ---------------------------------------------------------------------------------------------
# the shared selection


@pytest.mark.parametrize("sinks,recent,budget", [(4, 8, 20), (0, 0, 5), (2, 0, 10), (0, 6, 7), (4, 32, 37)])
def test_select_matches_rule(sinks, recent, budget):
    g = torch.Generator().manual_seed(budget)
    scores = torch.randn(2, 3, 50, generator=g)
    scores[0, 0, 10:20] = 0.5  # ties: the newer tokens win
    scores[1, 2, 5] = float("nan")  # NaN ranks lowest
    keep = select_keep_idx(scores, budget, sinks=sinks, recent=recent)
    check_keep_idx(keep, 2, 3, budget, 50)
    assert torch.equal(keep, ref_select(scores, budget, sinks, recent))


def test_select_protects_sinks_and_window_with_lowest_scores():
    t = 30
    scores = torch.arange(t, dtype=torch.float32).flip(0).expand(1, 2, t).clone()  # oldest = best
    scores[:, :, :4] = -100.0  # sinks score worst ...
    scores[:, :, -8:] = -100.0  # ... and so does the recent window
    keep = select_keep_idx(scores, 16, sinks=4, recent=8)
    expected = list(range(4)) + list(range(4, 8)) + list(range(22, 30))
    assert keep[0, 0].tolist() == expected and keep[0, 1].tolist() == expected
    # Without protection they are the first to go.
    assert set(select_keep_idx(scores, 16, sinks=0, recent=0)[0, 0].tolist()).isdisjoint(range(4))


def test_select_per_head_differs():
    scores = torch.zeros(1, 2, 20)
    scores[0, 0, 5] = scores[0, 0, 6] = 1.0
    scores[0, 1, 10] = scores[0, 1, 11] = 1.0
    keep = select_keep_idx(scores, 6, sinks=2, recent=2)
    assert keep[0, 0].tolist() == [0, 1, 5, 6, 18, 19]
    assert keep[0, 1].tolist() == [0, 1, 10, 11, 18, 19]


@pytest.mark.parametrize("t,budget", [(12, 12), (12, 30)])
def test_select_budget_at_or_above_length_keeps_everything(t, budget):
    keep = select_keep_idx(torch.randn(2, 2, t), budget, sinks=1, recent=2)
    check_keep_idx(keep, 2, 2, t, t)
    assert torch.equal(keep, torch.arange(t).expand(2, 2, t))


def test_select_protected_mask_and_overflow():
    scores = torch.randn(1, 1, 20)
    prot = torch.zeros(20, dtype=torch.bool)
    prot[9:12] = True
    keep = select_keep_idx(scores, 8, sinks=1, recent=1, protected=prot)
    assert {9, 10, 11} <= set(keep[0, 0].tolist())
    assert torch.equal(keep, ref_select(scores, 8, 1, 1, prot))
    with pytest.raises(ValueError, match="protected"):
        select_keep_idx(scores, 8, sinks=1, recent=1, protected=torch.ones(20, dtype=torch.bool))


def test_select_does_not_modify_scores():
    scores = torch.randn(1, 2, 20)
    before = scores.clone()
    select_keep_idx(scores, 8, sinks=2, recent=2)
    assert torch.equal(scores, before)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: get_policy("nope"), "policy"),
        (lambda: get_policy(42), "policy"),
        (lambda: select_keep_idx(torch.randn(1, 1, 50), 36, sinks=4, recent=32), "budget"),
        (lambda: select_keep_idx(torch.randn(1, 1, 50), 4, sinks=4, recent=0), "budget"),
        (lambda: select_keep_idx(torch.randn(1, 1, 50), 10, sinks=-1, recent=0), "sinks"),
        (lambda: select_keep_idx(torch.randn(1, 1, 50), 10, sinks=1, recent=-2), "recent"),
        (lambda: select_keep_idx(torch.randn(1, 50), 10, sinks=1, recent=2), "scores"),
        (lambda: get_policy("snapkv", window=-1), "window"),
        (lambda: get_policy("snapkv", window=0), "window"),
        (lambda: get_policy("snapkv", pool=0), "pool"),
        (lambda: get_policy("snapkv", pooling="median"), "pooling"),
        (lambda: get_policy("knorm", sinks=-1), "sinks"),
        (lambda: get_policy("random", seed=-3), "seed"),
        (lambda: get_policy("knorm", schedule="cone"), "schedule"),
        (lambda: get_policy("spans", drop=[(5, 2)]), "drop"),
        (lambda: get_policy("spans", keep=["ab"]), "keep"),
        (lambda: ObservedQueries(-4), "window"),
        (lambda: get_policy("knorm").validate(36), "budget"),
        (lambda: get_policy("knorm", schedule="pyramid").validate(30, num_layers=30), "budget"),
        (lambda: P.budget_for_layer(3, 3, 100), "layer_idx"),
        (lambda: P.budget_for_layer(0, 3, 0), "budget"),
        (lambda: get_policy(get_policy("knorm"), sinks=2), "policy"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


def test_query_policies_without_observed_say_attach():
    k, v = rand_kv(t=60)
    for name in ("snapkv", "h2o", "tova"):
        with pytest.raises(RuntimeError, match="attach"):
            get_policy(name).keep_indices(None, 40, keys=k, values=v)


def test_registry_names_and_objects():
    assert P.available_policies() == ["h2o", "knorm", "random", "snapkv", "spans", "streaming", "tova"]
    p = P.SnapKVPolicy(window=8)
    assert get_policy(p) is p
    assert isinstance(get_policy("SnapKV"), P.SnapKVPolicy)
    assert get_policy("snapkv").recent == 32 and get_policy("snapkv", window=8).recent == 8


# ---------------------------------------------------------------------------------------------
# per-layer budgets


@pytest.mark.parametrize("layers,budget,beta", [(30, 256, 20.0), (7, 100, 5.0), (2, 64, 20.0), (24, 37, 20.0)])
def test_pyramid_budgets_preserve_total_and_decrease(layers, budget, beta):
    bs = [P.budget_for_layer(i, layers, budget, schedule="pyramid", beta=beta, min_budget=1) for i in range(layers)]
    assert sum(bs) == layers * budget
    assert all(a >= b for a, b in zip(bs, bs[1:]))
    low = max(budget / beta, 1.0)
    assert abs(bs[-1] - low) <= 1 and abs(bs[0] - (2 * budget - low)) <= 1
    assert all(P.budget_for_layer(i, layers, budget) == budget for i in range(layers))


def test_pyramid_policy_floor_and_per_layer_selection():
    pol = get_policy("knorm", sinks=2, recent=4, schedule="pyramid", beta=20.0)
    layers, budget = 6, 20
    bs = [pol.layer_budget(i, layers, budget) for i in range(layers)]
    assert sum(bs) == layers * budget and min(bs) >= pol.min_budget == 7
    pol.validate(budget, num_layers=layers)
    k, v = rand_kv(b=1, h=2, t=60, seed=3)
    for i, lb in enumerate(bs):
        keep = pol.keep_indices(None, lb, keys=k, values=v, layer_idx=i)
        check_keep_idx(keep, 1, 2, lb, 60)
        assert torch.equal(keep, ref_select(-k.norm(dim=-1), lb, 2, 4))


def test_kvcompact_cache_refuses_a_pyramid_schedule_and_takes_uniform():
    """docs/policies.md: the cache's full-attention layers share one budget (one mask for all)."""
    from kvcompact import KVCompactCache

    cfg = tiny_model("llama", "sdpa").config
    with pytest.raises(ValueError, match="per-layer budgets are not supported"):
        KVCompactCache(cfg, budget=100, policy=get_policy("knorm", schedule="pyramid"))
    cache = KVCompactCache(cfg, budget=100, policy=get_policy("knorm"))
    assert [layer.budget for layer in cache.layers] == [100, 100]


# ---------------------------------------------------------------------------------------------
# cache-only policies


def test_streaming_keeps_sinks_and_newest():
    k, v = rand_kv(t=50)
    keep = get_policy("streaming", sinks=4).keep_indices(None, 20, keys=k, values=v)
    check_keep_idx(keep, 2, 2, 20, 50)
    assert torch.equal(keep, torch.tensor(list(range(4)) + list(range(34, 50))).expand(2, 2, 20))


def test_knorm_keeps_low_norm_keys_per_head():
    k, v = rand_kv(b=2, h=3, t=40, seed=5)
    k[0, 1, 10] *= 0.01  # a tiny key in one head only: kept there
    keep = get_policy("knorm", sinks=2, recent=3).keep_indices(None, 12, keys=k, values=v)
    check_keep_idx(keep, 2, 3, 12, 40)
    norms = torch.stack([torch.stack([torch.tensor([float(k[b, h, j].norm()) for j in range(40)]) for h in range(3)]) for b in range(2)])
    assert torch.equal(keep, ref_select(-norms, 12, 2, 3))
    assert 10 in keep[0, 1].tolist()


def test_random_is_seeded_and_deterministic():
    k, v = rand_kv(t=64)
    a, b, c = (get_policy("random", seed=s, sinks=2, recent=4) for s in (7, 7, 8))
    runs = [[p.keep_indices(None, 20, keys=k, values=v) for _ in range(3)] for p in (a, b, c)]
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    assert not torch.equal(runs[0][0], runs[0][1])  # a generator advances across calls
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(runs[0][0], ref_select(torch.rand(2, 2, 64, generator=gen), 20, 2, 4))
    a.reset()
    assert torch.equal(a.keep_indices(None, 20, keys=k, values=v), runs[0][0])


def test_spans_exact_and_budget_modes():
    pol = get_policy("spans", drop=[(10, 20), (30, 35)], keep=[(40, 42)], sinks=2, recent=4)
    exact = pol.keep_idx(50, batch=2, heads=3)
    expected = [j for j in range(50) if not (10 <= j < 20 or 30 <= j < 35)]
    assert torch.equal(exact, torch.tensor(expected).expand(2, 3, len(expected)))
    k, v = rand_kv(b=1, h=2, t=50)
    # Budget mode, budget above what remains after dropping: dropped spans go, nothing else.
    keep = pol.keep_indices(None, 35, keys=k, values=v)
    assert keep[0, 0].tolist() == expected
    # Tighter budget: after the spans, the oldest unprotected go; keep-range 40..41 survives.
    keep = pol.keep_indices(None, 20, keys=k, values=v)
    score = torch.arange(50, dtype=torch.float32)
    for a, b in [(10, 20), (30, 35)]:
        score[a:b] = -math.inf
    prot = torch.zeros(50, dtype=torch.bool)
    prot[40:42] = True
    assert torch.equal(keep, ref_select(score.expand(1, 2, 50), 20, 2, 4, prot))
    assert {40, 41} <= set(keep[0, 0].tolist())


# ---------------------------------------------------------------------------------------------
# query-aware policies on synthetic queries


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (6, 1)])
def test_snapkv_matches_reference_with_gqa(pooling, hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    b, t, d, w = 2, 48, 8, 6
    keys = torch.randn(b, hkv, t, d, generator=g)
    queries = torch.randn(b, hq, w, d, generator=g) * 2
    pol = get_policy("snapkv", window=w, pool=5, pooling=pooling, sinks=2)
    scores = pol.score(0, keys, None, observed_with(queries))
    ref = ref_snapkv_scores(queries, keys, w, 5, pooling)
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-6)
    keep = pol.keep_indices(None, 20, keys=keys, values=None, observed=observed_with(queries))
    check_keep_idx(keep, b, hkv, 20, t)
    assert torch.equal(keep, ref_select(ref, 20, 2, w))


def test_snapkv_pooling_keeps_neighbours_and_heads_differ():
    b, hkv, t, d, w = 1, 2, 64, 16, 4
    keys = torch.randn(b, hkv, t, d) * 0.01
    q = torch.zeros(b, hkv, w, d)
    # Head 0 looks at token 20, head 1 at token 40 (the window is the last 4 tokens).
    keys[0, 0, 20] = 5.0
    q[0, 0, :] = 5.0
    keys[0, 1, 40, :8] = 5.0
    keys[0, 1, 40, 8:] = -5.0
    q[0, 1, :, :8] = 5.0
    q[0, 1, :, 8:] = -5.0
    pol = get_policy("snapkv", window=w, pool=7, sinks=1)
    keep = keep_sets(pol.keep_indices(None, 12, keys=keys, values=None, observed=observed_with(q)))[0]
    assert set(range(17, 24)) <= keep[0] and 40 not in keep[0]  # the hit and its +-3 neighbours
    assert set(range(37, 44)) <= keep[1] and 20 not in keep[1]
    assert set(range(60, 64)) <= keep[0] & keep[1] and 0 in keep[0] & keep[1]


def test_tova_matches_reference():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 30, 8, generator=g)
    queries = torch.randn(1, 4, 3, 8, generator=g)
    pol = get_policy("tova", sinks=1, recent=2)
    obs = observed_with(queries)
    ref = ref_tova_scores(queries, keys)
    torch.testing.assert_close(pol.score(0, keys, None, obs), ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(pol.keep_indices(None, 10, keys=keys, values=None, observed=obs), ref_select(ref, 10, 1, 2))


def test_h2o_accumulates_and_compacts_like_the_rule():
    """Decode simulation: every query's attention onto the tokens held at its time, summed per token
    (tracked by logical id through every eviction), against the policy's folded, compacted mass."""
    torch.manual_seed(0)
    b, hq, hkv, d = 1, 4, 2, 8
    budget, slack, sinks, recent = 16, 3, 2, 4
    pol = get_policy("h2o", sinks=sinks, recent=recent)
    obs = ObservedQueries(1, accumulate=True)
    keys = torch.empty(b, hkv, 0, d)
    ids = [[list() for _ in range(hkv)] for _ in range(b)]  # logical id per physical slot
    mass = {}  # (b, h, logical id) -> reference mass
    for step, q_len in enumerate([20] + [1] * 25):
        first = keys.shape[2]
        new_k = torch.randn(b, hkv, q_len, d)
        new_q = torch.randn(b, hq, q_len, d)
        keys = torch.cat([keys, new_k], dim=2)
        for bi in range(b):
            for h in range(hkv):
                ids[bi][h] += list(range(first + step * 1000, first + step * 1000 + q_len))
        obs.observe(new_q)
        # Reference: every new query attends to the keys held now, causally.
        t = keys.shape[2]
        for bi in range(b):
            for qh in range(hq):
                h = qh // (hq // hkv)
                for i in range(q_len):
                    p = ref_probs_row(new_q[bi, qh, i], keys[bi, h], t - q_len + i, d**-0.5)
                    for j in range(t):
                        key = (bi, h, ids[bi][h][j])
                        mass[key] = mass.get(key, 0.0) + float(p[j])
        if t > budget + slack or (q_len > 1 and t > budget):
            keep = pol.keep_indices(None, budget, keys=keys, values=None, observed=obs)
            check_keep_idx(keep, b, hkv, budget, t)
            ref_scores = torch.tensor(
                [[[mass[(bi, h, ids[bi][h][j])] for j in range(t)] for h in range(hkv)] for bi in range(b)]
            )
            assert torch.equal(keep, ref_select(ref_scores, budget, sinks, recent)), f"step {step}"
            keys = reference.compact([keys], keep)[0][:, :, :budget]
            ids = [[[ids[bi][h][j] for j in keep[bi, h].tolist()] for h in range(hkv)] for bi in range(b)]
            # The compacted mass still lines up with the compacted keys.
            got = obs.attn_mass
            want = torch.tensor([[[mass[(bi, h, i)] for i in ids[bi][h]] for h in range(hkv)] for bi in range(b)])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert keys.shape[2] <= budget + slack


def test_observed_queries_window_rolls_and_compact_requires_fold():
    obs = ObservedQueries(4, accumulate=True)
    qs = [torch.randn(1, 2, n, 8) for n in (6, 1, 1)]
    for q in qs:
        obs.observe(q)
    assert torch.equal(obs.queries, torch.cat(qs, dim=2)[:, :, -4:])
    assert obs.num_pending == 8
    with pytest.raises(RuntimeError, match="fold"):
        obs.compact(torch.arange(4).expand(1, 1, 4))
    obs.fold(torch.randn(1, 1, 8, 8))
    assert obs.attn_mass.shape == (1, 1, 8) and obs.num_pending == 0
    # Every query's probabilities sum to one: total mass = number of queries x group size.
    torch.testing.assert_close(obs.attn_mass.sum(), torch.tensor(8.0 * 2))


# ---------------------------------------------------------------------------------------------
# attach: query states captured from real (tiny, random) models


def tiny_model(kind: str, impl: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model_cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)
        model_cls = transformers.Qwen2ForCausalLM
    cfg._attn_implementation = impl
    return model_cls(cfg).eval()


@contextlib.contextmanager
def record_rope(model):
    """Record the query states each attention forward computes (the output of its RoPE call)."""
    mod = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    original = mod.apply_rotary_pos_emb
    seen = []

    def wrapped(q, k, cos, sin, *a, **kw):
        out = original(q, k, cos, sin, *a, **kw)
        seen.append(out[0].detach().clone())
        return out

    mod.apply_rotary_pos_emb = wrapped
    try:
        yield seen
    finally:
        mod.apply_rotary_pos_emb = original


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_attach_captures_the_queries_attention_computed(kind, impl):
    model = tiny_model(kind, impl)
    cache = transformers.DynamicCache()
    ids = torch.randint(0, 128, (2, 21))
    with torch.no_grad(), record_rope(model) as seen, P.attach(model, cache, "h2o") as observed:
        model(ids[:, :20], **cache_kwargs(cache))
        model(ids[:, 20:], **cache_kwargs(cache))
        other = transformers.DynamicCache()  # forwards with another cache are not observed
        model(ids[:, :5], **cache_kwargs(other))
    layers = len(model.model.layers)
    assert sorted(observed) == list(range(layers))
    for i in range(layers):
        want = torch.cat([seen[i], seen[layers + i]], dim=2)  # prefill, then one decode step
        assert observed[i].pending.shape == (2, 4, 21, 16)
        torch.testing.assert_close(observed[i].pending, want, rtol=0, atol=1e-6)
    # Hooks are gone after the block.
    assert all(not m._forward_pre_hooks for _, m in P.attention_modules(model))

    cache = transformers.DynamicCache()
    with torch.no_grad(), record_rope(model) as seen, P.attach(model, cache, P.SnapKVPolicy(window=8)) as observed:
        model(ids[:, :20], **cache_kwargs(cache))
    for i in range(layers):
        assert observed[i].pending is None
        torch.testing.assert_close(observed[i].queries, seen[i][:, :, -8:], rtol=0, atol=1e-6)


def test_attach_observes_only_forwards_handed_its_cache_by_any_spelling():
    """The cache reaches the attention as ``cache=`` (5.24), ``past_key_values=`` (older) or the
    fourth positional argument; a forward with another cache, or none, is not observed."""
    model = tiny_model("llama", "sdpa")
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 6, 64)
    pe = model.model.rotary_emb(h, torch.arange(6).unsqueeze(0))
    cache, other = transformers.DynamicCache(), transformers.DynamicCache()
    with torch.no_grad(), P.attach(model, cache, "h2o") as observed:
        attn(h, pe, None, other)  # another cache, positionally
        model(torch.randint(0, 128, (1, 5)), use_cache=False)  # no cache at all
        assert observed == {}
        model(torch.randint(0, 128, (1, 3)), **cache_kwargs(cache))
        assert observed[0].num_pending == 3 and observed[1].num_pending == 3
        attn(h, pe, None, cache)  # this cache, positionally
        assert observed[0].num_pending == 9 and observed[1].num_pending == 3


def test_attach_is_a_no_op_for_cache_only_policies():
    model = tiny_model("llama", "sdpa")
    cache = transformers.DynamicCache()
    with P.attach(model, cache, "knorm") as observed:
        assert all(not m._forward_pre_hooks for _, m in P.attention_modules(model))
        model(torch.randint(0, 128, (1, 8)), **cache_kwargs(cache))
    assert observed == {} and cache.observed is observed


class CompactingDynamicCache(transformers.DynamicCache):
    """A DynamicCache that evicts with a policy after its update, the way KVCompactCache does:
    attention of this step still reads the pre-eviction K/V; the layer then keeps ``keep_idx``."""

    def __init__(self, policy, budget, slack):
        super().__init__()
        self.policy, self.budget, self.slack = policy, budget, slack
        self.observed = {}
        self.last_keep = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        n = k.shape[2]
        self.last_keep[layer_idx] = None
        if n > self.budget + self.slack or (key_states.shape[2] > 1 and n > self.budget):
            keep = self.policy.keep_indices(
                None, self.budget, keys=k, values=v, layer_idx=layer_idx, observed=self.observed.get(layer_idx)
            )
            kk, vv = reference.compact([k, v], keep)
            layer = self.layers[layer_idx]
            layer.keys, layer.values = kk[:, :, : keep.shape[-1]], vv[:, :, : keep.shape[-1]]
            self.last_keep[layer_idx] = keep
        return k, v


def test_h2o_mass_equals_eager_attention_through_evictions():
    """With eager attention the model returns its attention weights: the h2o mass the policy keeps
    must equal their sum (over queries and the GQA group), carried through every compaction."""
    model = tiny_model("llama", "eager")
    budget, slack = 24, 3
    pol = get_policy("h2o", sinks=2, recent=4)
    cache = CompactingDynamicCache(pol, budget, slack)
    ref = {}  # layer -> [B, Hkv, T] reference mass over the physical tokens held

    def on_attention(module, args, kwargs, output):
        w = output[1]  # [B, Hq, Q, T] eager attention weights
        i = module.layer_idx
        b, hq, _, t = w.shape
        add = w.float().sum(2).reshape(b, 2, hq // 2, t).sum(2)
        m = ref.get(i)
        m = add if m is None else torch.nn.functional.pad(m, (0, t - m.shape[-1])) + add
        keep = cache.last_keep[i]
        ref[i] = m if keep is None else torch.gather(m, 2, keep)

    handles = [m.register_forward_hook(on_attention, with_kwargs=True) for _, m in P.attention_modules(model)]
    try:
        ids = torch.randint(0, 128, (1, 60))
        with torch.no_grad(), P.attach(model, cache) as observed:
            model(ids[:, :30], **cache_kwargs(cache))
            for j in range(30, 60):
                model(ids[:, j : j + 1], **cache_kwargs(cache))
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        layer = cache.layers[i]
        assert layer.keys.shape[2] <= budget + slack
        observed[i].fold(layer.keys)
        torch.testing.assert_close(observed[i].attn_mass, ref[i], rtol=1e-4, atol=1e-5)


def test_snapkv_and_tova_run_inside_attach_with_per_head_eviction():
    model = tiny_model("llama", "sdpa")
    for name in ("snapkv", "tova"):
        pol = get_policy(name, window=8, recent=8, sinks=2) if name == "snapkv" else get_policy(name, sinks=2, recent=4)
        cache = CompactingDynamicCache(pol, 20, 4)
        g = torch.Generator().manual_seed(1)
        differ = False
        with torch.no_grad(), P.attach(model, cache):
            model(torch.randint(0, 128, (1, 40), generator=g), **cache_kwargs(cache))
            first = dict(cache.last_keep)
            for _ in range(10):
                model(torch.randint(0, 128, (1, 1), generator=g), **cache_kwargs(cache))
        for layer_idx in range(2):
            keep = first[layer_idx]  # the prefill eviction: 40 -> 20 tokens
            check_keep_idx(keep, 1, 2, 20, 40)
            assert set(range(2)) | set(range(40 - pol.recent, 40)) <= set(keep[0, 0].tolist())
            differ |= not torch.equal(keep[0, 0], keep[0, 1])
            assert cache.layers[layer_idx].keys.shape[2] <= 24
        assert differ, f"{name}: every layer kept the same tokens in both KV heads"


# ---------------------------------------------------------------------------------------------
# kvpress bridge (only where kvpress imports; it pins transformers < 5.3)


def test_kvpress_knorm_press_matches_knorm_policy():
    kvpress = pytest.importorskip("kvpress")
    pol = get_policy(kvpress.KnormPress(compression_ratio=0.5), sinks=2, recent=4)
    assert isinstance(pol, P.KVPressPolicy)
    k, v = rand_kv(t=50)
    ours = get_policy("knorm", sinks=2, recent=4).keep_indices(None, 20, keys=k, values=v)
    assert torch.equal(pol.keep_indices(None, 20, keys=k, values=v), ours)


class FakeKnormPress:
    """Duck-typed stand-in for a kvpress ScorerPress (the bridge's contract, without kvpress)."""

    compression_ratio = 0.5

    def __init__(self):
        self.calls = []

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        self.calls.append((module, hidden_states, attentions, dict(kwargs)))
        return -keys.norm(dim=-1)


def test_kvpress_bridge_contract_without_kvpress():
    press = FakeKnormPress()
    pol = get_policy(press, sinks=2, recent=4)
    assert isinstance(pol, P.KVPressPolicy) and pol.observes == "window"
    k, v = rand_kv(t=50)
    ours = get_policy("knorm", sinks=2, recent=4).keep_indices(None, 20, keys=k, values=v)
    obs = ObservedQueries(8, keep_hidden=True)
    obs.observe(torch.randn(2, 2, 8, 8), hidden_states=torch.randn(2, 8, 64))
    assert torch.equal(pol.keep_indices(None, 20, keys=k, values=v, observed=obs), ours)
    # A query-aware press with nothing observed is refused, not fed made-up hidden states.
    with pytest.raises(RuntimeError, match="attach"):
        pol.keep_indices(None, 20, keys=k, values=v, observed=ObservedQueries(8, keep_hidden=True))
    # Through attach, the press receives the attention module, the window's hidden states and RoPE tables.
    model = tiny_model("llama", "sdpa")
    cache = CompactingDynamicCache(P.KVPressPolicy(press, window=8, sinks=2, recent=4), 16, 2)
    press.calls.clear()
    with torch.no_grad(), P.attach(model, cache):
        model(torch.randint(0, 128, (1, 30)), **cache_kwargs(cache))
    module, hidden, attentions, kwargs = press.calls[0]
    assert module is model.model.layers[0].self_attn and attentions is None
    assert hidden.shape == (1, 8, 64) and kwargs["position_embeddings"][0].shape == (1, 8, 16)


@dataclasses.dataclass
class MirrorSnapKVPress:
    """kvpress's ``SnapKVPress`` (window_size=64, kernel_size=5), its ``score`` restated line by line.

    kvpress pins transformers < 5.3, so it cannot be installed next to 5.24; this mirror keeps what
    the bridge must satisfy, above all the assertion ``q_len > window_size`` on the hidden states.
    """

    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        bsz, num_key_value_heads, k_len, _ = keys.shape
        groups = module.config.num_attention_heads // num_key_value_heads
        q_len = hidden_states.shape[1]
        assert q_len > self.window_size, f"Query length {q_len} should be greater than the window size {self.window_size}"
        w, head_dim = self.window_size, module.head_dim
        # compute_window_attention: the last w queries (get_query_states + rotate-half RoPE) ...
        q = module.q_proj(hidden_states[:, -w:]).view(bsz, w, -1, head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)
        x1, x2 = q.chunk(2, dim=-1)
        q = q * cos + torch.cat((-x2, x1), dim=-1) * sin
        # ... onto every key, causally for query i at key position k_len - w + i, keys before the window kept.
        k = keys.repeat_interleave(groups, dim=1)
        attn = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)
        attn = attn + torch.triu(torch.ones_like(attn) * float("-inf"), diagonal=k_len - w + 1)
        attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)[..., :-w]
        scores = attn.mean(dim=-2)
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        scores = scores.view(bsz, num_key_value_heads, groups, k_len - w).mean(2)
        return F.pad(scores, (0, w), value=scores.max().item())


class RecordingCompactingCache(CompactingDynamicCache):
    """Also keeps, per layer, the keys each eviction scored (before compaction)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.scored_keys = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.last_keep[layer_idx] is not None:
            self.scored_keys[layer_idx] = k.clone()
        return k, v


def test_kvpress_snapkv_press_with_default_window_evicts_like_kvpress_on_the_prompt():
    """Default KVPressPolicy(SnapKVPress()): the bridge captures window_size + 1 tokens, so kvpress'
    assertion holds, and the keep set equals kvpress' own score on the whole prompt."""
    press = MirrorSnapKVPress()
    pol = get_policy(press)
    assert pol.window == press.window_size + 1
    model = tiny_model("llama", "sdpa")
    budget, prompt = 80, 100
    cache = RecordingCompactingCache(pol, budget, 4)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault(module.layer_idx, (kwargs["hidden_states"].clone(), kwargs["position_embeddings"]))

    attn = model.model.layers[0].self_attn
    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(4))
        with torch.no_grad(), P.attach(model, cache):
            model(ids, **cache_kwargs(cache))
    finally:
        handle.remove()
    keep = cache.last_keep[0]
    check_keep_idx(keep, 1, 2, budget, prompt)
    hidden, pe = seen[0]
    with torch.no_grad():  # kvpress at prefill: the full prompt's hidden states
        ref = press.score(attn, hidden, cache.scored_keys[0], None, None, {"position_embeddings": pe})
    assert torch.equal(keep, ref_select(ref.float(), budget, pol.sinks, pol.recent))


def test_kvpress_window_must_exceed_the_press_window():
    assert P.KVPressPolicy(MirrorSnapKVPress(window_size=16)).window == 17
    assert P.KVPressPolicy(FakeKnormPress()).window == 64  # no window of its own
    assert P.KVPressPolicy(MirrorSnapKVPress(), window=100).window == 100
    with pytest.raises(ValueError, match="window=64 must exceed the press's window_size=64"):
        P.KVPressPolicy(MirrorSnapKVPress(), window=64)


def test_kvpress_eviction_before_enough_tokens_says_so():
    model = tiny_model("llama", "sdpa")
    cache = CompactingDynamicCache(get_policy(MirrorSnapKVPress()), 40, 4)
    with torch.no_grad(), P.attach(model, cache), pytest.raises(RuntimeError, match="window_size=64"):
        model(torch.randint(0, 128, (1, 50)), **cache_kwargs(cache))


def CUDA(test):
    """CUDA-only test: marked ``cuda`` and skipped without a device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@CUDA
@pytest.mark.parametrize("name", ["knorm", "snapkv", "h2o", "tova", "random", "streaming"])
def test_cuda_scores_and_selection_equal_cpu(name):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 300, 16, generator=g)
    queries = torch.randn(2, 4, 40, 16, generator=g)
    scores = []
    for device in ("cpu", "cuda"):
        obs = ObservedQueries(32, accumulate=name == "h2o")
        obs.observe(queries.to(device))
        obs.fold(keys.to(device))
        scores.append(get_policy(name).score(0, keys.to(device), None, obs).cpu())
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-6)
    # Selection itself is exact on either device (same scores in, same keep_idx out, ties included).
    s = scores[0].clone()
    s[:, :, 50:60] = 0.25
    cpu = select_keep_idx(s, 100, sinks=4, recent=32)
    assert torch.equal(select_keep_idx(s.cuda(), 100, sinks=4, recent=32).cpu(), cpu)


def test_observed_crop_forgets_newest_tokens():
    obs = ObservedQueries(4, accumulate=True)
    obs.observe(torch.randn(1, 2, 10, 8))
    obs.fold(torch.randn(1, 1, 10, 8))
    obs.observe(torch.randn(1, 2, 3, 8))
    obs.crop(5)  # 3 pending + 2 folded tokens
    assert obs.num_pending == 0 and obs.attn_mass.shape[-1] == 8 and obs.queries is None
    obs.fold(torch.randn(1, 1, 8, 8))
    assert obs.attn_mass.shape[-1] == 8


def test_layer_keys_dequantizes_codes_without_the_workspace():
    from types import SimpleNamespace

    from kvcompact import ops

    k, v = rand_kv(b=1, h=2, t=24, d=32)
    kc, ks = ops.quantize(k, "fp8_e4m3", 16)
    vc, vs = ops.quantize(v, "fp8_e4m3", 16)
    pad = lambda t: torch.cat([t, torch.zeros_like(t[:, :, :8])], dim=2)  # capacity beyond length
    store = SimpleNamespace(fmt="fp8_e4m3", length=24, key_codes=pad(kc), key_scales=pad(ks), value_codes=pad(vc), value_scales=pad(vs))
    layer = SimpleNamespace(storage=store)
    keys, values = P.layer_keys(layer, with_values=False)
    assert values is None and keys.dtype == torch.float32
    assert torch.equal(keys, reference.dequantize(kc, ks, torch.float32))
    keep = get_policy("knorm", sinks=2, recent=4).keep_indices(layer, 10)
    assert torch.equal(keep, ref_select(-keys.norm(dim=-1), 10, 2, 4))
