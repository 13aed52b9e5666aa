"""The HTTP layer of ``kvcompact serve``: an OpenAI-compatible FastAPI app over a :class:`SessionManager`.

Routes: ``POST /v1/chat/completions`` (streaming too), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text), ``GET``/``DELETE /v1/sessions/{id}``. The app holds no model
state of its own: every request becomes one :meth:`SessionManager.chat` call, run on one worker
thread (the manager serves one request at a time anyway), so the event loop stays free for
``/health`` and for streaming while the model works. docs/serve.md describes the behaviour.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcompact.agent.sync import validate_messages
from kvcompact.agent.template import TemplateRenderer
from kvcompact.serve import protocol
from kvcompact.serve.protocol import APIError
from kvcompact.serve.tool_calls import ToolCallMemory, parse_tool_calls, with_tools

__all__ = ["create_app", "DEFAULT_MAX_TOKENS"]

log = logging.getLogger("kvcompact.serve")

DEFAULT_MAX_TOKENS = 512  # a request without max_tokens; capped by what the context has left
SESSION_HEADER = "X-Session-Id"
_SESSION_ID = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no blanks: fits in a header


class ClientGone(Exception):
    """Raised inside the model thread when a streaming client disconnected: the reply rolls back."""


MIN_BODY_BYTES = 1 << 20  # the body limit's floor (1 MiB), whatever the model's context
BODY_BYTES_PER_TOKEN = 64  # far above what JSON text spends per token, escapes and tool schemas included


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it passes ``limit`` bytes.

    A body that large cannot fit the context, and parsing and tokenizing it would hold the model
    thread for seconds to minutes. The rest of an oversized body is still read (and discarded) so
    the client, still sending, gets the 413 rather than a reset connection.
    """
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise APIError(413, f"the request body is {size} bytes; this server takes at most {limit} bytes "
                       "(far more than the model's context holds)", code="request_too_large")
    return b"".join(chunks)


def _error_response(err: APIError, headers: dict | None = None) -> JSONResponse:
    """The one place an error body is made (every handler below ends here)."""
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _edit_kind(result) -> str:
    """A word for the log line: what reconciling the request with its session did."""
    s = result.sync
    if result.created:
        return "fork" if s.tokens_reused else "new"  # fork: seeded with another session's prefix
    if s.tail_from is not None:
        return "tail"
    kinds = [k for k, n in (("drop", s.dropped), ("replace", s.replaced)) if n]
    return "+".join(kinds) or ("append" if s.fed else "same")


class _State:
    """What the routes share: the manager, counters for /metrics, the worker thread."""

    def __init__(self, manager, model_name: str, api_key: str | None, max_context: int, default_max_tokens: int):
        self.manager = manager
        self.model_name = model_name
        self.api_key = api_key
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens
        self.renderer = TemplateRenderer(manager.tokenizer)  # prompt length before routing (413)
        self.tool_memory = ToolCallMemory()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcompact-model")
        self.started = int(time.time())
        self._lock = threading.Lock()
        self.http: dict = {}  # (path, status) -> count
        self.completion_tokens = 0
        self.cancelled = 0  # streams whose client left before the reply ended (rolled back)

    def count(self, path: str, status: int) -> None:
        with self._lock:
            self.http[(path, status)] = self.http.get((path, status), 0) + 1

    def add_completion(self, n: int) -> None:
        with self._lock:
            self.completion_tokens += n


def _route_label(path: str) -> str:
    """The ``path`` label of /metrics: a route, never a raw id (bounded label values)."""
    if path.startswith("/v1/sessions/"):
        return "/v1/sessions/{id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in ("/v1/chat/completions", "/v1/models", "/health", "/metrics") else "other"


