"""Incremental chat-template rendering: feed the model only what is new.

A session keeps the KV of everything it has already shown the model. When a message arrives it
must append exactly the tokens that ``tokenizer.apply_chat_template(all_messages)`` would have
produced after the ones already cached -- no more (a re-prefill), no fewer, and not different
ones (the cache would then describe a conversation the model never saw).

Three things make "render the new message on its own" wrong, and this module handles each:

1. **The template decides the text, not the message.** A template may inject a default system
   prompt, separators, or render a message differently depending on its position. So we always
   render the *whole* conversation (Jinja is cheap: microseconds per message) and take the
   difference with the render of the messages already fed. If the earlier text changed the
   template is not prefix-stable (e.g. templates that strip reasoning from earlier assistant
   turns once a new user turn arrives) and :class:`TemplateNotPrefixStable` says where.
2. **The generation prompt is temporary.** ``add_generation_prompt=True`` appends the assistant
   header (``<|im_start|>assistant\\n``). If the next message *is* that assistant reply the header
   stays; if it is anything else (a tool result arriving instead), the header must be taken back
   out of the cache. :class:`Increment` reports this as ``retract_text`` / ``retract_tokens``.
3. **Tokenization does not commute with concatenation.** ``tok(a) + tok(b) != tok(a + b)`` at a
   boundary inside a word or a run of whitespace: SmolLM2 encodes ``"\\n"`` then ``"\\n\\n"``
   as ``[198] + [198, 198]`` but ``"\\n\\n\\n"`` as ``[1116]``. Added (special) tokens such as
   ``<|im_end|>`` are split out before the tokenizer's normalizer and pre-tokenizer run, so text
   on either side of one is tokenized independently. We therefore re-tokenize from the last
   added token that both the old and the new render share (usually a few characters before the
   new message) and compare: where the boundary merges differently, the increment retracts the
   last few cached tokens and re-feeds them (``retract_tokens``), so that
   ``previous_ids[:len(previous_ids) - retract_tokens] + token_ids == tok(full_render)`` always.
   A probe at construction checks that the tokenizer really splits at added tokens (SentencePiece
   tokenizers that add a dummy prefix space at the start of every call do not); where it does
   not, every increment is cut from the full tokenization. With ``verify_tokens=True`` (the
   default) each increment is also checked against tokenizing the full render; this costs about
   5 us per token of context on one CPU core (0.16 s at 30k tokens), so a long-running session
   may turn it off once its template and tokenizer have been exercised.

Templates without a ``tool`` role
---------------------------------
Found by rendering a probe conversation that ends with a tool message: if the template raises
or drops the tool message's text, tool messages are rendered as user messages whose content is
``"Tool output (NAME):\\n" + content`` (NAME: the message's ``name``, else its
``tool_call_id``, else ``"tool"``). A template that also rejects two user messages in a row
(strict role alternation) will still raise on consecutive tool outputs; merging them would
change text that is already cached, so we let the template's own error through.

Example (needs a tokenizer/model, so not a doctest)::

    r = TemplateRenderer(tokenizer)
    inc = r.render_increment(messages, n_already=0, add_generation_prompt=True)
    cache_ids = inc.token_ids                         # prefill these
    messages.append(Message("tool", "output", name="ls"))
    inc = r.render_increment(messages, n_already=len(messages) - 1,
                             previous_generation_prompt=True, previous_ids=cache_ids)
    # the unused assistant header comes out (a minimal edit: "<|im_start|>" is shared):
    inc.retract_text, inc.text[:5]   # -> ('assistant\\n', 'tool\\n')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from kvcompact.agent.messages import Message, as_message

__all__ = ["TemplateRenderer", "Increment", "RenderState", "TemplateError", "TemplateNotPrefixStable",
           "tool_label"]

_PROBE_MARK = "kvcompact-tool-probe-7f3a"


class TemplateError(ValueError):
    """The chat template cannot be used for incremental rendering (see the message)."""


class TemplateNotPrefixStable(TemplateError):
    """Rendering more messages changed the text of messages that were already rendered."""


def tool_label(message: Message) -> str:
    """The name shown for a tool message in the fallback: ``name``, ``tool_call_id`` or ``"tool"``."""
    return message.name or message.tool_call_id or "tool"


@dataclass(frozen=True)
class Increment:
    """What to change in the cache to go from the previous render to the new one.

    Attributes
    ----------
    text : str
        Text to append after removing ``retract_text``.
    token_ids : list of int
        Tokens to feed the model after removing ``retract_tokens`` tokens from the end of the cache.
    retract_text : str
        Trailing text of the previous render that is not part of the new one (the old generation
        prompt when a non-assistant message follows it; ``""`` otherwise).
    retract_tokens : int
        Tokens to remove from the end of the cache first. Covers ``retract_text`` plus any tokens
        that merge differently across the boundary (usually 0).
    full_text : str
        The full render of the conversation this increment completes.
    n_messages : int
        Messages rendered (``len(messages)``).
    generation_prompt : str
        The generation prompt at the end of ``full_text`` (``""`` without one).
    verified : bool
        Whether ``token_ids`` were checked against tokenizing ``full_text``.
    """

    text: str
    token_ids: list
    retract_text: str
    retract_tokens: int
    full_text: str
    n_messages: int
    generation_prompt: str
    verified: bool


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    # Strings: compare in chunks first (C speed), then finish character by character.
    if isinstance(a, str) and isinstance(b, str):
        step = 4096
        while i + step <= n and a[i:i + step] == b[i:i + step]:
            i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _first_difference(old: str, new: str, at: int) -> str:
    lo = max(0, at - 40)
    return f"at character {at}: before {old[lo:at + 40]!r}, now {new[lo:at + 40]!r}"


class TemplateRenderer:
    """Render a conversation incrementally with a tokenizer's chat template.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Any Hugging Face tokenizer with a chat template (or pass ``chat_template``).
    chat_template : str, optional
        A Jinja chat template overriding the tokenizer's.
    tools : list of dict, optional
        Tool schemas passed to the template (``apply_chat_template(tools=...)``).
    tool_fallback : {"auto", "always", "never"}
        ``"auto"``: render tool messages as user messages only if the template has no tool role
        (found by a probe). ``"always"``: always do that. ``"never"``: use the template as is.
    verify_tokens : bool
        Check each increment's tokens against tokenizing the whole render (exact; ~5 us/token).
    template_kwargs : dict, optional
        Extra variables for the template (``apply_chat_template(**template_kwargs)``).
    """

    def __init__(self, tokenizer, chat_template: str | None = None, *, tools: list | None = None,
                 tool_fallback: str = "auto", verify_tokens: bool = True,
                 template_kwargs: Mapping[str, Any] | None = None):
        if tool_fallback not in ("auto", "always", "never"):
            raise ValueError(f"tool_fallback must be 'auto', 'always' or 'never'; got tool_fallback={tool_fallback!r}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template; pass chat_template=...")
        self.tools = tools
        self.verify_tokens = verify_tokens
        self.template_kwargs = dict(template_kwargs or {})
        self.supports_tool_role = self._probe_tool_role()
        self.tool_fallback = tool_fallback
        self.uses_tool_fallback = tool_fallback == "always" or (tool_fallback == "auto" and not self.supports_tool_role)
        self._split_tokens = self._splitting_added_tokens()
        self.boundary_tokenization = bool(self._split_tokens) and self._probe_boundary()
        #: Increments where the boundary re-tokenization disagreed with the full tokenization
        #: (``verify_tokens`` caught it and used the full result). Non-zero means the tokenizer
        #: merges across added tokens for some text: keep ``verify_tokens`` on for it.
        self.boundary_mismatches = 0

    # ------------------------------------------------------------------ rendering

    def template_messages(self, messages: Sequence[Message | Mapping]) -> list[dict]:
        """The dicts handed to the template (the tool-role fallback applied)."""
        out = []
        for m in messages:
            m = as_message(m)
            if m.role == "tool" and self.uses_tool_fallback:
                out.append({"role": "user", "content": f"Tool output ({tool_label(m)}):\n{m.content}"})
            else:
                out.append(m.to_dict())
        return out

    def _apply(self, dicts: list[dict], add_generation_prompt: bool) -> str:
        kwargs = dict(self.template_kwargs)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        if self.tools is not None:
            kwargs["tools"] = self.tools
        return self.tokenizer.apply_chat_template(
            dicts, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)

    def render(self, messages: Sequence[Message | Mapping], add_generation_prompt: bool = False) -> str:
        """The full render of ``messages`` (``""`` for none, whatever the template does with [])."""
        if len(messages) == 0:
            return ""
        return self._apply(self.template_messages(messages), add_generation_prompt)

    def tokenize(self, text: str) -> list:
        """Token ids of rendered text (``add_special_tokens=False``: the template wrote them)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_ids(self, messages: Sequence[Message | Mapping], add_generation_prompt: bool = False) -> list:
        """Token ids of the full render."""
        return self.tokenize(self.render(messages, add_generation_prompt))

    # ------------------------------------------------------------------ increments

    def render_increment(self, messages: Sequence[Message | Mapping], n_already: int,
                         add_generation_prompt: bool = False, *, previous_generation_prompt: bool = False,
                         previous_ids: Sequence[int] | None = None) -> Increment:
        """What to append (and first take back) after ``messages[:n_already]`` were fed.

        Parameters
        ----------
        messages : sequence of Message or dict
            The whole conversation now.
        n_already : int
            How many of ``messages`` are already in the cache.
        add_generation_prompt : bool
            End the new render with the generation prompt (before ``generate``).
        previous_generation_prompt : bool
            Whether the previous render (of ``messages[:n_already]``) ended with one.
        previous_ids : sequence of int, optional
            The token ids in the cache now. Default: the tokenization of the previous render. Pass
            them when the cache holds something else (e.g. tokens the model generated, which need
            not be the canonical tokenization of the reply): the increment then retracts back to
            the longest common prefix with the new render's tokens (``verify_tokens`` or not, this
            comparison uses the full tokenization).

        Raises
        ------
        TemplateNotPrefixStable
            If the render of ``messages[:n_already]`` is not a prefix of the new render.
        """
        if not 0 <= n_already <= len(messages):
            raise ValueError(f"n_already must be in [0, {len(messages)}]; got n_already={n_already}")
        msgs = list(messages)
        base_text = self.render(msgs[:n_already], False)
        prev_text = self.render(msgs[:n_already], True) if previous_generation_prompt and n_already else base_text
        if previous_generation_prompt and n_already and not prev_text.startswith(base_text):
            raise TemplateNotPrefixStable(
                "the generation prompt does not extend the render of the same messages "
                + _first_difference(base_text, prev_text, _common_prefix_len(base_text, prev_text)))
        full_text = self.render(msgs, add_generation_prompt)
        generation_prompt = ""
        if add_generation_prompt and msgs:
            without = self.render(msgs, False)
            if not full_text.startswith(without):
                raise TemplateNotPrefixStable(
                    "the generation prompt does not extend the render of the same messages "
                    + _first_difference(without, full_text, _common_prefix_len(without, full_text)))
            generation_prompt = full_text[len(without):]
        common = _common_prefix_len(prev_text, full_text)
        if common < len(base_text):
            raise TemplateNotPrefixStable(
                f"adding messages {n_already}..{len(msgs) - 1} changed the text of the first {n_already} "
                + _first_difference(prev_text, full_text, common)
                + "; this template cannot be rendered incrementally (a full re-prefill is needed)")
        retract_text = prev_text[common:]
        text = full_text[common:]

        verified = False
        if previous_ids is not None:
            old_ids = list(previous_ids)
            full_ids = self.tokenize(full_text)
            keep = _common_prefix_len(old_ids, full_ids)
            retract, new_ids, verified = len(old_ids) - keep, full_ids[keep:], True
        elif self.boundary_tokenization:
            start = self._safe_split(full_text, common)
            window_old = self.tokenize(prev_text[start:])
            window_new = self.tokenize(full_text[start:])
            keep = _common_prefix_len(window_old, window_new)
            retract, new_ids = len(window_old) - keep, window_new[keep:]
            if self.verify_tokens:
                full_ids = self.tokenize(full_text)
                old_ids = self.tokenize(prev_text)
                if old_ids[:len(old_ids) - retract] + new_ids != full_ids:
                    # The split assumption failed for this text: trust the full tokenization.
                    self.boundary_mismatches += 1
                    keep = _common_prefix_len(old_ids, full_ids)
                    retract, new_ids = len(old_ids) - keep, full_ids[keep:]
                verified = True
        else:
            old_ids = self.tokenize(prev_text)
            full_ids = self.tokenize(full_text)
            keep = _common_prefix_len(old_ids, full_ids)
            retract, new_ids, verified = len(old_ids) - keep, full_ids[keep:], True
        return Increment(text=text, token_ids=new_ids, retract_text=retract_text, retract_tokens=retract,
                         full_text=full_text, n_messages=len(msgs), generation_prompt=generation_prompt,
                         verified=verified)

    def message_spans(self, messages: Sequence[Message | Mapping], add_generation_prompt: bool = False) -> list:
        """Token range ``(start, end)`` of each message in ``render_ids(messages, add_generation_prompt)``.

        Text the template adds before the first message (a default system prompt) belongs to the
        first message; the generation prompt belongs to none (it ends at the last span's end). A
        token that merges across a boundary belongs to the later message. Spans tile the tokens
        without gaps: ``spans[k][1] == spans[k + 1][0]``.
        """
        spans: list = []
        n_ids = 0
        for k in range(1, len(messages) + 1):
            inc = self.render_increment(messages[:k], k - 1)
            start = n_ids - inc.retract_tokens
            if spans and inc.retract_tokens:  # a merged boundary token moves to the new message
                spans[-1] = (spans[-1][0], max(spans[-1][0], start))
            n_ids = start + len(inc.token_ids)
            spans.append((start, n_ids))
        return spans

    # ------------------------------------------------------------------ probes and helpers

    def _probe_tool_role(self) -> bool:
        probe = [{"role": "user", "content": "What is in the folder?"},
                 {"role": "assistant", "content": "Let me look."},
                 {"role": "tool", "content": _PROBE_MARK, "name": "probe_tool", "tool_call_id": "call_probe"}]
        try:
            text = self._apply(probe, False)
        except Exception:  # noqa: BLE001 - any template error means "no tool role"
            return False
        return _PROBE_MARK in text

    def _splitting_added_tokens(self) -> list:
        """Added tokens whose end is a safe place to restart tokenization."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        out = []
        for tok in decoder.values():
            content = getattr(tok, "content", str(tok))
            # rstrip=True swallows the whitespace after the token: text right after it is not
            # tokenized as if it stood alone. single_word tokens only match at word bounds.
            if content and not getattr(tok, "rstrip", False) and not getattr(tok, "single_word", False):
                out.append(content)
        return sorted(set(out), key=len, reverse=True)

    def _probe_boundary(self) -> bool:
        """Does tokenizing at an added token give the same ids as tokenizing the whole?"""
        for tok in self._split_tokens[:4]:
            a, b = f"Hello there{tok}", "\n\n  world  x"
            if self.tokenize(a) + self.tokenize(b) != self.tokenize(a + b):
                return False
        return True

    def _safe_split(self, text: str, limit: int) -> int:
        """End of the last added token that lies wholly in ``text[:limit]`` (0 if none)."""
        lo = max(0, limit - 8192)
        while True:
            best = -1
            for tok in self._split_tokens:
                i = text.rfind(tok, lo, limit)
                if i >= 0:
                    best = max(best, i + len(tok))
            if best >= 0 or lo == 0:
                return max(best, 0)
            lo = max(0, lo - 65536)


class RenderState:
    """Tracks what a cache holds and hands out the next increment (a thin stateful helper).

    Example (needs a tokenizer)::

        state = RenderState(renderer := TemplateRenderer(tokenizer))
        inc = state.advance(messages, add_generation_prompt=True)   # feed inc.token_ids
        assert state.ids == renderer.render_ids(messages, True)
    """

    def __init__(self, renderer: TemplateRenderer):
        self.renderer = renderer
        self.n_messages = 0
        self.generation_prompt = False
        self.ids: list = []
        self.text = ""

    def advance(self, messages: Sequence[Message | Mapping], add_generation_prompt: bool = False) -> Increment:
        inc = self.renderer.render_increment(
            messages, self.n_messages, add_generation_prompt,
            previous_generation_prompt=self.generation_prompt)
        if inc.retract_tokens:
            del self.ids[len(self.ids) - inc.retract_tokens:]
        self.ids.extend(inc.token_ids)
        self.text = self.text[:len(self.text) - len(inc.retract_text)] + inc.text
        self.n_messages = len(messages)
        self.generation_prompt = add_generation_prompt
        return inc
