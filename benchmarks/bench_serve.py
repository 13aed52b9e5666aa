"""Compacting-agent replay: ``kvcompact serve`` with in-place edits vs prefix-only reuse vs stateless.

The trace is ``kvcompact demo``'s coding agent (24 tool calls, :mod:`kvcompact.demo.script`) driven the
way an agent framework drives an OpenAI-style endpoint: the agent keeps its own message list, sends
the whole list on every call, appends the reply, and then compacts its list with
:func:`kvcompact.agent.compact_messages` (older tool outputs truncated to an observation budget, the
last messages kept whole, the oldest dropped under a context budget). Each server answers with its
own greedy replies, so each replays the trace its own answers produce.

Two agent set-ups:

* by default, the demo's own settings (:class:`~kvcompact.demo.runner.DemoConfig`: observation
  budget 96 tokens, last 4 messages whole, a 1,500-token context budget, 12-token replies) and no
  ``tools``: the numbers of ``kvcompact demo``;
* a realistic agent, selected by options: ``--tools`` sends OpenAI ``tools`` schemas for the demo's
  four tools (:data:`TOOLS`) on every request, as agent frameworks do (the server renders them into
  the system prompt: a stateless server prefills them on every call), and a reply the server
  returns as ``tool_calls`` is appended as an assistant message with those ``tool_calls``, the
  observation answering it as a ``tool`` message with its ``tool_call_id`` (the server's
  ``ToolCallMemory`` puts the model's text back, so the message keeps its cache rows).
  ``--context-budget``, ``--observation-budget``, ``--keep-recent`` and ``--max-tokens`` override the
  demo's compaction settings and reply length (the model's context is 8,192 tokens; the demo's
  1,500-token budget keeps a demo short, a coding agent keeps far more).

The scripted trace decides which tool runs at each step whatever the model asked for, so every
agent sees the same observations.

Modes, one ``kvcompact serve --reuse MODE`` subprocess each on a free 127.0.0.1 port:

* ``edits``: kvcompact (``Session.sync``: drops and truncations are edited in the cache in place);
* ``prefix``: longest-common-token-prefix reuse only (vLLM prefix caching, llama.cpp slots);
* ``none``: stateless, a fresh prefill per request (``transformers serve``); the ratio columns'
  denominator.

Per mode, from the official ``openai`` client streaming each request with ``include_usage``:
tokens prefilled = sum of ``prompt_tokens - cached_tokens``, time to first token (first content or
tool-call chunk) per step, peak KV bytes (``kvcompact_peak_device_bytes`` from ``/metrics``), wall
time. With ``--tools`` the server holds a reply back until it is decoded (it may be a tool call), so
the "first token" is the whole reply there, in every mode. The "floor" line is the text no server
can avoid feeding: the tokens of every message that is new or changed since the previous request
(the new observation, truncated outputs' new text; the tool schemas once, at the first request), the
agent's own previous reply excluded (every stateful server holds it from decoding).

Concurrency: ``--concurrent`` agents (threads, one client and one ``X-Session-Id`` each) share the
system prompt and replay ``--concurrent-steps`` steps with their own task; total prefilled and wall
time per mode. Requests are served one at a time by each server (its queue).

``--in-process`` runs the same accounting against ``SessionManager(reuse=MODE)`` in this process
(no HTTP; TTFT from the ``on_token`` callback; ``--tools`` handled as the app handles them). JSON
with every step goes to ``--json``.

    python benchmarks/bench_serve.py [--quick] [--in-process] [--steps N] [--concurrent N] [--json PATH]
    python benchmarks/bench_serve.py --tools --context-budget 4000 --observation-budget 256 [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

# The installed package first (its compiled extension); the source checkout only as a fallback.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import machine_description, print_table  # noqa: E402

from kvcompact.demo.runner import DemoConfig  # noqa: E402
from kvcompact.demo.script import SYSTEM_PROMPT, TASK, Step, build_steps  # noqa: E402
from kvcompact.serve.tool_calls import ToolCallMemory, parse_tool_calls, tools_text, with_tools  # noqa: E402

MODES = ("edits", "prefix", "none")  # "none" last: the denominator of the ratio columns
MiB = 1 << 20
SESSION_HEADER = "X-Session-Id"


# ---------------------------------------------------------------------- the agent


def _function(name: str, description: str, properties: dict, required: list) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


# The demo agent's tools (the first word of every Step.tool) as an OpenAI-client agent declares them
# with ``--tools``: sent unchanged on every request, so a stateful server keeps them cached.
TOOLS = [
    _function("read_file", "Read a text file of the repository, whole or a range of lines. Returns the lines "
              "prefixed with their line numbers.",
              {"path": {"type": "string", "description": "Path relative to the repository root, e.g. inventory.py."},
               "start_line": {"type": "integer", "description": "First line to return, 1-based (default 1)."},
               "end_line": {"type": "integer", "description": "Last line to return, inclusive (default: the "
                            "last line of the file)."}},
              ["path"]),
    _function("run", "Run a shell command in the repository root and return its exit status, stdout and stderr "
              "(120 s timeout). Use it for the tests (python -m pytest), git, grep, ls and linters.",
              {"command": {"type": "string", "description": "The command line, e.g. python -m pytest tests/ -q."}},
              ["command"]),
    _function("search_docs", "Search the Python standard library documentation and the project's docs/ folder. "
              "Returns the best matching section.",
              {"query": {"type": "string", "description": "Keywords, e.g. decimal quantize rounding."}},
              ["query"]),
    _function("apply_patch", "Apply a unified diff to the repository's files. Nothing changes if a hunk does not "
              "apply; the error says which one.",
              {"patch": {"type": "string", "description": "The diff: --- a/PATH, +++ b/PATH, then @@ hunks."},
               "summary": {"type": "string", "description": "One line saying what the patch changes."}},
              ["patch"]),
]

# What an extra call of one reply gets: the API wants every call answered, the trace runs one tool a step.
SKIPPED_CALL = "(not run: this agent runs one tool per step)"


def reply_message(text: str, tool_calls: list | None = None) -> dict:
    """The assistant message an OpenAI client agent appends for a reply: its tool calls, else its text."""
    if tool_calls:
        return {"role": "assistant", "content": None, "tool_calls": [dict(c) for c in tool_calls]}
    return {"role": "assistant", "content": text}


class CompactingAgent:
    """The demo's coding agent as a framework would run it: its own message list, compacted after each reply.

    Parameters
    ----------
    tokenizer
        Counts tokens for ``compact_messages`` (the model's own tokenizer, as the demo uses).
    steps : list of Step
        The tool calls and their outputs, in order.
    config : DemoConfig
        ``observation_budget``, ``keep_recent``, ``token_budget`` of the compaction.
    task : str
        The user message after the system prompt.
    """

    def __init__(self, tokenizer, steps: list[Step], config: DemoConfig, task: str = TASK):
        self.tokenizer, self.steps, self.config = tokenizer, list(steps), config
        self.messages: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task}]
        self.truncations = self.drops = 0
        self.pending_calls: list[str] = []  # ids of the last reply's tool calls: the next step answers them

    def request(self, step: Step) -> list[dict]:
        """Add the step's tool output; the whole list the agent sends now (a copy)."""
        self.messages += self._observation(step)
        return [dict(m) for m in self.messages]

    def _observation(self, step: Step) -> list[dict]:
        """The step's tool message(s). After a tool-call reply the output answers the first call by its
        id and any further call gets a one-line note; after a text reply the output goes without an id
        (the scripted trace runs the step either way)."""
        content = f"$ {step.tool}\n{step.output}"
        if not self.pending_calls:
            return [{"role": "tool", "content": content}]
        first, *rest = self.pending_calls
        self.pending_calls = []
        return [{"role": "tool", "tool_call_id": first, "content": content}] + [
            {"role": "tool", "tool_call_id": cid, "content": SKIPPED_CALL} for cid in rest]

    def observe(self, reply: str, tool_calls: list | None = None) -> None:
        """Append the reply (its tool calls when the server sent some), then compact the list."""
        from kvcompact.agent import compact_messages

        self.messages.append(reply_message(reply, tool_calls))
        self.pending_calls = [c["id"] for c in tool_calls or ()]
        cfg = self.config
        out = compact_messages(self.messages, cfg.token_budget, keep_recent=cfg.keep_recent,
                               observation_budget=cfg.observation_budget, tokenizer=self.tokenizer)
        self.truncations += len(out.plan.truncated)
        self.drops += len(out.plan.dropped)
        self.messages = [dict(m) for m in out]


def _as_served(messages: list[dict], tools: list | None) -> list[dict]:
    """The messages as the server renders them: the tools described in the system prompt."""
    return with_tools(messages, tools) if tools and messages else messages


def new_text_tokens(tokenizer, previous: list[dict], previous_reply, request: list[dict],
                    tools: list | None = None) -> int:
    """Tokens of the messages in ``request`` that ``previous`` (plus the reply to it) did not hold.

    ``previous_reply``: the reply's text or its assistant message (:func:`reply_message`), or None.
    With ``tools`` the lists are compared as the server renders them, so the schemas count once.
    """
    if isinstance(previous_reply, str):
        previous_reply = reply_message(previous_reply)
    key = lambda m: json.dumps(m, sort_keys=True)  # noqa: E731 - every field: an edited tool_call_id is new too
    seen = {key(m) for m in _as_served(previous, tools)}
    if previous_reply is not None:
        seen.add(key(previous_reply))
    return sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
               for m in _as_served(request, tools) if m.get("content") and key(m) not in seen)


