"""``Session.sync(messages)``: reconcile a full message list with a live session, editing in place.

An agent framework that resends its whole (compacted) context on every call would otherwise pay a
re-prefill each time. ``sync`` aligns the incoming list with the session's messages and turns the
difference into the cheapest edits that make the session hold exactly the incoming list:

* unchanged messages are kept (their KV rows stay);
* live messages with no counterpart are dropped in place (``drop(reposition=True)``);
* an incoming message at the place of a live one with the same role (and the same ``name``,
  ``tool_call_id``, ``tool_calls``) but other content is replaced in place (``replace``);
* messages after the last live one are added and fed (``prefill``, inside ``sync``);
* where no in-place edit can do it -- a message inserted before kept ones, a reordering, a role
  change, a ``replace`` refused at a non-token boundary -- the cache is cut at the first such place
  and everything from there is fed again (the shortest exact tail).

Matching uses content, not ids (an OpenAI client sends none): the key of a message is
``(role, content, name, tool_call_id, tool_calls)``, aligned in order with
:class:`difflib.SequenceMatcher` (longest matching runs first). ``exact=True`` starts the re-fed tail
at the first edit instead, so the cache equals a fresh prefill of the new list (in-place drops and
replaces leave the KV of later tokens computed while the old text was visible). docs/sync.md has
the details and the measured reuse.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from kvcompact.agent import edits
from kvcompact.agent.entries import GAP, LIVE, SessionError
from kvcompact.agent.messages import ROLES, Message

__all__ = ["SyncResult", "sync", "align", "validate_messages", "message_key"]

KEPT, REPLACED, FED, REFED = "kept", "replaced", "fed", "refed"


@dataclass(frozen=True)
class SyncResult:
    """What :func:`sync` did. Equal for equal inputs (``ids`` is left out of the comparison).

    Attributes
    ----------
    kept, replaced, fed, refed : int
        Incoming messages per path (see ``paths``).
    dropped : int
        Messages of the session with no counterpart in the incoming list (removed).
    tokens_reused : int
        Cache rows from before the call that are still in the cache (not recomputed).
    tokens_fed : int
        Tokens this call fed to the model (replacement text, re-fed tail, new messages).
    paths : tuple of str
        Per incoming message: ``"kept"`` (its rows stayed), ``"replaced"`` (spliced in place),
        ``"fed"`` (new to the session, fed), ``"refed"`` (it was in the session, or replaced one
        that was, but sits in the re-fed tail).
    dropped_indices : tuple of int
        Indices, in the session's ``messages`` before the call, of the dropped messages.
    tail_from : int or None
        Index of the first incoming message of the re-fed tail; ``None`` when everything was done
        in place (new messages appended after the last kept one are not a tail).
    reason : str or None
        Why the tail was needed.
    ids : tuple of str
        The session's id of each incoming message (new messages get fresh random ids).
    """

    kept: int
    replaced: int
    fed: int
    refed: int
    dropped: int
    tokens_reused: int
    tokens_fed: int
    paths: tuple
    dropped_indices: tuple
    tail_from: int | None
    reason: str | None
    ids: tuple = field(compare=False, default=())


# ---------------------------------------------------------------------- input


def _optional_str(m: Mapping, j: int, key: str) -> None:
    value = m.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"sync: messages[{j}].{key} must be a str or None; got {type(value).__name__}")


def validate_messages(messages) -> list:
    """``(Message, explicit_id)`` per incoming message; ``ValueError`` naming the index and field."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"sync: messages must be a list of dicts or Messages; got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if isinstance(m, Message):
            out.append((m, m.id))
            continue
        if not isinstance(m, Mapping):
            raise TypeError(f"sync: messages[{j}] must be a dict or a Message; got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"sync: messages[{j}] has no 'role' (expected one of {', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise ValueError(f"sync: messages[{j}].role must be one of {', '.join(ROLES)}; got {m['role']!r}")
        if "content" not in m:
            raise ValueError(f"sync: messages[{j}] has no 'content' (a str; None only with tool_calls)")
        content = m["content"]
        if content is None and not m.get("tool_calls"):
            raise ValueError(f"sync: messages[{j}].content is None; only an assistant message with tool_calls "
                             "may have no content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"sync: messages[{j}].content must be a str; got {type(content).__name__}")
        for key in ("name", "tool_call_id", "id"):
            _optional_str(m, j, key)
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise ValueError(f"sync: messages[{j}].tool_calls must be a list or None; "
                             f"got {type(m['tool_calls']).__name__}")
        out.append((Message.from_dict(m), m.get("id")))
    return out


def message_key(m: Message) -> tuple:
    # An empty tool_calls list and none are the same message to a client.
    calls = json.dumps(m.tool_calls, sort_keys=True, default=str) if m.tool_calls else None
    return (m.role, m.content, m.name, m.tool_call_id, calls)


# ---------------------------------------------------------------------- alignment


def align(live: Sequence[Message], incoming: Sequence[Message]) -> list:
    """Ops ``(kind, i, j)`` in order: ``keep``/``replace`` (live ``i`` -> incoming ``j``), ``drop`` (``j``
    None), ``new`` (``i`` None). Monotone in both ``i`` and ``j``."""
    a, b = [message_key(m) for m in live], [message_key(m) for m in incoming]
    ops: list = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            ops += [("keep", i1 + k, j1 + k) for k in range(i2 - i1)]
            continue
        # Pair a changed block position by position: same role and tool fields -> a replacement;
        # anything else is a drop plus a new message (drops first, so new ones can be appended).
        # Only the leading run of such pairs: the ops must stay monotone in both lists.
        p = 0
        while p < min(i2 - i1, j2 - j1) and a[i1 + p][0] == b[j1 + p][0] and a[i1 + p][2:] == b[j1 + p][2:]:
            p += 1
        ops += [("replace", i1 + k, j1 + k) for k in range(p)]
        ops += [("drop", i, None) for i in range(i1 + p, i2)] + [("new", None, j) for j in range(j1 + p, j2)]
    return ops


def _tail_start(ops: list, exact: bool) -> tuple:
    """``(op index where the re-fed tail starts or None, reason)``."""
    if exact:
        for t, (kind, _, _) in enumerate(ops):
            if kind != "keep":
                return t, f"exact=True: re-fed from the first edit ({kind})"
        return None, None
    later_live = False
    first = None
    for t in range(len(ops) - 1, -1, -1):
        kind = ops[t][0]
        if kind in ("keep", "replace"):
            later_live = True
        elif kind == "new" and later_live:
            first = t
    if first is None:
        return None, None
    return first, "a message is inserted before kept ones (an insertion or a reordering)"


# ---------------------------------------------------------------------- cache edits


def _entry_index(session, msg_id: str):
    for k, e in enumerate(session._entries):
        if e.message.id == msg_id and e.state == LIVE:
            return k
    return None  # a pending message


def _truncate(session, k: int | None, pending_from: int) -> None:
    """Forget entries ``k..`` (cache rows cut) or, with ``k`` None, pending messages ``pending_from..``."""
    if k is None:
        del session._pending[pending_from:]
        return
    rows = sum(len(e.ids) for e in session._entries[:k] if e.state == LIVE)
    if k == 0:
        session.cache.reset()
    elif len(session._cache_ids) > rows:
        m = len(session._cache_ids) - rows
        try:
            session.cache.crop(-m)
        except ValueError:
            # The rows are not the cache's contiguous tail (a message was dropped among them):
            # remove them as a span and close their positions instead. No GAP entry lies among
            # them (the caller moved the cut to 0 then), so the positions end where the kept
            # entries end.
            session.cache.drop_span(rows, len(session._cache_ids), reposition=True, rope=session._rope_params())
    del session._cache_ids[rows:]
    del session._entries[k:]
    session._pending = []
    session._gen_tail = []
    session._gen_prompt = False


def _cut(session, ops: list, t: int, live_ids: list):
    """Cut the session where op ``t`` begins; returns the op index the re-fed tail really starts at.

    A GAP entry among the removed ones would leave positions the cache cannot close (its
    positions are still counted), so the cut moves to 0 then.
    """
    i_cut = next((i for _, i, _ in ops[t:] if i is not None), None)
    if i_cut is None:
        return t
    k = _entry_index(session, live_ids[i_cut])
    if k is not None and any(e.state == GAP for e in session._entries[k:]):
        t, k = 0, 0
    pending_from = 0 if k is not None else [m.id for m in session._pending].index(live_ids[i_cut])
    _truncate(session, k, pending_from)
    return t


def sync(session, messages, *, exact: bool = False) -> SyncResult:
    """Make ``session`` hold exactly ``messages`` with in-place edits where possible (see the module doc).

    Parameters
    ----------
    session : Session
        With a ``KVCompactCache`` (edits are in place).
    messages : list of dict or Message
        The whole conversation, OpenAI chat format (``role``, ``content``, optional ``name``,
        ``tool_call_id``, ``tool_calls``).
    exact : bool
        Re-feed everything from the first edit, so the cache equals a fresh prefill of
        ``messages`` (instead of keeping the KV of tokens after an edit).

    Returns
    -------
    SyncResult

    Raises
    ------
    ValueError
        A message without ``role``/``content``, an unknown role, a field of the wrong type (the
        message names the index and the field).
    TypeError
        ``messages`` is not a list, or an element is neither a dict nor a Message.

    A forward that raises inside ``sync`` propagates; the edits done before it stay, the cache
    holds exactly ``token_ids`` (see *Failures* in :mod:`kvcompact.agent.session`), and calling
    ``sync`` again with the same list finishes the job.
    """
    session._require_editable("sync")
    session._check_live()
    incoming = validate_messages(messages)
    live = session.messages
    live_ids = [m.id for m in live]
    ops = align(live, [m for m, _ in incoming])
    fed_before = session.fed_tokens
    t, reason = _tail_start(ops, exact)
    if t is not None:
        t = _cut(session, ops, t, live_ids)
    done = ops if t is None else ops[:t]
    for n, (kind, i, j) in enumerate(done):
        if kind == "drop":
            edits.drop(session, live_ids[i], reposition=True)
        elif kind == "replace":
            try:
                edits.replace(session, live_ids[i], incoming[j][0].content)
            except SessionError as err:  # not at a token boundary: this message starts the tail
                reason = f"replace of message {j} refused ({err})"
                t = _cut(session, ops, n, live_ids)
                break
    return _finish(session, ops, t, reason, incoming, live_ids, fed_before)


def _finish(session, ops, t, reason, incoming, live_ids, fed_before) -> SyncResult:
    """Add what is new or re-fed, prefill, and account."""
    taken = {m.id for m in session._history()} | {m.id for m in session._pending}
    paths: list = [None] * len(incoming)
    ids: list = [None] * len(incoming)
    dropped = tuple(i for kind, i, _ in ops if kind == "drop")
    for n, (kind, i, j) in enumerate(ops):
        if j is None:
            continue
        in_tail = t is not None and n >= t
        if kind in ("keep", "replace") and not in_tail:
            paths[j], ids[j] = (KEPT if kind == "keep" else REPLACED), live_ids[i]
            continue
        msg, explicit = incoming[j]
        if explicit is None or explicit in taken:
            msg = Message(msg.role, msg.content, name=msg.name, tool_call_id=msg.tool_call_id,
                          tool_calls=msg.tool_calls, metadata=dict(msg.metadata))
        taken.add(msg.id)
        session.add_message(msg)
        paths[j], ids[j] = (FED if kind == "new" else REFED), msg.id
    if session._pending or len(session._cache_ids) < len(session._target_ids()):
        session.prefill()
    fed = session.fed_tokens - fed_before
    return SyncResult(kept=paths.count(KEPT), replaced=paths.count(REPLACED), fed=paths.count(FED),
                      refed=paths.count(REFED), dropped=len(dropped), tokens_reused=len(session._cache_ids) - fed,
                      tokens_fed=fed, paths=tuple(paths), dropped_indices=dropped,
                      tail_from=None if t is None else _tail_index(ops, t, len(incoming)), reason=reason if t is not None else None,
                      ids=tuple(ids))


def _tail_index(ops: list, t: int, n_incoming: int) -> int:
    return next((j for _, _, j in ops[t:] if j is not None), n_incoming)
