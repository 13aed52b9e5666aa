"""`kvcompact eval`: the command in process (kvcompact.cli.main) on a tiny random model saved to a folder.

The tiny model answers nonsense (accuracy is test_eval_runner's business, on the same model); what
is checked is the command's contract: the options reach run_eval, the table is printed, the JSON
and the PNG are real, and bad input ends in the registry's error line, never a traceback.
"""

import json
import shutil
import sys

import pytest
import torch

from agent_fixtures import smollm2_tokenizer, tiny_llama
from kvcompact import cli
from kvcompact.eval import EvalReport, load_traces
from kvcompact.eval.traces import default_trace_paths

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = smollm2_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smallest_trace():
    return min(default_trace_paths(), key=lambda p: (p.stat().st_size, p.name))


@pytest.fixture
def one_thread():
    # --threads sets torch's process-wide count: 1 is quickest on a busy shared machine; put it back after.
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def _run(capsys, *argv):
    status = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def test_quick_run_writes_json_and_png(model_dir, tmp_path, capsys, one_thread):
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    status, out, err = _run(capsys, "--model", model_dir, "--quick", "--configs", "dense", "inplace-gap",
                            "--max-new-tokens", 2, "--jobs", 1, "--threads", one_thread, "--json", js, "--png", png)
    assert status == 0, err
    assert torch.get_num_threads() == one_thread
    quick = load_traces(quick=True)
    # stdout: the table; stderr: one progress line per trace x configuration.
    assert out.splitlines()[0].split()[:2] == ["config", "accuracy"]
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["dense", "inplace-gap"]
    assert sum(line.startswith("[") for line in err.splitlines()) == len(quick) * 2
    assert "Traceback" not in err

    report = EvalReport.from_json(js.read_text())
    assert EvalReport.from_json(report.to_json()).to_json() == report.to_json()
    assert report.traces == [t.id for t in quick]
    assert report.reference == "dense" and report.settings["max_new_tokens"] == 2
    questions = sum(len(t.questions) for t in quick)
    assert [(c.name, c.total) for c in report.configs] == [("dense", questions), ("inplace-gap", questions)]

    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert float(image[..., :3].std()) > 0.01  # something is drawn, not a blank canvas


def test_reference_none_has_no_kl_and_traces_may_be_a_folder(model_dir, smallest_trace, tmp_path, capsys,
                                                             one_thread):
    folder = tmp_path / "traces"
    folder.mkdir()
    shutil.copy(smallest_trace, folder)
    js = tmp_path / "eval.json"
    status, out, err = _run(capsys, "--model", model_dir, "--traces", folder, "--configs", "dense", "reprefill",
                            "--reference", "none", "--max-new-tokens", 2, "--jobs", 1, "--threads", one_thread,
                            "--json", js, "--quiet")
    assert status == 0, err
    assert err == ""  # --quiet: no progress, no loading bars
    report = EvalReport.from_json(js.read_text())
    assert report.reference is None and report.traces == [load_traces([smallest_trace])[0].id]
    assert sorted(c.name for c in report.configs) == ["dense", "reprefill"]  # run_eval picks the order
    assert all(c.mean_kl is None and all(q.kl is None for q in c.questions) for c in report.configs)
    header, _, *rows = out.splitlines()
    kl_at = header.index("KL dense")  # values are right-aligned under their header
    assert all(row[kl_at:kl_at + len("KL dense")].strip() == "-" for row in rows)


def test_worker_processes_give_the_same_report(model_dir, smallest_trace, tmp_path, capsys, one_thread):
    """--jobs 2: the plays run in two spawned worker processes that load --model themselves; the
    report is the one a single process writes (plays are deterministic, the KL is computed after)."""
    reports = {}
    for jobs in (1, 2):
        js = tmp_path / f"eval-{jobs}.json"
        status, out, err = _run(capsys, "--model", model_dir, "--traces", smallest_trace, "--configs", "dense",
                                "reprefill", "inplace-gap", "--max-new-tokens", 2, "--jobs", jobs, "--threads",
                                one_thread, "--json", js)
        assert status == 0, err
        assert "Traceback" not in err and sum(line.startswith("[") for line in err.splitlines()) == 3
        reports[jobs] = EvalReport.from_json(js.read_text())
    assert "2 worker processes (1 thread each)" in err
    one, two = reports[1], reports[2]
    assert two.settings["jobs"] == 2 and one.settings["jobs"] == 1
    assert [c.name for c in two.configs] == [c.name for c in one.configs] == ["dense", "reprefill", "inplace-gap"]
    for a, b in zip(one.configs, two.configs):
        assert (a.peak_kv_bytes, a.tokens_prefilled, a.tokens_fed) == (b.peak_kv_bytes, b.tokens_prefilled,
                                                                       b.tokens_fed)
        for qa, qb in zip(a.questions, b.questions, strict=True):
            assert (qa.question, qa.reply, qa.correct) == (qb.question, qb.reply, qb.correct)
            assert qa.kl == pytest.approx(qb.kl, rel=1e-6, abs=1e-12)
            assert qa.kl_exact == pytest.approx(qb.kl_exact, rel=1e-6, abs=1e-12)
    # the KL really was computed from the workers' plays
    assert all(q.kl is not None and q.kl_exact is not None for c in two.configs for q in c.questions)
    assert max(q.kl for q in two["reprefill"].questions) > 0


def test_a_model_folder_runs_in_one_process_unless_asked(model_dir, smallest_trace, capsys, one_thread):
    """--model of unknown size: one model copy (jobs 1) by default, not one per core."""
    status, out, err = _run(capsys, "--model", model_dir, "--traces", smallest_trace, "--configs", "dense",
                            "--max-new-tokens", 1, "--threads", one_thread)
    assert status == 0, err
    assert f"loading {model_dir}" in err and "worker processes" not in err


def test_list_configs_prints_every_known_config(capsys):
    from kvcompact.eval import configs

    status, out, err = _run(capsys, "--list-configs")
    assert status == 0 and err == ""
    known = getattr(configs, "ALL_CONFIGS", None) or configs.DEFAULT_CONFIGS
    assert [line.split()[0] for line in out.splitlines()] == [c.name for c in known]
    for c in known:
        assert c.description in out


@pytest.mark.parametrize("argv, needle", [
    (["--configs", "dense", "no-such-config"], "no-such-config"),
    (["--reference", "no-such-reference"], "no-such-reference"),
    (["--traces", "/no/such/trace.json"], "/no/such/trace.json"),
    (["--quick", "--model", "/no/such/model"], "/no/such/model"),
    (["--json", "/no/such/folder/eval.json"], "/no/such/folder"),
])
def test_bad_input_is_an_error_line_not_a_traceback(argv, needle, capsys):
    # All of these fail before any model is loaded.
    status, out, err = _run(capsys, *argv)
    assert status == 2
    assert "kvcompact eval: error:" in err and needle in err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_bad_number_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--max-new-tokens", value])
    assert exit_.value.code == 2
    assert "kvcompact eval: error: argument --max-new-tokens" in capsys.readouterr().err


def test_png_without_matplotlib_names_the_extra_before_running(model_dir, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    status, out, err = _run(capsys, "--model", model_dir, "--quick", "--png", tmp_path / "eval.png")
    assert status == 1
    assert 'pip install "kvcompact[demo]"' in err and "matplotlib" in err
    assert out == "" and "[1/" not in err  # refused before the run, not after it
    assert not (tmp_path / "eval.png").exists()

    report = EvalReport(model="m", traces=["t"], configs=[])
    with pytest.raises(ImportError, match="matplotlib"):
        report.plot(tmp_path / "eval.png")
