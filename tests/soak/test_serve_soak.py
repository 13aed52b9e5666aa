"""Soak of ``kvcompact serve`` over real HTTP: many requests over 8 agent slots, memory stays flat.

One server subprocess on a tiny random Llama (SmolLM2 tokenizer and chat template), with a device
budget below one session (every idle session is parked after each request) and a host budget of a
few sessions (the least recently used parked ones are dropped). Eight slots each run an agent
conversation: append a reply and a new tool result, drop the oldest tool output once three are
held, and every few turns start over under a new ``X-Session-Id`` (the old session is abandoned to
the host budget, or deleted). Each request goes to a slot drawn at random (seeded), so most
requests resume a parked session.

Checked: every request is answered; after warm-up (the first fifth of the requests) the server's
resident set (``VmRSS`` of its ``/proc/<pid>/status``) grows by less than 10%; ``/metrics`` host
bytes never exceed the host budget; device bytes never exceed the device budget plus one session
at the longest context this script builds; parks and drops happened; most prompt tokens were
served from the cache.

Length: 60 requests in CI; ``KVCOMPACT_SERVE_SOAK_REQUESTS=500`` for the acceptance run (issue 14:
500 requests over 8 sessions). Numbers are printed (``-s``).
"""

from __future__ import annotations

import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from serve_fixtures import Server, rss_kib, tiny_model_dir  # noqa: E402  (tests/serve_fixtures.py)

REQUESTS = int(os.environ.get("KVCOMPACT_SERVE_SOAK_REQUESTS", "0")) or 60
SLOTS = 8
GiB = 1 << 30
DEVICE_GIB = 0.00005  # ~52 KiB: below one session, so every idle session is parked
HOST_GIB = 0.0015  # ~1.5 MiB: about 8 parked sessions; abandoned and older ones are dropped
MAX_CONTEXT = 512
TURNS_PER_SESSION = 6  # then the slot starts a new session
KEEP_TOOL_OUTPUTS = 3  # the oldest is dropped past this
REPLY_TOKENS = 4
RSS_GROWTH = 0.10


def _tool_output(rng: random.Random, slot: int, turn: int) -> str:
    return "".join(f"{slot}.{turn}.{i}: value {rng.randrange(1000)}\n" for i in range(rng.randrange(2, 6)))


class Slot:
    """One agent: its session id, its message list, and what it sends next."""

    def __init__(self, index: int, rng: random.Random):
        self.index, self.rng, self.generation = index, rng, -1
        self.new_session()

    def new_session(self) -> None:
        self.generation += 1
        self.session = f"soak-{self.index}-{self.generation}"
        self.turns = 0
        self.messages = [
            {"role": "system", "content": "You are a coding agent. Use the tools, answer briefly."},
            {"role": "user", "content": f"Task {self.index}.{self.generation}: inspect the logs."},
            {"role": "tool", "content": _tool_output(self.rng, self.index, 0), "name": "read_log"},
            {"role": "user", "content": "What do you see?"},
        ]

    def after_reply(self, text: str) -> str:
        """Record the reply and pick the next edit: ``append``, ``drop`` or ``new``."""
        self.turns += 1
        if self.turns >= TURNS_PER_SESSION:
            return "new"
        output = _tool_output(self.rng, self.index, self.turns)
        self.messages += [{"role": "assistant", "content": text},
                          {"role": "tool", "content": output, "name": "read_log"},
                          {"role": "user", "content": f"And now (turn {self.turns})?"}]
        tools = [j for j, m in enumerate(self.messages) if m["role"] == "tool"]
        if len(tools) > KEEP_TOOL_OUTPUTS:
            del self.messages[tools[0]]  # the agent drops its oldest tool output
            return "drop"
        return "append"


def _kv_bytes_per_token(folder) -> int:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4  # K and V, fp32


def test_serve_soak_memory_stays_flat():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    folder = tiny_model_dir()
    srv = Server("--model", str(folder), "--threads", "1", "--max-context", str(MAX_CONTEXT),
                 "--max-device-gib", str(DEVICE_GIB), "--max-host-gib", str(HOST_GIB))
    rng = random.Random(0)
    slots = [Slot(k, rng) for k in range(SLOTS)]
    warm = max(20, REQUESTS // 5)
    edits = {"append": 0, "drop": 0, "new": 0, "delete": 0}
    samples = []  # (request, rss KiB, device bytes, host bytes)
    longest = 0
    t0 = time.perf_counter()
    try:
        for i in range(1, REQUESTS + 1):
            slot = slots[rng.randrange(SLOTS)]
            out, sid = srv.chat(slot.messages, session=slot.session, max_tokens=REPLY_TOKENS)
            assert sid == slot.session
            longest = max(longest, out["usage"]["total_tokens"])
            kind = slot.after_reply(out["choices"][0]["message"]["content"])
            if kind == "new":
                if rng.random() < 0.3:  # else abandoned: the host budget drops it
                    status, body, _ = srv.request("DELETE", f"/v1/sessions/{slot.session}")
                    assert status == 200 or (status == 404 and body["error"]["code"] == "session_not_found"), body
                    edits["delete"] += 1
                slot.new_session()
            edits[kind] += 1
            if i % 10 == 0 or i == warm or i == REQUESTS:
                m = srv.metrics()
                samples.append((i, rss_kib(srv.proc.pid), m["kvcompact_device_bytes"], m["kvcompact_host_bytes"]))
        metrics = srv.metrics()
    finally:
        srv.stop()
    seconds = time.perf_counter() - t0

    rss_warm = next(r for i, r, _, _ in samples if i == warm)
    rss_end = samples[-1][1]
    device_bound = DEVICE_GIB * GiB + longest * _kv_bytes_per_token(folder)
    print(f"\nserve soak: {REQUESTS} requests over {SLOTS} slots in {seconds:.1f} s "
          f"({1000 * seconds / REQUESTS:.0f} ms/request); edits {edits}; longest context {longest} tokens")
    print(f"  RSS {rss_warm} KiB at request {warm} -> {rss_end} KiB at {REQUESTS} "
          f"({100 * (rss_end - rss_warm) / rss_warm:+.1f}%); max device {max(s[2] for s in samples):.0f} B "
          f"(bound {device_bound:.0f}); max host {max(s[3] for s in samples):.0f} B (budget {HOST_GIB * GiB:.0f})")
    print(f"  parks {metrics['kvcompact_parks_total']:.0f}, dropped {metrics['kvcompact_sessions_dropped_total']:.0f}, "
          f"reused {metrics['kvcompact_prompt_tokens_reused_total']:.0f} / fed "
          f"{metrics['kvcompact_prompt_tokens_fed_total']:.0f} prompt tokens")

    assert metrics["kvcompact_chat_requests_total"] == REQUESTS
    assert edits["append"] and edits["drop"] and edits["new"]
    assert metrics["kvcompact_parks_total"] >= REQUESTS // 2  # idle sessions went to host memory
    assert metrics["kvcompact_sessions_dropped_total"] > 0  # and the host budget dropped old ones
    assert rss_end < (1 + RSS_GROWTH) * rss_warm, samples
    for i, _, device, host in samples:
        assert host <= HOST_GIB * GiB, (i, host)
        assert 0 <= device <= device_bound, (i, device, device_bound)  # 0: the served one was deleted
    # Resumed sessions reuse their rows: far more prompt tokens come from the cache than are fed.
    assert metrics["kvcompact_prompt_tokens_reused_total"] > metrics["kvcompact_prompt_tokens_fed_total"]
