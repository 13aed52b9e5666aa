"""``run_eval``: replay every trace under every configuration and score the answers.

Each (trace, configuration) pair is one independent *play*: a fresh cache, the trace's events in
order, every question answered and taken back. The reference configuration (``"dense"`` by
default) gives each question's first-token distribution, and every other configuration records
the KL divergence of its own from it (how much the context it holds changed what the model would
say, even where the greedy answer is the same). When ``"reprefill"`` (the edited conversation
prefilled afresh) is in the run, each question also gets ``kl_exact``, the KL from that exact
edited context: the error an in-place edit leaves in the tail's KV, which bounded repair and
``recompute-tail`` are there to remove. The KL is computed once every play is done, so plays can
run in any order, in worker processes (``jobs=``).

Why processes: decoding a small model on a CPU is bound by memory latency and per-op overhead,
so torch's intra-op threads help little (one play: 128 s on 2 threads, against 72 s for two
plays run side by side on 1 thread each, on the 2-core machine of docs/eval.md). Plays share
nothing, so ``jobs`` worker processes with one thread each use the cores fully. Each worker loads
its own model copy (``load_model``), so memory grows with ``jobs``.

Example (needs a model, so not a doctest)::

    from kvcompact.models import load_default
    from kvcompact.eval import run_eval, load_traces, get_configs
    model, tok = load_default()
    report = run_eval(model, tok, get_configs(["dense", "reprefill", "inplace-gap"]), load_traces(quick=True))
    print(report.table()); open("eval.json", "w").write(report.to_json())

    # the same on two worker processes (each loads the model itself; spawned workers import the
    # main module, so a script needs the __main__ guard)
    if __name__ == "__main__":
        report = run_eval(None, None, get_configs(["dense", "reprefill", "inplace-gap"]), load_traces(quick=True),
                          jobs=2, load_model=load_default)
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import multiprocessing
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kvcompact.eval.configs import EvalConfig, get_configs
from kvcompact.eval.replay import REPLAYERS, truncation_texts
from kvcompact.eval.report import ConfigResult, EvalReport, QuestionResult
from kvcompact.eval.scoring import score
from kvcompact.eval.traces import Trace, load_traces

__all__ = ["run_eval", "play", "Play", "kl_divergence", "EXACT"]

#: The configuration holding exactly the edited conversation (a fresh prefill of it); when it is in
#: a run, every question also records ``kl_exact``, the KL from its first-token distribution: how
#: far an in-place edit's stale tail, or a repair, is from the context it stands for.
EXACT = "reprefill"


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """``KL(P_ref || P)`` in nats from two ``[vocab]`` log-probability vectors (clamped at 0 for rounding)."""
    ref = ref_logprobs.double()
    return max(float((ref.exp() * (ref - logprobs.double())).sum()), 0.0)


def _model_name(model) -> str:
    path = str(getattr(model.config, "name_or_path", "") or "")
    return path or type(model).__name__


def _check_configs(configs) -> list:
    if isinstance(configs, (str, EvalConfig)):
        configs = [configs]
    out = [get_configs([c])[0] if isinstance(c, str) else c for c in configs]
    if not out:
        raise ValueError("run_eval: configs must name at least one configuration")
    bad = [c for c in out if not isinstance(c, EvalConfig)]
    if bad:
        raise TypeError(f"run_eval: configs must be EvalConfig objects or names; got {bad[0]!r}")
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"run_eval: configuration names must be unique; repeated: {', '.join(dup)}")
    return out


@dataclass
class Play:
    """One trace replayed under one configuration: the scored questions (KL not yet filled in),
    each question's first-token log-probabilities, and the costs."""

    trace: str
    config: str
    questions: list = field(default_factory=list)
    logprobs: dict = field(default_factory=dict)  # question id -> [vocab] float32
    peak_kv_bytes: int = 0
    tokens_prefilled: int = 0
    tokens_fed: int = 0
    seconds: float = 0.0
    model: str = ""


