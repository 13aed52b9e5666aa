"""Task-level quality: scripted agent traces with known answers, replayed per configuration (docs/eval.md).

- :mod:`~kvcompact.eval.traces`: the trace format (:class:`Trace`) and its loader.
- :mod:`~kvcompact.eval.generators`: deterministic tool outputs with a planted fact.
- :mod:`~kvcompact.eval.scoring`: the documented scoring rule (:func:`score`, :class:`Rule`).
- :mod:`~kvcompact.eval.configs`: the configurations compared (:class:`EvalConfig`).
- :mod:`~kvcompact.eval.replay`: one replayer per configuration mode.
- :mod:`~kvcompact.eval.runner`: :func:`run_eval`; :mod:`~kvcompact.eval.report`: :class:`EvalReport`.
"""

from kvcompact.eval.configs import DEFAULT_CONFIGS, EvalConfig, get_configs
from kvcompact.eval.report import ConfigResult, EvalReport, QuestionResult
from kvcompact.eval.runner import kl_divergence, run_eval
from kvcompact.eval.scoring import Check, Rule, Score, normalise, score
from kvcompact.eval.traces import KINDS, Event, Question, Trace, TraceError, load_trace, load_traces

__all__ = ["DEFAULT_CONFIGS", "EvalConfig", "get_configs", "ConfigResult", "EvalReport", "QuestionResult",
           "kl_divergence", "run_eval", "Check", "Rule", "Score", "normalise", "score", "KINDS", "Event",
           "Question", "Trace", "TraceError", "load_trace", "load_traces"]
