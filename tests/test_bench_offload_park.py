"""benchmarks/bench_offload.py's park / resume section runs on CPU and reports sane rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_offload.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_offload", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_park_rows_have_bytes_ceiling_and_ratio(capsys):
    bench = _bench()
    rows = bench.bench_park(torch.device("cpu"), layers=2, tokens=64, reps=2)
    assert [(r["kv_dtype"], r["op"]) for r in rows] == [("bf16", "park"), ("bf16", "resume"),
                                                        ("int8", "park"), ("int8", "resume")]
    bf16, int8 = rows[0]["bytes"], rows[2]["bytes"]
    assert bf16 == 2 * 2 * 8 * 64 * 128 * 2          # K and V, 2 layers, 8 heads, 64 tokens, bf16
    assert int8 == 2 * 2 * 8 * 64 * (128 + 4)        # int8 codes + one fp32 scale per token-head
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["ceiling_gbps"] > 0 and r["ratio"] > 0
    bench.print_park_table(rows)
    out = capsys.readouterr().out
    assert "| int8 | 2 | 64 | resume |" in out and "ceiling" in out