class _Gate:
    """ASGI middleware: the API key check (every route but /health) and per-route request counts.

    Plain ASGI rather than ``BaseHTTPMiddleware``, which would re-wrap streaming bodies and hide a
    client's disconnect from the stream.
    """

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    def _authorized(self, scope) -> bool:
        if not self.state.api_key or scope["path"] == "/health":
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          self.state.api_key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = _route_label(scope["path"])
        if not self._authorized(scope):
            self.state.count(label, 401)
            err = APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            return await _error_response(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.state.count(label, status[0])


class _Stream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (done, or the client gone)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(manager, *, model_name: str, api_key: str | None = None, max_context: int | None = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, max_body_bytes: int | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``manager``'s model.

    Parameters
    ----------
    manager : SessionManager
        Holds the model, the tokenizer and the sessions.
    model_name : str
        The id ``/v1/models`` lists and every response names (requests may name any model).
    api_key : str, optional
        When set, every route but ``/health`` answers 401 without ``Authorization: Bearer <key>``.
    max_context : int, optional
        Longest context in tokens (prompt + reply); a longer prompt is answered 413 and
        ``max_tokens`` is capped to what is left. Default: the model config's
        ``max_position_embeddings``.
    default_max_tokens : int
        Reply length limit of a request without ``max_tokens`` / ``max_completion_tokens``.
    max_body_bytes : int, optional
        A chat request body longer than this is answered 413 before it is parsed. Default:
        ``max(1 MiB, 64 bytes * max_context)``, far more than any prompt that fits the context.

    Returns
    -------
    fastapi.FastAPI
        Run it with uvicorn (``kvcompact serve`` does, :mod:`kvcompact.serve.server`).
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"create_app: model_name must be a non-empty str, got {model_name!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("create_app: api_key must be None or a non-empty str")
    if max_context is None:
        max_context = getattr(manager.model.config, "max_position_embeddings", None)
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
        raise ValueError(f"create_app: max_context must be an int >= 2 (tokens), got {max_context!r}")
    if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int) or default_max_tokens < 1:
        raise ValueError(f"create_app: default_max_tokens must be an int >= 1, got {default_max_tokens!r}")

    if max_body_bytes is None:
        max_body_bytes = max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_context)
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"create_app: max_body_bytes must be an int >= 1, got {max_body_bytes!r}")

    state = _State(manager, model_name, api_key, max_context, default_max_tokens)
    app = FastAPI(title="kvcompact serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kvcompact = state
    app.add_middleware(_Gate, state=state)

    # -------------------------------------------------------------- errors: one body everywhere

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = (err.errors() or [{"loc": (), "msg": "invalid request"}])[0]
        param = protocol._param(tuple(first.get("loc", ())))
        return _error_response(APIError(400, f"{param or 'request'}: {first.get('msg')}", param=param or None,
                                        code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}" if err.status_code in (404, 405)
                   else str(err.detail))
        return _error_response(APIError(err.status_code, message, type=kind), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))

    # -------------------------------------------------------------- small routes

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def _model_card():
        return {"id": model_name, "object": "model", "created": state.started, "owned_by": "kvcompact"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"no model {model_id!r}; this server serves {model_name!r}", type="not_found_error",
                           param="model", code="model_not_found")
        return _model_card()

    @app.get("/metrics")
    async def metrics():
        stats = await asyncio.to_thread(manager.stats)  # waits for the manager's lock off the loop
        return PlainTextResponse(_prometheus(state, stats), media_type="text/plain; version=0.0.4")

    def _session_or_404(session_id: str):
        try:
            return manager.session(session_id)
        except KeyError:
            raise APIError(404, f"no live session with id {session_id!r}", type="not_found_error",
                           param="session_id", code="session_not_found") from None

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        def describe():
            s = _session_or_404(session_id)
            return {"id": session_id, "object": "session", "messages": len(s.messages),
                    "roles": [m.role for m in s.messages], "tokens": len(s.token_ids), "parked": s.parked}

        return await asyncio.get_running_loop().run_in_executor(state.worker, describe)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        def close():
            try:
                manager.close(session_id)
            except KeyError:
                _session_or_404(session_id)  # raises the 404
            return {"id": session_id, "object": "session", "deleted": True}

        return await asyncio.get_running_loop().run_in_executor(state.worker, close)

    # -------------------------------------------------------------- chat

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = protocol.parse_chat_request(await _read_body(request, max_body_bytes))
        header = request.headers.get(SESSION_HEADER)
        for param, value in ((SESSION_HEADER, header), ("user", req.user)):
            if value is not None and not _SESSION_ID.match(value):
                raise APIError(400, f"{param}: a session id is 1-256 printable ASCII characters without blanks",
                               param=param, code="invalid_value")
        session_id = header or req.user  # the header wins when both are sent
        messages = protocol.chat_messages(req)
        tools_on = bool(req.tools) and req.tool_choice != "none"
        tool_names = {t.function.name for t in req.tools or ()} if tools_on else set()
        if tools_on:
            messages = with_tools(state.tool_memory.restore(messages), [t.model_dump() for t in req.tools])
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        options = dict(session_id=session_id, do_sample=temperature > 0, temperature=temperature,
                       top_p=None if req.top_p is None else float(req.top_p), seed=req.seed, stop=req.stop)
        wanted = req.max_completion_tokens or req.max_tokens or state.default_max_tokens
        call = _ChatCall(state, messages, options, wanted, tool_names)
        if req.stream:
            return await _stream(state, call, req)
        result = await asyncio.get_running_loop().run_in_executor(state.worker, call.run)
        content, calls, finish = call.reply(result)
        body = protocol.completion_body(protocol.new_completion_id(), model_name, result, content, calls, finish)
        return JSONResponse(body, headers={SESSION_HEADER: result.session_id})

    return app


