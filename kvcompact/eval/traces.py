"""Scripted agent traces with known answers: the format and its loader.

A trace is one JSON file: a system prompt, then events in order. Every configuration replays the
same events; only how it holds the context differs (``kvcompact.eval.configs``).

Format (docs/eval.md has a full example)::

    {"id": "deploy-incident", "quick": true, "description": "...",
     "system": "You are an SRE assistant ... End every answer with the ticket id OPS-4411.",
     "events": [
       {"type": "user", "content": "..."},
       {"type": "assistant", "content": "..."},
       {"type": "tool", "label": "svc", "call": "curl -s registry/v1/services",
        "output": "literal text" | {"generator": "json_api", "seed": 3, ...}},
       {"type": "truncate", "label": "svc", "head_tokens": 120, "tail_tokens": 60},
       {"type": "drop", "label": "svc"},
       {"type": "question", "id": "q1", "kind": "kept", "prompt": "...",
        "answers": ["9443"], "match": "contains", "forbidden": ["8443"],
        "checks": [{"name": "ends_with", "arg": "OPS-4411"}]}
     ]}

* ``tool``: the agent's call (an assistant message ``call``) and the tool's output (a tool
  message), both labelled so a later edit can name them; ``output`` is literal text or a
  generator spec (:mod:`kvcompact.eval.generators`). Optional ``fields`` (list of str) and
  ``grep`` (a regex) say what a structured tool would have been asked for.
* ``truncate``: the labelled tool output keeps its first ``head_tokens`` and last ``tail_tokens``
  tokens (the model's tokenizer) around the compaction note of :mod:`kvcompact.agent.compaction`
  -- what an agent framework's compaction does; ``drop``: it leaves the context.
* ``question``: asked as a user message at this point, answered, then taken back (it never
  becomes part of the trace). ``kind`` says what it probes (:data:`KINDS`); ``answers``,
  ``match``, ``forbidden`` and ``checks`` make its :class:`~kvcompact.eval.scoring.Rule`.

``load_trace`` checks everything it can without a tokenizer and raises :class:`TraceError` naming
the file, the event index and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from kvcompact.eval.generators import GeneratorError, generate
from kvcompact.eval.scoring import Check, Rule

__all__ = ["KINDS", "EVENT_TYPES", "Trace", "Event", "Question", "TraceError", "load_trace", "load_traces",
           "default_trace_paths"]

#: What a question probes: a fact in a kept message; a fact stated in (or superseding) a message
#: later truncated or dropped; a fact stated before a long stretch of noise; an early instruction.
KINDS = ("kept", "dropped", "noise", "instruction")
EVENT_TYPES = ("user", "assistant", "tool", "truncate", "drop", "question")


class TraceError(ValueError):
    """A trace file is malformed; the message names the file, the event and the field."""


@dataclass(frozen=True)
class Question:
    """A scored question. ``rule`` decides whether a reply is right (:func:`kvcompact.eval.scoring.score`)."""

    id: str
    prompt: str
    kind: str
    rule: Rule


@dataclass(frozen=True)
class Event:
    """One step of a trace.

    Attributes
    ----------
    type : str
        One of :data:`EVENT_TYPES`.
    content : str
        ``user`` / ``assistant``: the message; ``tool``: the output text (generated if the file
        gave a generator spec).
    label : str or None
        ``tool``: its label; ``truncate`` / ``drop``: the tool output it edits.
    call : str or None
        ``tool``: the assistant's call text.
    head_tokens, tail_tokens : int
        ``truncate`` only.
    question : Question or None
        ``question`` only.
    fields, grep : tuple of str / str, optional
        ``tool`` only: what the agent would ask a structured tool for (the ``structured``
        configuration shapes the output with :func:`kvcompact.agent.structured.structure_output`).
    """

    type: str
    content: str = ""
    label: str | None = None
    call: str | None = None
    head_tokens: int = 0
    tail_tokens: int = 0
    question: Question | None = None
    fields: tuple | None = None
    grep: str | None = None


@dataclass(frozen=True)
class Trace:
    id: str
    system: str
    events: tuple
    quick: bool = False
    description: str = ""
    source: str = ""

    @property
    def questions(self) -> list:
        return [e.question for e in self.events if e.type == "question"]


def _err(where: str, msg: str) -> TraceError:
    return TraceError(f"{where}: {msg}")


def _text(obj: Mapping, key: str, where: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise _err(where, f"{key!r} must be a non-empty string; got {value!r}")
    return value


def _strings(obj: Mapping, key: str, where: str) -> tuple:
    value = obj.get(key, [])
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(where, f"{key!r} must be a list of strings; got {value!r}")
    return tuple(value)


def _question(ev: Mapping, where: str) -> Question:
    qid = _text(ev, "id", where)
    kind = ev.get("kind")
    if kind not in KINDS:
        raise _err(where, f"'kind' must be one of {', '.join(KINDS)}; got {kind!r}")
    checks = ev.get("checks", [])
    if not isinstance(checks, list):
        raise _err(where, f"'checks' must be a list of {{'name', 'arg'}} objects; got {checks!r}")
    try:
        parsed = []
        for k, c in enumerate(checks):
            if not isinstance(c, Mapping) or "name" not in c:
                raise ValueError(f"checks[{k}] must be an object with 'name' (and 'arg' if it takes one)")
            parsed.append(Check(c["name"], None if c.get("arg") is None else str(c["arg"])))
        rule = Rule(answers=_strings(ev, "answers", where), match=ev.get("match", "contains"),
                    forbidden=_strings(ev, "forbidden", where), checks=tuple(parsed))
    except TraceError:
        raise
    except ValueError as err:
        raise _err(where, str(err)) from None
    return Question(qid, _text(ev, "prompt", where), kind, rule)


def _tokens(ev: Mapping, key: str, where: str) -> int:
    value = ev.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _err(where, f"{key!r} must be an int >= 0; got {value!r}")
    return value


def _event(ev, where: str, labels: dict, qids: set) -> Event:
    if not isinstance(ev, Mapping):
        raise _err(where, f"an event must be an object; got {type(ev).__name__}")
    kind = ev.get("type")
    if kind not in EVENT_TYPES:
        raise _err(where, f"'type' must be one of {', '.join(EVENT_TYPES)}; got {kind!r}")
    if kind in ("user", "assistant"):
        return Event(kind, content=_text(ev, "content", where))
    if kind == "tool":
        label = _text(ev, "label", where)
        if label in labels:
            raise _err(where, f"label {label!r} is already used by an earlier tool event")
        output = ev.get("output")
        if isinstance(output, Mapping):
            try:
                output = generate(output)
            except GeneratorError as err:
                raise _err(where, f"'output': {err}") from None
        elif not isinstance(output, str) or not output.strip():
            raise _err(where, f"'output' must be a non-empty string or a generator object; got {output!r}")
        labels[label] = "live"
        fields = _strings(ev, "fields", where) if "fields" in ev else None
        grep = _text(ev, "grep", where) if "grep" in ev else None
        return Event(kind, content=output, label=label, call=_text(ev, "call", where), fields=fields, grep=grep)
    if kind in ("truncate", "drop"):
        label = _text(ev, "label", where)
        state = labels.get(label)
        if state is None:
            raise _err(where, f"'label' {label!r} names no earlier tool event")
        if state == "dropped":
            raise _err(where, f"'label' {label!r} was already dropped")
        if kind == "drop":
            labels[label] = "dropped"
            return Event(kind, label=label)
        if state == "truncated":
            raise _err(where, f"'label' {label!r} was already truncated")
        labels[label] = "truncated"
        head, tail = _tokens(ev, "head_tokens", where), _tokens(ev, "tail_tokens", where)
        return Event(kind, label=label, head_tokens=head, tail_tokens=tail)
    q = _question(ev, where)
    if q.id in qids:
        raise _err(where, f"question id {q.id!r} is used twice")
    qids.add(q.id)
    return Event(kind, question=q)


def parse_trace(data, source: str = "<trace>") -> Trace:
    """A :class:`Trace` from decoded JSON ``data``; ``source`` names it in errors."""
    if not isinstance(data, Mapping):
        raise _err(source, f"a trace must be a JSON object; got {type(data).__name__}")
    trace_id = _text(data, "id", source)
    system = _text(data, "system", source)
    quick = data.get("quick", False)
    if not isinstance(quick, bool):
        raise _err(source, f"'quick' must be true or false; got {quick!r}")
    events = data.get("events")
    if not isinstance(events, list) or not events:
        raise _err(source, "'events' must be a non-empty list")
    labels: dict = {}
    qids: set = set()
    parsed = tuple(_event(ev, f"{source}: events[{k}]", labels, qids) for k, ev in enumerate(events))
    if not qids:
        raise _err(source, "a trace needs at least one question event")
    return Trace(trace_id, system, parsed, quick=quick, description=data.get("description", "") or "",
                 source=source)


def load_trace(path) -> Trace:
    """Read and check one trace file (raises :class:`TraceError` naming file, event and field)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except json.JSONDecodeError as err:
        raise TraceError(f"{path}: not valid JSON ({err})") from None
    return parse_trace(data, str(path))


def default_trace_paths() -> list:
    """The trace files shipped in ``kvcompact/eval/data``, sorted by name."""
    folder = resources.files("kvcompact.eval").joinpath("data")
    return sorted((Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def load_traces(paths: Iterable | None = None, *, quick: bool = False) -> list:
    """Traces from ``paths`` (default: the shipped set); ``quick=True`` keeps those marked ``"quick"``.

    Trace ids must be unique (a question is named ``trace_id/question_id`` in reports).
    """
    traces = [load_trace(p) for p in (default_trace_paths() if paths is None else paths)]
    seen: dict = {}
    for t in traces:
        if t.id in seen:
            raise TraceError(f"{t.source}: trace id {t.id!r} is also used by {seen[t.id]}")
        seen[t.id] = t.source
    if quick:
        traces = [t for t in traces if t.quick]
    if not traces:
        raise TraceError("no traces selected" + (" (none is marked \"quick\": true)" if quick else ""))
    return traces
