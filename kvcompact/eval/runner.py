"""``run_eval``: replay every trace under every configuration and score the answers.

For each trace, the reference configuration (``"dense"`` by default) is played first; every other
configuration is then played on the same events, and at each question the KL divergence of its
first-token distribution from the reference's is recorded (how much the context it holds changed
what the model would say, even where the greedy answer is the same). When ``"reprefill"`` (the
edited conversation prefilled afresh) is in the run, it plays second and each question also gets
``kl_exact``, the KL from that exact edited context: the error an in-place edit leaves in the
tail's KV, which bounded repair and ``recompute-tail`` are there to remove.

Example (needs a model, so not a doctest)::

    from kvcompact.models import load_default
    from kvcompact.eval import run_eval, load_traces, get_configs
    model, tok = load_default()
    report = run_eval(model, tok, get_configs(["dense", "reprefill", "inplace-gap"]), load_traces(quick=True))
    print(report.table()); open("eval.json", "w").write(report.to_json())
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from kvcompact.eval.configs import EvalConfig, get_configs
from kvcompact.eval.replay import REPLAYERS, truncation_texts
from kvcompact.eval.report import ConfigResult, EvalReport, QuestionResult
from kvcompact.eval.scoring import score
from kvcompact.eval.traces import Trace, load_traces

__all__ = ["run_eval", "kl_divergence", "EXACT"]

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


def _play(model, tokenizer, config: EvalConfig, trace: Trace, truncations: dict, result: ConfigResult,
          ref_logprobs: dict | None, exact_logprobs: dict | None, max_new_tokens: int) -> dict:
    """Play ``trace`` under ``config`` into ``result``; returns ``question id -> first-token logprobs``."""
    t0 = time.perf_counter()
    replayer = REPLAYERS[config.mode](model, tokenizer, config, trace, truncations, max_new_tokens=max_new_tokens)
    logprobs = {}
    try:
        for event in trace.events:
            if event.type != "question":
                replayer.event(event)
                continue
            q = event.question
            answer = replayer.ask(q)
            s = score(answer.reply, q.rule)
            kl = kl_exact = None
            if ref_logprobs is not None:
                kl = kl_divergence(ref_logprobs[q.id], answer.logprobs)
            if exact_logprobs is not None:
                kl_exact = kl_divergence(exact_logprobs[q.id], answer.logprobs)
            logprobs[q.id] = answer.logprobs
            result.questions.append(QuestionResult(trace=trace.id, question=q.id, kind=q.kind, reply=answer.reply,
                                                   correct=s.correct, reason=s.reason, kl=kl, kl_exact=kl_exact,
                                                   context_tokens=answer.context_tokens))
    finally:
        replayer.close()
    result.peak_kv_bytes = max(result.peak_kv_bytes, replayer.peak_kv_bytes)
    result.tokens_prefilled += replayer.tokens_prefilled
    result.tokens_fed += replayer.tokens_fed
    result.seconds += time.perf_counter() - t0
    return logprobs


def run_eval(model, tokenizer, configs: Sequence = None, traces: Sequence[Trace] | None = None, *,
             reference: str | None = "dense", max_new_tokens: int = 24,
             on_progress: Callable[[str], None] | None = None) -> EvalReport:
    """Replay ``traces`` under each of ``configs``; score every answer.

    Parameters
    ----------
    model, tokenizer
        A causal LM with a chat template (the embedded SmolLM2 by default elsewhere).
    configs : sequence of EvalConfig or str, optional
        Configurations (or names from :data:`kvcompact.eval.configs.DEFAULT_CONFIGS`); default all.
    traces : sequence of Trace, optional
        Default: every shipped trace (:func:`kvcompact.eval.traces.load_traces`).
    reference : str or None
        Name of the configuration the KL is measured against. If it is not in ``configs`` it is
        taken from the defaults and run first (its row is reported too). None: no KL.
    max_new_tokens : int
        Greedy tokens per answer.
    on_progress : callable, optional
        Called with a one-line message after each (trace, configuration).

    Returns
    -------
    EvalReport
    """
    configs = _check_configs(get_configs() if configs is None else configs)
    if reference is not None and reference not in [c.name for c in configs]:
        configs = get_configs([reference]) + configs
    # The reference plays first on every trace, then the exact edited context (if in the run).
    configs = sorted(configs, key=lambda c: (c.name != reference, c.name != EXACT))
    exact = EXACT if EXACT in [c.name for c in configs] else None
    traces = list(load_traces() if traces is None else traces)
    if not traces or not all(isinstance(t, Trace) for t in traces):
        raise TypeError("run_eval: traces must be a non-empty sequence of Trace objects (see load_traces)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"run_eval: max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    results = {c.name: ConfigResult(c.name, c.to_dict()) for c in configs}
    for trace in traces:
        truncations = truncation_texts(trace, tokenizer)
        ref_logprobs = exact_logprobs = None
        for config in configs:
            before = len(results[config.name].questions)
            logprobs = _play(model, tokenizer, config, trace, truncations, results[config.name],
                             ref_logprobs if config.name != reference else None,
                             exact_logprobs if config.name != exact else None, max_new_tokens)
            if config.name == reference:
                ref_logprobs = logprobs
                for q in results[config.name].questions[before:]:
                    q.kl = 0.0
            if config.name == exact:
                exact_logprobs = logprobs
                for q in results[config.name].questions[before:]:
                    q.kl_exact = 0.0
            if on_progress is not None:
                new = results[config.name].questions[before:]
                on_progress(f"{trace.id} {config.name}: {sum(q.correct for q in new)}/{len(new)}")
    return EvalReport(model=_model_name(model), traces=[t.id for t in traces],
                      configs=[results[c.name] for c in configs], reference=reference,
                      settings={"max_new_tokens": max_new_tokens})