def play(model, tokenizer, config: EvalConfig, trace: Trace, *, max_new_tokens: int = 24) -> Play:
    """Replay ``trace`` under ``config`` on ``model`` and score every question (no KL: see :func:`run_eval`)."""
    t0 = time.perf_counter()
    out = Play(trace.id, config.name, model=_model_name(model))
    replayer = REPLAYERS[config.mode](model, tokenizer, config, trace, truncation_texts(trace, tokenizer),
                                      max_new_tokens=max_new_tokens)
    try:
        for event in trace.events:
            if event.type != "question":
                replayer.event(event)
                continue
            q = event.question
            answer = replayer.ask(q)
            s = score(answer.reply, q.rule)
            out.logprobs[q.id] = answer.logprobs
            out.questions.append(QuestionResult(trace=trace.id, question=q.id, kind=q.kind, reply=answer.reply,
                                                correct=s.correct, reason=s.reason,
                                                context_tokens=answer.context_tokens))
    finally:
        replayer.close()
    out.peak_kv_bytes = replayer.peak_kv_bytes
    out.tokens_prefilled = replayer.tokens_prefilled
    out.tokens_fed = replayer.tokens_fed
    out.seconds = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- worker processes

_worker: dict = {}


def _worker_init(load_model, threads: int) -> None:
    torch.set_num_threads(threads)
    _worker["model"], _worker["tokenizer"] = load_model()


def _worker_play(config: EvalConfig, trace: Trace, max_new_tokens: int) -> Play:
    with torch.no_grad():
        p = play(_worker["model"], _worker["tokenizer"], config, trace, max_new_tokens=max_new_tokens)
    # numpy arrays pickle by value; a torch tensor would travel through a shared-memory file in
    # /dev/shm, which a container may keep small (the default set's log-probabilities are ~80 MB).
    p.logprobs = {k: v.numpy() for k, v in p.logprobs.items()}
    return p


def _cost(trace: Trace, config: EvalConfig) -> float:
    """A rough cost of a play, to start the longest first (the tail of a parallel run is then short)."""
    size = sum(len(e.content) for e in trace.events if e.type in ("user", "assistant", "tool"))
    questions = len(trace.questions)
    return size * (1 + questions * (1.0 if config.mode == "reprefill" else 0.1)) + 2000 * questions


def _play_all(tasks: list, model, tokenizer, max_new_tokens: int, jobs: int, load_model, threads,
              on_done: Callable[[Play], None]) -> dict:
    """Every ``(config, trace)`` of ``tasks`` played; returns ``(trace id, config name) -> Play``."""
    plays = {}
    if jobs == 1:
        for config, trace in tasks:
            p = play(model, tokenizer, config, trace, max_new_tokens=max_new_tokens)
            plays[trace.id, config.name] = p
            on_done(p)
        return plays
    order = sorted(tasks, key=lambda t: -_cost(t[1], t[0]))
    # spawn, not fork: a forked child of a process that has run torch's thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    pool = futures.ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                                       initializer=_worker_init, initargs=(load_model, threads))
    try:
        with _this_kvcompact_first():  # the workers start during these submits
            pending = [pool.submit(_worker_play, config, trace, max_new_tokens) for config, trace in order]
        for fut in futures.as_completed(pending):
            p = fut.result()
            p.logprobs = {k: torch.from_numpy(v) for k, v in p.logprobs.items()}
            plays[p.trace, p.config] = p
            on_done(p)
    except futures.process.BrokenProcessPool as err:
        _stop(pool)
        raise RuntimeError("run_eval: a worker process failed to start or died: load_model raised in it (its "
                           "traceback is above), or it ran out of memory (try fewer jobs=); "
                           f"{len(plays)} of {len(tasks)} plays had finished") from err
    except BaseException:
        # A play that raised, or Ctrl-C: stop now. Plays already handed to a worker cannot be
        # cancelled, and shutdown(wait=True) would wait for them, so the workers are terminated.
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return plays


@contextlib.contextmanager
def _this_kvcompact_first():
    """Put the folder holding the kvcompact this process runs first on ``sys.path`` while workers start.

    A spawned worker gets this process's ``sys.path`` and imports kvcompact afresh from it. When a
    source checkout sits on that path ahead of the installed package (a script that inserted its
    repository folder, the repository root as working directory), the worker would import the
    uncompiled source tree while this process runs the installed, compiled one.
    """
    import kvcompact

    home = str(Path(kvcompact.__file__).resolve().parent.parent)
    saved = list(sys.path)
    sys.path.insert(0, home)
    try:
        yield
    finally:
        sys.path[:] = saved


def _stop(pool: futures.ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=10)


