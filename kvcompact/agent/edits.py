"""``Session.drop`` and ``Session.replace``: message-level edits as in-place cache edits.

The cache does the row work (:meth:`KVCompactCache.drop_span`, :meth:`KVCompactCache.splice`,
which rolls itself back if the model's forward fails); this module maps a message id to its span,
renders replacement text in context, and keeps the session's bookkeeping (entries, physical ids)
in step with the cache. The session's state changes only after the cache edit succeeded, so a
failed edit leaves both as they were and the original exception propagates.
"""

from __future__ import annotations

import dataclasses

from kvcompact.agent.entries import CLOSED, GAP, LIVE, Entry, SessionError
from kvcompact.agent.repair import check_repair, repair_tail

__all__ = ["drop", "replace", "recompute_from"]


def _prepare(session, op: str) -> None:
    session._require_editable(op)
    session._check_live()
    # A feed that failed earlier may have left fed messages' rows missing; spans must be real rows.
    session._sync_physical()


def recompute_from(session, row: int) -> int:
    """Crop physical rows ``[row, end)`` and feed them again (exact tail); returns the tokens re-fed."""
    m = len(session._cache_ids) - row
    if m > 0:
        session.cache.crop(-m)
        del session._cache_ids[row:]
        session._sync_physical()
    return max(m, 0)


def drop(session, msg_id: str, *, reposition: bool = True, recompute_tail: bool = False,
         repair: float | None = None) -> int:
    """Evict a message's tokens from the cache in place; returns how many were evicted.

    ``reposition=True`` (the default): later keys are re-rotated by ``-span`` so positions close
    the gap, and the logical length shrinks by the span; a model whose RoPE cannot be re-rotated
    (dynamic / long / multimodal RoPE, local and global rotary embeddings) gets a ``ValueError``
    that says to pass ``reposition=False``. ``reposition=False``: later tokens keep
    their positions (a gap remains; the logical length is unchanged) -- no re-rotation, but on
    ``kvcompact eval``'s traces it answers worse than closing the gap (docs/eval.md). The message leaves ``messages``; later
    spans shift down. A pending (not yet fed) message is just removed.

    ``recompute_tail=True`` then re-feeds the tokens after the span, so their K/V no longer
    carry what the dropped message said: exact (equal to a re-prefill of the remaining
    messages with ``reposition=True``), at the cost of a forward over the tail only.
    ``repair=f`` (a fraction in [0, 1]) instead recomputes the fraction ``f`` of those tokens
    the drop changed most (:mod:`kvcompact.agent.repair`): bounded cost, most of the accuracy.
    """
    repair = check_repair(repair, recompute_tail, "drop")
    _prepare(session, "drop")
    for i, m in enumerate(session._pending):
        if m.id == msg_id:
            del session._pending[i]
            return 0
    k = session._find(msg_id)
    start, end = session.spans[msg_id]
    rope = None
    if reposition and end > start:
        try:
            rope = session._rope_params()
        except ValueError as err:  # nothing is edited yet
            raise ValueError(f"drop: cannot re-rotate the keys after the dropped message ({err}); pass "
                             "reposition=False to leave a position gap instead") from err
    length = session.cache.drop_span(start, end, reposition=reposition, rope=rope)
    del session._cache_ids[start:end]
    session._entries[k].state = CLOSED if reposition else GAP
    if recompute_tail:
        recompute_from(session, start)
    elif repair:
        session.last_repair = repair_tail(session, start, repair)
    return length


def _render_replacement(session, k: int, msg_id: str, text: str):
    """The replaced message and its token ids, rendered in context; refuses a non-boundary edit."""
    old = session._entries[k]
    new_msg = dataclasses.replace(old.message, content=text)
    hist = session._history()
    before = [i for e in session._entries[:k] for i in e.ids]
    inc = session.renderer.render_increment(hist[:k] + [new_msg], k, False, previous_ids=before)
    if inc.retract_tokens:
        raise SessionError(f"replace: the new text of {msg_id!r} merges with the tokens before it "
                           f"({inc.retract_tokens} would change); replace is only possible at a token boundary")
    new_ids = list(inc.token_ids)
    if k + 1 < len(session._entries):
        nxt = session.renderer.render_increment(hist[:k] + [new_msg, hist[k + 1]], k + 1, False,
                                                previous_ids=before + new_ids)
        if nxt.retract_tokens or list(nxt.token_ids) != session._entries[k + 1].ids:
            raise SessionError(f"replace: with the new text of {msg_id!r} the next message would tokenize "
                               "differently; replace is only possible at a token boundary")
    return new_msg, new_ids


def replace(session, msg_id: str, text: str, *, recompute_tail: bool = False,
            repair: float | None = None) -> tuple:
    """Splice ``text`` in place of a message's content; returns ``(old_tokens, new_tokens)``.

    The new message's tokens are rendered in context; the cache's ``splice`` opens or closes the
    gap, one forward computes the new tokens' KV against the tokens before the span (nothing after
    it), and the keys after it are re-rotated by the length change. Tokens after the span are NOT
    recomputed: their KV still reflects the old text (see docs/agent.md for the measured effect).
    ``recompute_tail=True`` then crops the cache after the new text and feeds everything after it
    again: exact (a re-prefill from the span on), cost proportional to the tail; ``repair=f``
    recomputes only the fraction ``f`` of the tail the edit changed most (:mod:`kvcompact.agent.repair`).
    A pending message is replaced without touching the cache.

    If the splice's forward raises, the cache restores itself and the session is unchanged (same
    messages, token ids and spans); the original exception propagates. If only the tail's
    re-feed (``recompute_tail``) raises, the replacement stands and the tail not yet re-fed is fed
    by the next call (see *Failures* in :mod:`kvcompact.agent.session`).
    """
    repair = check_repair(repair, recompute_tail, "replace")
    _prepare(session, "replace")
    for i, m in enumerate(session._pending):
        if m.id == msg_id:
            session._pending[i] = dataclasses.replace(m, content=text)
            return (0, 0)
    k = session._find(msg_id)
    new_msg, new_ids = _render_replacement(session, k, msg_id, text)
    start, end = session.spans[msg_id]
    session.cache.splice(start, end, len(new_ids), position=session._position_of(k),
                         forward=lambda: session._run(new_ids), rope=session._rope_params())
    session._cache_ids[start:end] = new_ids
    session._entries[k] = Entry(new_msg, new_ids, LIVE)
    if recompute_tail:
        recompute_from(session, start + len(new_ids))
    elif repair:
        session.last_repair = repair_tail(session, start + len(new_ids), repair)
    return (end - start, len(new_ids))
