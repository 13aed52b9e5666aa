"""``SessionManager``: many live :class:`~kvcompact.agent.Session` objects on one model.

Each request (a whole OpenAI-style message list) goes to one session, which
:meth:`~kvcompact.agent.Session.sync` reconciles with the list (reusing every cache row it can),
then generates the reply.

Routing
-------
* **With a session id**: the request goes to that session, created if the id is unknown (a client
  may name its own sessions; an id the manager dropped under its host budget is simply rebuilt).
  A created session is seeded like a fork (below), so a shared system prompt is not recomputed.
  The list may edit the session in place: drops and replaces become cache edits.
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

Reuse modes
-----------
``reuse`` picks how much of a live cache a request may reuse (the benchmark's baselines):

* ``"edits"`` (default): everything above -- ``Session.sync`` keeps, drops and replaces messages
  in place, so only new or changed text is fed.
* ``"prefix"``: longest common *token* prefix only, what vLLM's prefix caching and llama.cpp's
  slots do. The cache is cut where the request's render first differs from the session's tokens
  and everything after is recomputed (nothing is edited in place, so every cache equals a fresh
  prefill of its tokens). A request goes to its own session (``session_id``) or, without one, to
  the session it continues exactly; otherwise it starts a session seeded with a copy of the
  longest common token prefix of any unparked session (a shared system prompt).
* ``"none"``: stateless, what ``transformers serve`` does outside continuous batching: every
  request is a fresh prefill in a new session that is closed after the reply (``cached_tokens``
  is 0; no session outlives its request).

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
from kvcompact.agent.messages import Message
from kvcompact.agent.prefix import common_prefix
from kvcompact.agent.sampling import stop_strings
from kvcompact.agent.sync import message_key, validate_messages
from kvcompact.agent.template import TemplateRenderer

__all__ = ["ChatResult", "ManagerStats", "SessionManager", "REUSE_MODES"]

REUSE_MODES = ("edits", "prefix", "none")


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
    finish_reason : str
        ``"stop"`` (an end-of-turn token or a stop string) or ``"length"`` (``max_new_tokens``).
    """

    text: str
    session_id: str
    sync: SyncResult
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    created: bool
    finish_reason: str = "stop"


