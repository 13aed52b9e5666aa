"""Replayers: play one trace under one configuration, answer its questions, count the cost.

Every replayer gets the same events in the same order and returns, per question, the reply, the
log-probabilities of the reply's first token (for the KL against the reference) and the cache
size at that moment. Message ids are the trace's labels, so every configuration renders the same
text (the truncation note names the label, not a random id).

Asking without leaking
----------------------
A question must not stay in the context (its answer would leak into the next question). The
in-place replayers ask on the live session -- add the question, ``next_token_logits``,
``generate`` -- and then take question and reply back with ``Session.drop(reposition=True)``.
Both are the newest rows, so the drop removes exactly the rows the question added and the
logical length returns to what it was: the cache then holds the same rows at the same positions
as before the question (tests/test_eval_runner.py checks tokens, positions and the next logits).
``Session`` has no ask-and-roll-back of its own; a ``Session.rollback(mark)`` (crop to a mark
taken before the question) would say this in one call.

Costs
-----
``tokens_prefilled`` counts tokens fed to the model for the context (events, edits, the
re-prefill of a fresh session); ``tokens_fed`` adds the tokens fed for questions and replies.
``peak_kv_bytes`` is the largest ``cache.stats().device_bytes`` seen after any event or reply
(buffer capacity, so it moves in the cache's growth steps).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from kvcompact.agent.compaction import NOTE, TokenCounter
from kvcompact.agent.messages import Message
from kvcompact.eval.configs import EvalConfig
from kvcompact.eval.traces import Event, Question, Trace
from kvcompact.policies.attach import attach

__all__ = ["Answer", "Replayer", "DenseReplayer", "InPlaceReplayer", "ReprefillReplayer", "BudgetReplayer", "REPLAYERS",
           "structured_texts", "truncated_text", "truncation_texts"]


def truncated_text(text: str, head_tokens: int, tail_tokens: int, counter: TokenCounter, label: str) -> str:
    """``text`` cut to its first ``head_tokens`` and last ``tail_tokens`` tokens around the compaction note.

    The note is :data:`kvcompact.agent.compaction.NOTE` with the message's label as its reference.
    Returns ``text`` unchanged when the cut would keep everything.
    """
    head, tail, total = counter.cut(text, head_tokens, tail_tokens)
    if head_tokens + tail_tokens >= total:
        return text
    removed = total - counter.count(head) - counter.count(tail)
    return head + NOTE.format(removed=removed, total=total, ref=label) + tail


def structured_texts(trace: Trace, tokenizer) -> dict:
    """``label -> structured output`` for every tool output the trace later truncates.

    :func:`kvcompact.agent.structured.structure_output` with the tool event's ``fields`` / ``grep``
    and the truncation's budget (``head_tokens + tail_tokens``, the model's tokenizer); the handle
    in its note is the label, as the truncation note's reference is (so nothing is stored).
    """
    from kvcompact.agent.structured import structure_output

    counter = TokenCounter(tokenizer)
    tools = {e.label: e for e in trace.events if e.type == "tool"}
    out = {}
    for e in trace.events:
        if e.type == "truncate":
            tool = tools[e.label]
            out[e.label] = structure_output(tool.content, fields=list(tool.fields) if tool.fields else None,
                                            grep=tool.grep, budget_tokens=max(e.head_tokens + e.tail_tokens, 1),
                                            counter=counter, handle=e.label).text
    return out


def truncation_texts(trace: Trace, tokenizer) -> dict:
    """``label -> truncated text`` for every ``truncate`` event of ``trace`` (the model's tokenizer)."""
    counter = TokenCounter(tokenizer)
    outputs = {e.label: e.content for e in trace.events if e.type == "tool"}
    return {e.label: truncated_text(outputs[e.label], e.head_tokens, e.tail_tokens, counter, e.label)
            for e in trace.events if e.type == "truncate"}


@dataclass
class Answer:
    """One question's outcome before scoring."""

    reply: str
    logprobs: torch.Tensor  # [vocab] float32, log-softmax of the reply's first token
    context_tokens: int     # cache rows held when the question was asked (question excluded)


class Replayer(abc.ABC):
    """Base class: holds the counters; subclasses implement :meth:`event` and :meth:`ask`."""

    def __init__(self, model, tokenizer, config: EvalConfig, trace: Trace, truncations: dict, *,
                 max_new_tokens: int = 24):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.trace = trace
        self.truncations = truncations
        self.max_new_tokens = max_new_tokens
        self.tokens_prefilled = 0
        self.tokens_fed = 0
        self.peak_kv_bytes = 0

    def _cache(self):
        from kvcompact.cache import KVCompactCache

        return KVCompactCache(self.model.config, kv_dtype=self.config.kv_dtype, group_size=self.config.group_size)

    def _note_bytes(self, cache) -> None:
        self.peak_kv_bytes = max(self.peak_kv_bytes, cache.stats().device_bytes)

    @abc.abstractmethod
    def event(self, event: Event) -> None:
        """Apply one trace event (a message, or an agent's truncate / drop)."""

    @abc.abstractmethod
    def ask(self, question: Question) -> Answer:
        """Answer ``question`` on the context so far and leave the context as it was."""

    def close(self) -> None:
        pass


def _messages_of(event: Event, shaped: dict | None = None) -> list:
    """The messages a user/assistant/tool event adds (a tool event: the call, then the output, or
    ``shaped[label]`` in its place)."""
    if event.type == "tool":
        return [Message("assistant", event.call, id=f"{event.label}:call"),
                Message("tool", (shaped or {}).get(event.label, event.content), id=event.label)]
    return [Message(event.type, event.content)]


def _ask_live(replayer: Replayer, session, question: Question) -> Answer:
    """Ask on a live session, then take question and reply back (see the module docstring)."""
    held = len(session.token_ids)
    fed = session.fed_tokens
    qid = session.add("user", question.prompt)
    logits = session.next_token_logits()
    reply = session.generate(max_new_tokens=replayer.max_new_tokens)
    reply_id = session.messages[-1].id
    replayer._note_bytes(session.cache)
    replayer.tokens_fed += session.fed_tokens - fed
    session.drop(reply_id, reposition=True)
    session.drop(qid, reposition=True)
    return Answer(reply, torch.log_softmax(logits.float(), dim=-1), held)


class _LiveSessionReplayer(Replayer):
    """One session for the whole trace, fed event by event (dense and in-place modes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from kvcompact.agent import Session

        self._shaped = structured_texts(self.trace, self.tokenizer) if self.config.structured else {}
        self.session = Session(self.model, self.tokenizer, cache=self._cache())
        self.session.add("system", self.trace.system, id="system")
        self._prefill()

    def _prefill(self) -> None:
        before = self.session.fed_tokens
        self.session.prefill()
        self._count(before)

    def _count(self, before: int) -> None:
        n = self.session.fed_tokens - before
        self.tokens_prefilled += n
        self.tokens_fed += n
        self._note_bytes(self.session.cache)

    def event(self, event: Event) -> None:
        if event.type in ("user", "assistant", "tool"):
            for m in _messages_of(event, self._shaped):
                self.session.add_message(m)
            self._prefill()
        elif event.type in ("truncate", "drop"):
            before = self.session.fed_tokens
            self.edit(event)
            self._count(before)

    @abc.abstractmethod
    def edit(self, event: Event) -> None:
        """Apply a ``truncate`` / ``drop`` event to the live session."""

    def ask(self, question: Question) -> Answer:
        return _ask_live(self, self.session, question)

    def close(self) -> None:
        self.session.close()


class DenseReplayer(_LiveSessionReplayer):
    """The reference context: every message stays whole (edits are ignored)."""

    def edit(self, event: Event) -> None:
        pass


class InPlaceReplayer(_LiveSessionReplayer):
    """Edits as in-place cache edits: ``Session.drop`` / ``Session.replace`` with the config's options."""

    def edit(self, event: Event) -> None:
        c = self.config
        if event.type == "truncate" and event.label in self._shaped:
            return  # shaped when it arrived: nothing left to cut
        if c.recompute_tail:
            # Session.drop/replace(recompute_tail=True) crop the cache from the edit on, and the cache
            # refuses a crop reaching past rows dropped later (a question taken back, an earlier
            # edit after this one). sync(exact=True) re-feeds the same tail from the first change
            # and removes rows it cannot crop as a span: the same context, through the public API.
            self.session.sync(_edited(self.session.messages, event, self.truncations), exact=True)
        elif event.type == "drop":
            self.session.drop(event.label, reposition=c.reposition, repair=c.repair)
        else:
            self.session.replace(event.label, self.truncations[event.label], repair=c.repair)


def _edited(messages: list, event: Event, truncations: dict) -> list:
    """``messages`` with a ``drop`` / ``truncate`` event applied (ids kept)."""
    if event.type == "drop":
        return [m for m in messages if m.id != event.label]
    text = truncations[event.label]
    return [dataclasses.replace(m, content=text) if m.id == event.label else m for m in messages]


class ReprefillReplayer(Replayer):
    """Message compaction with a full re-prefill: a fresh session over the compacted list per question."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages = [Message("system", self.trace.system, id="system")]

    def event(self, event: Event) -> None:
        if event.type in ("user", "assistant", "tool"):
            self.messages.extend(_messages_of(event))
        elif event.type in ("truncate", "drop"):
            self.messages = _edited(self.messages, event, self.truncations)

    def ask(self, question: Question) -> Answer:
        from kvcompact.agent import Session

        session = Session(self.model, self.tokenizer, cache=self._cache())
        try:
            for m in self.messages:
                session.add_message(m)
            session.prefill()
            self.tokens_prefilled += session.fed_tokens
            self.tokens_fed += session.fed_tokens
            self._note_bytes(session.cache)
            return _ask_live(self, session, question)
        finally:
            session.close()


class BudgetReplayer(Replayer):
    """Every message whole, in a cache with a token budget: the eviction policy decides what stays.

    A ``Session`` refuses a budgeted cache (eviction is per head, so messages stop being spans),
    so this replayer feeds the rendered conversation to the model itself, inside
    ``kvcompact.attach`` (query-aware policies score with the queries it captures). The budget is
    ``ceil(budget_fraction * L)`` for ``L`` the trace's longest context (every message whole, as
    the dense replay holds it). A question is asked on a copy of the cache, so eviction it causes
    never reaches the trace's own cache. Edits are ignored: the budget is the memory control.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from kvcompact.agent.template import TemplateRenderer

        self.renderer = TemplateRenderer(self.tokenizer)
        self.messages = [Message("system", self.trace.system, id="system")]
        every = self.messages + [m for e in self.trace.events if e.type in ("user", "assistant", "tool")
                                 for m in _messages_of(e)]
        self.budget = max(1, math.ceil(self.config.budget_fraction * len(self.renderer.render_ids(every))))
        self.cache = self._budget_cache()
        self.fed_ids: list = []

    def _budget_cache(self):
        from kvcompact.cache import KVCompactCache

        return KVCompactCache(self.model.config, kv_dtype=self.config.kv_dtype, group_size=self.config.group_size,
                              budget=self.budget, policy=self.config.policy)

    @torch.no_grad()
    def _feed(self, cache, ids: list, chunk: int = 256) -> torch.Tensor:
        """Feed ``ids`` after what ``cache`` holds (inside ``attach``); logits of the last token ``[vocab]``."""
        from kvcompact.cache import compat

        device = next(self.model.parameters()).device
        logits = None
        for i in range(0, len(ids), chunk):
            x = torch.tensor([ids[i:i + chunk]], dtype=torch.long, device=device)
            logits = self.model(input_ids=x, use_cache=True, logits_to_keep=1,
                                **compat.cache_kwargs(cache)).logits[0, -1]
        return logits

    def event(self, event: Event) -> None:
        if event.type not in ("user", "assistant", "tool"):
            return
        self.messages.extend(_messages_of(event))
        ids = self.renderer.render_ids(self.messages)
        if ids[:len(self.fed_ids)] != self.fed_ids:
            raise RuntimeError("BudgetReplayer: the chat template does not render the conversation "
                               "incrementally (an earlier message's tokens changed)")
        new = ids[len(self.fed_ids):]
        with attach(self.model, self.cache):
            self._feed(self.cache, new)
        self.fed_ids = ids
        self.tokens_prefilled += len(new)
        self.tokens_fed += len(new)
        self._note_bytes(self.cache)

    def ask(self, question: Question) -> Answer:
        from kvcompact.agent.sampling import eos_ids

        asked = self.renderer.render_ids(self.messages + [Message("user", question.prompt)],
                                         add_generation_prompt=True)
        cache = copy.deepcopy(self.cache)  # the question and its reply must not evict from the trace's cache
        held = min(self.cache.get_seq_length(), self.budget)
        stop = eos_ids(self.model, self.tokenizer)
        out: list = []
        with attach(self.model, cache):
            logits = first = self._feed(cache, asked[len(self.fed_ids):])
            for _ in range(self.max_new_tokens):
                token = int(logits.argmax())
                if token in stop:
                    break
                out.append(token)
                logits = self._feed(cache, [token])
        self.tokens_fed += len(asked) - len(self.fed_ids) + len(out)
        self._note_bytes(cache)
        del cache
        reply = self.tokenizer.decode(out, skip_special_tokens=True)
        return Answer(reply, torch.log_softmax(first.float(), dim=-1), held)


#: mode -> replayer class (a new mode registers its replayer here).
REPLAYERS = {"dense": DenseReplayer, "inplace": InPlaceReplayer, "reprefill": ReprefillReplayer,
             "budget": BudgetReplayer}