# ---------------------------------------------------------------------- results


@dataclass
class Reply:
    """One answered request, from either backend."""

    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    seconds: float
    text: str = ""  # the content ("" when the reply is a tool call)
    tool_calls: list | None = None  # OpenAI ``tool_calls`` (dicts) when the server parsed the reply as calls


@dataclass
class StepResult:
    step: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    seconds: float
    reply: str  # the text, or the tool calls as JSON
    new_text_tokens: int = 0
    tool_call: bool = False

    @property
    def prefilled(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class ModeResult:
    mode: str
    steps: list[StepResult] = field(default_factory=list)
    peak_kv_bytes: int = 0
    wall_s: float = 0.0
    truncations: int = 0
    drops: int = 0

    @property
    def prefilled(self) -> int:
        return sum(s.prefilled for s in self.steps)

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.steps)

    @property
    def floor(self) -> int:
        return sum(s.new_text_tokens for s in self.steps)

    @property
    def tool_calls(self) -> int:
        return sum(s.tool_call for s in self.steps)

    def ttft_ms(self) -> tuple[float, float]:
        t = [s.ttft_s * 1e3 for s in self.steps]
        return statistics.fmean(t), statistics.median(t)


@dataclass
class ConcurrentResult:
    mode: str
    agents: int
    requests: int
    prompt_tokens: int
    prefilled: int
    wall_s: float
    peak_kv_bytes: int


