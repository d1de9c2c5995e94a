"""bsbr.bench, the benchmark CLI: each command measures one point and prints a summary or one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bsbr.bench import main
from bsbr.benchmarks import attention_flops
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
