"""Every example in README.md runs (issue 8): the Python blocks, and the CLI command shown."""

import pathlib
import re
import shlex

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_three_usage_examples():
    blocks = python_blocks()
    assert len(blocks) >= 3
    joined = "\n".join(blocks)
    for needle in ("KVCompactCache", "Session(", "ops.quantize", "ops.compact_"):
        assert needle in joined


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_example_runs(index, capsys):
    code = python_blocks()[index]
    exec(compile(code, f"README.md example {index + 1}", "exec"), {"__name__": f"readme_{index}"})
    capsys.readouterr()


def test_readme_estimate_command_runs(capsys):
    from kvcompact import cli

    text = README.read_text()
    line = next(l for l in text.splitlines() if l.startswith("kvcompact estimate"))
    argv = shlex.split(line)[1:]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "327,680" in out and "40.00 GiB" in out