# ---------------------------------------------------------------------- backends


class InProcessBackend:
    """``SessionManager(reuse=mode)`` in this process; a request's ``tools`` handled as the app handles them."""

    def __init__(self, model, tokenizer, mode: str, cache_kwargs=None):
        from kvcompact.serve import SessionManager

        self.manager = SessionManager(model, tokenizer, reuse=mode, cache_kwargs=cache_kwargs)
        self.tool_memory = ToolCallMemory()

    def chat(self, messages: list[dict], session_id: str, max_tokens: int, tools: list | None = None) -> Reply:
        names = {t["function"]["name"] for t in tools or ()}
        if tools:  # as kvcompact/serve/app.py does: our own calls' text back, the schemas in the system prompt
            messages = with_tools(self.tool_memory.restore(messages), tools)
        first = []
        t0 = time.perf_counter()
        r = self.manager.chat(messages, session_id=session_id, max_new_tokens=max_tokens,
                              on_token=lambda piece: first or first.append(time.perf_counter()))
        t1 = time.perf_counter()
        calls = parse_tool_calls(r.text, names) if names else None
        if calls:
            self.tool_memory.remember(calls, r.text)
        return Reply(r.prompt_tokens, r.cached_tokens, (first[0] if first else t1) - t0, t1 - t0,
                     "" if calls else r.text, calls)

    def peak_kv_bytes(self) -> int:
        return self.manager.stats().peak_device_bytes

    def close(self) -> None:
        for sid in self.manager.session_ids():
            self.manager.close(sid)


