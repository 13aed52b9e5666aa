"""Run the scripted session twice in one process: dense baseline vs kvcompact.

Both runs are :class:`kvcompact.agent.Session` objects fed the same observations
(:mod:`kvcompact.demo.script`); only the cache and the context policy differ:

* ``DynamicCache``: transformers' default cache; every observation stays whole.
* ``kvcompact``: a ``KVCompactCache`` storing K/V in int8 (one scale per head and token), and
  after every step the message-level plan of :func:`kvcompact.agent.compact_messages`
  (observation budget, recent messages kept whole, a token budget) is applied to
  the cache in place: truncated tool outputs through ``Session.replace``, dropped
  ones through ``Session.drop`` (closing the position gap), each followed by bounded repair
  (``repair=0.1``: the 10% of the later tokens the edit changed most, at least 32, are recomputed
  in place).
  No message is re-prefilled.

These settings are the eval's ``int8-repair-10`` configuration
(:data:`kvcompact.eval.configs.DEMO_CONFIG`): ``kvcompact eval`` measures it against message
compaction with a full re-prefill (docs/eval.md).

Task accuracy
-------------
After some steps both runs answer a scored question (:data:`kvcompact.demo.script.QUESTIONS`),
scored by :func:`kvcompact.eval.scoring.score`. A question must not stay in the context (the
next steps would see it), so each is taken back:

* kvcompact: asked on the live session -- add the question, ``generate`` -- then question and
  reply are dropped with ``Session.drop(reposition=True)``, as the eval's in-place replayer does.
  Both are the newest rows, so the cache holds the same rows at the same positions as before.
* DynamicCache: a ``Session`` over it is append-only (``drop`` needs a ``KVCompactCache``), so
  the question is asked on a copy of the session (``copy.deepcopy``, sharing the model and the
  tokenizer) that is then thrown away: the answer comes from exactly the DynamicCache context,
  which the question never touches. The copy exists only while the question is answered and is
  not counted in the dense run's KV bytes.

Question time is reported apart (``question_seconds``), not in either run's wall time.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from kvcompact.demo.script import QUESTIONS, SYSTEM_PROMPT, TASK, Question, build_steps
from kvcompact.eval.configs import DEMO_CONFIG, get_configs
from kvcompact.eval.scoring import score


_EVAL = get_configs([DEMO_CONFIG])[0]  # one source for the demo's storage and edit settings


@dataclass
class DemoConfig:
    steps: int = 24
    max_new_tokens: int = 12
    kv_dtype: str = _EVAL.kv_dtype
    group_size: int | None = _EVAL.group_size
    reposition: bool = _EVAL.reposition  # Session.drop(reposition=...)
    repair: float | None = _EVAL.repair  # Session.drop/replace(repair=...)
    observation_budget: int = 96     # tokens a tool output keeps once it is no longer recent
    keep_recent: int = 4             # messages kept whole at the end (2 steps)
    token_budget: int = 1500         # context tokens the kvcompact run may hold
    question_tokens: int = 24        # tokens generated for a scored question's reply


@dataclass
class StepRecord:
    step: int
    tool: str
    dense_context: int
    dense_kv_bytes: int
    compact_context: int
    compact_kv_bytes: int
    compact_dense_equiv_bytes: int
    prefill_avoided: int
    dense_answer: str
    compact_answer: str
    seconds: float


@dataclass
class QuestionRecord:
    """One scored question and both runs' replies (``*_reason`` is empty when correct)."""

    step: int
    kind: str
    question: str
    answers: list
    dense_reply: str
    dense_correct: bool
    dense_reason: str
    compact_reply: str
    compact_correct: bool
    compact_reason: str


