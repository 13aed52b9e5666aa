"""Chat messages with stable ids.

A :class:`Message` is the unit the agent layer reasons about: the tracker counts its tokens,
:func:`~kvcompact.agent.compaction.compact_messages` decides to truncate or drop it, and the
session maps it to a span of the KV cache. The id is what ties those together, so it is
assigned once, when the message is made, and never derived from the content (two identical
tool outputs are still two messages).

Messages are frozen: edits make a new message with :func:`dataclasses.replace`, so a list
handed to one component can never be changed behind another's back.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["ROLES", "Message", "IdGenerator", "new_message_id", "as_message", "validate_role", "message_ref"]

ROLES = ("system", "user", "assistant", "tool")

# Keys of an OpenAI-style message dict that map onto Message fields; anything else a caller's
# dict carries is kept in ``metadata["extra"]`` so no information is lost on the way through.
_DICT_FIELDS = ("id", "role", "content", "name", "tool_call_id", "tool_calls", "metadata")


def new_message_id(prefix: str = "msg") -> str:
    """A fresh random id, e.g. ``"msg_3f9c2a1b7d0e4c55"`` (64 random bits: unique in practice)."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


class IdGenerator:
    """Deterministic ids ``prefix_0``, ``prefix_1``, ... (thread safe).

    Useful where ids must be reproducible (tests, a session restored from a checkpoint keeps its
    own ids and continues a generator from ``start``).

    >>> ids = IdGenerator("m")
    >>> ids(), ids()
    ('m_0', 'm_1')
    """

    def __init__(self, prefix: str = "msg", start: int = 0):
        self.prefix = prefix
        self._counter = itertools.count(start)
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            return f"{self.prefix}_{next(self._counter)}"


def validate_role(role: Any) -> str:
    """Return ``role`` if it is one of :data:`ROLES`, else raise ``ValueError`` naming ``role``."""
    if role not in ROLES:
        raise ValueError(f"Message role must be one of {', '.join(map(repr, ROLES))}; got role={role!r}")
    return role


@dataclass(frozen=True)
class Message:
    """One chat message.

    Parameters
    ----------
    role : str
        ``"system"``, ``"user"``, ``"assistant"`` or ``"tool"``.
    content : str
        The text. (``None`` from an API dict, e.g. an assistant turn holding only tool calls,
        becomes ``""`` in :meth:`from_dict`.)
    id : str
        Stable identifier; a random one by default (:func:`new_message_id`).
    name : str, optional
        For tool messages, the tool's name (templates and the tool-role fallback show it).
    tool_call_id : str, optional
        For tool messages, the id of the call this answers.
    tool_calls : list of dict, optional
        For assistant messages, the calls it made (passed through to chat templates).
    metadata : dict
        Free-form data that is never rendered (timestamps, compaction notes, ...).

    Example
    -------
    >>> m = Message("tool", "42 files", name="ls", id="m_7")
    >>> m.to_dict()
    {'role': 'tool', 'content': '42 files', 'name': 'ls'}
    """

    role: str
    content: str
    id: str = field(default_factory=new_message_id)
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        validate_role(self.role)
        if not isinstance(self.content, str):
            raise TypeError(f"Message content must be a str; got content of type {type(self.content).__name__}")
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Message id must be a non-empty str; got id={self.id!r}")

    def to_dict(self, *, include_id: bool = False) -> dict:
        """The OpenAI-style dict (role, content, and name/tool_call_id/tool_calls when set)."""
        out: dict = {"role": self.role, "content": self.content}
        if include_id:
            out = {"id": self.id, **out}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping, *, id: str | None = None) -> "Message":
        """Build from a dict with at least ``role``; ``id`` from the argument, the dict, or fresh.

        Keys that are not Message fields are kept in ``metadata["extra"]``.
        """
        if "role" not in data:
            raise ValueError(f"message dict needs a 'role' key; got keys {sorted(data)}")
        content = data.get("content")
        kwargs: dict = {
            "role": data["role"],
            "content": "" if content is None else content,
            "name": data.get("name"),
            "tool_call_id": data.get("tool_call_id"),
            "tool_calls": data.get("tool_calls"),
            "metadata": dict(data.get("metadata") or {}),
        }
        extra = {k: v for k, v in data.items() if k not in _DICT_FIELDS}
        if extra:
            kwargs["metadata"]["extra"] = extra
        chosen = id if id is not None else data.get("id")
        if chosen is not None:
            kwargs["id"] = chosen
        return cls(**kwargs)


def as_message(message: Message | Mapping) -> Message:
    """A :class:`Message` as is; a dict through :meth:`Message.from_dict`."""
    if isinstance(message, Message):
        return message
    if isinstance(message, Mapping):
        return Message.from_dict(message)
    raise TypeError(f"expected a Message or a dict with 'role' and 'content'; got {type(message).__name__}")


def message_ref(message: Message | Mapping, index: int):
    """How reports name a message: its id (``Message.id`` or a dict's non-empty ``"id"``), else its index."""
    if isinstance(message, Message):
        return message.id
    if isinstance(message, Mapping) and message.get("id") is not None:
        return message["id"]
    return index
