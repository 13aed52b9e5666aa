"""``Session``: a chat whose messages are spans of a live KV cache, edited in place.

A session holds the conversation and a :class:`~kvcompact.cache.KVCompactCache` with the KV of every
message it has shown the model. ``generate`` feeds only what is new (the chat template rendered
incrementally, :class:`~kvcompact.agent.template.TemplateRenderer`), and the agent's decisions --
"drop the file read ten steps ago", "replace that tool output by a summary" -- become in-place cache
edits (:mod:`kvcompact.agent.kvedit`) instead of a re-prefill.

State model
-----------
* **Rendered history** (``_entries``): every message ever fed, in order, with the token ids fed
  for it. Dropped messages stay here as tombstones (their tokens are gone from the cache). The
  template is always rendered over this history, so the next increment is exactly what the
  template adds after it, whatever was dropped. Consequence (by design): after ``drop`` the cache
  holds the render of the history *minus the dropped span*. For templates that render each message
  independently (ChatML, Llama 3, ...) that is token for token the render of the remaining
  messages; a template that injects text depending on what is present (e.g. a default system
  prompt when the first message is not ``system``) would render the remaining messages differently
  from what the cache holds -- the cache is not re-rendered.
* **Spans** (``spans``): ``msg_id -> (start, end)`` physical rows of the cache, identical in every
  layer and head. Text the template adds before the first message belongs to the first message;
  the generation prompt waiting for a reply belongs to no message until the reply is appended (it
  then starts the assistant message's span). Pending messages (added, not yet fed) have no span.
* **Positions.** ``drop(reposition=False)`` leaves a gap: later tokens keep their RoPE positions and
  the logical length (next position) is unchanged. ``drop(reposition=True)`` re-rotates later keys
  so positions close the gap, and the logical length shrinks by the span length; the cache then
  has the positions of a fresh prefill of the remaining text (keys equal up to the rotation's
  rounding in layer 0). Tokens after an edited span keep K/V computed while the old text was
  visible, unless ``recompute_tail=True`` re-feeds them (exact; docs/agent.md has the measurements).
* **Budgets.** A session refuses a cache with a token budget: a budget evicts per head, after which a
  message no longer occupies one token range. Memory is controlled at message level instead (drop,
  replace, :func:`~kvcompact.agent.compaction.compact_messages`), plus 8-bit storage.

Example (needs a model, so not a doctest)::

    s = Session(model, tokenizer)
    s.add("system", "You are a coding agent.")
    s.add("user", "What is in src/?")
    s.generate(max_new_tokens=64)
    tool = s.add("tool", big_listing, name="ls")
    s.generate(max_new_tokens=64)
    s.drop(tool, reposition=True)                 # its KV leaves the cache in place
    s.save("ckpt"); s2 = Session.load("ckpt", model, tokenizer)
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from kvcompact.agent import kvedit
from kvcompact.agent.messages import Message, as_message, new_message_id
from kvcompact.agent.template import TemplateRenderer

__all__ = ["Session", "SessionError", "SpawnRecord", "PrefixCache", "PrefixChangedError", "prefix_sha256"]

LIVE, GAP, CLOSED = "live", "gap", "closed"
SESSION_FORMAT = 1


class SessionError(RuntimeError):
    """A session operation that cannot be done on the current cache state (the message says why)."""


class PrefixChangedError(ValueError):
    """The prefix handed to :meth:`PrefixCache.session` differs from the cached one."""


@dataclass
class _Entry:
    message: Message
    ids: list  # token ids fed for this message (virtual: kept after a drop)
    state: str = LIVE  # live | gap (dropped, positions kept) | closed (dropped, positions closed)


@dataclass
class SpawnRecord:
    """What :meth:`Session.spawn` did: the answer and the child cache's device bytes around its free."""

    answer: str
    child_messages: list
    child_device_bytes: int
    child_device_bytes_after_free: int
    child_cache_collected: bool = False


