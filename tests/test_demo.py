"""`kvcompact demo`, the main job, end to end on the embedded model (issue 8)."""

import json
import re

import pytest

from kvcompact import cli


@pytest.mark.slow
def test_demo_saves_memory_without_reprefill(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Summary" in printed and "peak KV bytes" in printed
    rows = [line for line in printed.splitlines() if re.match(r"\s*\d+/24\s", line)]
    assert len(rows) == 24  # one live row per step

    report = json.loads((out_dir / "demo.json").read_text())
    summary = report["summary"]
    assert summary["steps"] == 24
    assert summary["peak_kv_ratio"] <= 0.35
    assert summary["tokens_reprefilled"] == 0
    assert summary["edits"]["replaced"] + summary["edits"]["dropped"] > 0
    assert summary["prefill_tokens_avoided"] > 0
    steps = report["steps"]
    # the dense run only grows; kvcompact's context is smaller by the end
    assert all(a["dense_context"] <= b["dense_context"] for a, b in zip(steps, steps[1:]))
    assert steps[-1]["compact_context"] < steps[-1]["dense_context"]
    png = (out_dir / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--steps", "0"])
    assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err
