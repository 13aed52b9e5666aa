"""``SessionManager``: many live :class:`~kvcompact.agent.Session` objects on one model.

Each request (a whole OpenAI-style message list) goes to one session, which
:meth:`~kvcompact.agent.Session.sync` reconciles with the list (reusing every cache row it can),
then generates the reply.

Routing
-------
* **With a session id**: the request goes to that session, created if the id is unknown (a client
  may name its own sessions; an id the manager dropped under its host budget is simply rebuilt by a
  full prefill). The list may edit the session in place: drops and replaces become cache edits.
* **Without an id**: the request may only *continue* a session. A live session is a candidate when
  its messages are an exact prefix of the request's messages (append-only) and its KV is *clean*:
  no in-place drop or replace was ever applied to it (after such an edit, later rows hold KV
  computed while the removed text was visible). Of the candidates, the one whose token ids share
  the longest prefix with the request's render wins. Otherwise a new session starts (a fork),
  seeded with a copy of the KV of the longest exact common message prefix of a clean, unparked
  session (those rows never saw what follows them), else prefilled fresh. So a request without an
  id never edits another conversation in place and never reads KV that saw text the request does
  not contain.

Memory
------
Every session's cache is a ``KVCompactCache(offload="idle")`` parking into one shared
:class:`~kvcompact.offload.PinnedPool`. After each request, while the live sessions' device bytes
exceed ``max_device_bytes``, the least recently used session (never the one just served) is
parked; it resumes at its next request. While the parked sessions' host bytes exceed
``max_host_bytes`` (or the shared pool cannot take a park), the least recently used parked session
is dropped: closed and forgotten (with no parked session left, the one that did not fit goes).

All public methods take one lock: one request runs at a time.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvcompact.agent import Session, SyncResult
from kvcompact.agent.entries import LIVE
from kvcompact.agent.prefix import common_prefix
from kvcompact.agent.sync import message_key, validate_messages
from kvcompact.agent.template import TemplateRenderer

__all__ = ["ChatResult", "ManagerStats", "SessionManager"]


@dataclass(frozen=True)
class ChatResult:
    """One answered request.

    Attributes
    ----------
    text : str
        The reply.
    session_id : str
        The session that served it (send it back to continue or edit that session).
    sync : SyncResult
        What reconciling the request with the session did.
    prompt_tokens : int
        Tokens of the request's render, generation prompt included.
    cached_tokens : int
        ``sync.tokens_reused``: cache rows from before the request that were not recomputed.
    completion_tokens : int
        Cache rows the reply added (its end-of-turn marker included).
    created : bool
        True when the request started a new session (a new id, or a fork).
    """

    text: str
    session_id: str
    sync: SyncResult
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    created: bool


@dataclass(frozen=True)
class ManagerStats:
    """``SessionManager.stats()``: counts now and totals since construction.

    ``sessions_live`` counts sessions on the device, ``sessions_parked`` those in host memory,
    ``sessions_dropped`` those dropped under the host budget (or a full pool); ``parks`` counts
    parks done by the device budget; ``tokens_reused``/``tokens_fed`` sum the requests'
    ``SyncResult`` fields (the prompt side; decoding is not counted).
    """

    sessions_live: int
    sessions_parked: int
    sessions_dropped: int
    parks: int
    device_bytes: int
    host_bytes: int
    tokens_reused: int
    tokens_fed: int
    requests: int


class _Slot:
    __slots__ = ("session", "clean")

    def __init__(self, session: Session):
        self.session = session
        self.clean = True  # its KV equals a fresh prefill of its messages (see Routing)


def _check_budget(name: str, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None or an int >= 0 (bytes), got {value!r}")


class SessionManager:
    """Route chat requests to live sessions of one model; park and drop idle ones under budgets.

    Parameters
    ----------
    model, tokenizer
        As for :class:`~kvcompact.agent.Session`.
    cache_kwargs : dict, optional
        Extra ``KVCompactCache`` arguments for every session (e.g. ``kv_dtype="int8"``);
        ``offload`` and ``pool`` are set by the manager.
    max_device_bytes : int, optional
        Budget for the summed ``cache.stats().device_bytes`` of unparked sessions, enforced after
        each request by parking least recently used sessions. None: never park.
    max_host_bytes : int, optional
        Budget for the summed host bytes of parked sessions, enforced by dropping least recently
        used parked sessions. None: never drop.
    pool : kvcompact.offload.PinnedPool, optional
        The shared pool sessions park into. Default: one of ``max_host_bytes`` bytes when that is
        given, else each cache keeps its own (grown as needed).
    """

    def __init__(self, model, tokenizer, *, cache_kwargs=None, max_device_bytes=None, max_host_bytes=None,
                 pool=None):
        from kvcompact.offload import PinnedPool

        _check_budget("max_device_bytes", max_device_bytes)
        _check_budget("max_host_bytes", max_host_bytes)
        cache_kwargs = dict(cache_kwargs or {})
        for key in ("offload", "pool"):
            if key in cache_kwargs:
                raise ValueError(f"cache_kwargs must not set {key!r}: the manager sets it (offload='idle', the "
                                 "shared pool)")
        if pool is not None and not isinstance(pool, PinnedPool):
            raise ValueError(f"pool must be None or a kvcompact.offload.PinnedPool, got {type(pool).__name__}")
        if pool is None and max_host_bytes:
            pool = PinnedPool(max_host_bytes)
        self.model, self.tokenizer = model, tokenizer
        self.cache_kwargs = cache_kwargs
        self.max_device_bytes, self.max_host_bytes = max_device_bytes, max_host_bytes
        self.pool = pool
        self._renderer = TemplateRenderer(tokenizer)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._dropped = self._parks = self._reused = self._fed = self._requests = 0

    # ------------------------------------------------------------------ requests

    def chat(self, messages, *, session_id: str | None = None, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_p: float | None = None, seed: int | None = None) -> ChatResult:
        """Answer one request: route it (see the module docstring), sync the session, generate.

        Parameters
        ----------
        messages : list of dict
            The whole conversation, OpenAI chat format.
        session_id : str, optional
            The session to use (created if unknown); None routes by content.
        max_new_tokens, do_sample, temperature, top_p
            As for :meth:`Session.generate`.
        seed : int, optional
            Seeds the sampler (only used with ``do_sample=True``).

        Raises
        ------
        ValueError
            ``messages`` is not a non-empty list of dicts with ``role``/``content`` (the message
            names the index and field), ``session_id`` is not a non-empty str, or
            ``max_new_tokens`` is not an int >= 1. Nothing is routed or created then.
        """
        incoming = self._validate(messages)
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError(f"chat: session_id must be None or a non-empty str, got {session_id!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"chat: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        with self._lock:
            sid, created = self._route(incoming, session_id)
            slot = self._slots[sid]
            session = slot.session
            try:
                session.resume()
                result = session.sync(messages)
                if result.dropped or result.replaced:
                    slot.clean = False
                prompt = len(session.renderer.render_ids(session.messages, True))
                gen = None
                if do_sample and seed is not None:
                    gen = torch.Generator(device=session._device()).manual_seed(seed)
                text = session.generate(max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                        generator=gen)
            except BaseException:
                # A half-fed new session is not worth keeping; a broken one (its cache no longer
                # matches its tokens, see Session's *Failures*) can only raise from now on.
                if created or session._broken is not None:
                    self._forget(sid, dropped=False)
                else:
                    slot.clean = False  # a sync that raised may have edited in place before it
                raise
            completion = max(0, len(session.token_ids) - prompt)
            self._slots.move_to_end(sid)
            self._requests += 1
            self._reused += result.tokens_reused
            self._fed += result.tokens_fed
            self._enforce(sid)
            return ChatResult(text=text, session_id=sid, sync=result, prompt_tokens=prompt,
                              cached_tokens=result.tokens_reused, completion_tokens=completion, created=created)

    def _validate(self, messages) -> list:
        try:
            incoming = validate_messages(messages)
        except (TypeError, ValueError) as err:
            raise ValueError(str(err).replace("sync:", "chat:", 1)) from err
        if not incoming:
            raise ValueError("chat: messages must be a non-empty list of dicts with 'role' and 'content'")
        return [m for m, _ in incoming]

    def _route(self, incoming: list, session_id: str | None) -> tuple:
        """``(session id, created)`` for a request (see *Routing* in the module docstring)."""
        if session_id is not None:
            if session_id in self._slots:
                return session_id, False
            self._slots[session_id] = _Slot(self._new_session())
            return session_id, True
        keys = [message_key(m) for m in incoming]
        request_ids = None
        best, best_len = None, -1
        for sid, slot in self._slots.items():
            have = slot.session.messages
            if not slot.clean or not have or len(have) > len(keys):
                continue
            if [message_key(m) for m in have] != keys[:len(have)]:
                continue
            if request_ids is None:
                request_ids = self._renderer.render_ids(incoming)
            n = common_prefix(slot.session.token_ids, request_ids)
            if n > best_len:
                best, best_len = sid, n
        if best is not None:
            return best, False
        sid = f"sess-{uuid.uuid4().hex}"
        self._slots[sid] = _Slot(self._fork(keys))
        return sid, True

    def _fork(self, keys: list) -> Session:
        """A new session for a request no session can continue, seeded with a copy of the KV of the
        longest exact common message prefix of a clean, unparked session (causal attention: those
        rows never saw what follows them), else empty (a fresh prefill)."""
        from kvcompact.agent.entries import SessionError

        src, k = None, 0
        for slot in self._slots.values():
            s = slot.session
            if not slot.clean or s.parked or s._pending or any(e.state != LIVE for e in s._entries):
                continue
            have = s.messages
            n = 0
            while n < min(len(have), len(keys)) and message_key(have[n]) == keys[n]:
                n += 1
            if n > k:
                src, k = s, n
        session = self._new_session()
        if src is None:
            return session
        prefix = [e.copy() for e in src._entries[:k]]
        rows = sum(len(e.ids) for e in prefix)
        try:
            session.cache.import_state(*src.cache.export_state())
            session.cache.crop(rows - len(src.token_ids))  # -n: the newest n rows go; 0: none
        except (ValueError, RuntimeError, SessionError):
            # A cache that cannot be copied or cut there (e.g. a format that refuses the crop):
            # the fresh prefill is always correct.
            session.close()
            return self._new_session()
        session._adopt(session.cache, prefix)
        return session

    def _new_session(self) -> Session:
        from kvcompact.cache import KVCompactCache

        cache = KVCompactCache(self.model.config, offload="idle", pool=self.pool, **self.cache_kwargs)
        return Session(self.model, self.tokenizer, cache)

    # ------------------------------------------------------------------ budgets

    def _device_bytes(self) -> int:
        return sum(s.session.cache.stats().device_bytes for s in self._slots.values() if not s.session.parked)

    def _host_bytes(self) -> int:
        return sum(s.session.cache.stats().host_bytes for s in self._slots.values())

    def _enforce(self, served: str) -> None:
        if self.max_device_bytes is not None:
            for sid in list(self._slots):
                if self._device_bytes() <= self.max_device_bytes:
                    break
                if sid != served and sid in self._slots and not self._slots[sid].session.parked:
                    self._park(sid)
        if self.max_host_bytes is not None:
            for sid in list(self._slots):
                if self._host_bytes() <= self.max_host_bytes:
                    break
                if sid != served and self._slots[sid].session.parked:
                    self._forget(sid)

    def _park(self, sid: str) -> None:
        from kvcompact.offload import PoolExhaustedError

        session = self._slots[sid].session
        while True:
            try:
                session.park()
                self._parks += 1
                return
            except PoolExhaustedError:
                # Make room by dropping the oldest parked session; with none left, this one goes.
                victim = next((k for k, s in self._slots.items() if s.session.parked), None)
                self._forget(victim if victim is not None else sid)
                if victim is None:
                    return

    def _forget(self, sid: str, *, dropped: bool = True) -> None:
        self._slots.pop(sid).session.close()
        self._dropped += dropped

    # ------------------------------------------------------------------ management

    def close(self, session_id: str) -> None:
        """Close a session and forget it (not counted as dropped).

        Raises
        ------
        KeyError
            No live session has this id.
        """
        with self._lock:
            if session_id not in self._slots:
                raise KeyError(f"close: no live session with id {session_id!r}")
            self._slots.pop(session_id).session.close()

    def session(self, session_id: str) -> Session:
        """The live session with this id (``KeyError`` naming it when there is none)."""
        with self._lock:
            if session_id not in self._slots:
                raise KeyError(f"session: no live session with id {session_id!r}")
            return self._slots[session_id].session

    def session_ids(self) -> list:
        """Live session ids, least recently used first."""
        with self._lock:
            return list(self._slots)

    def stats(self) -> ManagerStats:
        """Sessions live / parked / dropped, bytes now, and token totals since construction."""
        with self._lock:
            parked = sum(1 for s in self._slots.values() if s.session.parked)
            return ManagerStats(sessions_live=len(self._slots) - parked, sessions_parked=parked,
                                sessions_dropped=self._dropped, parks=self._parks, device_bytes=self._device_bytes(),
                                host_bytes=self._host_bytes(), tokens_reused=self._reused, tokens_fed=self._fed,
                                requests=self._requests)
