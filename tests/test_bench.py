"""bsbr.bench, the benchmark CLI: each command measures one point and prints a summary or one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bsbr.bench import MODEL_DEFAULTS, main, model_config_error
from bsbr.benchmarks import attention_flops
from bsbr.registry import available_models
from tests.conftest import ROOT


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_attention_prints_json(capsys):
    # in this process, so no --threads: torch's thread count here stays as it is
    assert main(["attention", "--impl", "sdpa_core", "--seq-len", "32", "--hidden-dim", "16", "--num-heads", "2",
                 "--repeats", "1", "--warmup", "0", "--json"]) == 0
    result = _last_json(capsys)
    assert (result["impl"], result["mode"], result["seq_len"]) == ("sdpa_core", "forward", 32)
    assert result["flops"] == attention_flops("sdpa_core", 32, 16, 2)
    load = result["load_average"]  # beside every timing: was the machine shared?
    assert len(load["before"]) == len(load["after"]) == 3 and load["cores"] == os.cpu_count()


def test_cli_model_in_its_original_form_and_a_summary_line(capsys):
    config = json.dumps({"vocab_size": 64, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ff_dim": 32})
    assert main(["--model", "standard", "--seq-len", "16", "--config", config, "--repeats", "2", "--warmup", "0",
                 "--json"]) == 0
    result = _last_json(capsys)
    assert (result["model"], result["seq_len"], result["repeats"], len(result["times_s"])) == ("standard", 16, 2, 2)
    assert main(["model", "--model", "standard", "--seq-len", "16", "--config", config, "--repeats", "1"]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("standard seq_len=16: median ")
    assert " before, " in summary and f"after, on {os.cpu_count()} cores]" in summary  # the load average


def test_python_m_bsbr_bench_as_the_readme_shows():
    """The README's form, in its own process: ``python -m bsbr.bench attention ... --threads N --json``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bsbr.bench", "attention", "--impl", "bsbr", "--mode", "decode",
                           "--seq-len", "40", "--hidden-dim", "16", "--num-heads", "2", "--chunk-size", "8",
                           "--threads", "1", "--repeats", "2", "--warmup", "1", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["impl"], result["mode"], result["threads"], result["state_tokens"]) == ("bsbr", "decode", 1, 43)


def test_bad_values_are_usage_errors_naming_the_option(capsys):
    """Exit status 2 and argparse's one-line error naming the option, before anything is measured (no traceback)."""
    tiny = ["--model", "standard", "--seq-len", "16", "--repeats", "1", "--warmup", "0"]
    for argv, message in [
        ([*tiny, "--config", "notjson"], "argument --config: must be a JSON object of bsbr.build_model kwargs, got "
                                         "'notjson' (Expecting value: line 1 column 1 (char 0))"),
        ([*tiny, "--config", "[1]"], "argument --config: must be a JSON object of bsbr.build_model kwargs, got '[1]'"),
        ([*tiny, "--config", '{"hidden_dimm": 16}'],
         "argument --config: model 'standard' does not take ['hidden_dimm']; it accepts ['dropout', 'ff_dim', "
         "'hidden_dim', 'num_heads', 'num_layers', 'vocab_size']"),
        ([*tiny, "--config", '{"num_heads": 3}'],
         "argument --config: hidden_dim (512) must be divisible by num_heads (3)"),  # the model's own check
        ([*tiny, "--config", '{"hidden_dim": "64"}'], "argument --config: hidden_dim must be an integer >= 1, got '64'"),
        (["--model", "bsbr", "--seq-len", "16", "--config", '{"chunk_size": 0}'],
         "argument --config: chunk_size must be an integer >= 1, got 0"),
        ([*tiny, "--threads", "0"], "argument --threads: must be an integer >= 1, got '0'"),
        (["attention", "--impl", "bsbr", "--seq-len", "16", "--threads", "two"],
         "argument --threads: must be an integer >= 1, got 'two'"),
        (["matmul", "--threads", "-1"], "argument --threads: must be an integer >= 1, got '-1'"),
        ([*tiny, "--warmup", "-1"], "argument --warmup: must be an integer >= 0, got '-1'"),
        (["--model", "standrd", "--seq-len", "16"], "argument --model: invalid choice: 'standrd' (choose from "),
        # combinations the measurement refuses: usage errors from the measurement's own check, not tracebacks
        (["attention", "--impl", "delta_recurrent", "--mode", "decode", "--seq-len", "16"],
         "mode 'decode' streams through a module: impl must be one of ['bsbr', 'standard', 'linear', 'delta_net', "
         "'sliding_window', 'hopfield', 'gau'], got 'delta_recurrent'"),
        (["attention", "--impl", "bsbr", "--seq-len", "16", "--num-heads", "3"],
         "hidden_dim (512) must be divisible by num_heads (3)"),
        (["attention", "--impl", "llama_normalized", "--seq-len", "16", "--chunk-size", "2"],
         "sink_size must be an integer in [0, chunk_size=2], got 4"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f": error: {message}" in err and "Traceback" not in err, argv


def test_a_bad_value_in_its_own_process_exits_2_without_a_traceback():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bsbr.bench", "--model", "standard", "--seq-len", "16", "--config",
                           "{bad json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith(
        "python -m bsbr.bench model: error: argument --config: must be a JSON object of bsbr.build_model kwargs, got "
        "'{bad json'")


@pytest.mark.parametrize("name", available_models())
def test_every_model_builds_with_the_cli_defaults_on_the_meta_device(name):
    """``--config`` is checked by building the model on the meta device: every registered model must build there with
    the CLI's defaults (else a valid config would be refused), and a bad value must still be found there."""
    assert model_config_error(name, dict(MODEL_DEFAULTS)) is None
    assert model_config_error(name, {**MODEL_DEFAULTS, "num_layers": 0}) == "num_layers must be an integer >= 1, got 0"