def prefix_sha256(token_ids: Sequence[int]) -> str:
    """sha256 of a token id sequence (int64 little-endian), the identity of a cached prefix."""
    return hashlib.sha256(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """A conversation over a live, editable KV cache (see the module docstring for the state model).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM with RoPE (Llama family and alike); used for every forward.
    tokenizer : transformers.PreTrainedTokenizerBase
        With a chat template (or pass ``chat_template``).
    cache : KVCompactCache, optional
        Empty, without a token budget, full-attention layers only. Default:
        ``KVCompactCache(model.config)`` (lossless, model dtype).
    chat_template, tools, tool_fallback, verify_tokens, template_kwargs
        Passed to :class:`~kvcompact.agent.template.TemplateRenderer`.
    rope_style : {"neox", "gptj"}, optional
        Key layout for re-rotation; guessed from ``model_type`` by default.
    prefill_chunk : int
        Max tokens per forward when feeding (bounds activation memory).

    Attributes
    ----------
    cache : KVCompactCache
    renderer : TemplateRenderer
    last_spawn : SpawnRecord or None
    fed_tokens : int
        Tokens fed to the model by this session so far (prefill + decode + splices).
    """

    def __init__(self, model, tokenizer, cache=None, *, chat_template: str | None = None, tools: list | None = None,
                 tool_fallback: str = "auto", verify_tokens: bool = True,
                 template_kwargs: Mapping[str, Any] | None = None, rope_style: str | None = None,
                 prefill_chunk: int = 1024):
        from kvcompact.cache import KVCompactCache

        self.model = model
        self.tokenizer = tokenizer
        if cache is None:
            cache = KVCompactCache(model.config)
        # Any transformers Cache can hold an append-only conversation (add/generate:
        # the demo's DynamicCache baseline); in-place edits need a KVCompactCache.
        self._editable = isinstance(cache, KVCompactCache)
        if self._editable:
            kvedit.check_editable(cache)
        if cache.get_seq_length() != 0:
            raise ValueError("Session needs an empty cache (use PrefixCache.session or Session.load to start "
                             "from computed KV)")
        self.cache = cache
        self._renderer_options = dict(chat_template=chat_template, tools=tools, tool_fallback=tool_fallback,
                                      verify_tokens=verify_tokens, template_kwargs=dict(template_kwargs or {}))
        self.renderer = TemplateRenderer(tokenizer, **self._renderer_options)
        self._rope_style = rope_style
        self._rope = None
        self.prefill_chunk = int(prefill_chunk)
        self._entries: list[_Entry] = []
        self._pending: list[Message] = []
        self._gen_tail: list = []  # generation-prompt tokens at the end of the cache
        self._gen_prompt = False
        self._cache_ids: list = []  # physical token ids, in cache order
        self._prefix: PrefixCache | None = None
        self._parked = None
        self.last_spawn: SpawnRecord | None = None
        self.fed_tokens = 0

    # ------------------------------------------------------------------ views

    @property
    def messages(self) -> list:
        """The conversation now: fed messages that were not dropped, then pending ones (a copy)."""
        return [e.message for e in self._entries if e.state == LIVE] + list(self._pending)

    @property
    def spans(self) -> dict:
        """``msg_id -> (start, end)``: physical cache rows of each fed, live message."""
        out, p = {}, 0
        for e in self._entries:
            if e.state == LIVE:
                out[e.message.id] = (p, p + len(e.ids))
                p += len(e.ids)
        return out

    @property
    def token_ids(self) -> list:
        """Token ids held by the cache, in physical order (a copy)."""
        return list(self._cache_ids)

    def positions(self) -> list:
        """RoPE position of every physical token (gaps left by ``drop(reposition=False)`` show)."""
        out, p = [], 0
        for e in self._entries:
            if e.state == LIVE:
                out.extend(range(p, p + len(e.ids)))
            if e.state in (LIVE, GAP):
                p += len(e.ids)
        out.extend(range(p, p + len(self._gen_tail)))
        return out

    def _history(self) -> list:
        return [e.message for e in self._entries]

    def _virtual_ids(self) -> list:
        ids: list = []
        for e in self._entries:
            ids.extend(e.ids)
        return ids + self._gen_tail

    def _target_ids(self) -> list:
        ids: list = []
        for e in self._entries:
            if e.state == LIVE:
                ids.extend(e.ids)
        return ids + self._gen_tail

    def _rope_params(self):
        if self._rope is None:
            self._rope = kvedit.rope_params(self.model, self._rope_style)
        return self._rope

    def _require_editable(self, op: str) -> None:
        if not self._editable:
            raise TypeError(f"Session.{op} edits the cache in place and needs a KVCompactCache; this session "
                            f"holds a {type(self.cache).__name__} (append-only: add and generate work)")

    def _check_live(self) -> None:
        if self._parked is not None:
            raise SessionError("the session is parked; call resume() first")
        if self.cache is None:
            raise SessionError("the session was closed")

    # ------------------------------------------------------------------ messages in

    def add(self, role: str, content: str, *, name: str | None = None, tool_call_id: str | None = None,
            tool_calls: list | None = None, id: str | None = None, metadata: dict | None = None) -> str:
        """Append a message (fed at the next ``generate``/``prefill``); returns its id."""
        msg = Message(role, content, id=id or new_message_id(), name=name, tool_call_id=tool_call_id,
                      tool_calls=tool_calls, metadata=dict(metadata or {}))
        if any(m.id == msg.id for m in self._history() + self._pending):
            raise ValueError(f"add: a message with id {msg.id!r} already exists in this session")
        self._pending.append(msg)
        return msg.id

    def add_message(self, message: Message | Mapping) -> str:
        """Append a :class:`Message` (or an OpenAI-style dict) as is; returns its id."""
        m = as_message(message)
        return self.add(m.role, m.content, name=m.name, tool_call_id=m.tool_call_id, tool_calls=m.tool_calls,
                        id=m.id, metadata=m.metadata)

    # ------------------------------------------------------------------ feeding

    def _retract_virtual(self, count: int) -> None:
        while count:
            if self._gen_tail:
                self._gen_tail.pop()
            elif self._entries and self._entries[-1].state == LIVE and self._entries[-1].ids:
                self._entries[-1].ids.pop()
            elif self._entries and not self._entries[-1].ids:
                self._entries.pop()  # an emptied entry (only through deep retraction)
                continue
            else:
                raise SessionError(
                    "the template increment would take back tokens of a dropped message (the previous render "
                    "does not end where the cache does); re-prefill this conversation")
            count -= 1

    def _render_virtual(self, add_generation_prompt: bool) -> None:
        """Bring the rendered history up to date with pending messages (no model call)."""
        hist = self._history()
        prev_gp = self._gen_prompt
        for m in self._pending:
            inc = self.renderer.render_increment(hist + [m], len(hist), False, previous_generation_prompt=prev_gp,
                                                 previous_ids=self._virtual_ids())
            self._retract_virtual(inc.retract_tokens)
            carried, self._gen_tail = self._gen_tail, []  # e.g. "<|im_start|>" shared with a tool message
            self._entries.append(_Entry(m, carried + list(inc.token_ids)))
            hist.append(m)
            prev_gp = False
        self._pending = []
        if add_generation_prompt and not prev_gp:
            inc = self.renderer.render_increment(hist, len(hist), True, previous_generation_prompt=False,
                                                 previous_ids=self._virtual_ids())
            self._retract_virtual(inc.retract_tokens)
            self._gen_tail.extend(inc.token_ids)
        elif not add_generation_prompt and prev_gp:
            inc = self.renderer.render_increment(hist, len(hist), False, previous_generation_prompt=True,
                                                 previous_ids=self._virtual_ids())
            self._retract_virtual(inc.retract_tokens)
            self._gen_tail.extend(inc.token_ids)
        self._gen_prompt = add_generation_prompt

    @torch.no_grad()
    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Feed ``ids`` after the cache's tokens; logits of the last one ``[vocab]``."""
        device = next(self.model.parameters()).device
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([list(ids[i:i + self.prefill_chunk])], dtype=torch.long, device=device)
            out = self.model(input_ids=chunk, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
        self.fed_tokens += len(ids)
        return logits

    def _sync_physical(self, need_logits: bool = False) -> torch.Tensor | None:
        """Make the cache hold ``_target_ids()``: crop the divergent tail, feed the rest."""
        target = self._target_ids()
        keep = _common_prefix(self._cache_ids, target)
        if need_logits and keep == len(target):
            keep -= 1  # nothing new: re-feed the last token to get its logits
        if keep < len(self._cache_ids):
            self.cache.crop(-(len(self._cache_ids) - keep))
            del self._cache_ids[keep:]
        logits = None
        if keep < len(target):
            logits = self._forward(target[keep:])
            self._cache_ids.extend(target[keep:])
        return logits

    def prefill(self) -> None:
        """Feed pending messages now (without a generation prompt)."""
        self._check_live()
        self._render_virtual(False)
        self._sync_physical()

    # ------------------------------------------------------------------ generation

    def _eos_ids(self, eos_token_id) -> set:
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = self.tokenizer.eos_token_id
        ids = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in self.tokenizer.get_vocab() else None
        if end is not None:
            ids.add(end)
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def generate(self, max_new_tokens: int = 128, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 generator: torch.Generator | None = None) -> str:
        """Feed what is new, decode a reply, append it as an assistant message; returns its text.

        Greedy by default; ``do_sample=True`` samples with ``temperature``/``top_k``/``top_p``.
        Decoding stops at an end-of-turn token or after ``max_new_tokens``. The reply's canonical
        end (``<|im_end|>\\n`` for ChatML) is fed before returning, so the cache holds the whole
        reply and the next turn feeds only new messages.
        """
        self._check_live()
        self._render_virtual(True)
        logits = self._sync_physical(need_logits=True)
        eos = self._eos_ids(eos_token_id)
        generated: list = []
        for step in range(max_new_tokens):
            tok = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
            generated.append(tok)
            if tok in eos or step == max_new_tokens - 1:
                break
            logits = self._forward([tok])
            self._cache_ids.append(tok)
            self._gen_tail.append(tok)
        text_ids = generated[:-1] if generated and generated[-1] in eos else generated
        reply = Message("assistant", self.tokenizer.decode(text_ids, skip_special_tokens=True))
        # The fed generated tokens become the reply's entry (gen prompt first), then the canonical
        # increment completes it (the end-of-turn tokens, or a re-tokenized tail if the model's
        # tokens were not the tokenizer's own for this text).
        hist = self._history()
        vids_before = self._virtual_ids()
        inc = self.renderer.render_increment(hist + [reply], len(hist), False, previous_generation_prompt=True,
                                             previous_ids=vids_before)
        self._retract_virtual(inc.retract_tokens)
        self._entries.append(_Entry(reply, self._gen_tail + list(inc.token_ids)))
        self._gen_tail = []
        self._gen_prompt = False
        self._sync_physical()
        return reply.content

    @torch.no_grad()
    def next_token_logits(self) -> torch.Tensor:
        """Feed what is new plus the generation prompt; the logits ``[vocab]`` of the reply's first token.

        Nothing is generated or appended (the generation prompt stays in the cache, as before
        ``generate``).
        """
        self._check_live()
        self._render_virtual(True)
        return self._sync_physical(need_logits=True)

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> int:
        if not do_sample:
            return int(torch.argmax(logits))
        scores = logits.float() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        if top_p is not None and top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cut = torch.cumsum(sp, -1) - sp > top_p
            sp = sp.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    # ------------------------------------------------------------------ edits

    def _find(self, msg_id: str) -> int:
        for k, e in enumerate(self._entries):
            if e.message.id == msg_id:
                if e.state != LIVE:
                    raise KeyError(f"message {msg_id!r} was already dropped")
                return k
        raise KeyError(f"no message with id {msg_id!r} in this session")

    def _position_of(self, k: int) -> int:
        return sum(len(e.ids) for e in self._entries[:k] if e.state in (LIVE, GAP))

    def _recompute_from(self, row: int) -> int:
        """Crop physical rows ``[row, end)`` and feed them again (exact tail); returns tokens re-fed."""
        m = len(self._cache_ids) - row
        if m > 0:
            self.cache.crop(-m)
            del self._cache_ids[row:]
            self._sync_physical()
        return max(m, 0)

    def drop(self, msg_id: str, *, reposition: bool = False, recompute_tail: bool = False) -> int:
        """Evict a message's tokens from the cache in place; returns how many were evicted.

        ``reposition=False``: later tokens keep their positions (a gap remains; the logical length
        is unchanged). ``reposition=True``: later keys are re-rotated by ``-span`` so positions close
        the gap, and the logical length shrinks by the span. The message leaves ``messages``; later
        spans shift down. A pending (not yet fed) message is just removed.

        ``recompute_tail=True`` then re-feeds the tokens after the span, so their K/V no longer
        carry what the dropped message said: exact (equal to a re-prefill of the remaining
        messages with ``reposition=True``), at the cost of a forward over the tail only.
        """
        self._require_editable("drop")
        self._check_live()
        for i, m in enumerate(self._pending):
            if m.id == msg_id:
                del self._pending[i]
                return 0
        k = self._find(msg_id)
        start, end = self.spans[msg_id]
        kvedit.evict_span(self.cache, start, end)
        length = end - start
        if reposition and length:
            inv, style = self._rope_params()
            kvedit.shift_keys(self.cache, start, len(self._cache_ids) - length, -length, inv, style)
            for layer in kvedit.attention_layers(self.cache):
                layer.set_lengths(physical=layer.physical_len, logical=layer.logical_len - length,
                                  tail_contiguous=layer._tail_contiguous)
        del self._cache_ids[start:end]
        self._entries[k].state = CLOSED if reposition else GAP
        if recompute_tail:
            self._recompute_from(start)
        return length

    def replace(self, msg_id: str, text: str, *, recompute_tail: bool = False) -> tuple:
        """Splice ``text`` in place of a message's content; returns ``(old_tokens, new_tokens)``.

        The new message's tokens are rendered in context; ``move_`` opens or closes the gap; one
        forward computes the new tokens' KV against the tokens before the span (nothing after it);
        the keys after it are re-rotated by the length change. Tokens after the span are NOT
        recomputed: their KV still reflects the old text (see docs/agent.md for the measured
        effect). ``recompute_tail=True`` instead crops the cache at the span and feeds the new text
        and everything after it again: exact (a re-prefill from the span on), cost proportional to
        the tail. A pending message is replaced without touching the cache.
        """
        self._require_editable("replace")
        self._check_live()
        for i, m in enumerate(self._pending):
            if m.id == msg_id:
                self._pending[i] = dataclasses.replace(m, content=text)
                return (0, 0)
        k = self._find(msg_id)
        old = self._entries[k]
        new_msg = dataclasses.replace(old.message, content=text)
        hist = self._history()
        before = [i for e in self._entries[:k] for i in e.ids]
        inc = self.renderer.render_increment(hist[:k] + [new_msg], k, False, previous_ids=before)
        if inc.retract_tokens:
            raise SessionError(f"replace: the new text of {msg_id!r} merges with the tokens before it "
                               f"({inc.retract_tokens} would change); replace is only possible at a token boundary")
        new_ids = list(inc.token_ids)
        if k + 1 < len(self._entries):
            nxt = self.renderer.render_increment(hist[:k] + [new_msg, hist[k + 1]], k + 1, False,
                                                 previous_ids=before + new_ids)
            if nxt.retract_tokens or list(nxt.token_ids) != self._entries[k + 1].ids:
                raise SessionError(f"replace: with the new text of {msg_id!r} the next message would tokenize "
                                   "differently; replace is only possible at a token boundary")
        start, end = self.spans[msg_id]
        if recompute_tail:
            self.cache.crop(-(len(self._cache_ids) - start))
            del self._cache_ids[start:]
            self._entries[k] = _Entry(new_msg, new_ids, LIVE)
            self._sync_physical()
            return (end - start, len(new_ids))
        inv, style = self._rope_params()

        def forward():
            self._forward(new_ids)

        kvedit.splice(self.cache, start, end, len(new_ids), self._position_of(k), forward, inv, style)
        self._cache_ids[start:end] = new_ids
        self._entries[k] = _Entry(new_msg, new_ids, LIVE)
        return (end - start, len(new_ids))

    # ------------------------------------------------------------------ sub-agents, parking, lifetime

    def _new_cache(self):
        from kvcompact.cache import KVCompactCache

        c = self.cache
        return KVCompactCache(self.model.config, kv_dtype=c.kv_dtype, group_size=c.group_size, residual=c.residual)

    def spawn(self, task: str, *, name: str = "subagent", **generate_kwargs) -> str:
        """Run a child session on ``task`` and record its answer here as a tool message.

        The child starts from the shared prefix: this session's :class:`PrefixCache` (a copy of its
        KV, nothing recomputed) or, without one, this session's leading system messages (prefilled
        in the child). It gets a fresh cache of the same storage format, answers with
        ``generate(**generate_kwargs)``, and its cache is freed before this returns
        (``last_spawn`` records its device bytes before and after). This session's cache is not
        touched; the tool message is pending until the next ``generate``.
        """
        self._require_editable("spawn")
        self._check_live()
        if self._prefix is not None:
            child = self._prefix.session()
        else:
            child = Session(self.model, self.tokenizer, self._new_cache(), rope_style=self._rope_style,
                            prefill_chunk=self.prefill_chunk, **self._renderer_options)
            for m in self.messages:
                if m.role != "system":
                    break
                child.add(m.role, m.content, id=m.id, name=m.name)
        child.add("user", task)
        answer = child.generate(**generate_kwargs)
        used = child.cache.stats().device_bytes
        child_messages = child.messages
        ref = weakref.ref(child.cache)
        child.close()
        after = sum(layer.storage.nbytes for layer in kvedit.attention_layers(ref())) if ref() is not None else 0
        del child
        if ref() is not None:  # the cache's layers hold bound methods of it: a cycle for the collector
            import gc

            gc.collect()
        self.last_spawn = SpawnRecord(answer, child_messages, used, after, ref() is None)
        self.add("tool", answer, name=name)
        return answer

    def close(self) -> None:
        """Free the cache's buffers and workspace; the session can no longer be used."""
        if self.cache is not None:
            self.cache.reset()
            self.cache.release_workspace()
        self.cache = None
        self._cache_ids = []

    def _buffers(self) -> list:
        """``(layer, attribute)`` of every cache buffer (token buffers and residual shadows)."""
        out = []
        for layer in kvedit.attention_layers(self.cache):
            if not layer.is_initialized:
                continue
            names = list(layer.storage._shapes(0))
            if layer.storage.residual:
                names += ["key_shadow", "value_shadow"]
            out.extend((layer, n) for n in names)
        return out

    def park(self, pool=None) -> int:
        """Move the cache to pinned host memory (``kvcompact.offload``); returns bytes parked.

        The device buffers are released (device memory returns to the allocator once the copy has
        read them; on CPU the copy is synchronous). Every other method raises until
        :meth:`resume`. ``pool``: a :class:`~kvcompact.offload.PinnedPool` to use (default: one
        sized for this cache, allocated here; on a CPU-only machine it is ordinary memory).
        """
        self._require_editable("park")
        from kvcompact.offload import PinnedPool, SessionParker

        self._check_live()
        bufs = self._buffers()
        tensors = [getattr(layer.storage, n) for layer, n in bufs]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if pool is None:
            pool = PinnedPool(nbytes + 4096 * (len(tensors) + 1), allow_pageable_fallback=True)
        parker = SessionParker(pool)
        handle = parker.park(tensors)
        for (layer, n), t in zip(bufs, tensors):
            setattr(layer.storage, n, t.new_empty((0,) * t.dim()))
        del tensors
        self._parked = (parker, handle, bufs)
        return handle.nbytes

    def resume(self) -> None:
        """Bring a parked cache back to the device (blocks the current stream until it is there)."""
        if self._parked is None:
            return
        parker, handle, bufs = self._parked
        device = next(self.model.parameters()).device
        restored = parker.resume(handle, device=device)
        restored.wait()
        for (layer, n), t in zip(bufs, restored.tensors):
            setattr(layer.storage, n, t)
        self._parked = None

    @property
    def parked(self) -> bool:
        return self._parked is not None

    # ------------------------------------------------------------------ checkpoints

    def save(self, path) -> None:
        """Write a checkpoint directory (atomic, checksummed; see :mod:`kvcompact.agent.checkpoint`).

        Holds the messages (including dropped tombstones, which the template rendering needs), the
        token ids of each, the cache buffers (codes, scales, residual shadows: only the valid rows),
        per-layer lengths, renderer options and the model identity.
        """
        self._require_editable("save")
        from kvcompact.agent.session_io import save_session

        self._check_live()
        save_session(self, path)

    @classmethod
    def load(cls, path, model, tokenizer, **session_kwargs) -> "Session":
        """Restore a session saved by :meth:`save` for ``model``/``tokenizer``.

        Raises :class:`~kvcompact.agent.checkpoint.CheckpointError` on corruption, an unknown format,
        another model (identity check), or a tokenizer/template that renders the saved messages
        differently from the saved tokens.
        """
        from kvcompact.agent.session_io import load_session

        return load_session(cls, path, model, tokenizer, **session_kwargs)


class PrefixCache:
    """The KV of a shared prefix (system prompt, tool schemas), computed once, copied into sessions.

    Parameters
    ----------
    model, tokenizer
        As for :class:`Session`.
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
        from kvcompact.cache import KVCompactCache

        if isinstance(messages_or_text, str):
            messages = [Message("system", messages_or_text)]
        else:
            messages = [as_message(m) for m in messages_or_text]
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
        self.token_ids = list(base._cache_ids)
        self.sha256 = prefix_sha256(self.token_ids)

    def check(self, messages_or_text) -> None:
        """Raise :class:`PrefixChangedError` if this prefix renders to other tokens than the cached ones."""
        msgs = [Message("system", messages_or_text)] if isinstance(messages_or_text, str) else \
            [as_message(m) for m in messages_or_text]
        ids = self._base.renderer.render_ids(msgs)
        if prefix_sha256(ids) != self.sha256:
            at = _common_prefix(ids, self.token_ids)
            lo = max(0, at - 8)
            raise PrefixChangedError(
                f"the prefix changed: its sha256 is {prefix_sha256(ids)[:16]}..., the cached prefix's "
                f"{self.sha256[:16]}...; first difference at token {at}: cached "
                f"{self.tokenizer.decode(self.token_ids[lo:at + 8])!r}, now {self.tokenizer.decode(ids[lo:at + 8])!r}. "
                "Text that changes per run (a timestamp, a random id) in the system prompt defeats prefix reuse: "
                "move it after the prefix, or build a new PrefixCache")

    def session(self, prefix=None, **overrides) -> Session:
        """A new :class:`Session` whose cache starts as a copy of the prefix KV (no prefix token is fed).

        ``prefix``: the prefix as the caller built it this time (str or messages); when given it is
        checked against the cached one (:meth:`check`) first.
        """
        import copy

        if prefix is not None:
            self.check(prefix)
        kwargs = {**self.session_kwargs, **overrides}
        s = Session(self.model, self.tokenizer, self._base._new_cache(), **kwargs)
        s.cache = copy.deepcopy(self._base.cache)
        s.cache.release_workspace()
        s._entries = [_Entry(e.message, list(e.ids), e.state) for e in self._base._entries]
        s._cache_ids = list(self._base._cache_ids)
        s._prefix = self
        return s

    @property
    def stats(self):
        return self._base.cache.stats()
