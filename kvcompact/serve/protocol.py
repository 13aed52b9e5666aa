"""The OpenAI chat-completions wire format: request models, error bodies, response shapes.

Requests are parsed from the raw body here (not by FastAPI's own validation), so every bad input
becomes one :class:`APIError` with OpenAI's error body, ``{"error": {"message", "type", "param",
"code"}}``, and a status code: 400 for malformed JSON, a missing or mistyped field, an unknown role.
Types are strict (``"max_tokens": "16"`` is refused, as OpenAI refuses it); unknown fields are
ignored (clients send ``frequency_penalty``, ``logprobs``, ... that this server does not implement).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

__all__ = ["APIError", "ChatRequest", "parse_chat_request", "chat_messages", "completion_body", "chunk_body",
           "usage_body", "new_completion_id"]

# OpenAI's newer "developer" role is its system prompt under another name.
_ROLE_ALIASES = {"developer": "system"}
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered with OpenAI's body: ``status``, ``message``, ``type``, ``param``, ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Model):
    type: StrictStr
    text: StrictStr | None = None


class FunctionCall(_Model):
    name: StrictStr
    arguments: StrictStr = "{}"


class ToolCall(_Model):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: StrictStr
    content: Union[StrictStr, list[ContentPart], None] = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionDef(_Model):
    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: dict[str, StrictStr]


class StreamOptions(_Model):
    include_usage: StrictBool = False


class ChatRequest(_Model):
    """The fields of ``POST /v1/chat/completions`` this server reads (others are ignored)."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Union[StrictFloat, StrictInt, None] = Field(default=None, ge=0, le=2)
    top_p: Union[StrictFloat, StrictInt, None] = Field(default=None, gt=0, le=1)
    # torch's generators take a seed in [-2**63, 2**64): outside it the sampler cannot be seeded.
    seed: StrictInt | None = Field(default=None, ge=-(1 << 63), le=(1 << 64) - 1)
    stop: Union[StrictStr, list[StrictStr], None] = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    n: StrictInt = 1


def _param(loc: tuple) -> str:
    """Pydantic's error location as a path, ``messages[1].role``: indices and field names are kept,
    the tags pydantic adds for the branch of a union (``str``, ``list[str]``, ``NamedToolChoice``) go."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _check_unicode(data) -> None:
    """JSON may spell a lone UTF-16 surrogate (``"\\ud800"``), which is no Unicode text: the tokenizer
    cannot encode it, so it is refused here, before anything is routed (a 400, not a server error)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"the request body holds a lone UTF-16 surrogate escape ({err.reason}); strings "
                       "must be valid Unicode text", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse", code="invalid_json") from None


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Parse and validate a request body; :class:`APIError` (400) naming the field otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
    _check_unicode(data)
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"])
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{param}: {first['msg']}", param=param, code=code) from None
    for j, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{j}].role must be one of {', '.join(ROLES)}; got {m.role!r}",
                           param=f"messages[{j}].role", code="invalid_value")
        if m.content is None and not m.tool_calls:
            raise APIError(400, f"messages[{j}].content is missing: only an assistant message with tool_calls "
                           "may have none", param=f"messages[{j}].content", code="missing_required_parameter")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{j}].tool_calls: only assistant messages carry tool calls",
                           param=f"messages[{j}].tool_calls", code="invalid_value")
        for k, part in enumerate(m.content if isinstance(m.content, list) else ()):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"messages[{j}].content[{k}]: only text parts are supported (this server "
                               f"runs a text model); got type {part.type!r}",
                               param=f"messages[{j}].content[{k}].type", code="invalid_value")
    if req.n != 1:
        raise APIError(400, f"n: only n=1 is supported; got {req.n}", param="n", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop",
                       code="invalid_value")
    return req


def chat_messages(req: ChatRequest) -> list:
    """The request's messages as the plain dicts ``SessionManager.chat`` takes (text parts joined)."""
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        d: dict = {"role": _ROLE_ALIASES.get(m.role, m.role), "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        out.append(d)
    return out


# ---------------------------------------------------------------------- responses


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(result) -> dict:
    """OpenAI's ``usage`` from a :class:`~kvcompact.serve.ChatResult`."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def completion_body(cid: str, model: str, result, content: str | None, tool_calls: list | None,
                    finish_reason: str) -> dict:
    """A ``chat.completion`` object."""
    message: dict = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_body(result)}


def chunk_body(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None, with_choice: bool = True) -> dict:
    """A ``chat.completion.chunk`` object (``with_choice=False``: the usage-only last chunk)."""
    body: dict = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                  if with_choice else []}
    if usage is not None:
        body["usage"] = usage
    return body
