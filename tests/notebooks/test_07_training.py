"""Notebook 07 (training from scratch) runs end to end through the pipeline runner with smoke parameters, and the
data it writes is consistent: every architecture and seed, losses that decrease, a convergence table and memory
exponents that can be recomputed from the CSVs."""

from __future__ import annotations

import json
import math

import nbformat
import numpy as np
import pandas as pd
import pytest

import bsbr
from bsbr.fitting import fit_power_law
from bsbr.training import build_lm, model_config, steps_to_reach
from tests.conftest import ROOT, run_notebook_cli

NOTEBOOK = ROOT / "notebooks" / "07_training.ipynb"
SMOKE = {
    "models": None,  # every architecture
    "seeds": [0, 1],
    "steps": 16,
    "batch_size": 4,
    "seq_len": 64,
    "hidden_dim": 32,
    "num_layers": 2,
    "num_heads": 2,
    "ff_dim": 64,
    "chunk_size": 16,
    "warmup_steps": 2,
    "eval_interval": 4,
    "eval_windows": 4,
    "memory_seq_lens": [256, 1024],
    "threads": 1,
}
NAMES = bsbr.available_models()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("training")
    metrics = out / "metrics" / "07_training.json"
    proc = run_notebook_cli(NOTEBOOK, "07_training", out,
                            overrides={**SMOKE, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()), "proc": proc,
            "notebook": nbformat.read(out / "07_training.ipynb", as_version=4)}


def test_training_curves_cover_every_architecture_seed_and_step(smoke):
    history = pd.read_csv(smoke["out"] / "training_curves.csv")
    assert list(history.columns) == ["model", "seed", "step", "tokens", "lr", "train_loss", "elapsed_s"]
    expected = [(m, s, t) for m in NAMES for s in SMOKE["seeds"] for t in range(1, SMOKE["steps"] + 1)]
    assert list(zip(history.model, history.seed, history.step)) == expected  # sorted, complete
    assert (history.tokens == history.step * SMOKE["batch_size"] * SMOKE["seq_len"]).all()
    assert np.isfinite(history.train_loss).all() and (history.lr > 0).all()
    for _, group in history.groupby(["model", "seed"]):
        assert group.elapsed_s.is_monotonic_increasing
    # same seed, same learning-rate schedule for every architecture
    assert history.groupby("step").lr.nunique().max() == 1


def test_loss_decreases_on_the_tiny_run(smoke):
    history = pd.read_csv(smoke["out"] / "training_curves.csv")
    evals = pd.read_csv(smoke["out"] / "validation.csv")
    for (name, seed), group in evals.groupby(["model", "seed"]):
        losses = group.sort_values("step").val_loss.to_numpy()
        assert losses[0] == pytest.approx(math.log(256), abs=0.4), (name, seed)  # near-uniform at initialisation
        assert losses[-1] < losses[0] - 0.3, (name, seed)
        train = history[(history.model == name) & (history.seed == seed)].train_loss.to_numpy()
        assert train[-4:].mean() < train[:4].mean() - 0.3, (name, seed)


def test_validation_and_runs_tables_agree(smoke):
    evals = pd.read_csv(smoke["out"] / "validation.csv")
    runs = pd.read_csv(smoke["out"] / "runs.csv")
    eval_steps = list(range(0, SMOKE["steps"] + 1, SMOKE["eval_interval"]))
    for _, group in evals.groupby(["model", "seed"]):
        assert list(group.step) == eval_steps
    assert np.allclose(evals.val_ppl, np.exp(evals.val_loss))
    assert np.allclose(evals.val_bpb, evals.val_loss / math.log(2))
    assert list(zip(runs.model, runs.seed)) == [(m, s) for m in NAMES for s in SMOKE["seeds"]]
    last = evals[evals.step == SMOKE["steps"]].set_index(["model", "seed"])
    for row in runs.itertuples():
        assert row.final_val_loss == pytest.approx(last.loc[(row.model, row.seed), "val_loss"])
        assert row.tokens_per_s == pytest.approx(row.tokens / row.train_seconds)
        assert row.tokens == SMOKE["steps"] * SMOKE["batch_size"] * SMOKE["seq_len"]
    # hopfield (one update, beta = 1/sqrt(head_dim)) is softmax attention: identical runs, and the notebook says so
    pivot = evals.pivot_table(index=["seed", "step"], columns="model", values="val_loss")
    assert (pivot.hopfield - pivot.standard).abs().max() < 1e-4
    assert ["hopfield", "standard"] in smoke["metrics"]["identical_pairs"]