@dataclass
class DemoResult:
    config: DemoConfig
    device: str
    model: str
    steps: list[StepRecord] = field(default_factory=list)
    questions: list[QuestionRecord] = field(default_factory=list)
    dense_seconds: float = 0.0
    question_seconds: float = 0.0
    compact_seconds: float = 0.0
    tokens_reprefilled: int = 0
    tokens_repaired: int = 0
    edits: dict = field(default_factory=dict)

    def summary(self) -> dict:
        peak_dense = max(s.dense_kv_bytes for s in self.steps)
        peak_compact = max(s.compact_kv_bytes for s in self.steps)
        return {
            "steps": len(self.steps),
            "peak_kv_bytes_dense": peak_dense,
            "peak_kv_bytes_kvcompact": peak_compact,
            "peak_kv_ratio": peak_compact / peak_dense,
            "final_context_dense": self.steps[-1].dense_context,
            "final_context_kvcompact": self.steps[-1].compact_context,
            "tokens_reprefilled": self.tokens_reprefilled,
            "tokens_repaired": self.tokens_repaired,
            "prefill_tokens_avoided": sum(s.prefill_avoided for s in self.steps),
            "accuracy": self.accuracy(),
            "dense_seconds": round(self.dense_seconds, 2),
            "kvcompact_seconds": round(self.compact_seconds, 2),
            "question_seconds": round(self.question_seconds, 2),
            "edits": self.edits,
        }

    def accuracy(self) -> dict:
        """``{"dense": {"correct", "questions"}, "kvcompact": {...}}`` over the questions asked."""
        n = len(self.questions)
        return {"dense": {"correct": sum(q.dense_correct for q in self.questions), "questions": n},
                "kvcompact": {"correct": sum(q.compact_correct for q in self.questions), "questions": n}}

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "device": self.device,
            "model": self.model,
            "summary": self.summary(),
            "steps": [asdict(s) for s in self.steps],
            "questions": [asdict(q) for q in self.questions],
        }


def _model_name(model) -> str:
    path = str(getattr(model.config, "name_or_path", "") or "")
    if "SmolLM2-135M-Instruct" in path:
        return "SmolLM2-135M-Instruct (embedded)"
    return path or type(model).__name__


def dynamic_cache_bytes(cache) -> int:
    """Bytes held by a transformers DynamicCache (K and V of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    if not getattr(cache, "layers", None):  # transformers < 4.56 layout
        for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", [])):
            total += t.numel() * t.element_size()
    return total


def compact_kv_bytes(cache) -> tuple[int, int]:
    """(device bytes incl. the dequantization workspace, dense bytes of the held tokens)."""
    s = cache.stats()
    return s.device_bytes + getattr(s, "workspace_bytes", 0), s.dense_bytes


def apply_compaction(session, cfg: DemoConfig, tokenizer) -> tuple[int, int, int, int, int]:
    """Turn compact_messages' plan into in-place edits.

    Returns ``(replaced, dropped, tokens avoided, tokens re-prefilled, tokens repaired)``.
    ``tokens avoided`` is what a message-level compactor without KV editing would re-prefill:
    everything from the first edited message to the end of the context. ``tokens repaired`` is
    what bounded repair recomputed (``Session.last_repair.fed`` of each edit). ``tokens
    re-prefilled`` is measured: tokens the edits fed to the model beyond the new (truncated)
    texts themselves and the repair.
    """
    from kvcompact.agent import compact_messages

    plan = compact_messages(
        session.messages, cfg.token_budget, keep_recent=cfg.keep_recent,
        observation_budget=cfg.observation_budget, tokenizer=tokenizer,
    ).plan
    if not plan.truncated and not plan.dropped:
        return 0, 0, 0, 0, 0
    edited = [t.ref for t in plan.truncated] + [d.ref for d in plan.dropped]
    first_start = min(session.spans[ref][0] for ref in edited)
    avoided = len(session.token_ids) - first_start
    fed_before, new_text_tokens, repaired = session.fed_tokens, 0, 0
    for t in plan.truncated:
        session.last_repair = None
        _, new_tokens = session.replace(t.ref, t.text, repair=cfg.repair)
        new_text_tokens += new_tokens
        repaired += session.last_repair.fed if session.last_repair is not None else 0
    for d in plan.dropped:
        session.last_repair = None
        session.drop(d.ref, reposition=cfg.reposition, repair=cfg.repair)
        repaired += session.last_repair.fed if session.last_repair is not None else 0
    reprefilled = session.fed_tokens - fed_before - new_text_tokens - repaired
    return len(plan.truncated), len(plan.dropped), max(avoided, 0), reprefilled, repaired


def ask_and_take_back(session, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply to ``prompt`` on ``session``'s context, leaving that context as it was.

    A session over a ``KVCompactCache`` answers live and drops question and reply again
    (``reposition=True``: they are the newest rows, so positions and length return to what they
    were). Any other cache (an append-only ``DynamicCache``) answers on a throwaway copy of the
    session that shares the model and the tokenizer. See the module docstring.
    """
    from kvcompact import KVCompactCache

    if not isinstance(session.cache, KVCompactCache):
        shared = {id(session.model): session.model, id(session.tokenizer): session.tokenizer}
        fork = copy.deepcopy(session, memo=shared)
        fork.add("user", prompt)
        return fork.generate(max_new_tokens=max_new_tokens, do_sample=False)
    question_id = session.add("user", prompt)
    reply = session.generate(max_new_tokens=max_new_tokens, do_sample=False)
    reply_id = session.messages[-1].id
    session.drop(reply_id, reposition=True)
    session.drop(question_id, reposition=True)
    return reply