def run_eval(model, tokenizer, configs: Sequence = None, traces: Sequence[Trace] | None = None, *,
             reference: str | None = "dense", max_new_tokens: int = 24,
             on_progress: Callable[[str], None] | None = None, jobs: int = 1,
             load_model: Callable | None = None, threads: int = 1) -> EvalReport:
    """Replay ``traces`` under each of ``configs``; score every answer.

    Parameters
    ----------
    model, tokenizer
        A causal LM with a chat template (the embedded SmolLM2 by default elsewhere). Unused (may
        be None) when ``jobs > 1``: each worker loads its own with ``load_model``.
    configs : sequence of EvalConfig or str, optional
        Configurations (or names from :data:`kvcompact.eval.configs.DEFAULT_CONFIGS`); default
        the default set.
    traces : sequence of Trace, optional
        Default: every shipped trace (:func:`kvcompact.eval.traces.load_traces`).
    reference : str or None
        Name of the configuration the KL is measured against. If it is not in ``configs`` it is
        taken from the known configurations and played too (its row is reported first). None: no KL.
    max_new_tokens : int
        Greedy tokens per answer.
    on_progress : callable, optional
        Called with a one-line message after each (trace, configuration) play.
    jobs : int
        Plays run at once, each in its own worker process (1: in this process, on ``model``).
        Results do not depend on it: a play is deterministic and the KL is computed after all.
    load_model : callable, optional
        Needed when ``jobs > 1``: picklable (a module-level function or a ``functools.partial``
        of one), called once in each worker, returns ``(model, tokenizer)``.
    threads : int
        torch intra-op threads in each worker process (``jobs > 1`` only).

    Returns
    -------
    EvalReport
    """
    configs = _check_configs(get_configs() if configs is None else configs)
    if reference is not None and reference not in [c.name for c in configs]:
        configs = get_configs([reference]) + configs
    # The reference's row first, then the exact edited context's (if in the run).
    configs = sorted(configs, key=lambda c: (c.name != reference, c.name != EXACT))
    exact = EXACT if EXACT in [c.name for c in configs] else None
    traces = list(load_traces() if traces is None else traces)
    if not traces or not all(isinstance(t, Trace) for t in traces):
        raise TypeError("run_eval: traces must be a non-empty sequence of Trace objects (see load_traces)")
    if len({t.id for t in traces}) != len(traces):
        raise ValueError("run_eval: trace ids must be unique")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"run_eval: max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"run_eval: jobs must be an int >= 1; got {jobs!r}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"run_eval: threads must be an int >= 1; got {threads!r}")
    if jobs > 1 and not callable(load_model):
        raise ValueError("run_eval: jobs > 1 needs load_model=, a picklable callable returning (model, tokenizer) "
                         "that each worker process calls once")
    if jobs == 1 and (model is None or tokenizer is None):
        raise ValueError("run_eval: model and tokenizer are required when jobs == 1")

    t0 = time.perf_counter()

    def done(p: Play) -> None:
        if on_progress is not None:
            on_progress(f"{p.trace} {p.config}: {sum(q.correct for q in p.questions)}/{len(p.questions)}")

    tasks = [(c, t) for t in traces for c in configs]
    plays = _play_all(tasks, model, tokenizer, max_new_tokens, jobs, load_model, threads, done)

    results = {c.name: ConfigResult(c.name, c.to_dict()) for c in configs}
    for trace in traces:
        ref = plays[trace.id, reference].logprobs if reference is not None else None
        exact_lp = plays[trace.id, exact].logprobs if exact is not None else None
        for config in configs:
            p = plays[trace.id, config.name]
            r = results[config.name]
            for q in p.questions:
                if ref is not None:
                    q.kl = 0.0 if config.name == reference else kl_divergence(ref[q.question], p.logprobs[q.question])
                if exact_lp is not None:
                    q.kl_exact = (0.0 if config.name == exact
                                  else kl_divergence(exact_lp[q.question], p.logprobs[q.question]))
                r.questions.append(q)
            r.peak_kv_bytes = max(r.peak_kv_bytes, p.peak_kv_bytes)
            r.tokens_prefilled += p.tokens_prefilled
            r.tokens_fed += p.tokens_fed
            r.seconds += p.seconds
    name = next(iter(plays.values())).model  # the model the plays ran on (the workers' own when jobs > 1)
    return EvalReport(model=name, traces=[t.id for t in traces], configs=[results[c.name] for c in configs],
                      reference=reference,
                      settings={"max_new_tokens": max_new_tokens, "jobs": jobs,
                                "wall_seconds": round(time.perf_counter() - t0, 1)})
