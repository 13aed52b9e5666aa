"""`kvcompact estimate`: in process (kvcompact.cli.main) and as `python -m kvcompact`."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from kvcompact import cli, memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 1 << 30

# meta-llama/Llama-3.1-70B's public config.json, as downloaded (the fields that matter
# and the ones around them, so the reader sees nothing is special-cased).
LLAMA_70B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 8192,
    "initializer_range": 0.02,
    "intermediate_size": 28672,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


@pytest.fixture
def llama70b_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B_CONFIG, indent=2))
    return path


def run_main(capsys, *argv):
    """main() in process -> (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_module(*argv):
    # The child must import the same kvcompact this process did (the installed
    # package in CI, an in-place build in a checkout), so put that one first
    # and run from a neutral folder where no source tree can shadow it.
    import kvcompact

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(kvcompact.__file__)))
    env = dict(os.environ, PYTHONPATH=package_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "kvcompact", *argv], cwd=os.path.dirname(package_parent),
                          env=env, capture_output=True, text=True, timeout=120)


def row(out, storage):
    """The table row whose first cell is `storage`."""
    for line in out.splitlines():
        if re.match(re.escape(storage) + r"\s{2,}", line):  # columns are 2+ spaces apart
            return line
    raise AssertionError(f"no {storage!r} row in:\n{out}")


def check_llama70b_table(out):
    dense = row(out, "bf16/fp16")
    assert "327,680" in dense and "(320.00 KiB)" in dense and "40.00 GiB" in dense
    assert "at 131,072 tokens" in out
    # fp8 and int8 beside them: 128 one-byte codes + a 4-byte scale per head vector.
    for fmt in ("fp8_e4m3", "fp8_e5m2", "int8"):
        assert "168,960" in row(out, fmt) and "20.62 GiB" in row(out, fmt)
    assert "184,320" in row(out, "int8 g32")  # 4 scales per 128-wide head
    assert "GQA 8:1" in out


def test_llama70b_config_in_process(capsys, llama70b_config):
    rc, out, err = run_main(capsys, "estimate", "--config", str(llama70b_config),
                            "--context", "131072")
    assert rc == 0, err
    check_llama70b_table(out)
    assert "LlamaForCausalLM" in out


def test_llama70b_config_as_module(llama70b_config):
    proc = run_module("estimate", "--config", str(llama70b_config), "--context", "131,072")
    assert proc.returncode == 0, proc.stderr
    check_llama70b_table(proc.stdout)


def test_default_context_is_max_position_embeddings(capsys, llama70b_config):
    rc, out, _ = run_main(capsys, "estimate", "--config", str(llama70b_config.parent))
    assert rc == 0 and "at 131,072 tokens" in out
    rc, out, _ = run_main(capsys, "estimate", "--model", "SmolLM2-135M")
    assert rc == 0 and "at 8,192 tokens" in out and "23,040" in out