class _ChatCall:
    """One chat request's model work, run on the worker thread (:meth:`run`)."""

    def __init__(self, state: _State, messages: list, options: dict, wanted: int, tool_names: set):
        self.state, self.messages, self.options = state, messages, options
        self.wanted, self.tool_names = wanted, tool_names
        self.on_token = None  # set for streaming (called with each settled text piece)
        self.session_id = options.get("session_id")  # the routed session's, once chat has routed it

    def run(self):
        st = self.state
        t0 = time.perf_counter()
        status, result = 500, None
        try:
            try:
                incoming = [m for m, _ in validate_messages(self.messages)]
            except (TypeError, ValueError) as err:
                raise APIError(400, str(err).replace("sync: ", "", 1), param="messages") from None
            prompt = len(st.renderer.render_ids(incoming, True))
            if prompt >= st.max_context:
                raise APIError(413, f"the prompt is {prompt} tokens; this model's context is {st.max_context} "
                               "tokens (prompt + reply)", param="messages", code="context_length_exceeded")
            max_new = min(self.wanted, st.max_context - prompt)
            try:
                result = st.manager.chat(self.messages, max_new_tokens=max_new, on_token=self.on_token,
                                         on_session=self._routed, **self.options)
            except ValueError as err:
                raise APIError(400, str(err).replace("chat: ", "", 1)) from None
            status = 200
            st.add_completion(result.completion_tokens)
            return result
        except APIError as err:
            status = err.status
            raise
        except ClientGone:
            status = 499  # nginx's "client closed request"
            with st._lock:
                st.cancelled += 1
            raise
        finally:
            ms = (time.perf_counter() - t0) * 1000
            if result is not None:
                s = result.sync
                log.info("chat session=%s status=%d prompt=%d reused=%d fed=%d completion=%d edit=%s finish=%s "
                         "ms=%.0f", result.session_id, status, result.prompt_tokens, s.tokens_reused, s.tokens_fed,
                         result.completion_tokens, _edit_kind(result), result.finish_reason, ms)
            else:
                log.info("chat session=%s status=%d ms=%.0f", self.options.get("session_id") or "-", status, ms)

    def _routed(self, session_id: str) -> None:
        self.session_id = session_id

    def reply(self, result) -> tuple:
        """``(content, tool_calls, finish_reason)`` of the OpenAI message for ``result``."""
        calls = parse_tool_calls(result.text, self.tool_names) if self.tool_names else None
        if calls:
            self.state.tool_memory.remember(calls, result.text)
            return None, calls, "tool_calls"
        return result.text, None, result.finish_reason


