"""Notebook 08 (MQAR trained from scratch) runs end to end through the pipeline runner with smoke parameters, and what
it writes is consistent: every architecture (span-sensitive ones at both spans), BSBR with block retrieval and BSBR
with compressed chunk states (both spans), one chosen learning rate per point
picked by validation accuracy, test accuracies and intervals that recompute from the per-seed rows, state sizes from
bsbr.mqar.state_size, locality fractions from the regenerated test set, and goals (also each BSBR point against the
accuracy-vs-state frontier) that follow the numbers."""

from __future__ import annotations

import json
import re
import sys

import nbformat
import numpy as np
import pandas as pd
import pytest

import bsbr
from bsbr.analysis import wilson_interval
from bsbr.convergence import grid_edge_summary
from bsbr.mqar import multiquery_ar, outside_fraction, state_size
from bsbr.training import matched_ff_dims, model_config, parameter_count
from tests.conftest import ROOT, run_notebook_cli
from tests.reference import t_bounds

NOTEBOOK = ROOT / "notebooks" / "08_associative_recall.ipynb"
SMOKE = {
    "models": None,  # every architecture
    "vocab_size": 64,
    "seq_len": 16,
    "num_pairs": 2,
    "train_examples": 64,
    "val_examples": 16,
    "test_examples": 24,
    "hidden_dim": 16,
    "num_layers": 2,
    "num_heads": 2,
    "ff_dim": 128,  # the smallest power of two at which GAU (its attention alone: 10,914 parameters) can be matched
    "spans": [4, 8],
    "learning_rates": [0.001, 0.01],
    "seeds": [0, 1],
    "steps": 6,
    "batch_size": 8,
    "warmup_steps": 1,
    "eval_interval": 3,
    "threads": 1,
}
NAMES = bsbr.available_models()
SPAN_SENSITIVE = ("bsbr", "gau", "sliding_window")
#: the notebook's default block-retrieval point (its parameters cell): bsbr with retrieval="blocks"
BLOCKS = {"chunk_size": 4, "block_size": 4, "top_k": 1, "summary": "minmax", "sink_size": 0}
#: the notebook's default compression of BSBR's chunk states (its parameters cell): "bsbr_compressed" at every span
COMPRESSION = 16
POINTS = sorted([(name, span) for name in NAMES for span in (SMOKE["spans"] if name in SPAN_SENSITIVE else [4])]
                + [("bsbr_blocks", BLOCKS["chunk_size"])] + [("bsbr_compressed", span) for span in SMOKE["spans"]])
#: the headline span's points are named plainly, the other span's with it
LABEL = lambda name, span: f"{name} ({span})" if span != SMOKE["spans"][0] else name


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mqar")
    metrics = out / "metrics" / "08_associative_recall.json"
    proc = run_notebook_cli(NOTEBOOK, "08_associative_recall", out,
                            overrides={**SMOKE, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()),
            "notebook": nbformat.read(out / "08_associative_recall.ipynb", as_version=4)}


def test_sweep_covers_every_point_and_rate_and_chooses_the_best_validation_accuracy(smoke):
    sweep = pd.read_csv(smoke["out"] / "lr_sweep.csv")
    assert list(zip(sweep.model, sweep.span, sweep.learning_rate)) == [
        (name, span, lr) for name, span in POINTS for lr in SMOKE["learning_rates"]]
    assert (sweep.seed == 0).all() and sweep.val_accuracy.between(0, 1).all()
    for (name, span), group in sweep.groupby(["model", "span"]):
        assert group.chosen.sum() == 1
        best = group.sort_values(["val_accuracy", "val_loss", "learning_rate"], ascending=[False, True, True]).iloc[0]
        assert group[group.chosen].learning_rate.item() == best.learning_rate


