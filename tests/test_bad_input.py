"""Every entry of tests/bad_input_catalogue.py raises its specific exception, naming the argument.

The whole catalogue runs in ONE subprocess (one interpreter start, not one per
entry) that prints a JSON line per entry: a crash (segfault, abort) kills the
subprocess and fails this test, and the last line printed says which entry was
running. ``python tests/bad_input_catalogue.py "<entry name>"`` re-runs one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_bad_input_catalogue():
    # Run from tests/ (not the repository root) so the installed package is what gets imported,
    # as for the rest of the suite; PYTHONPATH passes through for in-place builds.
    import kvcompact

    # The child imports the kvcompact this process imported (installed in CI, an
    # in-place build in a checkout).
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(kvcompact.__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=package_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HERE / "bad_input_catalogue.py")], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(HERE))
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    last = results[-1]["name"] if results else "(none)"
    assert proc.returncode == 0, (f"catalogue process died with {proc.returncode} after entry {last!r}:\n"
                                  f"{proc.stderr[-3000:]}")
    sys.path.insert(0, str(HERE))
    import bad_input_catalogue as cat  # the names only; the entries ran in the subprocess

    assert len(cat.CATALOGUE) >= 40
    assert [r["name"] for r in results] == [e[0] for e in cat.CATALOGUE]
    bad = [f"{r['name']}: expected {r['expected']} naming {r['needle']!r}, got {r['raised']}: {r['message']}"
           for r in results if not r["ok"]]
    assert not bad, "\n".join(bad)
