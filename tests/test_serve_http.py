"""``kvcompact serve`` over real HTTP: the official ``openai`` client, KV reuse across requests,
parking, isolation, API keys, bad input, a client leaving mid-stream, smolagents, the README example.

One server subprocess for the module, on the embedded SmolLM2 (the real tokenizer and chat template
matter), with an API key and a device budget small enough that every idle session is parked after
each request. Replies are greedy and short. References are computed in this process on the same
model: the same code on the same CPU gives the same bits, so replies are compared exactly.

The first section tests ``Session.generate``'s streaming hook and stop strings in process, on a tiny
random model (what the server's streaming is built on).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from pathlib import Path

import pytest

from agent_fixtures import smollm2_tokenizer, tiny_llama
from kvcompact.agent import Session
from kvcompact.agent.sampling import settled_length
from kvcompact.cache import KVCompactCache

KEY = "sk-test-kvcompact"
N = 10  # max_tokens of most requests
SYSTEM = "You are a careful coding agent. Answer briefly."


# ---------------------------------------------------------------------- Session.generate (in process)


@pytest.fixture(scope="module")
def tiny():
    tok = smollm2_tokenizer()
    return tiny_llama(len(tok)), tok


def _tiny_session(tiny):
    model, tok = tiny
    s = Session(model, tok, KVCompactCache(model.config))
    s.add("user", "hello there, how are you?")
    return s


def test_on_token_pieces_concatenate_to_the_reply(tiny):
    full = _tiny_session(tiny).generate(24)
    pieces: list = []
    s = _tiny_session(tiny)
    assert s.generate(24, on_token=pieces.append) == full
    assert "".join(pieces) == full and len(pieces) > 3 and s.last_finish_reason == "length"


def test_a_stop_string_cuts_the_reply_and_the_cache_holds_exactly_its_render(tiny):
    model, tok = tiny
    full = _tiny_session(tiny).generate(24)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    pieces: list = []
    s = _tiny_session(tiny)
    text = s.generate(24, stop=["never-there", stop], on_token=pieces.append)
    assert text == full[:full.index(stop)] and "".join(pieces) == text and s.last_finish_reason == "stop"
    fresh = Session(model, tok, KVCompactCache(model.config))
    fresh.add("user", "hello there, how are you?")
    fresh.add("assistant", text)
    fresh.prefill()
    assert s.token_ids == fresh.token_ids  # what the cut reply renders to, nothing decoded past it
    assert s.cache.get_seq_length() == len(s.token_ids)


def test_a_raising_on_token_rolls_the_reply_back(tiny):
    full = _tiny_session(tiny).generate(24)
    s = _tiny_session(tiny)
    seen: list = []

    def leave(piece):
        seen.append(piece)
        if len(seen) == 4:
            raise ConnectionResetError("client gone")

    with pytest.raises(ConnectionResetError):
        s.generate(24, on_token=leave)
    assert [m.role for m in s.messages] == ["user"]
    assert s.token_ids == s.renderer.render_ids(s.messages, True)  # messages + generation prompt
    assert s.cache.get_seq_length() == len(s.token_ids)
    assert s.generate(24) == full  # the session carries on as if the abandoned reply never happened


def test_streaming_holds_back_a_possible_stop_string_and_bad_stops_raise(tiny):
    assert settled_length("abc Obs", ("Observation:",)) == 4
    assert settled_length("abc\ufffd", ()) == 3
    assert settled_length("abc", ("x",)) == 3
    s = _tiny_session(tiny)
    for bad in ("", [""], [3], b"x"):
        with pytest.raises(ValueError, match="stop"):
            s.generate(4, stop=bad)
    with pytest.raises(TypeError, match="on_token"):
        s.generate(4, on_token="print")
    assert s.token_ids == []  # refused before anything was fed


# ---------------------------------------------------------------------- tool calls (no model)


def test_tools_are_described_in_the_system_message_and_json_replies_become_tool_calls():
    from kvcompact.serve.tool_calls import ToolCallMemory, parse_tool_calls, with_tools

    tools = [{"type": "function", "function": {"name": "grep", "parameters": {"type": "object"}}}]
    msgs = with_tools([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "find x"}], tools)
    assert msgs[0]["content"].startswith(SYSTEM + "\n\n") and '"name": "grep"' in msgs[0]["content"]
    assert with_tools([{"role": "user", "content": "x"}], tools)[0]["role"] == "system"
    assert msgs == with_tools([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "find x"}], tools)
    for text in ('{"name": "grep", "arguments": {"pattern": "x"}}', ' ```json\n{"name": "grep", "arguments": '
                 '"{\\"pattern\\": \\"x\\"}"}\n``` ', '<tool_call>{"name": "grep", "parameters": {"pattern": "x"}}'
                 '</tool_call>'):
        calls = parse_tool_calls(text, {"grep"})
        assert calls and calls[0]["function"] == {"name": "grep", "arguments": '{"pattern": "x"}'}, text
        assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    for text in ("grep it", '{"name": "rm", "arguments": {}}', '{"name": "grep", "arguments": 3}', "{"):
        assert parse_tool_calls(text, {"grep"}) is None, text
    raw = '{"name": "grep", "arguments": {"pattern": "x"}}'
    calls = parse_tool_calls(raw, {"grep"})
    memory = ToolCallMemory()
    memory.remember(calls, raw)
    sent_back = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "content": "x: 1", "tool_call_id": calls[0]["id"]}]
    restored = memory.restore(sent_back)
    assert restored[1] == {"role": "assistant", "content": raw} and restored[2] == sent_back[2]
    other = [dict(sent_back[1], tool_calls=[dict(calls[0], id="call_unknown")])]
    assert memory.restore(other) == other  # not one of ours: left as sent


# ---------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_fixtures import Server

    srv = Server("--max-device-gib", "0.001", "--threads", "1", api_key=KEY)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here as in the server (same bits in both; no oversubscribed shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(smollm):
    """In-process references on the same model."""
    model, tok = smollm

    def session():
        return Session(model, tok, KVCompactCache(model.config))

    def fresh_reply(messages, n=N):
        s = session()
        s.sync(messages)
        return s.generate(n)

    return type("Ref", (), {"model": model, "tok": tok, "session": staticmethod(session),
                            "fresh_reply": staticmethod(fresh_reply)})


def conversation(k: int = 0, n_tool: int = 30):
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Read the file notes_{k}.txt and tell me what it is about."},
        {"role": "assistant", "content": "Reading it."},
        {"role": "tool", "content": "".join(f"note {i}: the cache of file {k} holds entry {i * 7}\n"
                                            for i in range(n_tool)), "name": "read_file"},
        {"role": "user", "content": "What does the file say, in one sentence?"},
    ]


def test_openai_client_streamed_text_equals_the_non_streamed_greedy_text(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url, api_key=KEY)
    messages = [{"role": "user", "content": "Name three uses of a hash map."}]
    r = client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "SmolLM2-135M-Instruct"
    text = r.choices[0].message.content
    assert text and r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.prompt_tokens_details.cached_tokens == 0
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == u.prompt_tokens
    # The second request (no id) was a fork of the first session: its messages' rows were copied.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert client.models.list().data[0].id == "SmolLM2-135M-Instruct"


def test_the_stream_is_server_sent_events_ending_in_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), server.headers())
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    assert resp.getheader("x-session-id")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and "usage" not in last


def test_append_reuses_the_whole_previous_context_and_edits_match_a_session_driven_by_hand(server, ref):
    sid = "append-and-edit"
    hand = ref.session()
    msgs = conversation(1)
    r1, got = server.chat(msgs, session=sid, max_tokens=N)
    assert got == sid
    hand.sync(msgs)
    assert r1["choices"][0]["message"]["content"] == hand.generate(N)
    held = r1["usage"]["prompt_tokens"] + r1["usage"]["completion_tokens"]
    assert held == len(hand.token_ids)

    msgs2 = msgs + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "Which entry is the largest?"}]
    r2, _ = server.chat(msgs2, session=sid, max_tokens=N)
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == held  # prompt + reply of the last call
    sync2 = hand.sync(msgs2)
    assert sync2.tokens_reused == held and r2["choices"][0]["message"]["content"] == hand.generate(N)

    # The agent shortens the old tool output (a truncation with a note) and asks again.
    old_span = hand.spans[hand.messages[3].id]
    before = len(hand.token_ids)
    msgs3 = [dict(m) for m in msgs2] + [{"role": "assistant", "content": r2["choices"][0]["message"]["content"]},
                                       {"role": "user", "content": "Summarize once more."}]
    msgs3[3]["content"] = msgs3[3]["content"][:120] + "\n[... truncated ...]"
    r3, _ = server.chat(msgs3, session=sid, max_tokens=N)
    sync3 = hand.sync(msgs3)
    kept = before - (old_span[1] - old_span[0])  # every row of the previous context but the old output's
    cached = r3["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert sync3.replaced == 1 and sync3.tail_from is None
    assert cached == sync3.tokens_reused and cached >= 0.9 * kept
    assert r3["choices"][0]["message"]["content"] == hand.generate(N)

    # Then it drops the tool output altogether.
    msgs4 = msgs3[:3] + msgs3[4:] + [{"role": "assistant", "content": r3["choices"][0]["message"]["content"]},
                                     {"role": "user", "content": "Thanks. Anything else?"}]
    span = hand.spans[hand.messages[3].id]
    kept = len(hand.token_ids) - (span[1] - span[0])
    r4, _ = server.chat(msgs4, session=sid, max_tokens=N)
    sync4 = hand.sync(msgs4)
    assert sync4.dropped == 1 and r4["usage"]["prompt_tokens_details"]["cached_tokens"] == sync4.tokens_reused
    assert sync4.tokens_reused >= 0.9 * kept
    assert r4["choices"][0]["message"]["content"] == hand.generate(N)


def test_eight_sessions_under_a_tiny_device_budget_park_and_resume_identically(server, smollm):
    from kvcompact.serve import SessionManager

    model, tok = smollm
    unbudgeted = SessionManager(model, tok)  # the same requests, never parked
    before = server.metrics()
    held: dict = {}
    convs = {f"park-{k}": conversation(10 + k, n_tool=6) for k in range(8)}
    checked = ("park-0", "park-3", "park-7")  # replayed in process too (all 8 would double the time)
    for rnd in range(2):
        for sid, msgs in convs.items():
            r, _ = server.chat(msgs, session=sid, max_tokens=4)
            text, usage = r["choices"][0]["message"]["content"], r["usage"]
            if rnd:  # resumed from host memory: the whole previous context reused, nothing recomputed
                assert usage["prompt_tokens_details"]["cached_tokens"] == held[sid]
            if sid in checked:
                assert text == unbudgeted.chat(msgs, session_id=sid, max_new_tokens=4).text
            held[sid] = usage["prompt_tokens"] + usage["completion_tokens"]
            convs[sid] = msgs + [{"role": "assistant", "content": text},
                                 {"role": "user", "content": f"And then (round {rnd})?"}]
    after = server.metrics()
    assert after["kvcompact_parks_total"] - before["kvcompact_parks_total"] >= 14
    assert after['kvcompact_sessions{state="parked"}'] >= 7
    assert after["kvcompact_host_bytes"] > 0


def test_a_request_without_id_is_served_from_kv_that_never_saw_a_removed_secret(server, ref):
    secret = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Remember this: the vault code is 4812 and the guard is Olga."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Who is the guard and what is the code?"},
    ]
    server.chat(secret, max_tokens=N)  # client A, no id
    subset = [secret[0], secret[3]]  # client B: the same conversation with the secret message removed
    b, sid_b = server.chat(subset, max_tokens=N)
    assert b["choices"][0]["message"]["content"] == ref.fresh_reply(subset)
    system_rows = len(ref.session().renderer.render_ids(subset[:1]))
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] <= system_rows


def test_api_key_is_required_everywhere_but_health(server):
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            status, out, headers = server.request(method, path, body, auth=False, headers=auth)
            assert status == 401, (path, auth)
            assert out["error"]["code"] == "invalid_api_key" and set(out["error"]) == {"message", "type", "param",
                                                                                        "code"}
    assert server.request("GET", "/health", auth=False)[0] == 200


BAD_REQUESTS = [
    (b'{"messages": [', 400, None),
    (b'[1, 2]', 400, None),
    ({"model": "m"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "16"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "user": "has blanks in it"}, 400, "user"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 413, "messages"),
]


def test_bad_requests_get_openai_error_bodies_and_leave_every_session_intact(server):
    sid = "intact"
    msgs = conversation(3, n_tool=8)
    r1, _ = server.chat(msgs, session=sid, max_tokens=4)
    for body, status, param in BAD_REQUESTS:
        got, out, _ = server.request("POST", "/v1/chat/completions", body, headers={"X-Session-Id": sid})
        assert got == status, (body if isinstance(body, bytes) else json.dumps(body)[:80], got, out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (err, param)
    # Other routes answer in the same format, and FastAPI's own validation body never shows.
    for method, path, status in (("DELETE", "/v1/sessions/no-such-session", 404),
                                 ("GET", "/v1/sessions/no-such-session", 404), ("GET", "/v1/nothing", 404),
                                 ("GET", "/v1/chat/completions", 405)):
        got, out, _ = server.request(method, path)
        assert got == status and set(out["error"]) == {"message", "type", "param", "code"}, (path, out)
    # The session named in every bad request was not touched: appending reuses all of it.
    nxt = msgs + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                  {"role": "user", "content": "Go on."}]
    r2, _ = server.chat(nxt, session=sid, max_tokens=4)
    held = r1["usage"]["prompt_tokens"] + r1["usage"]["completion_tokens"]
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == held
    status, out, _ = server.request("DELETE", f"/v1/sessions/{sid}")
    assert status == 200 and out["deleted"] is True
    assert server.request("GET", f"/v1/sessions/{sid}")[0] == 404


def test_a_stop_string_over_http_cuts_the_reply_and_the_next_turn_reuses_all_of_it(server):
    sid = "stops"
    msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    free, _ = server.chat(msgs, session="stops-free", max_tokens=12)
    text = free["choices"][0]["message"]["content"]
    word = text.split()[3]
    cut, _ = server.chat(msgs, session=sid, max_tokens=12, stop=[word])
    assert cut["choices"][0]["message"]["content"] == text[:text.index(word)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    nxt = msgs + [{"role": "assistant", "content": cut["choices"][0]["message"]["content"]},
                  {"role": "user", "content": "More."}]
    r2, _ = server.chat(nxt, session=sid, max_tokens=2)
    held = cut["usage"]["prompt_tokens"] + cut["usage"]["completion_tokens"]
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == held


def test_a_client_leaving_mid_stream_rolls_the_reply_back(server):
    sid = "leaves"
    msgs = [{"role": "user", "content": "Hello."}]
    server.chat(msgs, session=sid, max_tokens=2)
    msgs = msgs + [{"role": "assistant", "content": "Hi."},
                   {"role": "user", "content": "Write a long essay about the history of Rome."}]
    before = server.metrics()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    body = json.dumps({"messages": msgs, "max_tokens": 200, "temperature": 0, "stream": True}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in server.headers(**{"X-Session-Id": sid}).items())
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n"
                 .encode() + body)
    got = b""
    while got.count(b'"content"') < 4:  # the role chunk and three pieces of text
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    t0 = time.monotonic()  # the model is still decoding: /health does not wait for it
    assert server.request("GET", "/health", auth=False, timeout=5)[0] == 200
    assert time.monotonic() - t0 < 2
    sock.close()
    deadline = time.monotonic() + 120
    while server.metrics()["kvcompact_streams_cancelled_total"] == before["kvcompact_streams_cancelled_total"]:
        assert time.monotonic() < deadline, "the server never noticed the client leaving"
        time.sleep(0.2)
    status, info, _ = server.request("GET", f"/v1/sessions/{sid}")
    assert status == 200 and info["roles"] == ["user", "assistant", "user"]  # no partial reply kept
    r, _ = server.chat(msgs, session=sid, max_tokens=2)
    assert info["tokens"] == r["usage"]["prompt_tokens"] == r["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_smolagents_tool_calling_agent_runs_a_multi_step_loop_through_the_server(server):
    smolagents = pytest.importorskip("smolagents")
    from smolagents import tool

    @tool
    def word_length(word: str) -> int:
        """Count the letters of a word.

        Args:
            word: The word to measure.
        """
        return len(word)

    before = server.metrics()
    model = smolagents.OpenAIServerModel(model_id="kvcompact", api_base=server.url, api_key=KEY, temperature=0,
                                         max_tokens=24)
    agent = smolagents.ToolCallingAgent(tools=[word_length], model=model, max_steps=2, verbosity_level=0)
    agent.run("How many letters are in the word 'kvcompact'? Use the tool.")
    after = server.metrics()
    assert after["kvcompact_chat_requests_total"] - before["kvcompact_chat_requests_total"] >= 2
    assert after["kvcompact_prompt_tokens_reused_total"] > before["kvcompact_prompt_tokens_reused_total"]
    assert len(agent.memory.steps) >= 3  # the task and at least two model steps


def _readme_serve_block() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Serve agents over HTTP", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's serve section has one ```py example"
    return blocks[0]


def test_the_readme_serve_example_runs_against_the_server(server, capsys):
    pytest.importorskip("openai")
    code = _readme_serve_block()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and 'api_key="none"' in code
    code = code.replace("http://127.0.0.1:8000/v1", server.url).replace('api_key="none"', f'api_key="{KEY}"')
    exec(compile(code, "README.md serve example", "exec"), {"__name__": "readme_serve"})
    out = capsys.readouterr().out
    reused, total = map(int, re.search(r"(\d+) of (\d+) prompt tokens reused", out).groups())
    assert 0 < reused <= total


def test_every_request_is_logged_in_one_line(server):
    log = server.log()
    lines = [l for l in log.splitlines() if " chat session=" in l]
    assert len(lines) >= 20
    assert any(re.search(r"session=append-and-edit status=200 prompt=\d+ reused=\d+ fed=\d+ completion=\d+ "
                         r"edit=replace finish=\w+ ms=\d+", l) for l in lines)
    assert any("status=499" in l for l in lines) and any("status=413" in l for l in lines)


# ---------------------------------------------------------------------- the command's own checks


def test_a_public_host_without_a_key_warns(monkeypatch, capsys, tiny):
    import uvicorn

    from kvcompact import cli
    from kvcompact.serve import server as srv

    model, tok = tiny
    ran = {}
    monkeypatch.setattr(srv, "load_model", lambda name, device: (model, tok, "tiny"))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw, app=app))
    monkeypatch.delenv("KVCOMPACT_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "9", "--device", "cpu"]) == 0
    assert "warning: listening on 0.0.0.0 without an API key" in capsys.readouterr().err
    assert ran["host"] == "0.0.0.0" and ran["port"] == 9  # uvicorn.run was replaced: nothing was bound
    monkeypatch.setenv("KVCOMPACT_API_KEY", "k")
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "9", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert srv.is_loopback("127.0.0.1") and srv.is_loopback("::1") and srv.is_loopback("localhost")
    assert not srv.is_loopback("0.0.0.0") and not srv.is_loopback("example.org")