async def _stream(state: _State, call: _ChatCall, req) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format; errors before the first token are plain errors."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    # With tools, a reply may turn out to be a tool call: its text is held until decoding ends.
    buffered = bool(call.tool_names)

    def on_token(piece: str) -> None:
        if gone.is_set():
            raise ClientGone("the client closed the stream")
        if not buffered:
            loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))

    def work():
        try:
            result = call.run()
        except BaseException as err:  # noqa: BLE001 - handed to the event loop
            loop.call_soon_threadsafe(queue.put_nowait, ("error", err))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))

    call.on_token = on_token
    loop.run_in_executor(state.worker, work)
    first = await queue.get()
    if first[0] == "error":
        gone.set()
        raise first[1]
    session_id = call.session_id  # routing happened before the first piece or the end
    cid, created = protocol.new_completion_id(), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    model = state.model_name

    async def events():
        yield _sse(protocol.chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
        item = first
        while True:
            kind, value = item
            if kind == "piece":
                yield _sse(protocol.chunk_body(cid, model, created, {"content": value}))
            elif kind == "error":
                err = value if isinstance(value, APIError) else APIError(500, f"{type(value).__name__}: {value}",
                                                                        type="server_error")
                yield _sse(err.body())
                yield "data: [DONE]\n\n"
                return
            else:
                content, calls, finish = call.reply(value)
                if calls:
                    delta = {"tool_calls": [dict(c, index=k) for k, c in enumerate(calls)]}
                    yield _sse(protocol.chunk_body(cid, model, created, delta))
                elif buffered and content:
                    yield _sse(protocol.chunk_body(cid, model, created, {"content": content}))
                yield _sse(protocol.chunk_body(cid, model, created, {}, finish))
                if include_usage:
                    yield _sse(protocol.chunk_body(cid, model, created, {}, usage=protocol.usage_body(value),
                                                   with_choice=False))
                yield "data: [DONE]\n\n"
                return
            item = await queue.get()

    headers = {"Cache-Control": "no-cache"}
    if session_id:
        headers[SESSION_HEADER] = session_id
    return _Stream(events(), gone.set, media_type="text/event-stream", headers=headers)


def _prometheus(state: _State, stats) -> str:
    """``/metrics``: the manager's stats and the server's counters in Prometheus' text format."""
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP kvcompact_{name} {help_text}")
        lines.append(f"# TYPE kvcompact_{name} {kind}")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"kvcompact_{name}{label} {value}")

    metric("sessions", "gauge", "Sessions held, by state (live: on the device; parked: in host memory).",
           [({"state": "live"}, stats.sessions_live), ({"state": "parked"}, stats.sessions_parked)])
    metric("sessions_dropped_total", "counter", "Sessions dropped under the host budget or a full pool.",
           [({}, stats.sessions_dropped)])
    metric("parks_total", "counter", "Sessions parked to host memory under the device budget.", [({}, stats.parks)])
    metric("device_bytes", "gauge", "KV bytes of unparked sessions on the device.", [({}, stats.device_bytes)])
    metric("host_bytes", "gauge", "Pinned host bytes held for sessions.", [({}, stats.host_bytes)])
    if hasattr(stats, "peak_device_bytes"):
        metric("peak_device_bytes", "gauge", "Largest device KV bytes seen right after a reply.",
               [({}, stats.peak_device_bytes)])
    metric("prompt_tokens_reused_total", "counter", "Prompt tokens served from cached KV (not recomputed).",
           [({}, stats.tokens_reused)])
    metric("prompt_tokens_fed_total", "counter", "Prompt tokens fed to the model (prefill, replacements, tails).",
           [({}, stats.tokens_fed)])
    metric("completion_tokens_total", "counter", "Cache rows added by replies.", [({}, state.completion_tokens)])
    metric("chat_requests_total", "counter", "Chat requests answered by the model.", [({}, stats.requests)])
    metric("streams_cancelled_total", "counter", "Streams whose client left mid-reply (the reply was rolled back).",
           [({}, state.cancelled)])
    with state._lock:
        http = sorted(state.http.items())
    metric("http_requests_total", "counter", "HTTP requests by route and status.",
           [({"path": p, "status": s}, n) for (p, s), n in http])
    return "\n".join(lines) + "\n"
