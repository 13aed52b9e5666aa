"""``Session``: a chat whose messages are spans of a live KV cache, edited in place.

A session holds the conversation and a :class:`~kvcompact.cache.KVCompactCache` with the KV of every
message it has shown the model. ``generate`` feeds only what is new (the chat template rendered
incrementally, :class:`~kvcompact.agent.template.TemplateRenderer`), and the agent's decisions --
"drop the file read ten steps ago", "replace that tool output by a summary" -- become in-place cache
edits (the cache's own edit API, driven by :mod:`kvcompact.agent.edits`) instead of a re-prefill.

This module holds the state and the feeding (``add``, ``prefill``, ``generate``). The other jobs
live beside it, each in its own module, and ``Session``'s methods delegate to them:
:mod:`~kvcompact.agent.sampling` (token picking), :mod:`~kvcompact.agent.edits` (``drop``,
``replace``), :mod:`~kvcompact.agent.spawn` (sub-agents), :mod:`~kvcompact.agent.park`
(parking), :mod:`~kvcompact.agent.session_io` (``save``/``load``) and
:mod:`~kvcompact.agent.prefix` (:class:`PrefixCache`).

State model
-----------
* **Rendered history** (``_entries``, :class:`~kvcompact.agent.entries.Entry`): every message ever
  fed, in order, with the token ids fed for it. Dropped messages stay here as tombstones (their
  tokens are gone from the cache). The template is always rendered over this history, so the next
  increment is exactly what the template adds after it, whatever was dropped. Consequence (by
  design): after ``drop`` the cache holds the render of the history *minus the dropped span*. For
  templates that render each message independently (ChatML, Llama 3, ...) that is token for token
  the render of the remaining messages; a template that injects text depending on what is present
  (e.g. a default system prompt when the first message is not ``system``) would render the
  remaining messages differently from what the cache holds -- the cache is not re-rendered.
* **Physical ids** (``_cache_ids``): the token ids the cache holds, in row order. Invariant: the
  cache holds exactly these, always -- also after a forward that raised (see *Failures*).
* **Spans** (``spans``): ``msg_id -> (start, end)`` physical rows of the cache, identical in every
  layer and head. Text the template adds before the first message belongs to the first message;
  the generation prompt waiting for a reply belongs to no message until the reply is appended (it
  then starts the assistant message's span). Pending messages (added, not yet fed) have no span.
* **Positions.** ``drop(reposition=True)`` (the default) re-rotates later keys so positions close
  the gap, and the logical length shrinks by the span length; the cache then has the positions of
  a fresh prefill of the remaining text (keys equal up to the rotation's rounding in layer 0).
  ``drop(reposition=False)`` leaves a gap: later tokens keep their RoPE positions and the logical
  length (next position) is unchanged; it skips the re-rotation, but ``kvcompact eval`` measures
  it answering worse (docs/eval.md), so it is opt-in. Tokens after an edited span keep K/V computed while the old text was
  visible, unless ``recompute_tail=True`` re-feeds them (exact; docs/agent.md has the measurements)
  or ``repair=f`` recomputes the fraction ``f`` of them the edit changed most
  (:mod:`~kvcompact.agent.repair`).
* **Budgets.** A session refuses a cache with a token budget: a budget evicts per head, after which a
  message no longer occupies one token range. Memory is controlled at message level instead (drop,
  replace, :func:`~kvcompact.agent.compaction.compact_messages`), plus 8-bit storage.

Failures
--------
A forward that raises (out of memory, ``KeyboardInterrupt``, a token id the model does not know)
never leaves the session believing the cache holds other tokens than it does:

* ``replace``: the cache's ``splice`` restores the cache exactly and the original exception
  propagates; the session's messages, token ids and spans are unchanged.
* Feeding (``prefill``, ``generate``, ``next_token_logits``, ``recompute_tail``): input is fed in
  chunks of ``prefill_chunk`` tokens; the chunks that completed stay in the cache (and in
  ``token_ids``), the failing chunk is cropped back out, the original exception propagates, and
  the next call feeds what is still missing. Only when the forward stopped between two layers (some
  layers hold the chunk, others not -- no crop can make them agree) is the session marked unusable:
  every later call raises :class:`SessionError` saying so (``close`` still works; rebuild the
  session from its messages or a checkpoint).

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

from typing import Any, Callable, Mapping, Sequence

import torch

from kvcompact.agent.entries import GAP, LIVE, Entry, SessionError
from kvcompact.agent.messages import Message, as_message, new_message_id
from kvcompact.agent.prefix import PrefixCache, PrefixChangedError, common_prefix, prefix_sha256
from kvcompact.agent.sampling import eos_ids, find_stop, pick_token, settled_length, stop_strings
from kvcompact.agent.spawn import SpawnRecord
from kvcompact.agent.template import TemplateRenderer
from kvcompact.cache import compat

__all__ = ["Session", "SessionError", "SpawnRecord", "PrefixCache", "PrefixChangedError", "prefix_sha256"]

# Kept importable from here for code written before the split.
_Entry = Entry


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
        ``KVCompactCache(model.config)`` (lossless, model dtype). Any other transformers ``Cache``
        (e.g. ``DynamicCache``) works append-only: ``add``/``generate``, no edits.
    chat_template, tools, tool_fallback, verify_tokens, template_kwargs
        Passed to :class:`~kvcompact.agent.template.TemplateRenderer`.
    rope_style : {"neox", "gptj"}, optional
        Key layout for re-rotation; guessed from ``model_type`` by default.
    prefill_chunk : int
        Max tokens per forward when feeding (bounds activation memory, and what a failed forward
        takes back; see *Failures* in the module docstring).
    attention : bool, optional
        Compute the attention of short forwards (decode steps) from the cache's storage with
        :func:`kvcompact.ops.decode_attention` (see ``kvcompact.attach``): 8-bit codes and a shared
        prefix are read in place, with no dequantized or concatenated workspace. Default: on for a
        ``KVCompactCache`` with 8-bit storage or a shared prefix, when the model's attention
        implementation allows it ("sdpa" or "eager"); ``True`` raises if it does not.

    Attributes
    ----------
    cache : KVCompactCache
    renderer : TemplateRenderer
    last_spawn : SpawnRecord or None
    last_tool_call : kvcompact.agent.park.ToolCallRecord or None
        The latest :meth:`tool_call`: name, bytes parked, the tool's time, the model's wait for
        the resume copy.
    last_finish_reason : str or None
        Why the last :meth:`generate` ended: ``"stop"`` (end of turn or a stop string) or
        ``"length"`` (``max_new_tokens`` reached); None before the first.
    fed_tokens : int
        Tokens fed to the model by this session so far (prefill + decode + splices).
    """

    def __init__(self, model, tokenizer, cache=None, *, chat_template: str | None = None, tools: list | None = None,
                 tool_fallback: str = "auto", verify_tokens: bool = True,
                 template_kwargs: Mapping[str, Any] | None = None, rope_style: str | None = None,
                 prefill_chunk: int = 1024, attention: bool | None = None):
        from kvcompact.cache import KVCompactCache

        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        self.model = model
        self.tokenizer = tokenizer
        if cache is None:
            cache = KVCompactCache(model.config)
        # Any transformers Cache can hold an append-only conversation (add/generate:
        # the demo's DynamicCache baseline); in-place edits need a KVCompactCache.
        self._editable = isinstance(cache, KVCompactCache)
        if self._editable:
            cache.check_editable()
        if cache.get_seq_length() != 0:
            raise ValueError("Session needs an empty cache (use PrefixCache.session or Session.load to start "
                             "from computed KV)")
        self.cache = cache
        self._renderer_options = dict(chat_template=chat_template, tools=tools, tool_fallback=tool_fallback,
                                      verify_tokens=verify_tokens, template_kwargs=dict(template_kwargs or {}))
        self.renderer = TemplateRenderer(tokenizer, **self._renderer_options)
        self._rope_style = rope_style
        self._rope = None
        self.prefill_chunk = prefill_chunk
        if attention is not None and not isinstance(attention, bool):
            raise ValueError(f"attention must be None, True or False, got {attention!r}")
        if attention and not self._editable:
            raise ValueError(f"attention=True needs a KVCompactCache, got {type(cache).__name__}")
        if attention:
            from kvcompact.cache.attention import can_route

            why = can_route(model)
            if why is not None:
                raise ValueError(f"attention=True: cannot route {type(model).__name__}: {why}")
        self.attention = attention
        self._model_routable: bool | None = None  # see _routes_attention
        self._entries: list[Entry] = []
        self._pending: list[Message] = []
        self._gen_tail: list = []  # generation-prompt tokens at the end of the cache
        self._gen_prompt = False
        self._cache_ids: list = []  # physical token ids, in cache order
        self._prefix: PrefixCache | None = None
        self._parked = None
        self._resume_record = None  # a tool_call whose resume wait is measured at the next forward
        self._broken: str | None = None  # why the cache no longer matches _cache_ids (see _recover)
        self.last_spawn: SpawnRecord | None = None
        self.last_tool_call = None
        self.last_finish_reason: str | None = None  # of the last generate(): "stop" or "length"
        self.fed_tokens = 0
        self.last_repair = None  # the RepairResult of the last edit with repair=

    def _adopt(self, cache, entries: list, *, pending=(), gen_tail=(), gen_prompt: bool = False,
               prefix: PrefixCache | None = None) -> None:
        """Take over a cache that already holds ``entries``' live tokens (a prefix copy, a checkpoint)."""
        self.cache = cache
        self._entries = list(entries)
        self._pending = list(pending)
        self._gen_tail = list(gen_tail)
        self._gen_prompt = bool(gen_prompt)
        self._cache_ids = self._target_ids()
        self._prefix = prefix

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

    @property
    def parked(self) -> bool:
        return self._parked is not None

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
            from kvcompact.rope import rope_params

            self._rope = rope_params(self.model, self._rope_style)
        return self._rope

    def _require_editable(self, op: str) -> None:
        if not self._editable:
            raise TypeError(f"Session.{op} edits the cache in place and needs a KVCompactCache; this session "
                            f"holds a {type(self.cache).__name__} (append-only: add and generate work)")

    def _check_live(self) -> None:
        if self._broken is not None:
            raise SessionError(self._broken)
        if self._parked is not None:
            raise SessionError("the session is parked; call resume() first")
        if self.cache is None:
            raise SessionError("the session was closed")

    def _find(self, msg_id: str) -> int:
        for k, e in enumerate(self._entries):
            if e.message.id == msg_id:
                if e.state != LIVE:
                    raise KeyError(f"message {msg_id!r} was already dropped")
                return k
        raise KeyError(f"no message with id {msg_id!r} in this session")

    def _position_of(self, k: int) -> int:
        """RoPE position of entry ``k``'s first token."""
        return sum(len(e.ids) for e in self._entries[:k] if e.state in (LIVE, GAP))

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

    # ------------------------------------------------------------------ rendering (no model call)

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
            self._entries.append(Entry(m, carried + list(inc.token_ids)))
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

    # ------------------------------------------------------------------ feeding

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _model_step(self, ids: Sequence[int]) -> torch.Tensor:
        """One forward of ``ids`` after the cache's tokens; logits of the last one ``[vocab]``.

        The cache goes in as ``cache=`` (``past_key_values=`` on transformers before 5.24), through
        ``compat.cache_kwargs``.
        """
        if self._resume_record is not None:
            from kvcompact.agent.park import settle_resume

            settle_resume(self)
        chunk = torch.tensor([list(ids)], dtype=torch.long, device=self._device())
        with self._attention_scope():
            out = self.model(input_ids=chunk, use_cache=True, logits_to_keep=1, **compat.cache_kwargs(self.cache))
        self.fed_tokens += len(ids)
        return out.logits[0, -1]

    def _attention_scope(self):
        """Where forwards run: routed through ``decode_attention`` (see ``attention`` in the class
        docstring) or as the model is."""
        import contextlib

        if not self._routes_attention():
            return contextlib.nullcontext()
        from kvcompact.cache.attention import route

        return route(self.model, self.cache)

    def _routes_attention(self) -> bool:
        if self.attention is not None:
            return self.attention
        if not self._editable:
            return False
        if self.cache.kv_dtype is None and not self.cache.shares_prefix:
            return False
        if self._model_routable is None:  # a property of the model: asked once, not per forward
            from kvcompact.cache.attention import can_route

            self._model_routable = can_route(self.model) is None
        return self._model_routable

    def _run(self, ids: Sequence[int]) -> torch.Tensor | None:
        """Feed ``ids`` in chunks with no bookkeeping (a splice's forward: the cache rolls it back)."""
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            logits = self._model_step(ids[i:i + self.prefill_chunk])
        return logits

    def _layer_lengths(self) -> list:
        return [self.cache.get_seq_length(i) for i in range(len(self.cache))]

    def _feed(self, ids: Sequence[int]) -> torch.Tensor | None:
        """Feed ``ids`` after ``_cache_ids`` in chunks, extending ``_cache_ids`` chunk by chunk."""
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            chunk = list(ids[i:i + self.prefill_chunk])
            before = self._layer_lengths()
            try:
                logits = self._model_step(chunk)
            except BaseException as err:
                self._recover(before, len(chunk), err)
                raise
            self._cache_ids.extend(chunk)
        return logits

    def _recover(self, before: list, q: int, err: BaseException) -> None:
        """After a forward of ``q`` tokens raised: crop what it wrote, or mark the session unusable."""
        try:
            now = self._layer_lengths()
            grown = {n - (before[i] if i < len(before) else 0) for i, n in enumerate(now)}
            if grown <= {0}:
                return  # it failed before any layer wrote (e.g. a bad token id in the embedding)
            if grown == {q}:
                self.cache.crop(-q)  # every layer appended the chunk: the newest q rows, croppable
                return
        except Exception as crop_err:  # noqa: BLE001 - reported through _broken, err propagates
            detail = f"; rolling back failed too ({type(crop_err).__name__}: {crop_err})"
        else:
            detail = f" (layers grew by {sorted(grown)} tokens)"
        self._broken = (f"the session is unusable: a forward of {q} tokens stopped midway "
                        f"({type(err).__name__}: {err}) and left the cache's layers holding different "
                        f"tokens{detail}; rebuild the session from its messages or a checkpoint")

    def _sync_physical(self, need_logits: bool = False) -> torch.Tensor | None:
        """Make the cache hold ``_target_ids()``: crop the divergent tail, feed the rest."""
        target = self._target_ids()
        keep = common_prefix(self._cache_ids, target)
        if need_logits and keep == len(target):
            keep -= 1  # nothing new: re-feed the last token to get its logits
        if keep < len(self._cache_ids):
            self.cache.crop(-(len(self._cache_ids) - keep))
            del self._cache_ids[keep:]
        logits = None
        if keep < len(target):
            logits = self._feed(target[keep:])
        return logits

    def prefill(self) -> None:
        """Feed pending messages now (without a generation prompt)."""
        self._check_live()
        self._render_virtual(False)
        self._sync_physical()

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, max_new_tokens: int = 128, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 generator: torch.Generator | None = None, stop: str | Sequence[str] | None = None,
                 on_token: Callable[[str], Any] | None = None) -> str:
        """Feed what is new, decode a reply, append it as an assistant message; returns its text.

        Greedy by default; ``do_sample=True`` samples with ``temperature``/``top_k``/``top_p``
        (:func:`~kvcompact.agent.sampling.pick_token`). Decoding stops at an end-of-turn token, at a
        ``stop`` string, or after ``max_new_tokens``. The reply's canonical end (``<|im_end|>\\n`` for
        ChatML) is fed before returning, so the cache holds the whole reply and the next turn feeds
        only new messages. If a decode step's forward raises, the tokens decoded so far stay in the
        cache after the generation prompt (no reply is appended) and the next call continues from
        there.

        Parameters
        ----------
        stop : str or sequence of str, optional
            Decoding stops as soon as the decoded reply contains one of these non-empty strings, and
            the reply is cut before it. The cache then holds exactly what the cut reply renders to:
            decoded tokens past the cut are taken back and the canonical tokens fed.
        on_token : callable, optional
            Called with each new piece of the reply's text as it is decoded (streaming). The pieces
            concatenate to the returned text (for a tokenizer whose decoding of a token prefix is a
            prefix of the full decoding, as byte-level BPE is): text that may still turn out to
            begin a ``stop`` string, or an incomplete UTF-8 character, is held back until settled.
            If it raises, the reply is rolled back -- the decoded tokens leave the cache, no reply is
            appended, the session holds its messages plus the generation prompt (as after
            :meth:`next_token_logits`) -- and the exception propagates.

        Sets ``last_finish_reason``: ``"stop"`` (an end-of-turn token or a ``stop`` string) or
        ``"length"`` (``max_new_tokens`` reached).
        """
        stops = stop_strings(stop)
        if on_token is not None and not callable(on_token):
            raise TypeError(f"generate: on_token must be callable or None, got {type(on_token).__name__}")
        self._check_live()
        self._render_virtual(True)
        logits = self._sync_physical(need_logits=True)
        eos = eos_ids(self.model, self.tokenizer, eos_token_id)
        prompt_rows = len(self._gen_tail)  # the generation prompt; fed decoded tokens follow it

        def emit(piece: str) -> None:
            try:
                on_token(piece)
            except BaseException:
                fed = len(self._gen_tail) - prompt_rows
                if fed:
                    try:
                        self.cache.crop(-fed)  # the newest rows: always a contiguous tail
                    except Exception as err:  # noqa: BLE001 - reported through _broken
                        self._broken = (f"the session is unusable: rolling back a reply whose on_token raised "
                                        f"failed ({type(err).__name__}: {err})")
                        raise
                    del self._cache_ids[-fed:]
                    del self._gen_tail[prompt_rows:]
                raise

        watch = bool(stops) or on_token is not None
        generated: list = []
        text, sent, cut, finish = "", "", None, "length"
        for step in range(max_new_tokens):
            tok = pick_token(logits, do_sample, temperature, top_k, top_p, generator)
            generated.append(tok)
            if tok in eos:
                finish = "stop"
                break
            if watch:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                cut = find_stop(text, stops)
                if cut is not None:
                    finish = "stop"
                    break
                ready = text[:settled_length(text, stops)]
                if on_token is not None and len(ready) > len(sent) and ready.startswith(sent):
                    emit(ready[len(sent):])
                    sent = ready
            if step == max_new_tokens - 1:
                break
            logits = self._feed([tok])
            self._gen_tail.append(tok)
        if cut is not None:
            content = text[:cut]
        else:
            text_ids = generated[:-1] if generated and generated[-1] in eos else generated
            content = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if on_token is not None and len(content) > len(sent) and content.startswith(sent):
            emit(content[len(sent):])
        self.last_finish_reason = finish
        reply = Message("assistant", content)
        # The fed generated tokens become the reply's entry (gen prompt first), then the canonical
        # increment completes it: the end-of-turn tokens, or a re-tokenized tail where the model's
        # tokens were not the tokenizer's own for this text or ran past a stop string.
        hist = self._history()
        inc = self.renderer.render_increment(hist + [reply], len(hist), False, previous_generation_prompt=True,
                                             previous_ids=self._virtual_ids())
        self._retract_virtual(inc.retract_tokens)
        self._entries.append(Entry(reply, self._gen_tail + list(inc.token_ids)))
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

    # ------------------------------------------------------------------ edits (kvcompact.agent.edits)

    def drop(self, msg_id: str, *, reposition: bool = True, recompute_tail: bool = False,
             repair: float | None = None) -> int:
        """Evict a message's tokens from the cache in place; returns how many were evicted.

        See :func:`kvcompact.agent.edits.drop`.
        """
        from kvcompact.agent import edits

        return edits.drop(self, msg_id, reposition=reposition, recompute_tail=recompute_tail, repair=repair)

    def replace(self, msg_id: str, text: str, *, recompute_tail: bool = False,
                repair: float | None = None) -> tuple:
        """Splice ``text`` in place of a message's content; returns ``(old_tokens, new_tokens)``.

        See :func:`kvcompact.agent.edits.replace`.
        """
        from kvcompact.agent import edits

        return edits.replace(self, msg_id, text, recompute_tail=recompute_tail, repair=repair)

    def sync(self, messages, *, exact: bool = False):
        """Reconcile the whole ``messages`` list (OpenAI chat format) with this session, in place.

        Kept messages keep their rows, missing ones are dropped, changed ones replaced, new ones
        fed (this call prefills); only what cannot be edited in place is re-fed, from the first
        such place. Returns a :class:`~kvcompact.agent.sync.SyncResult`. See
        :func:`kvcompact.agent.sync.sync` and docs/sync.md.
        """
        from kvcompact.agent import sync

        return sync.sync(self, messages, exact=exact)

    # ------------------------------------------------------------------ sub-agents, parking, lifetime

    def _new_cache(self):
        from kvcompact.cache import KVCompactCache

        c = self.cache
        return KVCompactCache(self.model.config, kv_dtype=c.kv_dtype, group_size=c.group_size, residual=c.residual)

    def spawn(self, task: str, *, name: str = "subagent", **generate_kwargs) -> str:
        """Run a child session on ``task`` and record its answer here as a tool message.

        See :func:`kvcompact.agent.spawn.spawn`.
        """
        from kvcompact.agent import spawn

        return spawn.spawn(self, task, name=name, **generate_kwargs)

    def park(self, pool=None) -> int:
        """Move the cache to pinned host memory; returns bytes parked. See :func:`kvcompact.agent.park.park`."""
        from kvcompact.agent import park

        return park.park(self, pool)

    def resume(self) -> None:
        """Bring a parked cache back to the device. See :func:`kvcompact.agent.park.resume`."""
        from kvcompact.agent import park

        park.resume(self)

    def tool_call(self, name: str):
        """``with session.tool_call("grep"): run_the_tool()`` parks the cache while the tool runs.

        The park starts as the tool starts, the resume as it returns (both non-blocking, so the
        copies overlap the tool and the host work after it); ``last_tool_call`` records the bytes
        parked, the tool's time and how long the model waited for the resume copy. A raising tool
        still gets the cache resumed and its exception propagates. See
        :func:`kvcompact.agent.park.tool_call`.
        """
        from kvcompact.agent import park

        return park.tool_call(self, name)

    def close(self) -> None:
        """Free the cache's buffers and workspace; the session can no longer be used."""
        if self.cache is not None:
            self.cache.reset()
            if hasattr(self.cache, "release_workspace"):
                self.cache.release_workspace()
        self.cache = None
        self._cache_ids = []
        self._parked = None
        self._resume_record = None

    # ------------------------------------------------------------------ checkpoints (session_io)

    def save(self, path) -> None:
        """Write a checkpoint directory (atomic, checksummed; see :mod:`kvcompact.agent.session_io`).

        Holds the messages (including dropped tombstones, which the template rendering needs), the
        token ids of each, the cache buffers (codes, scales, residual shadows: only the valid rows),
        per-layer lengths, renderer options and the model identity. What a failed feed left unfed
        is fed first, so the checkpoint's cache holds every fed message.
        """
        self._require_editable("save")
        from kvcompact.agent.session_io import save_session

        self._check_live()
        self._sync_physical()
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
