"""``Session.spawn``: a sub-agent on a fresh cache that starts from the shared prefix."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

__all__ = ["SpawnRecord", "spawn"]


@dataclass
class SpawnRecord:
    """What :meth:`Session.spawn` did: the answer and the child cache's device bytes around its free."""

    answer: str
    child_messages: list
    child_device_bytes: int
    child_device_bytes_after_free: int
    child_cache_collected: bool = False


def spawn(session, task: str, *, name: str = "subagent", **generate_kwargs) -> str:
    """Run a child session on ``task`` and record its answer in ``session`` as a tool message.

    The child starts from the shared prefix: the session's :class:`~kvcompact.agent.PrefixCache`
    (a copy of its KV, nothing recomputed) or, without one, the session's leading system messages
    (prefilled in the child). It gets a fresh cache of the same storage format, answers with
    ``generate(**generate_kwargs)``, and its cache is freed before this returns
    (``session.last_spawn`` records its device bytes before and after). The parent's cache is not
    touched; the tool message is pending until the next ``generate``.
    """
    from kvcompact.agent.session import Session

    session._require_editable("spawn")
    session._check_live()
    if session._prefix is not None:
        child = session._prefix.session()
    else:
        child = Session(session.model, session.tokenizer, session._new_cache(), rope_style=session._rope_style,
                        prefill_chunk=session.prefill_chunk, **session._renderer_options)
        for m in session.messages:
            if m.role != "system":
                break
            child.add(m.role, m.content, id=m.id, name=m.name)
    child.add("user", task)
    try:
        answer = child.generate(**generate_kwargs)
        used = child.cache.stats().device_bytes
        child_messages = child.messages
    finally:
        ref = weakref.ref(child.cache)
        child.close()
    after = ref().stats().device_bytes if ref() is not None else 0
    del child
    if ref() is not None:  # a cycle through the cache (bound methods, hooks) waits for the collector
        gc.collect()
    session.last_spawn = SpawnRecord(answer, child_messages, used, after, ref() is None)
    session.add("tool", answer, name=name)
    return answer
