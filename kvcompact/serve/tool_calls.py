"""Tool calling for a model without a tool-call format: the request's ``tools`` as text, the reply's
JSON as ``tool_calls``.

The embedded SmolLM2's chat template has no tool syntax, so the server does the minimal thing:

* **In**: the tools of the request are described in the system message (appended to the first
  system message, or a system message is put first) with the instruction to answer a call as one
  JSON object ``{"name": ..., "arguments": {...}}``. The text is a pure function of ``tools``, so
  an agent that sends the same tools every call keeps its whole prefix cached.
* **Out**: a reply that is such a JSON object (alone, or in a ```` ```json ```` fence or
  ``<tool_call>`` tags) naming one of the tools becomes ``message.tool_calls`` with
  ``finish_reason: "tool_calls"`` and ``content: null``; anything else is plain content.
* **Back**: the session holds the model's own text. When the client sends the assistant turn back
  as ``tool_calls`` (OpenAI clients do), :meth:`ToolCallMemory.restore` puts that text back in its
  place, so the message matches the session's and its cache rows are reused.

``tool_choice="none"`` turns all of it off for a request.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import OrderedDict

__all__ = ["tools_text", "with_tools", "parse_tool_calls", "ToolCallMemory"]

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_TAGS = re.compile(r"^<tool_call>\s*(.*?)\s*(?:</tool_call>)?$", re.S)


def tools_text(tools: list) -> str:
    """The system-prompt text describing ``tools`` (OpenAI ``tools`` entries, as dicts)."""
    lines = ["You can call these functions. To call one, answer with only a JSON object "
             '{"name": <function name>, "arguments": {<argument name>: <value>, ...}}.', "Functions:"]
    for t in tools:
        lines.append(json.dumps(t["function"], sort_keys=True, ensure_ascii=False))
    return "\n".join(lines)


def with_tools(messages: list, tools: list) -> list:
    """``messages`` with the tools described in the (first) system message; a new list."""
    text = tools_text(tools)
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{text}"
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def parse_tool_calls(text: str, names) -> list | None:
    """OpenAI ``tool_calls`` from a reply that is a JSON call of one of ``names`` (None otherwise).

    Accepted: ``{"name": ..., "arguments": {...} or "<json>"}`` (``"parameters"`` too), or a list of
    them, alone or in a ```` ``` ```` fence or ``<tool_call>`` tags, surrounding blanks ignored.
    """
    body = text.strip()
    for pattern in (_FENCE, _TAGS):
        m = pattern.match(body)
        if m:
            body = m.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls or None


class ToolCallMemory:
    """The model's text behind the tool calls the server issued (the newest ``capacity`` replies)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._text: OrderedDict[str, tuple] = OrderedDict()  # call id -> (all ids of that reply, text)
        self._lock = threading.Lock()

    def remember(self, calls: list, text: str) -> None:
        ids = tuple(c["id"] for c in calls)
        with self._lock:
            for cid in ids:
                self._text[cid] = (ids, text)
            while len(self._text) > self.capacity:
                self._text.popitem(last=False)

    def restore(self, messages: list) -> list:
        """``messages`` with every assistant turn whose tool calls are exactly one reply of ours put
        back as the text the model wrote (other messages as they are); a new list."""
        out = []
        with self._lock:
            for m in messages:
                calls = m.get("tool_calls") if m.get("role") == "assistant" else None
                if calls and not m.get("content"):
                    ids = tuple(c.get("id") for c in calls)
                    known = self._text.get(ids[0])
                    if known is not None and known[0] == ids:
                        m = {"role": "assistant", "content": known[1]}
                out.append(m)
        return out
