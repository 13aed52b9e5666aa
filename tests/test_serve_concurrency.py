"""``kvcompact serve`` under concurrent clients: four ``openai`` clients at once get the same replies
as the same requests sent one after another.

One server subprocess on a tiny random Llama (SmolLM2 tokenizer and chat template). Each of four
agents runs a five-turn conversation on its own ``X-Session-Id`` (through its own ``openai``
client), appending the reply and a new question every turn; the third turn is streamed. Each agent's
system prompt is its own, so no session is seeded from another's rows and every reply depends only
on its own conversation. Run sequentially first (agents one after another), then all at once from
four threads released by a barrier, after closing the sequential sessions (which would seed the
new ones): every reply and every ``usage`` is equal, greedy.
"""

from __future__ import annotations

import threading
import time

import pytest

AGENTS = 4
TURNS = 5
REPLY_TOKENS = 6
STREAMED_TURN = 2


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from serve_fixtures import Server, tiny_model_dir

    srv = Server("--model", str(tiny_model_dir()), "--threads", "1")
    try:
        yield srv
    finally:
        srv.stop()


def _run_agent(url: str, session: str, agent: int, start: threading.Barrier | None = None) -> dict:
    """Five turns of agent ``agent`` on ``session``: ``{"replies", "usages", "t0", "t1"}``."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", default_headers={"X-Session-Id": session},
                           max_retries=0, timeout=120)
    messages = [{"role": "system", "content": f"You are agent {agent}. Be brief."},
                {"role": "user", "content": f"Agent {agent}: list the files in src/."}]
    replies, usages = [], []
    if start is not None:
        start.wait(timeout=60)
    t0 = time.monotonic()
    for turn in range(TURNS):
        if turn == STREAMED_TURN:
            chunks = list(client.chat.completions.create(
                model="any", messages=messages, max_tokens=REPLY_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            r = client.chat.completions.create(model="any", messages=messages, max_tokens=REPLY_TOKENS,
                                               temperature=0)
            text, usage = r.choices[0].message.content, r.usage
        replies.append(text)
        usages.append((usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens))
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "user", "content": f"Agent {agent}, turn {turn}: and then?"}]
    return {"replies": replies, "usages": usages, "t0": t0, "t1": time.monotonic()}


def test_concurrent_clients_get_the_replies_of_the_same_requests_sent_sequentially(server):
    sequential = [_run_agent(server.url, f"seq-{k}", k) for k in range(AGENTS)]
    for k in range(AGENTS):  # else the concurrent runs' first requests are seeded from these rows
        assert server.request("DELETE", f"/v1/sessions/seq-{k}")[0] == 200

    start = threading.Barrier(AGENTS)
    results: list = [None] * AGENTS
    errors: list = []

    def worker(k):
        try:
            results[k] = _run_agent(server.url, f"conc-{k}", k, start)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append((k, err))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(AGENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client never finished"
    assert not errors, errors

    # The four conversations were in flight together (each began before any other had finished).
    assert max(r["t0"] for r in results) < min(r["t1"] for r in results)
    for k in range(AGENTS):
        assert results[k]["replies"] == sequential[k]["replies"], k
        assert results[k]["usages"] == sequential[k]["usages"], k
        assert all(results[k]["replies"]), k
    # Each later turn reused its whole previous context (nothing was lost to the other clients).
    for r in results:
        for (p0, c0, _), (_, _, cached) in zip(r["usages"], r["usages"][1:]):
            assert cached >= 0.9 * (p0 + c0), r["usages"]
    # Different agents got different replies (a mixed-up session would show as equal lists).
    assert len({tuple(r["replies"]) for r in results}) == AGENTS
    assert server.metrics()["kvcompact_chat_requests_total"] == 2 * AGENTS * TURNS