@dataclass(frozen=True)
class ManagerStats:
    """``SessionManager.stats()``: counts now and totals since construction.

    ``sessions_live`` counts sessions on the device, ``sessions_parked`` those in host memory,
    ``sessions_dropped`` those dropped under the host budget (or a full pool); ``parks`` counts
    parks done by the device budget; ``tokens_reused``/``tokens_fed`` sum the requests'
    ``SyncResult`` fields (the prompt side; decoding is not counted); ``peak_device_bytes`` is the
    largest ``device_bytes`` seen right after a reply (before parking, or closing under
    ``reuse="none"``), i.e. the KV the requests needed at once.
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
    peak_device_bytes: int = 0


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
    reuse : {"edits", "prefix", "none"}
        How much of a live cache a request reuses (see *Reuse modes* in the module docstring):
        in-place edits (default), the longest common token prefix only, or nothing (stateless).

    Raises
    ------
    ValueError
        A budget that is not None or an int >= 0, ``reuse`` not one of the modes, ``cache_kwargs``
        setting ``offload``/``pool``, ``pool`` not a ``PinnedPool``.
    """

    def __init__(self, model, tokenizer, *, cache_kwargs=None, max_device_bytes=None, max_host_bytes=None,
                 pool=None, reuse: str = "edits"):
        from kvcompact.offload import PinnedPool

        if not isinstance(reuse, str) or reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {', '.join(map(repr, REUSE_MODES))}, got {reuse!r}")
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
        self.reuse = reuse
        self._renderer = TemplateRenderer(tokenizer)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._dropped = self._parks = self._reused = self._fed = self._requests = 0
        self._peak_device = 0

    # ------------------------------------------------------------------ requests

    def chat(self, messages, *, session_id: str | None = None, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_p: float | None = None, seed: int | None = None, stop=None,
             on_token=None, on_session=None) -> ChatResult:
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
        stop : str or list of str, optional
            Stop strings: the reply is cut before the first one decoded (:meth:`Session.generate`).
        on_token : callable, optional
            Called with each settled piece of the reply's text while it is decoded (streaming). If
            it raises (e.g. the client went away), the reply is rolled back in the session and the
            exception propagates, as for any failed request (see *Threads, errors* in docs/serve.md).
        on_session : callable, optional
            Called with the session id once the request is routed, before any model work (a
            streaming server sends it in its response headers before the first token).

        Raises
        ------
        ValueError
            ``messages`` is not a non-empty list of dicts with ``role``/``content`` (the message
            names the index and field), ``session_id`` is not a non-empty str, ``max_new_tokens``
            is not an int >= 1, or ``stop`` is not None, a str or a list of non-empty str. Nothing
            is routed or created then.
        """
        incoming = self._validate(messages)
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError(f"chat: session_id must be None or a non-empty str, got {session_id!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"chat: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        try:
            stop = stop_strings(stop)
        except ValueError as err:
            raise ValueError(f"chat: {err}") from err
        for name, fn in (("on_token", on_token), ("on_session", on_session)):
            if fn is not None and not callable(fn):
                raise ValueError(f"chat: {name} must be callable or None, got {type(fn).__name__}")
        with self._lock:
            sid, created = self._route(incoming, session_id)
            slot = self._slots[sid]
            session = slot.session
            try:
                if on_session is not None:
                    on_session(sid)
                session.resume()
                result = self._sync(session, messages)
                if result.dropped or result.replaced:
                    slot.clean = False
                prompt = len(session.renderer.render_ids(session.messages, True))
                gen = None
                if do_sample and seed is not None:
                    gen = torch.Generator(device=session._device()).manual_seed(seed)
                text = session.generate(max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                        generator=gen, stop=stop, on_token=on_token)
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
                              cached_tokens=result.tokens_reused, completion_tokens=completion, created=created,
                              finish_reason=session.last_finish_reason)

    def _validate(self, messages) -> list:
        try:
            incoming = validate_messages(messages)
        except (TypeError, ValueError) as err:
            raise ValueError(str(err).replace("sync:", "chat:", 1)) from err
        if not incoming:
            raise ValueError("chat: messages must be a non-empty list of dicts with 'role' and 'content'")
        return [m for m, _ in incoming]

    def _route(self, incoming: list, session_id: str | None) -> tuple:
        """``(session id, created)`` for a request (see *Routing* and *Reuse modes*)."""
        if self.reuse == "none":
            # Stateless: a fresh session every time (closed in _enforce after the reply).
            sid = session_id if session_id is not None else f"sess-{uuid.uuid4().hex}"
            if sid in self._slots:  # only while a request that failed midway left it behind
                self._forget(sid, dropped=False)
            self._slots[sid] = _Slot(self._new_session())
            return sid, True
        if self.reuse == "prefix":
            return self._route_prefix(incoming, session_id)
        keys = [message_key(m) for m in incoming]
        if session_id is not None:
            if session_id in self._slots:
                return session_id, False
            # A new named conversation starts like a fork: a shared system prompt is not recomputed.
            self._slots[session_id] = _Slot(self._fork(keys))
            return session_id, True
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

    def _route_prefix(self, incoming: list, session_id: str | None) -> tuple:
        """``reuse="prefix"``: the request's own session, else an exact continuation, else a new session
        seeded with the longest common token prefix of an unparked session (see *Reuse modes*)."""
        if session_id is not None and session_id in self._slots:
            return session_id, False
        request_ids = self._renderer.render_ids(incoming)
        src, best = None, 0
        for sid, slot in self._slots.items():
            s = slot.session
            if s.parked or s._pending:
                continue
            n = common_prefix(s.token_ids, request_ids)
            if session_id is None and n == len(s.token_ids) and n > 0:
                return sid, False  # the request continues this session exactly: extend it
            if n > best:
                src, best = s, n
        sid = session_id if session_id is not None else f"sess-{uuid.uuid4().hex}"
        self._slots[sid] = _Slot(self._seeded_session(src, best))
        return sid, True

    def _seeded_session(self, src: Session | None, rows: int) -> Session:
        """A new session whose cache holds a copy of ``src``'s first ``rows`` cache rows (no messages
        yet: :meth:`_prefix_sync` renders the request and keeps the rows its render shares)."""
        session = self._new_session()
        if src is None or rows == 0:
            return session
        try:
            session.cache.import_state(*src.cache.export_state())
            session.cache.crop(rows - len(src.token_ids))  # -n: the newest n rows go; 0: none
        except (ValueError, RuntimeError):
            session.close()  # a cache that cannot be copied or cut: a fresh prefill is always correct
            return self._new_session()
        session._adopt(session.cache, [])
        session._cache_ids = src.token_ids[:rows]
        return session

    def _sync(self, session: Session, messages) -> SyncResult:
        """Reconcile ``session`` with the request under the manager's reuse mode."""
        if self.reuse == "prefix":
            return self._prefix_sync(session, messages)
        return session.sync(messages)  # "edits"; under "none" the session is new, so this feeds all

    def _prefix_sync(self, session: Session, messages) -> SyncResult:
        """``reuse="prefix"``: keep the cache rows the request's render shares as a token prefix, feed the rest.

        The session forgets its message record and keeps its cache: the request is rendered from
        scratch as a fresh session would render it, and ``prefill`` cuts the cache where the render
        first differs from the cached tokens and feeds everything after (Session keeps the longest
        common prefix of its cache ids and its render). No in-place edit happens, so the cache stays
        equal to a fresh prefill of its tokens.
        """
        incoming = [m for m, _ in validate_messages(messages)]
        old_messages, old_ids = session.messages, session.token_ids
        fresh = [Message(m.role, m.content, name=m.name, tool_call_id=m.tool_call_id, tool_calls=m.tool_calls,
                         metadata=dict(m.metadata)) for m in incoming]
        session._adopt(session.cache, [], pending=fresh)
        session._cache_ids = old_ids
        fed_before = session.fed_tokens
        session.prefill()
        fed = session.fed_tokens - fed_before
        reused = len(session.token_ids) - fed
        spans = session.spans
        old_keys = [message_key(m) for m in old_messages]
        new_keys = [message_key(m) for m in incoming]
        paths = []
        for m, key in zip(session.messages, new_keys):
            if spans[m.id][1] <= reused:
                paths.append("kept")
            else:
                paths.append("refed" if key in old_keys else "fed")
        remaining = list(new_keys)
        dropped = []
        for i, key in enumerate(old_keys):
            if key in remaining:
                remaining.remove(key)
            else:
                dropped.append(i)
        tail = next((j for j, p in enumerate(paths) if p != "kept"), None)
        # New messages after the kept ones are an append; anything else re-fed is a recomputed tail.
        redone = tail is not None and (bool(dropped) or "refed" in paths[tail:])
        return SyncResult(kept=paths.count("kept"), replaced=0, fed=paths.count("fed"), refed=paths.count("refed"),
                          dropped=len(dropped), tokens_reused=reused, tokens_fed=fed, paths=tuple(paths),
                          dropped_indices=tuple(dropped), tail_from=tail if redone else None,
                          reason=f"reuse='prefix': recomputed after the first {reused} common tokens" if redone else None,
                          ids=tuple(m.id for m in session.messages))

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
        self._peak_device = max(self._peak_device, self._device_bytes())
        if self.reuse == "none":
            self._forget(served, dropped=False)  # stateless: nothing outlives its request
            return
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
                                requests=self._requests, peak_device_bytes=self._peak_device)
