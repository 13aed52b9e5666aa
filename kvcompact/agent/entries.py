"""The session's record of what it fed: one :class:`Entry` per message, in render order.

An entry keeps the token ids fed for its message even after the message is dropped (a tombstone),
because the chat template is always rendered over the whole history; its ``state`` says whether
the tokens are still in the cache and whether their positions still count.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcompact.agent.messages import Message

__all__ = ["Entry", "SessionError", "LIVE", "GAP", "CLOSED"]

LIVE, GAP, CLOSED = "live", "gap", "closed"


class SessionError(RuntimeError):
    """A session operation that cannot be done on the current cache state (the message says why)."""


@dataclass
class Entry:
    """One fed message.

    Attributes
    ----------
    message : Message
    ids : list of int
        Token ids fed for this message (kept after a drop: the render still contains them).
    state : {"live", "gap", "closed"}
        ``live``: in the cache. ``gap``: dropped, its positions kept (later tokens did not move).
        ``closed``: dropped and its positions closed (later keys re-rotated).
    """

    message: Message
    ids: list
    state: str = LIVE

    def copy(self) -> "Entry":
        return Entry(self.message, list(self.ids), self.state)
