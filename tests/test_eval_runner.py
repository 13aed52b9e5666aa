"""``kvcompact.eval`` mechanics on a tiny random model with the real SmolLM2 tokenizer (accuracy is not the point).

The tiny model answers nonsense; what is checked is that every configuration replays every trace,
scores every question, accounts its costs, leaves no question in the context, and that the KL and
the JSON report mean what they say.
"""

import json

import pytest
import torch

from agent_fixtures import smollm2_tokenizer, tiny_llama
from kvcompact.agent import Session
from kvcompact.cache import KVCompactCache
from kvcompact.eval import (KINDS, EvalConfig, EvalReport, TraceError, get_configs, kl_divergence, load_trace,
                            load_traces, run_eval)
from kvcompact.eval.replay import _ask_live, truncated_text
from kvcompact.eval.scoring import Rule
from kvcompact.eval.traces import Question, parse_trace
from kvcompact.agent.compaction import TokenCounter


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


@pytest.fixture(scope="module")
def quick_report(model, tok):
    # the default set, plus the position gap (compared with reposition below)
    return run_eval(model, tok, get_configs(["default", "inplace-gap"]), load_traces(quick=True), max_new_tokens=3)


# ---------------------------------------------------------------------- shipped data


def test_shipped_traces_cover_the_spec():
    traces = load_traces()
    questions = [q for t in traces for q in t.questions]
    assert len(traces) >= 8 and len(questions) >= 40
    assert {q.kind for q in questions} == set(KINDS)
    quick = load_traces(quick=True)
    assert 2 <= len(quick) < len(traces)
    assert {q.kind for t in quick for q in t.questions} == set(KINDS)


def test_dropped_questions_come_after_an_edit():
    for t in load_traces():
        edited = False
        for e in t.events:
            edited |= e.type in ("truncate", "drop")
            if e.type == "question" and e.question.kind == "dropped":
                assert edited, f"{t.id}/{e.question.id} is 'dropped' but no edit precedes it"


def test_shipped_tool_outputs_are_realistic_size(tok):
    sizes = [len(tok(e.content)["input_ids"]) for t in load_traces() for e in t.events if e.type == "tool"]
    big = [n for n in sizes if n >= 500]
    assert max(sizes) <= 3000 and len(big) >= len(sizes) // 2


# ---------------------------------------------------------------------- the quick set on every config


def test_every_config_scores_every_question(quick_report):
    expected = [(t.id, q.id) for t in load_traces(quick=True) for q in t.questions]
    assert [c.name for c in quick_report.configs] == [c.name for c in get_configs(["default", "inplace-gap"])]
    for c in quick_report.configs:
        assert [(q.trace, q.question) for q in c.questions] == expected, c.name
        assert c.total == len(expected) and 0 <= c.correct <= c.total
        assert all(isinstance(q.reply, str) and isinstance(q.correct, bool) for q in c.questions)
        assert c.peak_kv_bytes > 0 and c.seconds > 0
        assert all(q.kl is not None and q.kl >= 0 for q in c.questions)
    assert all(q.kl == 0.0 for q in quick_report["dense"].questions)


def test_in_place_configs_prefill_less_than_reprefill(quick_report):
    reprefill = quick_report["reprefill"].tokens_prefilled
    for c in quick_report.configs:
        if c.config["mode"] == "inplace":
            assert 0 < c.tokens_prefilled < reprefill, c.name
    # recompute-tail re-feeds the tails after edits, so it pays more than the plain in-place edits
    assert quick_report["recompute-tail"].tokens_prefilled > quick_report["inplace-reposition"].tokens_prefilled
    assert quick_report["inplace-gap"].tokens_prefilled == quick_report["inplace-reposition"].tokens_prefilled


def test_edits_shrink_memory_and_8bit_shrinks_it_more(quick_report):
    for name in ("int8", "fp8_e4m3", "int8-repair-10"):
        assert quick_report[name].peak_kv_bytes < quick_report["inplace-reposition"].peak_kv_bytes, name


def test_recompute_tail_sees_what_reprefill_sees(quick_report):
    # Both hold exactly the compacted context (recompute-tail is a re-prefill from the edit on),
    # so their first-token distributions -- and their KL to dense -- agree up to float rounding.
    a, b = quick_report["recompute-tail"].questions, quick_report["reprefill"].questions
    for qa, qb in zip(a, b):
        assert qa.kl == pytest.approx(qb.kl, rel=1e-3, abs=1e-5), (qa.trace, qa.question)
        assert qa.reply == qb.reply