def _merge_tool_call(calls: dict, part) -> None:
    """Fold one streamed tool-call fragment into ``calls`` (``{index: call}``), as OpenAI clients do:
    the first fragment of a call has its id and name, the arguments may come in pieces."""
    call = calls.setdefault(part.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = part.id or call["id"]
    if part.function is not None:
        call["function"]["name"] += part.function.name or ""
        call["function"]["arguments"] += part.function.arguments or ""


class HttpBackend:
    """A running ``kvcompact serve`` at ``base_url``, through the official ``openai`` client."""

    def __init__(self, base_url: str, model_name: str = "kvcompact"):
        self.base_url, self.model_name = base_url, model_name

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", timeout=600, max_retries=0)

    def chat(self, messages: list[dict], session_id: str, max_tokens: int, tools: list | None = None,
             client=None) -> Reply:
        """One streamed request."""
        client = client or self.client()
        extra = {"tools": tools} if tools else {}
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model=self.model_name, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_headers={SESSION_HEADER: session_id}, **extra)
        first, parts, calls, usage = None, [], {}, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta
                if first is None and (delta.content or delta.tool_calls):
                    first = time.perf_counter()
                parts.append(delta.content or "")
                for part in delta.tool_calls or ():
                    _merge_tool_call(calls, part)
        t1 = time.perf_counter()
        if usage is None:
            raise RuntimeError("the server sent no usage chunk (stream_options.include_usage)")
        details = usage.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details is not None else 0
        return Reply(usage.prompt_tokens, cached, (first or t1) - t0, t1 - t0, "".join(parts),
                     [calls[k] for k in sorted(calls)] or None)

    def metrics(self) -> dict:
        """``/metrics`` samples without labels, as ``{name: float}``."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                out[name] = float(value)
        return out

    def peak_kv_bytes(self) -> int:
        m = self.metrics()
        if "kvcompact_peak_device_bytes" not in m:
            raise RuntimeError("/metrics has no kvcompact_peak_device_bytes")
        return int(m["kvcompact_peak_device_bytes"])

    def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m kvcompact serve --reuse MODE`` on 127.0.0.1; ``with`` starts it and stops it by its pid."""

    def __init__(self, mode: str, extra_args: list[str], start_timeout_s: float = 300.0):
        self.mode, self.extra_args, self.start_timeout_s = mode, list(extra_args), start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = None

    def __enter__(self) -> "Server":
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_serve_{self.mode}_", suffix=".log", delete=False)
        cmd = [sys.executable, "-P", "-m", "kvcompact", "serve", "--reuse", self.mode, "--host", "127.0.0.1",
               "--port", str(self.port), *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvcompact serve --reuse {self.mode} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"kvcompact serve --reuse {self.mode} did not answer /health within "
                           f"{self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-n:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # this process's own child, by its pid
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.log is not None:
            self.log.close()
            os.unlink(self.log.name)


# ---------------------------------------------------------------------- replay


def replay(backend, tokenizer, steps: list[Step], config: DemoConfig, *, session_id: str, task: str = TASK,
           tools: list | None = None, client=None) -> tuple:
    """Run the agent over ``backend``; ``(list of StepResult, agent)``."""
    agent = CompactingAgent(tokenizer, steps, config, task)
    out, previous, previous_reply = [], [], None
    kwargs = {"client": client} if client is not None else {}
    for i, step in enumerate(steps, 1):
        msgs = agent.request(step)
        r = backend.chat(msgs, session_id, config.max_new_tokens, tools=tools, **kwargs)
        shown = json.dumps([c["function"] for c in r.tool_calls]) if r.tool_calls else r.text
        out.append(StepResult(i, r.prompt_tokens, r.cached_tokens, r.ttft_s, r.seconds, shown,
                              new_text_tokens(tokenizer, previous, previous_reply, msgs, tools),
                              bool(r.tool_calls)))
        previous, previous_reply = msgs, reply_message(r.text, r.tool_calls)
        agent.observe(r.text, r.tool_calls)
    return out, agent


def run_mode(backend, tokenizer, mode: str, steps: list[Step], config: DemoConfig,
             tools: list | None = None) -> ModeResult:
    t0 = time.perf_counter()
    results, agent = replay(backend, tokenizer, steps, config, session_id=f"agent-{mode}", tools=tools)
    return ModeResult(mode, results, backend.peak_kv_bytes(), time.perf_counter() - t0, agent.truncations,
                      agent.drops)


def run_concurrent(backend, tokenizer, mode: str, steps: list[Step], config: DemoConfig, agents: int,
                   tools: list | None = None) -> ConcurrentResult:
    """``agents`` threads replaying ``steps`` at once, each with its own task, session id and client."""
    results: list = [None] * agents
    errors: list = []
    barrier = threading.Barrier(agents)

    def work(k: int) -> None:
        try:
            client = backend.client() if isinstance(backend, HttpBackend) else None
            task = f"{TASK} You are agent {k + 1} of {agents}; report only your own findings."
            barrier.wait(timeout=60)
            results[k], _ = replay(backend, tokenizer, steps, config, session_id=f"{mode}-agent-{k}", task=task,
                                   tools=tools, client=client)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(agents)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    flat = [s for r in results for s in r]
    return ConcurrentResult(mode, agents, len(flat), sum(s.prompt_tokens for s in flat),
                            sum(s.prefilled for s in flat), wall, backend.peak_kv_bytes())


def run_all(make_backend, tokenizer, *, modes=MODES, steps: list[Step], config: DemoConfig, concurrent: int = 0,
            concurrent_steps: int = 0, tools: list | None = None) -> tuple:
    """Every mode on one backend each (``make_backend(mode)``: a context manager giving the backend)."""
    single, multi = [], []
    for mode in modes:
        with make_backend(mode) as backend:
            single.append(run_mode(backend, tokenizer, mode, steps, config, tools))
            print(f"  {mode}: {single[-1].prefilled} tokens prefilled in {single[-1].wall_s:.1f} s", flush=True)
        if concurrent:
            with make_backend(mode) as backend:
                multi.append(run_concurrent(backend, tokenizer, mode, steps[:concurrent_steps], config, concurrent,
                                            tools))
                print(f"  {mode} x{concurrent}: {multi[-1].prefilled} tokens prefilled in {multi[-1].wall_s:.1f} s",
                      flush=True)
    return single, multi


# ---------------------------------------------------------------------- report


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def single_table(results: list[ModeResult]) -> tuple:
    base = next((r for r in results if r.mode == "none"), results[-1])
    base_mean, _ = base.ttft_ms()
    headers = ["mode", "requests", "prompt tok", "prefilled", "vs none", "TTFT mean ms", "TTFT median ms",
               "TTFT vs none", "peak KV MiB", "KV vs none", "wall s"]
    rows = []
    for r in results:
        mean, median = r.ttft_ms()
        rows.append([r.mode, len(r.steps), r.prompt_tokens, r.prefilled, _ratio(r.prefilled, base.prefilled),
                     f"{mean:.0f}", f"{median:.0f}", _ratio(mean, base_mean), f"{r.peak_kv_bytes / MiB:.2f}",
                     _ratio(r.peak_kv_bytes, base.peak_kv_bytes), f"{r.wall_s:.1f}"])
    return headers, rows


def concurrent_table(results: list[ConcurrentResult]) -> tuple:
    base = next((r for r in results if r.mode == "none"), results[-1])
    headers = ["mode", "agents", "requests", "prompt tok", "prefilled", "vs none", "wall s", "wall vs none",
               "peak KV MiB"]
    rows = [[r.mode, r.agents, r.requests, r.prompt_tokens, r.prefilled, _ratio(r.prefilled, base.prefilled),
             f"{r.wall_s:.1f}", _ratio(r.wall_s, base.wall_s), f"{r.peak_kv_bytes / MiB:.2f}"] for r in results]
    return headers, rows


# ---------------------------------------------------------------------- main


class _InProcess:
    def __init__(self, model, tokenizer, mode, cache_kwargs):
        self.backend = InProcessBackend(model, tokenizer, mode, cache_kwargs)

    def __enter__(self):
        return self.backend

    def __exit__(self, *exc):
        self.backend.close()


class _Http:
    def __init__(self, mode, extra_args):
        self.server = Server(mode, extra_args)

    def __enter__(self):
        self.server.__enter__()
        return HttpBackend(self.server.url)

    def __exit__(self, *exc):
        self.server.__exit__(*exc)


def _embedded_tokenizer():
    """The embedded model's tokenizer without loading its weights (converted once by ``load_default``)."""
    from transformers import AutoTokenizer

    from kvcompact.models import default_model_dir, load_default

    folder = default_model_dir()
    if not (folder / "tokenizer_config.json").exists():
        return load_default()[1]  # converts the model first
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 steps, 2 concurrent agents of 3 steps")
    p.add_argument("--in-process", action="store_true", help="SessionManager in this process instead of HTTP")
    p.add_argument("--steps", type=_positive, default=None, help="trace steps (default 24, --quick 8)")
    p.add_argument("--concurrent", type=_non_negative, default=None,
                   help="concurrent agents (default 4, --quick 2; 0: skip)")
    p.add_argument("--concurrent-steps", type=_positive, default=None, help="steps per concurrent agent (default 6)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of edits,prefix,none")
    p.add_argument("--kv-dtype", default=None, help="passed to the server (default: its own, lossless)")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads (this process and the servers)")
    agent = p.add_argument_group("the agent (default: the demo's settings, no tools)")
    agent.add_argument("--tools", action="store_true",
                       help="send the demo's four tools as OpenAI tools schemas on every request")
    agent.add_argument("--context-budget", type=_positive, default=None, metavar="N",
                       help="tokens the agent's message list may hold (demo: 1500)")
    agent.add_argument("--observation-budget", type=_positive, default=None, metavar="N",
                       help="tokens an older tool output is truncated to (demo: 96)")
    agent.add_argument("--keep-recent", type=_non_negative, default=None, metavar="N",
                       help="last messages kept whole (demo: 4)")
    agent.add_argument("--max-tokens", type=_positive, default=None, metavar="N",
                       help="max_tokens of every request (demo: 12)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "serve.json"))
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in args.modes) or not args.modes:
        p.error(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    return args


def agent_config(args: argparse.Namespace, steps: int) -> DemoConfig:
    """The demo's settings with the options' overrides."""
    overrides = {"token_budget": args.context_budget, "observation_budget": args.observation_budget,
                 "keep_recent": args.keep_recent, "max_new_tokens": args.max_tokens}
    return replace(DemoConfig(steps=steps), **{k: v for k, v in overrides.items() if v is not None})


def _backends(args: argparse.Namespace) -> tuple:
    """``(make_backend, tokenizer, how)`` for ``run_all``."""
    from kvcompact.models import load_default

    if args.in_process:
        model, tokenizer = load_default()
        cache_kwargs = {"kv_dtype": args.kv_dtype} if args.kv_dtype else None
        return (lambda mode: _InProcess(model, tokenizer, mode, cache_kwargs)), tokenizer, "in-process SessionManager"
    tokenizer = _embedded_tokenizer()  # the servers load the model; this process only counts tokens
    extra = (["--kv-dtype", args.kv_dtype] if args.kv_dtype else []) + (
        ["--threads", str(args.threads)] if args.threads else [])
    return (lambda mode: _Http(mode, extra)), tokenizer, "HTTP (openai client, streaming)"


def report(single: list, multi: list, *, machine: str, date: str, config: DemoConfig, tools: list | None,
           tools_tokens: int, concurrent: int, concurrent_steps: int) -> int:
    """Print the tables and the floor; the floor in tokens."""
    agent = (f"tools: {len(tools)} schemas, {tools_tokens} tokens of system prompt" if tools else "no tools")
    print(f"\n{machine}, {date}; SmolLM2-135M-Instruct, max_tokens {config.max_new_tokens}, {agent}; compaction: "
          f"observation budget {config.observation_budget}, keep_recent {config.keep_recent}, context budget "
          f"{config.token_budget}\n")
    headers, rows = single_table(single)
    print_table(headers, rows)
    floor = single[0].floor
    none_prefilled = next((r.prefilled for r in single if r.mode == "none"), 0)
    print(f"\nfloor (new or changed message text): {floor} tokens"
          + (f" = {floor / none_prefilled:.3f} of stateless" if none_prefilled else "")
          + f"; the agent truncated {single[0].truncations} and dropped {single[0].drops} messages"
          + (f"; the model answered {single[0].tool_calls} of {len(single[0].steps)} steps with a tool call"
             if tools else ""))
    if multi:
        print(f"\n{concurrent} concurrent agents sharing the system prompt, {concurrent_steps} steps each:\n")
        c_headers, c_rows = concurrent_table(multi)
        print_table(c_headers, c_rows)
    return floor


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    n_steps = args.steps or (8 if args.quick else 24)
    concurrent = args.concurrent if args.concurrent is not None else (2 if args.quick else 4)
    concurrent_steps = args.concurrent_steps or (3 if args.quick else 6)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = agent_config(args, n_steps)
    steps = build_steps()[:n_steps]
    tools = TOOLS if args.tools else None

    make, tokenizer, how = _backends(args)
    tools_tokens = len(tokenizer(tools_text(tools), add_special_tokens=False)["input_ids"]) if tools else 0
    print(f"compacting-agent replay: {n_steps} steps, {how}, modes {','.join(args.modes)}", flush=True)
    single, multi = run_all(make, tokenizer, modes=args.modes, steps=steps, config=config, concurrent=concurrent,
                            concurrent_steps=concurrent_steps, tools=tools)

    machine = machine_description("cpu" if not torch.cuda.is_available() else "cuda")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    floor = report(single, multi, machine=machine, date=date, config=config, tools=tools, tools_tokens=tools_tokens,
                   concurrent=concurrent, concurrent_steps=concurrent_steps)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "bench_serve", "machine": machine, "date": date, "how": how,
                   "config": asdict(config), "tools": [t["function"]["name"] for t in tools or ()],
                   "tools_tokens": tools_tokens, "floor_tokens": floor,
                   "single": [dict(asdict(r), prefilled=r.prefilled) for r in single],
                   "concurrent": [asdict(r) for r in multi]}, f, indent=2)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