def test_summary_table_recomputes_from_the_csvs(smoke):
    summary = pd.read_csv(smoke["out"] / "summary.csv").set_index("model")
    runs = pd.read_csv(smoke["out"] / "runs.csv")
    evals = pd.read_csv(smoke["out"] / "validation.csv")
    assert list(summary.index) == NAMES
    config = dict(hidden_dim=SMOKE["hidden_dim"], num_layers=SMOKE["num_layers"], num_heads=SMOKE["num_heads"],
                  ff_dim=SMOKE["ff_dim"], chunk_size=SMOKE["chunk_size"])
    for name in NAMES:
        group = runs[runs.model == name]
        row = summary.loc[name]
        assert row.params == sum(p.numel() for p in build_lm(name, model_config(name, **config)).parameters())
        assert row.seeds == len(SMOKE["seeds"])
        assert row.final_val_ppl_mean == pytest.approx(group.final_val_ppl.mean())
        assert row.final_val_ppl_min <= row.final_val_ppl_mean <= row.final_val_ppl_max
        assert row.final_val_ppl_std == pytest.approx(group.final_val_ppl.std(ddof=1))
    metrics = smoke["metrics"]
    target = summary.final_val_loss_mean.max()  # target_loss = None: the worst seed-mean final loss
    assert metrics["target_val_loss"] == pytest.approx(target, abs=1e-4)
    mean = evals.groupby(["model", "step"], as_index=False).val_loss.mean()
    for name in NAMES:
        curve = mean[mean.model == name]
        expected = steps_to_reach(curve.step, curve.val_loss, target)
        assert expected is not None  # every architecture reaches the worst one's final level
        assert summary.loc[name, "steps_to_target"] == pytest.approx(expected)
        assert metrics["models"][name]["steps_to_target"] == pytest.approx(expected, abs=0.01)
    worst = summary.final_val_loss_mean.idxmax()
    assert summary.loc[worst, "steps_to_target"] <= SMOKE["steps"]
    fastest = summary.steps_to_target.idxmin()
    assert metrics["fastest"] == fastest
    runner_up = summary.steps_to_target.drop(fastest).idxmin()
    assert metrics["runner_up"] == runner_up
    margin = summary.loc[runner_up, "steps_to_target"] - summary.loc[fastest, "steps_to_target"]
    assert metrics["step_margin"] == pytest.approx(margin, abs=0.01)
    assert metrics["best_final"] == summary.final_val_loss_mean.idxmin()


def test_memory_rows_sorted_positive_and_exponents_refit(smoke):
    memory = pd.read_csv(smoke["out"] / "memory.csv")
    lens = SMOKE["memory_seq_lens"]
    assert list(zip(memory.model, memory.seq_len)) == [(m, n) for m in NAMES for n in lens]
    assert (memory.peak_bytes > 0).all() and (memory.baseline_bytes > 10 * 2**20).all()
    assert (memory.peak_bytes == memory.peak_total_bytes - memory.baseline_bytes).all()
    assert (memory.grad_bytes == memory.param_bytes).all()
    assert (memory.optimizer_state_bytes >= 2 * memory.param_bytes).all()
    assert (memory.device == "cpu").all() and (memory.dtype == "float32").all()
    fits = pd.read_csv(smoke["out"] / "memory_fits.csv")
    assert list(zip(fits.model, fits.lengths)) == [(m, part) for m in NAMES for part in ("all", "upper half")]
    upper = lens[len(lens) // 2:] if len(lens[len(lens) // 2:]) >= 2 else lens[-2:]
    assert smoke["metrics"]["memory_fit_seq_lens"] == upper
    for name in NAMES:
        part = memory[(memory.model == name) & memory.seq_len.isin(upper)]
        exponent, _, _ = fit_power_law(part.seq_len, part.peak_bytes)
        assert smoke["metrics"]["models"][name]["memory_exponent"] == pytest.approx(exponent, abs=1e-4)
        row = fits[(fits.model == name) & (fits.lengths == "upper half")].iloc[0]
        assert row.exponent == pytest.approx(exponent)
        longest = memory[(memory.model == name) & (memory.seq_len == lens[-1])].peak_bytes.item()
        assert smoke["metrics"]["models"][name]["memory_peak_bytes_longest"] == longest


def test_executed_notebook_provenance_progress_and_figures(smoke):
    nb = smoke["notebook"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "torch ", "device: cpu, dtype: float32, threads: 1", "CPU:", "seeds = [0, 1]",
                 "memory points: 100%", "bsbr seed 1: 100%", "Convergence (criterion:"):
        assert line in printed, line
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    for name in ("convergence.png", "memory.png"):
        assert (smoke["out"] / name).stat().st_size > 5000
    machine = json.loads((smoke["out"] / "machine.json").read_text())
    assert machine["threads"] == 1 and {"cpu", "cores", "torch"} <= set(machine)
    assert smoke["metrics"]["machine"] == machine
    assert smoke["metrics"]["setup"]["tokenizer"] == "bytes (vocab 256)"


def test_bad_device_and_dtype_fail_before_training(tmp_path):
    out = tmp_path / "bad"
    proc = run_notebook_cli(NOTEBOOK, "07_training", out,
                            overrides={**SMOKE, "dtype": "float16", "out_dir": str(out),
                                       "metrics_path": str(tmp_path / "m.json")})
    assert proc.returncode == 1
    assert "ValueError" in proc.stderr and "float16" in proc.stderr and "needs a CUDA device" in proc.stderr
    assert not (tmp_path / "m.json").exists() and not (out / "07_training.ipynb").exists()