def test_json_and_planner(capsys):
    rc, out, _ = run_main(capsys, "estimate", "--model", "llama-3.1-8b", "--context", "32768",
                          "--gpu-mem", "80", "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["model"] == "Llama-3.1-8B" and report["context_tokens"] == 32768
    rows = {r["storage"]: r for r in report["rows"]}
    assert rows["bf16/fp16"]["bytes_per_token"] == 131_072
    assert rows["bf16/fp16"]["bytes_at_context"] == 4 * GiB
    assert rows["int8 g64"]["bytes_per_token"] == 2 * 32 * 8 * (128 + 8)
    cfg = memory.builtin_config("Llama-3.1-8B")
    for r in report["rows"]:
        assert r["tokens_that_fit"] == memory.tokens_that_fit(
            cfg, 80 * GiB, kv_dtype=r["kv_dtype"], group_size=r["group_size"])
    plan = report["planner"]
    assert plan["num_params"] == 8_030_261_248 and plan["num_params_estimated"]
    assert plan["reserve_bytes"] == 8 * GiB
    assert plan["available_bytes"] == 80 * GiB - 16_060_522_496 - 8 * GiB
    assert rows["fp8_e4m3"]["tokens_that_fit"] > rows["bf16/fp16"]["tokens_that_fit"]


def test_planner_options(capsys):
    rc, out, _ = run_main(capsys, "estimate", "--model", "Llama-3.1-70B", "--gpu-mem", "80",
                          "--weights-dtype", "int4", "--num-params", "70.6B", "--reserve", "0",
                          "--kv-dtype", "fp8_e4m3", "--group-size", "32", "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["planner"]["num_params"] == 70_600_000_000
    assert not report["planner"]["num_params_estimated"]
    assert [r["storage"] for r in report["rows"]] == ["bf16/fp16", "fp8_e4m3 g32"]
    available = 80 * GiB - 35_300_000_000
    assert report["rows"][1]["tokens_that_fit"] == available // 184_320
    # Weights that do not fit: zero tokens, said in words.
    rc, out, _ = run_main(capsys, "estimate", "--model", "Llama-3.1-70B", "--gpu-mem", "80")
    assert rc == 0 and "do not fit" in out and row(out, "int8").split()[-1] == "0"


def test_mla_and_windows_in_table(capsys):
    rc, out, _ = run_main(capsys, "estimate", "--model", "DeepSeek-V3", "--kv-dtype", "int8")
    assert rc == 0
    assert "70,272" in row(out, "bf16/fp16") and "MLA" in out and "c_kv 1x512 + k_pe 1x64" in out
    assert "35,624" in row(out, "int8")
    rc, out, _ = run_main(capsys, "estimate", "--model", "gemma-2-9b", "--context", "32768")
    assert rc == 0 and "21 sliding, 21 full" in out and "4,096 tokens" in out
    bf16_total = memory.kv_bytes(memory.builtin_config("Gemma-2-9B"), 32768)
    assert memory.format_bytes(bf16_total) in row(out, "bf16/fp16")


def test_group_that_does_not_divide_shows_na(capsys):
    rc, out, _ = run_main(capsys, "estimate", "--model", "DeepSeek-V3",
                          "--kv-dtype", "int8", "--group-size", "128")
    assert rc == 0 and "n/a: group_size=128 does not divide" in row(out, "int8 g128")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["estimate", "--model", "gpt-5"], "unknown model 'gpt-5'; built-in models: Llama-3.1-8B"),
        (["estimate", "--config", "/nonexistent/config.json"], "config file not found"),
        (["estimate"], "one of the arguments --config --model is required"),
        (["estimate", "--model", "SmolLM2-135M", "--context", "-5"], "expected a positive integer"),
        (["estimate", "--model", "SmolLM2-135M", "--gpu-mem", "lots"], "expected a positive number"),
        (["estimate", "--model", "SmolLM2-135M", "--kv-dtype", "int4"], "invalid choice"),
        (["estimate", "--model", "SmolLM2-135M", "--group-size", "32"], "needs a quantized --kv-dtype"),
        (["estimate", "--model", "x", "--config", "y"], "not allowed with argument"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_message(capsys, argv, message):
    rc, out, err = run_main(capsys, *argv)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err + out


def test_bad_config_files(capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    rc, _, err = run_main(capsys, "estimate", "--config", str(bad))
    assert rc == 2 and "not valid JSON" in err
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    rc, _, err = run_main(capsys, "estimate", "--config", str(bad))
    assert rc == 2 and "lacks 'num_hidden_layers'" in err
    # The same failure through the real entry point: a message, not a traceback.
    proc = run_module("estimate", "--config", str(bad))
    assert proc.returncode == 2
    assert "kvcompact estimate: error: config lacks 'num_hidden_layers'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_module("estimate", "--model", "nope")
    assert proc.returncode == 2 and "SmolLM2-135M" in proc.stderr and "Traceback" not in proc.stderr


def test_adding_a_command_is_one_function(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def _args(p):
        p.add_argument("--n", type=int, default=1)

    @cli.command("hello", help="say hello", arguments=_args)
    def hello(args):
        print("hello" * args.n)
        return 3

    rc, out, _ = run_main(capsys, "hello", "--n", "2")
    assert rc == 3 and out == "hellohello\n"
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0 and "estimate" in out and "hello" in out
    with pytest.raises(ValueError, match="twice"):
        cli.command("hello", help="again")(hello)


# -- tensor parallelism: per-device figures ------------------------------------------------------


def test_tp8_llama70b_is_5_gib_per_device_with_fp8_and_int8_beside(capsys):
    rc, out, err = run_main(capsys, "estimate", "--model", "Llama-3.1-70B", "--context", "131072", "--tp", "8")
    assert rc == 0, err
    assert "tensor parallel over 8 devices" in out and "GQA 8:1" in out
    rows = {" ".join(line.split()[:-6]): line for line in out.splitlines()
            if line[:1].isalpha() and line.rstrip().endswith("x")}
    assert "5.00 GiB" in rows["bf16/fp16"] and "40,960" in rows["bf16/fp16"]
    assert "2.58 GiB" in rows["fp8_e4m3"] and "2.58 GiB" in rows["int8"]  # 128 codes + 4-byte scale per head


def test_tp_json_and_planner_split_the_weights(capsys):
    rc, out, _ = run_main(capsys, "estimate", "--model", "Llama-3.1-70B", "--context", "8192", "--tp", "4",
                          "--gpu-mem", "80", "--json")
    assert rc == 0
    rep = json.loads(out)
    _, one, _ = run_main(capsys, "estimate", "--model", "Llama-3.1-70B", "--context", "8192", "--gpu-mem", "80",
                         "--json")
    single = json.loads(one)
    assert rep["tp"] == 4
    assert rep["rows"][0]["bytes_per_token"] * 4 == single["rows"][0]["bytes_per_token"]
    assert rep["planner"]["weights_bytes"] == -(-single["planner"]["weights_bytes"] // 4)


def test_shard_config_rules():
    llama = memory.builtin_config("Llama-3.1-70B")  # 64 query heads, 8 KV heads
    assert memory.kv_bytes_per_token(memory.shard_config(llama, 16)) == memory.kv_bytes_per_token(
        memory.shard_config(llama, 8))  # fewer KV heads than ranks: one per rank (replicated)
    assert memory.kv_bytes_per_token(memory.shard_config(llama, 1)) == memory.kv_bytes_per_token(llama)
    deepseek = memory.builtin_config("DeepSeek-V3")  # MLA: the latent is not split by heads
    assert memory.kv_bytes_per_token(memory.shard_config(deepseek, 8)) == memory.kv_bytes_per_token(deepseek)
    with pytest.raises(memory.ConfigError, match="tp=3 does not divide num_attention_heads=64"):
        memory.shard_config(llama, 3)
    with pytest.raises(memory.ConfigError, match="tp must be an int >= 1"):
        memory.shard_config(llama, 0)


def test_tp_that_does_not_divide_the_heads_exits_2(capsys):
    rc, _, err = run_main(capsys, "estimate", "--model", "Llama-3.1-70B", "--tp", "3")
    assert rc == 2
    assert "tp=3 does not divide num_attention_heads=64" in err
