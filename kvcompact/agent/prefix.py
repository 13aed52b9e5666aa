"""``PrefixCache``: the KV of a shared prefix (system prompt, tool schemas), computed once and stored
once: every session that starts with it reads the same rows (copied into a session only when it
must rewrite them)."""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import torch

from kvcompact.agent.messages import Message, as_message

__all__ = ["PrefixCache", "PrefixChangedError", "prefix_sha256", "common_prefix"]


class PrefixChangedError(ValueError):
    """The prefix handed to :meth:`PrefixCache.session` differs from the cached one."""


def prefix_sha256(token_ids: Sequence[int]) -> str:
    """sha256 of a token id sequence (int64 little-endian), the identity of a cached prefix."""
    return hashlib.sha256(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _as_messages(messages_or_text) -> list:
    if isinstance(messages_or_text, str):
        return [Message("system", messages_or_text)]
    return [as_message(m) for m in messages_or_text]


class PrefixCache:
    """The KV of a shared prefix (system prompt, tool schemas), computed once, shared by sessions.

    Sessions from :meth:`session` share the prefix's full-attention K/V read-only
    (:meth:`kvcompact.KVCompactCache.shared_copy`): N sessions hold the prefix once, plus their own
    tokens. A session that rewrites a prefix row (a budget eviction, dropping or replacing a
    prefix message, a crop into the prefix) copies the prefix into its own cache first.

    Parameters
    ----------
    model, tokenizer
        As for :class:`~kvcompact.agent.Session`.
    messages_or_text : str or sequence of Message/dict
        The prefix: a string is one system message.
    cache_kwargs : dict, optional
        ``KVCompactCache`` options (``kv_dtype``, ``group_size``, ``residual``) for the prefix and
        every session made from it.
    **session_kwargs
        Renderer and session options (``chat_template``, ``tools``, ...), shared by the sessions.

    Attributes
    ----------
    token_ids : list of int
        The prefix tokens.
    sha256 : str
        :func:`prefix_sha256` of ``token_ids``.
    """

    def __init__(self, model, tokenizer, messages_or_text, *, cache_kwargs: Mapping | None = None,
                 **session_kwargs):
        from kvcompact.agent.session import Session
        from kvcompact.cache import KVCompactCache

        messages = _as_messages(messages_or_text)
        if not messages:
            raise ValueError("PrefixCache needs at least one message")
        self.model, self.tokenizer = model, tokenizer
        self.cache_kwargs = dict(cache_kwargs or {})
        self.session_kwargs = dict(session_kwargs)
        base = Session(model, tokenizer, KVCompactCache(model.config, **self.cache_kwargs), **self.session_kwargs)
        for m in messages:
            base.add_message(m)
        base.prefill()
        self._base = base
        self.messages = [e.message for e in base._entries]
        self.token_ids = base.token_ids
        self.sha256 = prefix_sha256(self.token_ids)

    def check(self, messages_or_text) -> None:
        """Raise :class:`PrefixChangedError` if this prefix renders to other tokens than the cached ones."""
        ids = self._base.renderer.render_ids(_as_messages(messages_or_text))
        if prefix_sha256(ids) != self.sha256:
            at = common_prefix(ids, self.token_ids)
            lo = max(0, at - 8)
            raise PrefixChangedError(
                f"the prefix changed: its sha256 is {prefix_sha256(ids)[:16]}..., the cached prefix's "
                f"{self.sha256[:16]}...; first difference at token {at}: cached "
                f"{self.tokenizer.decode(self.token_ids[lo:at + 8])!r}, now {self.tokenizer.decode(ids[lo:at + 8])!r}. "
                "Text that changes per run (a timestamp, a random id) in the system prompt defeats prefix reuse: "
                "move it after the prefix, or build a new PrefixCache")

    def session(self, prefix=None, **overrides):
        """A new :class:`~kvcompact.agent.Session` whose cache starts as a copy of the prefix KV (no
        prefix token is fed).

        ``prefix``: the prefix as the caller built it this time (str or messages); when given it is
        checked against the cached one (:meth:`check`) first.
        """
        from kvcompact.agent.session import Session

        if prefix is not None:
            self.check(prefix)
        kwargs = {**self.session_kwargs, **overrides}
        s = Session(self.model, self.tokenizer, self._base._new_cache(), **kwargs)
        # The prefix's KV is shared, not copied: every session reads the same rows (copy on write).
        cache = self._base.cache.shared_copy()
        s._adopt(cache, [e.copy() for e in self._base._entries], prefix=self)
        return s

    @property
    def stats(self):
        return self._base.cache.stats()