def test_json_round_trip(quick_report):
    text = quick_report.to_json()
    back = EvalReport.from_json(text)
    assert back.to_json() == text
    row = json.loads(text)["configs"][1]
    assert {"accuracy", "correct", "total", "mean_kl", "peak_kv_bytes", "tokens_prefilled", "seconds"} <= set(row)
    table = quick_report.table()
    assert all(c.name in table for c in quick_report.configs)


# ---------------------------------------------------------------------- KL and rollback


def test_kl_is_zero_for_the_same_context_and_positive_otherwise(model, tok):
    trace = _small_trace()
    report = run_eval(model, tok, [EvalConfig("dense-again", "dense"), "inplace-gap"], [trace], max_new_tokens=2)
    assert [c.name for c in report.configs] == ["dense", "dense-again", "inplace-gap"]  # reference added first
    assert all(q.kl < 1e-9 for q in report["dense-again"].questions)
    after_edit = [q for q in report["inplace-gap"].questions if q.question == "after"]
    assert after_edit[0].kl > 1e-6  # the edit changed the context, so the distribution moved


def test_kl_divergence_formula():
    p = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    q = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0]), -1)
    expected = float((p.exp() * (p - q)).sum())
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(p, p) == 0.0


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_asking_takes_the_question_back(model, tok, kv_dtype):
    s = Session(model, tok, cache=KVCompactCache(model.config, kv_dtype=kv_dtype))
    s.add("system", "You answer briefly.")
    tool = s.add("tool", "x " * 200)
    s.add("user", "hello there")
    s.prefill()
    s.drop(tool, reposition=False)  # a gap before the question, as inplace-gap leaves
    ids, positions, logical = s.token_ids, s.positions(), s.cache.get_seq_length()

    class _R:  # the counters _ask_live updates
        max_new_tokens, tokens_fed, peak_kv_bytes = 3, 0, 0

        def _note_bytes(self, cache):
            pass

    _ask_live(_R(), s, Question("q", "What did I say?", "kept", Rule(answers=("hello",))))
    assert s.token_ids == ids and s.positions() == positions and s.cache.get_seq_length() == logical
    s.add("user", "next")
    after = s.next_token_logits()
    fresh = Session(model, tok, cache=KVCompactCache(model.config, kv_dtype=kv_dtype))
    fresh.add("system", "You answer briefly.")
    t2 = fresh.add("tool", "x " * 200)
    fresh.add("user", "hello there")
    fresh.prefill()
    fresh.drop(t2, reposition=False)
    fresh.add("user", "next")
    torch.testing.assert_close(after, fresh.next_token_logits(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- truncation and loader errors


def test_truncated_text_keeps_head_and_tail(tok):
    text = "\n".join(f"line {i} value {i * 7}" for i in range(200))
    out = truncated_text(text, 20, 10, TokenCounter(tok), "logs")
    assert out.startswith("line 0 value 0") and out.endswith("199 value 1393")  # 10 tokens: the last line's end
    assert "line 100 value 700" not in out and "message logs" in out
    assert truncated_text("short", 20, 10, TokenCounter(tok), "x") == "short"


def _small_trace(**overrides):
    data = {"id": "small", "system": "You answer briefly.", "events": [
        {"type": "user", "content": "Hi, my ticket is OPS-1."},
        {"type": "tool", "label": "out", "call": "$ cat notes.txt", "output": "alpha beta gamma " * 40},
        {"type": "question", "id": "before", "kind": "kept", "prompt": "Ticket?", "answers": ["OPS-1"]},
        {"type": "drop", "label": "out"},
        {"type": "question", "id": "after", "kind": "dropped", "prompt": "Ticket?", "answers": ["OPS-1"]},
    ]}
    data.update(overrides)
    return parse_trace(data, "small.json")


@pytest.mark.parametrize("events, message", [
    ([{"type": "shout", "content": "x"}], r"small.json: events\[0\]: 'type' must be one of"),
    ([{"type": "drop", "label": "nope"}], r"events\[0\]: 'label' 'nope' names no earlier tool event"),
    ([{"type": "tool", "label": "a", "call": "c", "output": {"generator": "nope"}}],
     r"events\[0\]: 'output': unknown generator 'nope'"),
    ([{"type": "question", "id": "q", "kind": "odd", "prompt": "p", "answers": ["a"]}],
     r"events\[0\]: 'kind' must be one of kept, dropped, noise, instruction"),
    ([{"type": "question", "id": "q", "kind": "kept", "prompt": "p", "answers": "a"}],
     r"events\[0\]: 'answers' must be a list of strings"),
    ([{"type": "question", "id": "q", "kind": "kept", "prompt": "p", "checks": [{"name": "loud"}]}],
     r"events\[0\]: Check.name must be one of"),
    ([{"type": "tool", "label": "a", "call": "c", "output": "o"},
      {"type": "truncate", "label": "a", "head_tokens": -1, "tail_tokens": 3}],
     r"events\[1\]: 'head_tokens' must be an int >= 0"),
    ([{"type": "user", "content": "no questions"}], "at least one question"),
])
def test_loader_errors_name_file_event_and_field(events, message):
    with pytest.raises(TraceError, match=message):
        _small_trace(events=events)


def test_load_trace_file_errors(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TraceError, match="bad.json: not valid JSON"):
        load_trace(bad)
    bad.write_text('{"id": "x", "events": []}')
    with pytest.raises(TraceError, match="'system' must be a non-empty string"):
        load_trace(bad)


def test_run_eval_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="unknown eval config"):
        run_eval(model, tok, ["fast"], [_small_trace()])
    with pytest.raises(ValueError, match="names must be unique"):
        run_eval(model, tok, ["dense", "dense"], [_small_trace()])
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_eval(model, tok, ["dense"], [_small_trace()], max_new_tokens=0)
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        run_eval(model, tok, ["dense"], [_small_trace()], jobs=0)
    with pytest.raises(ValueError, match="jobs > 1 needs load_model"):
        run_eval(model, tok, ["dense"], [_small_trace()], jobs=2)
    with pytest.raises(ValueError, match="model and tokenizer are required"):
        run_eval(None, None, ["dense"], [_small_trace()])
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        run_eval(model, tok, ["dense"], [_small_trace()], threads=0)
    with pytest.raises(ValueError, match="trace ids must be unique"):
        run_eval(model, tok, ["dense"], [_small_trace(), _small_trace()])
    with pytest.raises(ValueError, match="mode must be one of"):
        EvalConfig("x", "evict")
    with pytest.raises(ValueError, match="needs policy and budget_fraction"):
        EvalConfig("x", "budget")
    with pytest.raises(ValueError, match="needs policy and budget_fraction"):
        EvalConfig("x", "inplace", policy="snapkv", budget_fraction=0.5)
    with pytest.raises(ValueError, match="budget_fraction"):
        EvalConfig("x", "budget", policy="snapkv", budget_fraction=1.5)
    with pytest.raises(ValueError, match="repair"):
        EvalConfig("x", "inplace", repair=0.0)
    with pytest.raises(ValueError, match="repair"):
        EvalConfig("x", "inplace", repair=0.1, recompute_tail=True)
    with pytest.raises(ValueError, match="apply to mode 'inplace' only"):
        EvalConfig("x", "dense", repair=0.1)


def test_config_sets():
    from kvcompact.eval.configs import ALL_CONFIGS, BUDGET_FRACTIONS, BUDGET_POLICIES, DEFAULT_CONFIGS, QUICK_CONFIGS
    from kvcompact.policies import available_policies

    names = [c.name for c in ALL_CONFIGS]
    assert len(set(names)) == len(names)
    budgets = [c for c in ALL_CONFIGS if c.mode == "budget"]
    assert {(c.policy, c.budget_fraction) for c in budgets} == {(p, f) for p in BUDGET_POLICIES for f in BUDGET_FRACTIONS}
    assert set(BUDGET_POLICIES) <= set(available_policies())
    assert {c.name for c in QUICK_CONFIGS} <= {c.name for c in DEFAULT_CONFIGS} <= set(names)
    assert get_configs() == list(DEFAULT_CONFIGS) and get_configs("all") == list(ALL_CONFIGS)
    assert get_configs(["quick", "dense", "int8"]) == list(QUICK_CONFIGS) + get_configs(["int8"])
    with pytest.raises(ValueError, match="unknown eval config"):
        get_configs(["snapkv-33"])


def test_budget_replay_holds_the_budget_and_leaves_no_question(model, tok):
    """mode 'budget': the cache never holds more than the budget; asking does not touch it."""
    from kvcompact.eval.replay import BudgetReplayer

    trace = load_traces(quick=True)[0]
    config = get_configs(["snapkv-25"])[0]
    r = BudgetReplayer(model, tok, config, trace, {}, max_new_tokens=2)
    try:
        for event in trace.events:
            if event.type == "question":
                before = (r.cache.get_seq_length(), [t.clone() for t in r.cache.layers[0].storage.view(fresh=True)])
                r.ask(event.question)
                assert r.cache.get_seq_length() == before[0]
                after = r.cache.layers[0].storage.view(fresh=True)
                assert all(torch.equal(a, b) for a, b in zip(after, before[1]))
            else:
                r.event(event)
            assert max(r.cache.stats().physical_tokens) <= r.budget + r.cache.slack
        assert r.tokens_prefilled == len(r.fed_ids) > r.budget * 3  # everything fed, a quarter kept
    finally:
        r.close()


def test_kl_exact_is_zero_for_the_exact_context(quick_report):
    """reprefill and recompute-tail hold the same context: both have KL 0 from it (up to rounding)."""
    assert all(q.kl_exact == 0.0 for q in quick_report["reprefill"].questions)
    assert all(q.kl_exact < 1e-3 for q in quick_report["recompute-tail"].questions)
    assert quick_report["inplace-gap"].mean_kl_exact > 0


# ---------------------------------------------------------------------- worker processes (jobs > 1)


def _tiny_model_and_tokenizer():
    """load_model for spawned workers (module-level, so it pickles by reference)."""
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


def _raising_loader():
    raise OSError("no model here")


def test_jobs_give_the_same_report(model, tok):
    """Two worker processes play the pairs in another order; the report is the same (KL included)."""
    configs, traces = ["dense", "reprefill", "inplace-reposition", "int8"], [_small_trace()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (threads=1): float sums then run in the same order
    try:
        one = run_eval(model, tok, configs, traces, max_new_tokens=2)
    finally:
        torch.set_num_threads(threads)
    two = run_eval(None, None, configs, traces, max_new_tokens=2, jobs=2, threads=1,
                   load_model=_tiny_model_and_tokenizer)
    assert one.model == two.model and [c.name for c in one.configs] == [c.name for c in two.configs]
    for a, b in zip(one.configs, two.configs):
        assert (a.tokens_prefilled, a.tokens_fed, a.peak_kv_bytes) == (b.tokens_prefilled, b.tokens_fed, b.peak_kv_bytes)
        assert [(q.reply, q.correct) for q in a.questions] == [(q.reply, q.correct) for q in b.questions]
        # the same first-token distributions: the KL agrees up to the summation order of the KL itself
        for qa, qb in zip(a.questions, b.questions, strict=True):
            assert qa.kl == pytest.approx(qb.kl, rel=1e-6, abs=1e-12)
            assert qa.kl_exact == pytest.approx(qb.kl_exact, rel=1e-6, abs=1e-12)
    assert two.settings["jobs"] == 2 and max(q.kl for q in two["int8"].questions) > 0


def test_workers_import_the_kvcompact_this_process_runs(tmp_path, monkeypatch):
    """A folder first on sys.path with another ``kvcompact`` (an uncompiled source checkout, say) must
    not be what the spawned workers import: they get this process's sys.path."""
    shadow = tmp_path / "kvcompact"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing kvcompact was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    report = run_eval(None, None, ["dense"], [_small_trace()], max_new_tokens=1, jobs=2,
                      load_model=_tiny_model_and_tokenizer)
    assert report["dense"].total == len(_small_trace().questions)


def test_a_failing_play_stops_the_workers(tok):
    """A play that raises in a worker ends the run with its exception, without waiting for the rest."""
    import time

    bad = EvalConfig("bad-policy", "budget", policy="no-such-policy", budget_fraction=0.5)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="no-such-policy"):
        run_eval(None, None, ["dense", bad], load_traces(quick=True), max_new_tokens=2,
                 jobs=2, load_model=_tiny_model_and_tokenizer)
    assert time.perf_counter() - t0 < 120


def test_a_worker_that_cannot_load_the_model_is_a_clear_error():
    with pytest.raises(RuntimeError, match="failed to start or died: load_model raised"):
        run_eval(None, None, ["dense"], [_small_trace()], jobs=2, load_model=_raising_loader)
