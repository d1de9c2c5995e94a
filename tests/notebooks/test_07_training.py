"""Notebook 07 (training from scratch) runs end to end through the pipeline runner with smoke parameters, and the
data it writes is consistent: the n-gram floors, matched parameter counts, the learning rate chosen per architecture
from the sweep, every architecture and seed at that rate, intervals and steps to the target recomputed from the CSVs,
memory exponents refitted, the load average recorded."""

from __future__ import annotations

import json
import math
import re

import nbformat
import numpy as np
import pandas as pd
import pytest

import bsbr
from bsbr.convergence import grid_edge_summary
from bsbr.data import load_split
from bsbr.fitting import fit_power_law
from bsbr.training import (ByteNgram, encode_bytes, evaluation_windows, model_config, parameter_count,
                           steps_to_reach)
from tests.conftest import ROOT, run_notebook_cli
from tests.reference import t_bounds

NOTEBOOK = ROOT / "notebooks" / "07_training.ipynb"
SMOKE = {
    "models": None,  # every architecture
    "seeds": [0, 1, 2],
    "tune_seed": 1,
    "learning_rates": [0.003, 0.01],
    "steps": 16,
    "batch_size": 4,
    "seq_len": 64,
    "hidden_dim": 32,
    "num_layers": 2,
    "num_heads": 2,
    "ff_dim": 128,
    "chunk_size": 16,
    "warmup_steps": 2,
    "eval_interval": 4,
    "eval_windows": 4,
    "target_loss": 4.0,  # a level the tiny runs reach (the default, bigram - margin, needs the long profile)
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


def test_ngram_floors_are_the_count_models_on_the_validation_positions(smoke):
    floors = pd.read_csv(smoke["out"] / "ngram_floors.csv")
    assert floors.name.tolist() == ["unigram", "bigram", "trigram"]
    assert floors.val_loss.is_monotonic_decreasing  # more context, lower loss
    windows = evaluation_windows(encode_bytes(load_split(ROOT / "data" / "corpus", "validation")), SMOKE["seq_len"],
                                 SMOKE["eval_windows"])
    model = ByteNgram(encode_bytes(load_split(ROOT / "data" / "corpus", "train")), 3)
    trigram = floors.iloc[2]
    alphas = json.loads(trigram.alphas) if isinstance(trigram.alphas, str) and trigram.alphas.startswith("[") else \
        [float(a) for a in str(trigram.alphas).strip("[]").split(",")]
    assert trigram.val_loss == pytest.approx(float(model.nll(windows, alphas).mean()))
    assert trigram.scored == SMOKE["eval_windows"] * (SMOKE["seq_len"] - 1)
    metrics = smoke["metrics"]
    assert metrics["ngram_floors"]["bigram"]["val_loss"] == pytest.approx(floors.val_loss[1], abs=1e-4)
    assert metrics["target_val_loss"] == SMOKE["target_loss"] and metrics["target_source"] == "the target_loss parameter"
    # every model lies below the bigram floor, above it, or undecided (its interval holds it): by its interval
    # (the lists in the summary's order, best first; the metrics' models sorted by name)
    bigram, models = metrics["ngram_floors"]["bigram"]["val_loss"], metrics["models"]
    assert sorted(metrics["below_bigram_floor"]) == [n for n in sorted(models)
                                                     if models[n]["final_val_loss_high"] < bigram]
    assert sorted(metrics["above_bigram_floor"]) == [n for n in sorted(models)
                                                     if models[n]["final_val_loss_low"] > bigram]
    assert sorted(metrics["below_bigram_floor"] + metrics["above_bigram_floor"]
                  + metrics["bigram_floor_undecided"]) == sorted(models)


def test_parameter_counts_matched_within_five_percent(smoke):
    params = pd.read_csv(smoke["out"] / "parameters.csv").set_index("model")
    sizes = dict(hidden_dim=SMOKE["hidden_dim"], num_layers=SMOKE["num_layers"], num_heads=SMOKE["num_heads"],
                 chunk_size=SMOKE["chunk_size"])
    reference = parameter_count("standard", model_config("standard", ff_dim=SMOKE["ff_dim"], **sizes))
    runs = pd.read_csv(smoke["out"] / "runs.csv")
    for name in NAMES:
        count = parameter_count(name, model_config(name, ff_dim=int(params.ff_dim[name]), **sizes))
        assert params.params[name] == count and abs(count / reference - 1) <= 0.05, name
        assert (runs[runs.model == name].params == count).all()
        assert smoke["metrics"]["models"][name]["params"] == count
    assert smoke["metrics"]["setup"]["max_param_difference"] <= 0.05


def test_learning_rate_is_the_sweeps_lowest_validation_loss(smoke):
    sweep = pd.read_csv(smoke["out"] / "lr_sweep.csv")
    assert list(zip(sweep.model, sweep.learning_rate)) == [(m, lr) for m in NAMES for lr in SMOKE["learning_rates"]]
    assert (sweep.seed == SMOKE["tune_seed"]).all()
    runs = pd.read_csv(smoke["out"] / "runs.csv")
    evals = pd.read_csv(smoke["out"] / "validation.csv")
    for name, group in sweep.groupby("model"):
        best = group.sort_values(["final_val_loss", "learning_rate"]).iloc[0]
        assert group.chosen.tolist() == (group.learning_rate == best.learning_rate).tolist()
        assert (runs[runs.model == name].learning_rate == best.learning_rate).all()
        assert smoke["metrics"]["models"][name]["learning_rate"] == best.learning_rate
        # the tune_seed run at the chosen rate is the seed's run: its final validation loss is the sweep's
        final = evals[(evals.model == name) & (evals.seed == SMOKE["tune_seed"]) & (evals.step == SMOKE["steps"])]
        assert final.val_loss.item() == pytest.approx(best.final_val_loss)


def test_curves_cover_every_architecture_seed_and_step(smoke):
    history = pd.read_csv(smoke["out"] / "training_curves.csv")
    expected = [(m, s, t) for m in NAMES for s in SMOKE["seeds"] for t in range(1, SMOKE["steps"] + 1)]
    assert list(zip(history.model, history.seed, history.step)) == expected  # sorted, complete
    assert (history.tokens == history.step * SMOKE["batch_size"] * SMOKE["seq_len"]).all()
    evals = pd.read_csv(smoke["out"] / "validation.csv")
    for (name, seed), group in evals.groupby(["model", "seed"]):
        assert list(group.step) == list(range(0, SMOKE["steps"] + 1, SMOKE["eval_interval"]))
        losses = group.val_loss.to_numpy()
        assert losses[0] == pytest.approx(math.log(256), abs=0.4), (name, seed)  # near-uniform at initialisation
        assert losses[-1] < losses[0] - 0.3, (name, seed)
    assert np.allclose(evals.val_ppl, np.exp(evals.val_loss))
    # hopfield (one update, beta = 1/sqrt(head_dim)) is softmax attention: identical runs when the rates agree
    if smoke["metrics"]["models"]["hopfield"]["learning_rate"] == smoke["metrics"]["models"]["standard"]["learning_rate"]:
        assert ["hopfield", "standard"] in smoke["metrics"]["identical_pairs"]


def test_summary_intervals_and_steps_recompute_from_the_csvs(smoke):
    summary = pd.read_csv(smoke["out"] / "summary.csv").set_index("model")
    runs = pd.read_csv(smoke["out"] / "runs.csv")
    evals = pd.read_csv(smoke["out"] / "validation.csv")
    assert sorted(summary.index) == NAMES and summary.final_val_loss.is_monotonic_increasing
    metrics = smoke["metrics"]
    for name in NAMES:
        group = runs[runs.model == name].sort_values("seed")
        row = summary.loc[name]
        assert row.final_val_loss == pytest.approx(group.final_val_loss.mean())
        assert (row.final_val_loss_low, row.final_val_loss_high) == pytest.approx(t_bounds(group.final_val_loss))
        assert row.final_val_ppl_high == pytest.approx(math.exp(row.final_val_loss_high))
        per_seed = []
        for seed in SMOKE["seeds"]:
            curve = evals[(evals.model == name) & (evals.seed == seed)]
            per_seed.append(steps_to_reach(curve.step, curve.val_loss, SMOKE["target_loss"]))
        assert group.steps_to_target.tolist() == pytest.approx([np.nan if s is None else s for s in per_seed],
                                                               nan_ok=True)
        if None not in per_seed:
            assert (row.steps_to_target_low, row.steps_to_target_high) == pytest.approx(t_bounds(per_seed))
            assert metrics["models"][name]["steps_to_target"] == pytest.approx(np.mean(per_seed), abs=1e-4)
        assert metrics["models"][name]["final_val_loss"] == pytest.approx(row.final_val_loss, abs=1e-4)
    assert metrics["best_final"] == summary.final_val_loss.idxmin()
    pairs = pd.read_csv(smoke["out"] / "separations.csv")
    loss_pairs = pairs[pairs.quantity == "final_val_loss"]
    assert len(loss_pairs) == len(NAMES) * (len(NAMES) - 1) // 2 == metrics["separated"]["pairs"]
    for p in loss_pairs.itertuples():
        apart = (summary.final_val_loss_high[p.a] < summary.final_val_loss_low[p.b]
                 or summary.final_val_loss_high[p.b] < summary.final_val_loss_low[p.a])
        assert p.separated == apart
    assert [list(x) for x in loss_pairs[loss_pairs.separated][["a", "b"]].itertuples(index=False)] == \
        metrics["separated"]["final_val_loss"]


def test_memory_rows_and_exponents_refit(smoke):
    memory = pd.read_csv(smoke["out"] / "memory.csv")
    lens = SMOKE["memory_seq_lens"]
    assert list(zip(memory.model, memory.seq_len)) == [(m, n) for m in NAMES for n in lens]
    assert (memory.peak_bytes > 0).all() and (memory.grad_bytes == memory.param_bytes).all()
    for name in NAMES:
        part = memory[memory.model == name]
        exponent, _, _ = fit_power_law(part.seq_len, part.peak_bytes)
        assert smoke["metrics"]["models"][name]["memory_exponent"] == pytest.approx(exponent, abs=1e-4)


def test_report_layout_provenance_and_load_average(smoke):
    nb = smoke["notebook"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = "".join(str(o.get("data", {}).get("text/markdown", "")) + str(o.get("data", {}).get("text/html", ""))
                    for o in outputs)
    for text in ("**Floors**", "**Final validation loss, nats/byte", "**Steps to the target", "**Are they separated?",
                 "pairs have final-loss intervals", "load average (1 min)", "git revision:", "seeds = [0, 1, 2]",
                 "A · n-gram floors", "C · Learning-rate sweep"):
        assert text in shown, text
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.get("name") == "stdout")
    assert "%|" not in printed  # progress bars go to stderr, which the report leaves out
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    headline = [c for c in nb.cells if "headline-figure" in c.metadata.get("tags", [])]
    assert len(headline) == 1 and any("image/png" in o.get("data", {}) for o in headline[0].outputs)
    for name in ("training.png", "memory.png"):
        assert (smoke["out"] / name).stat().st_size > 5000
    metrics = smoke["metrics"]
    assert len(metrics["load_average"]["before"]) == 3 and len(metrics["load_average"]["after"]) == 3
    machine = json.loads((smoke["out"] / "machine.json").read_text())
    assert machine["threads"] == 1 and metrics["machine"] == machine
    assert metrics["setup"]["tokenizer"] == "bytes (vocab 256)" and metrics["setup"]["seeds"] == 3


def test_findings_rank_bsbr_by_steps_among_those_that_reached_and_say_the_sweep_edges_once(smoke):
    outputs = [o for c in smoke["notebook"].cells if c.cell_type == "code" for o in c.outputs]
    markdown = "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    models = smoke["metrics"]["models"]
    # the sweep's edges: one compact sentence from the chosen rates and the number of rates, not one per model
    edges = grid_edge_summary({name: models[name]["learning_rate"] for name in sorted(models)}, SMOKE["learning_rates"])
    assert edges and edges in markdown and markdown.count("chose an edge") == 1
    assert f"A sweep of {len(SMOKE['learning_rates'])} rates" in markdown
    # by steps, BSBR is ranked only among the architectures every seed of which reached the target; the rest tie last
    reached = [name for name, m in models.items() if m["steps_to_target"] is not None]
    if "bsbr" in reached:
        rank = 1 + sum(models[name]["steps_to_target"] < models["bsbr"]["steps_to_target"] for name in reached)
        assert f"it ranks {rank} of the {len(reached)} that reached it with every seed" in markdown
    elif reached:
        assert "did not reach it with every seed" in markdown and (
            "tied last" in markdown or "alone did not reach" in markdown)
    else:
        assert "no architecture reached it with every seed" in markdown


def test_parameters_cell_is_a_smoke_run_and_the_profiles_are_quick_and_publication():
    text = "".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert "smoke profile" not in text and not re.search(r"\btier\b", text)
    assert "`quick`" in text and "`publication`" in text and "PROFILE_ENV" in text
    assert "def r6(" not in text and "rounded(" in text  # bsbr.scaling.rounded, not a copy of it


def test_bad_parameters_fail_before_training(tmp_path):
    for key, bad, message in (("dtype", "float16", "needs a CUDA device"), ("tune_seed", 7, "tune_seed"),
                              ("param_tolerance", 0.0, "tolerance")):
        out = tmp_path / key
        proc = run_notebook_cli(NOTEBOOK, "07_training", out,
                                overrides={**SMOKE, key: bad, "out_dir": str(out),
                                           "metrics_path": str(tmp_path / "m.json")})
        assert proc.returncode == 1
        assert "ValueError" in proc.stderr and message in proc.stderr, key
        assert not (tmp_path / "m.json").exists() and not (out / "07_training.ipynb").exists()
