"""A real ``kvcompact serve`` subprocess on 127.0.0.1 for the HTTP tests, and small HTTP helpers.

The server is started as users start it (``python -m kvcompact serve``), polled on ``/health`` with
a bounded loop, and stopped by its own pid.
"""

from __future__ import annotations

import atexit
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``kvcompact serve`` running in a subprocess; ``url`` is its ``/v1`` base."""

    def __init__(self, *args: str, api_key: str | None = None, startup_s: float = 180.0):
        self.port = free_port()
        self.api_key = api_key
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvcompact-serve-{self.port}.log"
        cmd = [sys.executable, "-P", "-m", "kvcompact", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, HF_HUB_OFFLINE="1", KVCOMPACT_API_KEY="")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"kvcompact serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/health", auth=False)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"kvcompact serve did not answer /health within {startup_s} s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self._log.close()

    def headers(self, auth: bool = True, **extra) -> dict:
        h = {"Content-Type": "application/json"}
        if auth and self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(extra)
        return h

    def request(self, method: str, path: str, body=None, *, auth: bool = True, headers: dict | None = None,
                timeout: float = 300.0):
        """``(status, parsed JSON or text, response headers)`` of one request (raw bytes bodies as is)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, data, self.headers(auth, **(headers or {})))
            resp = conn.getresponse()
            raw = resp.read().decode()
            kind = resp.getheader("content-type", "")
            return resp.status, (json.loads(raw) if kind.startswith("application/json") else raw), dict(
                (k.lower(), v) for k, v in resp.getheaders())
        finally:
            conn.close()

    def chat(self, messages, *, session: str | None = None, **fields):
        """POST /v1/chat/completions (greedy unless told); ``(body, session id)``; asserts 200."""
        body = {"model": "kvcompact", "messages": messages, "temperature": 0, **fields}
        status, out, headers = self.request("POST", "/v1/chat/completions", body,
                                            headers={"X-Session-Id": session} if session else None)
        assert status == 200, (status, out)
        return out, headers["x-session-id"]

    def metrics(self) -> dict:
        """``/metrics`` as ``{"name{labels}": value}``."""
        status, text, _ = self.request("GET", "/metrics")
        assert status == 200, text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(kvcompact_\S+) (\S+)$", text, flags=re.M)}


@functools.lru_cache(maxsize=1)
def tiny_model_dir() -> Path:
    """A folder holding :func:`save_tiny_model`'s model, saved once per test process (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="kvcompact-tiny-serve-"))
    atexit.register(shutil.rmtree, folder, True)
    return save_tiny_model(folder / "tiny")


def save_tiny_model(folder: Path, max_context: int = 4096) -> Path:
    """Save a seeded tiny random Llama with the real SmolLM2 tokenizer (and chat template) to ``folder``.

    ``kvcompact serve --model <folder>`` then starts in a couple of seconds and answers a request in
    milliseconds, so long loops of requests (soak, concurrency, fuzz) run on it; its replies are
    random-looking text, but greedy decoding makes them reproducible. Skips (through the tokenizer
    helper) when the SmolLM2 tokenizer is unavailable.
    """
    from agent_fixtures import smollm2_tokenizer, tiny_llama

    tok = smollm2_tokenizer()
    model = tiny_llama(len(tok))
    model.config.max_position_embeddings = max_context
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line in /proc/{pid}/status")