def test_per_seed_rows_and_summary_recompute(smoke):
    per_seed = pd.read_csv(smoke["out"] / "test_per_seed.csv")
    sweep = pd.read_csv(smoke["out"] / "lr_sweep.csv")
    summary = pd.read_csv(smoke["out"] / "summary.csv")
    assert list(zip(per_seed.model, per_seed.span, per_seed.seed)) == [
        (name, span, seed) for name, span in POINTS for seed in SMOKE["seeds"]]
    answers = SMOKE["test_examples"] * SMOKE["num_pairs"]
    assert (per_seed.test_answers == answers).all()
    assert np.allclose(per_seed.test_accuracy, per_seed.test_correct / answers)
    chosen = sweep[sweep.chosen].set_index(["model", "span"]).learning_rate
    tuned = per_seed[per_seed.seed == 0].set_index(["model", "span"])
    # the seed-0 test row is the sweep's run at the chosen rate (its validation accuracy is the sweep's)
    for (name, span), lr in chosen.items():
        assert tuned.loc[(name, span), "learning_rate"] == lr
        row = sweep[(sweep.model == name) & (sweep.span == span) & sweep.chosen].iloc[0]
        assert tuned.loc[(name, span), "val_accuracy"] == pytest.approx(row.val_accuracy)
    assert len(summary) == len(POINTS)
    metrics = smoke["metrics"]["architectures"]
    extras = set()
    for (name, span), group in per_seed.groupby(["model", "span"]):
        label = LABEL(name, span)
        arch = "bsbr" if name in ("bsbr_blocks", "bsbr_compressed") else name
        m = metrics[label]
        low, high = t_bounds(group.test_accuracy)
        assert m["accuracy"] == pytest.approx(group.test_accuracy.mean(), abs=1e-4)
        assert m["ci_low"] == pytest.approx(max(0.0, low), abs=1e-4)
        assert m["ci_high"] == pytest.approx(min(1.0, high), abs=1e-4)
        low, high = wilson_interval(int(group.test_correct.sum()), int(group.test_answers.sum()))
        assert (m["wilson_low"], m["wilson_high"]) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
        config = model_config(arch, SMOKE["hidden_dim"], SMOKE["num_layers"], SMOKE["num_heads"], SMOKE["ff_dim"],
                              span, vocab_size=SMOKE["vocab_size"])
        if name == "bsbr_compressed":
            config.update(compression_factor=COMPRESSION)
            assert m["state_values"] < metrics[LABEL("bsbr", span)]["state_values"]
        if name == "bsbr_blocks":
            config.update(retrieval="blocks", **BLOCKS)
            # a KV cache of every token (as attention's) plus the blocks' min/max summaries
            assert m["state_values"] == metrics["standard"]["state_values"] + SMOKE["num_layers"] * SMOKE["hidden_dim"] * (
                SMOKE["seq_len"] // BLOCKS["block_size"]) * 2
        assert m["state_values"] == state_size(arch, config, SMOKE["seq_len"], short_conv=3)  # the default kernel
        assert m["state_bytes"] == 4 * m["state_values"]  # float32
        assert m["n_seeds"] == 2 and m["answers"] == 2 * answers
        # parameter counts matched to standard attention's by the feed-forward width (the same embedding convolution
        # on every model only brings them closer)
        assert abs(m["params"] / metrics["standard"]["params"] - 1) <= 0.05
        width = smoke["metrics"]["model"]["ff_dims"][f"{name}_{span}"]
        if name not in ("bsbr_blocks", "bsbr_compressed"):
            assert width == matched_ff_dims([arch], SMOKE["hidden_dim"], SMOKE["num_layers"], SMOKE["num_heads"],
                                            SMOKE["ff_dim"], span, vocab_size=SMOKE["vocab_size"])[arch]["ff_dim"]
        extras.add(m["params"] - parameter_count(arch, {**config, "ff_dim": width}))  # the model at that width + conv
    assert len(extras) == 1 and extras.pop() > 0  # every model: the same embedding convolution on top


def test_locality_and_goals_follow_the_data(smoke):
    metrics = smoke["metrics"]
    test = multiquery_ar(SMOKE["test_examples"], SMOKE["seq_len"], SMOKE["num_pairs"], SMOKE["vocab_size"], seed=2)
    for span in SMOKE["spans"]:
        assert metrics["outside_fraction"][f"chunk_{span}"] == pytest.approx(
            outside_fraction(*test, SMOKE["num_pairs"], span, "chunk"), abs=1e-4)
        assert metrics["outside_fraction"][f"window_{span}"] == pytest.approx(
            outside_fraction(*test, SMOKE["num_pairs"], span, "window"), abs=1e-4)
        assert metrics["architectures"][LABEL("bsbr", span)]["outside_fraction"] == pytest.approx(
            outside_fraction(*test, SMOKE["num_pairs"], span, "chunk"), abs=1e-4)
    blocks_outside = outside_fraction(*test, SMOKE["num_pairs"], BLOCKS["chunk_size"], "own_and_previous")
    assert metrics["outside_fraction"][f"own_and_previous_{BLOCKS['chunk_size']}"] == pytest.approx(blocks_outside,
                                                                                                    abs=1e-4)
    assert metrics["architectures"]["bsbr_blocks"]["outside_fraction"] == pytest.approx(blocks_outside, abs=1e-4)
    assert metrics["bsbr_blocks"] == {**BLOCKS, "attended_tokens_max": 2 * 4 + 0 + 1 * 4}
    assert metrics["task"]["test_answers"] == SMOKE["test_examples"] * SMOKE["num_pairs"]
    goal = metrics["goals"]["attention_accuracy"]
    assert goal["value"] == metrics["architectures"]["standard"]["accuracy"]
    assert goal["met"] == (goal["value"] >= goal["goal"])
    per_seed = pd.read_csv(smoke["out"] / "test_per_seed.csv")
    comparisons = metrics["goals"]["bsbr_vs"]
    assert [(c["model"], c["other"], c["span"]) for c in comparisons] == [
        ("bsbr", "sliding_window", 4), ("bsbr", "sliding_window", 8), ("bsbr", "linear", 4), ("bsbr", "linear", 8),
        ("bsbr_compressed", "sliding_window", 4), ("bsbr_compressed", "sliding_window", 8),
        ("bsbr_compressed", "linear", 4), ("bsbr_compressed", "linear", 8), ("bsbr_blocks", "sliding_window", 4), ("bsbr_blocks", "linear", 4), ("bsbr_blocks", "bsbr", 4),
        ("bsbr_blocks", "standard", 4)]
    for c in comparisons:
        b = per_seed[(per_seed.model == c["model"]) & (per_seed.span == c["span"])].set_index("seed").test_accuracy
        other_span = c["span"] if c["other"] in SPAN_SENSITIVE and c["model"] != "bsbr_blocks" else 4
        assert c["other_span"] == other_span
        o = per_seed[(per_seed.model == c["other"]) & (per_seed.span == other_span)].set_index("seed").test_accuracy
        assert c["difference"] == pytest.approx((b - o).mean(), abs=1e-4)
        who = {"bsbr": "BSBR", "bsbr_blocks": "BSBR blocks", "bsbr_compressed": "BSBR compressed"}[c["model"]]
        expected = f"{who} above" if c["ci_low"] > 0 else f"{who} below" if c["ci_high"] < 0 else "undecided"
        assert c["verdict"] == expected


def test_each_bsbr_point_against_the_frontier_of_no_larger_state(smoke):
    """The frontier row of each BSBR point: the most accurate other architecture whose state is no larger, and the
    seed-paired difference against it, recomputed from the per-seed rows."""
    summary = pd.read_csv(smoke["out"] / "summary.csv")
    per_seed = pd.read_csv(smoke["out"] / "test_per_seed.csv")
    bsbr_points = ("bsbr", "bsbr_blocks", "bsbr_compressed")
    rows = smoke["metrics"]["goals"]["frontier"]
    assert sorted((f["model"], f["span"]) for f in rows) == sorted(p for p in POINTS if p[0] in bsbr_points)
    others = summary[~summary.model.isin(bsbr_points)]
    for f in rows:
        state = smoke["metrics"]["architectures"][f["label"]]["state_values"]
        assert f["state_values"] == state
        smaller = others[others.state_values <= state]
        if smaller.empty:
            assert f["frontier"] is None and f["verdict"].startswith("the smallest state")
            continue
        best = smaller.sort_values(["accuracy", "state_values", "label"], ascending=[False, True, True],
                                   kind="mergesort").iloc[0]
        assert f["frontier"] == best.label and f["frontier_state_values"] == best.state_values <= state
        best_span = int(best.span) if best.model in SPAN_SENSITIVE else 4
        b = per_seed[(per_seed.model == f["model"]) & (per_seed.span == f["span"])].set_index("seed").test_accuracy
        o = per_seed[(per_seed.model == best.model) & (per_seed.span == best_span)].set_index("seed").test_accuracy
        assert f["difference"] == pytest.approx((b - o).mean(), abs=1e-4)
        expected = ("above the frontier" if f["ci_low"] > 0 else "below the frontier" if f["ci_high"] < 0
                    else "undecided")
        assert f["verdict"] == expected


def test_the_registered_architectures_ranked_by_their_intervals(smoke):
    """Every pair of the registered architectures at the headline span, recomputed from the per-seed rows: separated
    when their t-intervals over seeds (clipped to [0, 1]) do not overlap, paired-separated when the t-interval of the
    per-seed difference excludes 0; the undecided pairs and the counts are the report's. Every difference's interval
    lies in [-1, 1] (two accuracies differ by at most 1)."""
    per_seed = pd.read_csv(smoke["out"] / "test_per_seed.csv")
    head = per_seed[per_seed.model.isin(NAMES) & (per_seed.span == SMOKE["spans"][0])]
    acc = {name: group.set_index("seed").test_accuracy for name, group in head.groupby("model")}
    assert sorted(acc) == sorted(NAMES)

    bounds = {name: (max(0.0, low), min(1.0, high)) for name, a in acc.items() for low, high in [t_bounds(a)]}
    separated, paired, undecided = 0, 0, set()
    for i, a in enumerate(NAMES):
        for b in NAMES[i + 1:]:
            apart = bounds[a][1] < bounds[b][0] or bounds[b][1] < bounds[a][0]
            low, high = t_bounds(acc[a] - acc[b])
            by_seed = low > 0 or high < 0
            separated, paired = separated + apart, paired + by_seed
            if not apart and not by_seed:
                undecided.add(frozenset((a, b)))
    ranking = smoke["metrics"]["separations"]
    assert ranking["span"] == SMOKE["spans"][0] and ranking["pairs"] == len(NAMES) * (len(NAMES) - 1) // 2
    assert (ranking["separated"], ranking["paired_separated"]) == (separated, paired)
    assert {frozenset(pair) for pair in ranking["undecided"]} == undecided
    if not (acc["hopfield"] - acc["standard"]).any():  # trained identically: never told apart
        assert frozenset(("hopfield", "standard")) in undecided
    rows = pd.read_csv(smoke["out"] / "separations.csv")
    assert len(rows) == ranking["pairs"]
    goals = smoke["metrics"]["goals"]
    for c in goals["bsbr_vs"] + [f for f in goals["frontier"] if f["ci_low"] is not None]:
        assert -1.0 <= c["ci_low"] <= c["difference"] <= c["ci_high"] <= 1.0
    assert ((rows.difference_low.dropna() >= -1.0) & (rows.difference_high.dropna() <= 1.0)).all()
    markdown = next(o["data"]["text/markdown"] for c in smoke["notebook"].cells if c.cell_type == "code"
                    for o in c.outputs if "text/markdown" in o.get("data", {}))
    assert (f"At span {SMOKE['spans'][0]}, {separated} of {ranking['pairs']} pairs are separated by their intervals "
            f"over seeds and {paired} by the seed-paired difference") in markdown


def test_executed_notebook_findings_first_figure_and_no_errors(smoke):
    nb = smoke["notebook"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and markdown[0].startswith("### What we found")
    assert "Goal 1 (standard attention ≥ 95%): " + ("met" if smoke["metrics"]["goals"]["attention_accuracy"]["met"]
                                                     else "missed") in markdown[0]
    assert "Where BSBR lands on the accuracy-vs-state frontier" in markdown[0]
    # nothing printed to stdout before the findings: provenance goes to the appendix
    first_markdown = next(i for i, o in enumerate(outputs) if "text/markdown" in o.get("data", {}))
    assert not [o for o in outputs[:first_markdown] if o.output_type == "stream" and o.name == "stdout"]
    html = "".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert "git revision:" in html and "Provenance and run log" in html
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert (smoke["out"] / "accuracy_vs_state.png").stat().st_size > 5000
    assert smoke["metrics"]["machine"]["threads"] == 1


def test_findings_say_the_sweep_edges_once(smoke):
    sweep = pd.read_csv(smoke["out"] / "lr_sweep.csv")
    chosen = {LABEL(name, span): lr for name, span, lr in
              sweep[sweep.chosen][["model", "span", "learning_rate"]].itertuples(index=False)}
    markdown = next(o["data"]["text/markdown"] for c in smoke["notebook"].cells if c.cell_type == "code"
                    for o in c.outputs if "text/markdown" in o.get("data", {}))
    edges = grid_edge_summary(chosen, SMOKE["learning_rates"])  # 2 rates: every choice is an edge
    assert edges and edges in markdown and markdown.count("chose an edge") == 1
    assert "A sweep of 2 rates brackets no model" in markdown


def test_question_is_short_and_the_profiles_are_quick_and_publication():
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    question = next(c for c in cells if c.cell_type == "markdown")
    assert "**Question.**" in question.source and len(question.source) < 1000  # the findings box comes soon after
    assert "**Goals.**" not in question.source and "profile" not in question.source
    text = "".join(cell.source for cell in cells)
    assert "**Goals.**" in text and "smoke profile" not in text and not re.search(r"\btier\b", text)
    assert "`quick`" in text and "`publication`" in text and "PROFILE_ENV" in text


def test_rendered_report_has_one_what_we_found_heading(smoke):
    """The findings' own heading becomes the box's heading: the page says "What we found" once."""
    import bs4

    sys.path.insert(0, str(ROOT / "pipelines"))  # the stage scripts are top-level modules
    from render_report import render

    page = bs4.BeautifulSoup(render(smoke["out"] / "08_associative_recall.ipynb"), "html.parser")
    box = page.find("section", class_="what-we-found")
    assert box is not None and box.find("h3").get_text(strip=True).startswith("What we found")
    assert page.get_text().count("What we found") == 1


def test_bad_task_size_fails_before_training(tmp_path):
    out = tmp_path / "bad"
    proc = run_notebook_cli(NOTEBOOK, "08_associative_recall", out,
                            overrides={**SMOKE, "num_pairs": 5, "out_dir": str(out),
                                       "metrics_path": str(tmp_path / "m.json")})
    assert proc.returncode == 1
    assert "ValueError" in proc.stderr and "num_pairs" in proc.stderr
    assert not (tmp_path / "m.json").exists() and not (out / "08_associative_recall.ipynb").exists()