def ask_both(dense, compact, question: Question, cfg: DemoConfig) -> QuestionRecord:
    """Asks ``question`` to both runs (taken back from each) and scores the replies."""
    dense_reply = ask_and_take_back(dense, question.prompt, cfg.question_tokens)
    compact_reply = ask_and_take_back(compact, question.prompt, cfg.question_tokens)
    d, c = score(dense_reply, question.rule), score(compact_reply, question.rule)
    return QuestionRecord(
        step=question.step, kind=question.kind, question=question.prompt, answers=list(question.rule.answers),
        dense_reply=dense_reply, dense_correct=d.correct, dense_reason=d.reason,
        compact_reply=compact_reply, compact_correct=c.correct, compact_reason=c.reason,
    )


def run_demo(model, tokenizer, cfg: DemoConfig, on_step=None, questions=QUESTIONS) -> DemoResult:
    """Runs both sessions step by step; ``on_step(record)`` is called after each step.

    ``questions`` (default :data:`kvcompact.demo.script.QUESTIONS`) are asked after their step;
    those after the last step run are not asked.
    """
    from transformers import DynamicCache

    from kvcompact import KVCompactCache
    from kvcompact.agent import Session

    steps = build_steps()[: cfg.steps]
    result = DemoResult(config=cfg, device=str(model.device), model=_model_name(model))
    dense = Session(model, tokenizer, cache=DynamicCache())
    compact = Session(
        model, tokenizer,
        cache=KVCompactCache(model.config, kv_dtype=cfg.kv_dtype, group_size=cfg.group_size),
    )
    for s in (dense, compact):
        s.add("system", SYSTEM_PROMPT)
        s.add("user", TASK)

    replaced = dropped = 0
    try:
        for i, step in enumerate(steps, 1):
            t0 = time.perf_counter()
            observation = f"$ {step.tool}\n{step.output}"
            # A fixed id per observation: a truncation note names it, so both runs and every rerun
            # render the same text (a random id would change the note's token count run to run).
            dense.add("tool", observation, id=f"obs{i}")
            dense_answer = dense.generate(max_new_tokens=cfg.max_new_tokens, do_sample=False)
            t1 = time.perf_counter()

            compact.add("tool", observation, id=f"obs{i}")
            fed_before, held_before = compact.fed_tokens, len(compact.token_ids)
            compact_answer = compact.generate(max_new_tokens=cfg.max_new_tokens, do_sample=False)
            # Everything fed beyond what the context grew by was fed twice (a re-prefill).
            result.tokens_reprefilled += (compact.fed_tokens - fed_before) - (len(compact.token_ids) - held_before)
            r, d, avoided, reprefilled, repaired = apply_compaction(compact, cfg, tokenizer)
            result.tokens_reprefilled += reprefilled
            result.tokens_repaired += repaired
            replaced += r
            dropped += d
            t2 = time.perf_counter()
            result.dense_seconds += t1 - t0
            result.compact_seconds += t2 - t1

            compact_bytes, compact_dense = compact_kv_bytes(compact.cache)
            record = StepRecord(
                step=i, tool=step.tool,
                dense_context=dense.cache.get_seq_length(),
                dense_kv_bytes=dynamic_cache_bytes(dense.cache),
                compact_context=compact.cache.get_seq_length(),
                compact_kv_bytes=compact_bytes,
                compact_dense_equiv_bytes=compact_dense,
                prefill_avoided=avoided,
                dense_answer=dense_answer, compact_answer=compact_answer,
                seconds=t2 - t0,
            )
            result.steps.append(record)
            for question in (q for q in questions if q.step == i):
                result.questions.append(ask_both(dense, compact, question, cfg))
            result.question_seconds += time.perf_counter() - t2
            if on_step is not None:
                on_step(record)
    finally:
        compact.close()  # frees its buffers; the DynamicCache goes with its session
    result.edits = {"replaced": replaced, "dropped": dropped}
    return result
