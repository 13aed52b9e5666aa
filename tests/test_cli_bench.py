"""`kvcompact bench`: the whole command in process, on tiny shapes and a random Llama (--smoke)."""

import contextlib
import io
import json
import math

import pytest
import torch

from kvcompact import bench, cli


def run_main(capsys, *argv):
    """main() in process -> (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One --quick --smoke run shared by the tests below (about 3 s)."""
    out = tmp_path_factory.mktemp("bench") / "sub" / "bench.json"  # the folder is created
    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = cli.main(["bench", "--quick", "--smoke", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide; give the other tests theirs back
    return rc, stdout.getvalue(), stderr.getvalue(), out


def test_bench_prints_one_table_with_every_row_and_its_ratio(smoke_run):
    rc, out, err, _ = smoke_run
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("kvcompact bench (--smoke) on cpu: ")
    assert "1 threads" in lines[0]
    assert "clock: thread_time" in out  # --threads 1 on CPU measures CPU time
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header + 1].startswith("-----")
    table = "\n".join(lines[header:])
    for case in ("quantize fp8_e4m3 g32", "quantize int8 g32", "dequantize fp8_e4m3 g32",
                 "dequantize int8 g32", "compact_ keep 50%/head", "rope_shift_ neox",
                 "decode @64 DynamicCache", "decode @64 KVCompact(None)",
                 "decode @64 KVCompact(fp8_e4m3 g", "decode @64 KVCompact(int8 g",
                 "decode @64 HF QuantizedCache(fp8)", "decode @64 HF offloaded DynamicCache"):
        assert case in table, case
    for peer in ("torch eager (reference.quantize)", "torch eager (reference.dequantize)",
                 "copy_ of the bf16 tensor (ceiling)", "gather into new tensors (kvpress)",
                 "copy_ of the moved bytes (ceiling)", "torch eager (reference.rope_shift)",
                 "copy_ of the keys (ceiling)"):
        assert peer in table, peer
    if not torch.cuda.is_available():
        assert "n/a: needs a CUDA device" in table
    # Every measured row shows a ratio like "3.71x".
    end = next(i for i, line in enumerate(lines) if line.startswith("wrote "))
    measured = [line for line in lines[header + 2:end] if line and "n/a" not in line]
    assert len(measured) >= 12 + 4  # kernels; DynamicCache and 3 KVCompactCache rows at least
    for line in measured:
        ratios = [tok for tok in line.split() if tok.endswith("x") and tok[:-1].replace(".", "").isdigit()]
        assert ratios, line
    assert "wrote " in out


def test_bench_json_rows_have_positive_finite_ratios(smoke_run):
    rc, _, err, path = smoke_run
    assert rc == 0, err
    doc = json.loads(path.read_text())
    assert doc["mode"] == "--smoke" and doc["device"] == "cpu" and doc["threads"] == 1
    assert doc["config"]["repeats"] % 2 == 1 and doc["config"]["decode_steps"] % 2 == 1
    rows = doc["rows"]
    kernels = [r for r in rows if r["section"] == "kernel"]
    decode = [r for r in rows if r["section"] == "decode"]
    assert len(kernels) == 12  # 4 quantize/dequantize x 2 comparisons, compact_ x 2, rope x 2
    for r in kernels:
        assert positive_finite(r["value"]) and positive_finite(r["vs_value"]), r
        assert r["ratio"] == pytest.approx(r["vs_value"] / r["value"])
    measured = [r for r in decode if r["value"] is not None]
    assert {r["extra"]["cache"] for r in measured} >= {
        "DynamicCache", "KVCompact(None)", "KVCompact(fp8_e4m3 g16)", "KVCompact(int8 g16)"}
    for r in measured:
        for key in ("value", "vs_value", "ratio", "kv_bytes", "kv_ratio"):
            assert positive_finite(r[key]), (key, r)
    by_name = {r["extra"]["cache"]: r for r in measured if r["vs"].startswith("DynamicCache")}
    assert by_name["DynamicCache"]["ratio"] == 1.0 and by_name["DynamicCache"]["kv_ratio"] == 1.0
    # 8-bit storage holds fewer bytes than the fp32 DynamicCache even with its capacity slack.
    assert by_name["KVCompact(fp8_e4m3 g16)"]["kv_bytes"] < by_name["DynamicCache"]["kv_bytes"]
    assert by_name["KVCompact(int8 g16)"]["extra"]["workspace_bytes"] > 0
    assert all(r["extra"]["tokens"] == 64 + 1 + 3 for r in by_name.values())
    for r in decode:
        if r["value"] is None:
            assert r["note"].startswith("n/a: ") and r["ratio"] is None


def test_median_times_is_round_robin_and_odd_repeats_give_a_measured_value():
    calls = []
    t = bench.median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                           "cpu", repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "--threads: expected a positive integer"),
        (["--threads", "two"], "--threads: expected a positive integer"),
        (["--device", "tpu"], "--device: invalid choice"),
        (["--quick", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(capsys, argv, message):
    rc, out, err = run_main(capsys, "bench", *argv)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_unwritable_out_and_missing_gpu_exit_2_before_running(capsys, tmp_path):
    rc, out, err = run_main(capsys, "bench", "--smoke", "--out", str(tmp_path))
    assert rc == 2 and "kvcompact bench: error:" in err and "is a directory" in err
    assert out == ""  # rejected before any measurement
    if not torch.cuda.is_available():
        rc, out, err = run_main(capsys, "bench", "--smoke", "--device", "cuda",
                                "--out", str(tmp_path / "b.json"))
        assert rc == 2 and "--device cuda: no CUDA device is available" in err
        assert not (tmp_path / "b.json").exists()


def test_help_lists_options_but_not_the_smoke_switch(capsys):
    rc, out, _ = run_main(capsys, "bench", "--help")
    assert rc == 0
    for opt in ("--quick", "--device", "--threads", "--out"):
        assert opt in out
    assert "--smoke" not in out
