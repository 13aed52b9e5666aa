"""`kvcompact demo`, the main job, end to end on the embedded model (issue 8), and its task accuracy:
scored questions asked to both runs and taken back (on a tiny random Llama over SmolLM2's tokenizer)."""

import json
import re

import pytest

from agent_fixtures import smollm2_tokenizer, tiny_llama
from kvcompact import cli
from kvcompact.demo.script import QUESTION_KINDS, QUESTIONS, SYSTEM_PROMPT, TASK, Question, build_steps
from kvcompact.eval.scoring import Rule, normalise


@pytest.mark.slow
def test_demo_saves_memory_without_reprefill(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Summary" in printed and "peak KV bytes" in printed
    rows = [line for line in printed.splitlines() if re.match(r"\s*\d+/24\s", line)]
    assert len(rows) == 24  # one live row per step

    report = json.loads((out_dir / "demo.json").read_text())
    summary = report["summary"]
    assert summary["steps"] == 24
    assert summary["peak_kv_ratio"] <= 0.35
    assert summary["tokens_reprefilled"] == 0
    assert summary["edits"]["replaced"] + summary["edits"]["dropped"] > 0
    assert summary["prefill_tokens_avoided"] > 0
    # task accuracy: every scored question asked to both runs; the dense reference answers them
    assert "task accuracy" in printed and "same answers" not in printed
    acc = summary["accuracy"]
    assert acc["dense"]["questions"] == acc["kvcompact"]["questions"] == len(QUESTIONS)
    assert [q["question"] for q in report["questions"]] == [q.prompt for q in QUESTIONS]
    assert acc["dense"]["correct"] >= len(QUESTIONS) - 1
    steps = report["steps"]
    # the dense run only grows; kvcompact's context is smaller by the end
    assert all(a["dense_context"] <= b["dense_context"] for a, b in zip(steps, steps[1:]))
    assert steps[-1]["compact_context"] < steps[-1]["dense_context"]
    png = (out_dir / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--steps", "0"])
    assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err


# -- task accuracy: scored questions, asked to both runs and taken back (tiny model, fast) --------

# Tight budgets so three steps already truncate and drop (the questions are asked after the edits);
# group_size 16: the tiny model's head_dim.
TINY = dict(steps=3, max_new_tokens=3, question_tokens=4, group_size=16, observation_budget=32, keep_recent=2,
            token_budget=600)
TINY_QUESTIONS = (
    Question(1, "instruction", "What kind of fixes does the task ask you to propose?", Rule(answers=("minimal",)), 0),
    Question(3, "truncated", "What did the AssertionError assert?", Rule(answers=("0.32",)), 2),
    Question(3, "kept", "Which file did you read last?", Rule(answers=("inventory.py",)), 3),
    Question(9, "kept", "Never asked: step 9 is after the run's last step", Rule(answers=("x",)), 9),
)


@pytest.fixture(scope="module")
def tiny():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


def _run(tiny, questions):
    from kvcompact.demo.runner import DemoConfig, run_demo

    model, tok = tiny
    return run_demo(model, tok, DemoConfig(**TINY), questions=questions)


def _contains(text: str, answer: str) -> bool:
    return f" {normalise(answer)} " in f" {normalise(text)} "


def test_questions_are_asked_scored_and_leave_both_runs_unchanged(tiny):
    from kvcompact.eval.scoring import score

    asked = _run(tiny, TINY_QUESTIONS)
    plain = _run(tiny, ())
    assert [(q.step, q.question) for q in asked.questions] == [(q.step, q.prompt) for q in TINY_QUESTIONS[:3]]
    for record, question in zip(asked.questions, TINY_QUESTIONS):
        assert record.dense_reply and record.compact_reply
        assert record.dense_correct == score(record.dense_reply, question.rule).correct
        assert record.compact_correct == score(record.compact_reply, question.rule).correct
    assert asked.edits["replaced"] + asked.edits["dropped"] > 0  # asked after in-place edits too
    # Taken back: every step sees the same context, holds the same KV and replies the same as in a
    # run without questions (the kvcompact run drops them; the dense run answers on a copy).
    strip = lambda r: {k: v for k, v in vars(r).items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in asked.steps] == [strip(r) for r in plain.steps]
    assert plain.questions == [] and plain.accuracy()["dense"] == {"correct": 0, "questions": 0}


@pytest.mark.parametrize("editable", [True, False], ids=["KVCompactCache", "DynamicCache"])
def test_ask_and_take_back_restores_the_context(tiny, editable):
    from transformers import DynamicCache

    from kvcompact import KVCompactCache
    from kvcompact.agent import Session
    from kvcompact.demo.runner import ask_and_take_back

    model, tok = tiny
    cache = KVCompactCache(model.config, kv_dtype="fp8_e4m3", group_size=16) if editable else DynamicCache()
    session = Session(model, tok, cache=cache)
    session.add("system", SYSTEM_PROMPT)
    session.add("user", TASK)
    session.add("tool", build_steps()[0].output)
    session.generate(max_new_tokens=3)
    before = (len(session.token_ids), list(session.token_ids), session.positions(),
              [m.id for m in session.messages], session.cache.get_seq_length())
    reply = ask_and_take_back(session, "What kind of fixes does the task ask you to propose?", 4)
    assert isinstance(reply, str) and reply
    after = (len(session.token_ids), list(session.token_ids), session.positions(),
             [m.id for m in session.messages], session.cache.get_seq_length())
    assert after == before
    session.close()


def test_accuracy_is_in_the_json_and_the_summary(tiny, tmp_path):
    import io

    from kvcompact.demo.report import print_summary, write_outputs

    result = _run(tiny, TINY_QUESTIONS)
    report = json.loads(open(write_outputs(result, str(tmp_path))["json"]).read())
    acc = report["summary"]["accuracy"]
    assert set(acc) == {"dense", "kvcompact"} and acc["dense"]["questions"] == acc["kvcompact"]["questions"] == 3
    assert acc["dense"]["correct"] == sum(q["dense_correct"] for q in report["questions"])
    assert acc["kvcompact"]["correct"] == sum(q["compact_correct"] for q in report["questions"])
    assert [q["question"] for q in report["questions"]] == [q.prompt for q in TINY_QUESTIONS[:3]]
    assert "same_answers" not in report["summary"] and "same_answer" not in report["steps"][0]

    out = io.StringIO()
    print_summary(result, out)
    text = out.getvalue()
    line = f"dense {acc['dense']['correct']}/3  kvcompact {acc['kvcompact']['correct']}/3"
    assert "task accuracy" in text and line in text and "same answers" not in text
    assert TINY_QUESTIONS[0].prompt not in text  # per-question lines only in verbose mode
    out = io.StringIO()
    print_summary(result, out, verbose=True)
    assert all(q.prompt in out.getvalue() for q in TINY_QUESTIONS[:3])


def test_the_demo_questions_are_answerable_from_what_the_script_feeds():
    from kvcompact.agent import compact_messages
    from kvcompact.agent.messages import Message
    from kvcompact.demo.runner import DemoConfig

    tok = smollm2_tokenizer()
    cfg = DemoConfig()
    steps = build_steps()
    assert 5 <= len(QUESTIONS) <= 8 and {q.kind for q in QUESTIONS} == set(QUESTION_KINDS)
    assert all(1 <= q.step <= cfg.steps and 0 <= q.source_step <= q.step for q in QUESTIONS)
    for q in QUESTIONS:
        # the source states an accepted answer
        source = f"{SYSTEM_PROMPT}\n{TASK}" if q.source_step == 0 else steps[q.source_step - 1].output
        assert any(_contains(source, a) for a in q.rule.answers), q.prompt
        # what the kvcompact run's truncation leaves of the source when the question is asked
        # (drops depend on the replies' lengths, so only truncation is replayed here)
        msgs = [Message("system", SYSTEM_PROMPT, id="system"), Message("user", TASK, id="task")]
        for i, step in enumerate(steps[: q.step], 1):
            msgs += [Message("tool", f"$ {step.tool}\n{step.output}", id=f"obs{i}"),
                     Message("assistant", "ok", id=f"reply{i}")]
        plan = compact_messages(msgs, None, keep_recent=cfg.keep_recent, observation_budget=cfg.observation_budget,
                                tokenizer=tok).plan
        cut = {t.ref: t.text for t in plan.truncated}
        if q.kind == "truncated":
            assert f"obs{q.source_step}" in cut, q.prompt
            assert not any(_contains(cut[f"obs{q.source_step}"], a) for a in q.rule.answers), q.prompt
        elif q.kind == "kept":
            assert f"obs{q.source_step}" not in cut, q.prompt


def test_the_eval_measures_what_the_demo_runs(tiny):
    """Every eval run (default and quick) has the demo's configuration, and the demo's session really
    is built with it: its cache's storage and the edit options it passes."""
    from kvcompact.agent import Session
    from kvcompact.demo import runner
    from kvcompact.eval.configs import DEFAULT_CONFIGS, DEMO_CONFIG, QUICK_CONFIGS, get_configs

    assert DEMO_CONFIG in [c.name for c in DEFAULT_CONFIGS] and DEMO_CONFIG in [c.name for c in QUICK_CONFIGS]
    row = get_configs([DEMO_CONFIG])[0]
    assert row.kv_dtype is not None and row.repair and not row.recompute_tail
    seen = {"drop": [], "replace": [], "kv_dtype": set()}
    real_drop, real_replace = Session.drop, Session.replace

    def drop(self, msg_id, **kw):
        seen["drop"].append(kw)
        seen["kv_dtype"].add(self.cache.kv_dtype)
        return real_drop(self, msg_id, **kw)

    def replace(self, msg_id, text, **kw):
        seen["replace"].append(kw)
        return real_replace(self, msg_id, text, **kw)

    model, tok = tiny
    try:
        Session.drop, Session.replace = drop, replace
        runner.run_demo(model, tok, runner.DemoConfig(**{k: v for k, v in TINY.items() if k != "group_size"}),
                        questions=())
    finally:
        Session.drop, Session.replace = real_drop, real_replace
    compaction_drops = [kw for kw in seen["drop"] if "repair" in kw]
    assert compaction_drops and seen["replace"] and seen["kv_dtype"] == {row.kv_dtype}
    assert all(kw == {"reposition": row.reposition, "repair": row.repair} for kw in compaction_drops)
    assert all(kw == {"repair": row.repair} for kw in seen["replace"])


def test_edits_are_repaired_not_reprefilled(tiny):
    """Every edit of the tiny run is repaired in place: tokens recomputed, no message fed twice."""
    from kvcompact.demo.runner import DemoConfig, run_demo

    model, tok = tiny
    repaired = run_demo(model, tok, DemoConfig(**TINY), questions=()).summary()
    plain = run_demo(model, tok, DemoConfig(**TINY, repair=None), questions=()).summary()
    assert repaired["edits"] == plain["edits"] and repaired["edits"]["replaced"] + repaired["edits"]["dropped"] > 0
    assert repaired["tokens_repaired"] > 0 == plain["tokens_repaired"]
    # repair's forwards are counted as repair, not as a re-prefill (the same count as without it)
    assert repaired["tokens_reprefilled"] == plain["tokens_reprefilled"]
