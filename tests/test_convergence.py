"""bsbr.convergence: the learning rate per architecture, steps to a target loss, t-intervals over seeds, which pairs
they separate, identical runs, memory power laws."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import bsbr
from bsbr.convergence import (check_training_parameters, choose_learning_rates, convergence_summary, crossing,
                              format_steps, identical_pairs, memory_fit_lens, memory_fits, memory_table,
                              grid_edge_sentence, grid_edge_summary, rates_at_grid_edge, run_row, separations)
from tests.reference import t_bounds


def curves():
    """Validation losses at steps 0, 10, 20 for three seeds of a (fast), b (slow) and c (= a)."""
    losses = {("a", 0): [3.0, 1.0, 0.5], ("a", 1): [3.0, 1.5, 0.7], ("a", 2): [3.0, 1.2, 0.6],
              ("b", 0): [3.0, 2.0, 1.0], ("b", 1): [3.0, 2.5, 1.2], ("b", 2): [3.0, 2.2, 0.9],
              ("c", 0): [3.0, 1.0, 0.5], ("c", 1): [3.0, 1.5, 0.7], ("c", 2): [3.0, 1.2, 0.6]}
    return pd.DataFrame([{"model": m, "seed": s, "step": step, "val_loss": loss, "elapsed_s": step / 10}
                         for (m, s), values in losses.items() for step, loss in zip((0, 10, 20), values)])


def runs_table(evals):
    last = evals[evals.step == 20]
    return pd.DataFrame([{"model": r.model, "seed": r.seed, "learning_rate": 0.01, "params": 100,
                          "final_val_loss": r.val_loss, "final_val_ppl": math.exp(r.val_loss),
                          "final_val_bpb": r.val_loss / math.log(2), "tokens_per_s": 10.0, "train_seconds": 2.0}
                         for r in last.itertuples()])


def test_crossing_interpolates_step_and_seconds():
    frame = pd.DataFrame({"step": [10, 0, 20], "val_loss": [1.0, 3.0, 0.5], "elapsed_s": [1.0, 0.0, 4.0]})
    assert crossing(frame, 2.0) == (5.0, 0.5)
    assert crossing(frame, 0.75) == (15.0, 2.5)
    assert crossing(frame, 0.1) == (None, None)


def test_choose_learning_rates_takes_the_lowest_validation_loss():
    sweep = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3 + ["c"] * 2,
                          "learning_rate": [0.001, 0.003, 0.01, 0.001, 0.003, 0.01, 0.003, 0.001],
                          "final_val_loss": [2.5, 2.1, 2.3, 2.0, float("inf"), 2.0, 1.5, 1.7]})
    # a: the middle rate; b: a tie (the smaller rate) and a diverged run never chosen; c: order of rows irrelevant
    assert choose_learning_rates(sweep) == {"a": 0.003, "b": 0.001, "c": 0.003}
    sweep.loc[sweep.model == "b", "final_val_loss"] = [float("nan"), float("inf"), 1.9]
    assert choose_learning_rates(sweep)["b"] == 0.01
    sweep.loc[sweep.model == "b", "final_val_loss"] = float("inf")
    with pytest.raises(ValueError, match="every learning rate of b diverged"):
        choose_learning_rates(sweep)
    with pytest.raises(ValueError, match="final_val_loss"):
        choose_learning_rates(sweep.drop(columns="final_val_loss"))


def test_rates_at_grid_edge_names_the_unbracketed_architectures():
    grid = [0.01, 0.001, 0.003]  # unsorted on purpose
    chosen = {"a": 0.001, "b": 0.003, "c": 0.01, "d": 0.001}
    assert rates_at_grid_edge(chosen, grid) == {"a": "lowest", "c": "highest", "d": "lowest"}
    assert rates_at_grid_edge({"b": 0.003}, grid) == {}
    assert rates_at_grid_edge({"a": 0.001}, [0.001, 0.001]) == {}  # one rate: no sweep, nothing to bracket
    with pytest.raises(ValueError, match="learning_rates must hold at least one rate"):
        rates_at_grid_edge({"a": 0.001}, [])
    with pytest.raises(ValueError, match="rate 0.03 of e is not one of learning_rates"):
        rates_at_grid_edge({"e": 0.03}, grid)


def test_grid_edge_sentence_is_the_one_the_reports_and_readme_print():
    grid = [0.01, 0.001, 0.003]
    assert grid_edge_sentence({"a": 0.001, "b": 0.003, "c": 0.01}, grid) == (
        "**Learning-rate sweep edges.** a chose the lowest rate (0.001); c chose the highest rate (0.01) of "
        "[0.001, 0.003, 0.01]: the sweep does not bracket them, so their best rate may lie outside it.")
    assert grid_edge_sentence({"b": 0.003}, grid) == ""
    with pytest.raises(ValueError, match="rate 0.03 of e is not one of learning_rates"):
        grid_edge_sentence({"e": 0.03}, grid)


def test_grid_edge_summary_says_once_how_many_chose_an_edge_and_what_the_sweep_can_tell():
    two = [0.01, 0.003]  # unsorted on purpose; two rates: every choice is an edge
    assert grid_edge_summary({"a": 0.003, "b": 0.01, "c": 0.01}, two) == (
        "**Learning-rate sweep edges.** 3 of 3 models chose an edge of the 2 swept rates [0.003, 0.01] (the lowest, "
        "0.003: a; the highest, 0.01: b, c). A sweep of 2 rates brackets no model (every choice is an edge), so it "
        "cannot tell whether a model's best rate lies beyond it.")
    three = [0.01, 0.001, 0.003]
    assert grid_edge_summary({"a": 0.001, "b": 0.003, "c": 0.003, "d": 0.001}, three) == (
        "**Learning-rate sweep edges.** 2 of 4 models chose an edge of the 3 swept rates [0.001, 0.003, 0.01] (the "
        "lowest, 0.001: a, d). A sweep of 3 rates brackets only a choice inside it (2 models here): for the 2 at an "
        "edge it cannot tell whether the best rate lies beyond it.")
    assert "(1 model here)" in grid_edge_summary({"a": 0.01, "b": 0.003}, three)
    assert grid_edge_summary({"b": 0.003}, three) == ""  # bracketed
    assert grid_edge_summary({"a": 0.003}, [0.003]) == ""  # one rate: no sweep
    with pytest.raises(ValueError, match="rate 0.03 of e is not one of learning_rates"):
        grid_edge_summary({"e": 0.03}, three)


def test_convergence_summary_intervals_over_seeds():
    evals = curves()
    runs, summary = convergence_summary(runs_table(evals), evals, target=1.1)
    per_seed = runs.set_index(["model", "seed"]).steps_to_target
    assert per_seed[("a", 0)] == pytest.approx(10 * 1.9 / 2.0)  # 3.0 -> 1.0 over steps 0-10
    assert per_seed[("a", 1)] == pytest.approx(10 + 10 * 0.4 / 0.8) and per_seed[("b", 0)] == pytest.approx(19.0)
    assert pd.isna(per_seed[("b", 1)])  # ends at 1.2 > 1.1
    assert list(summary.model) == ["a", "c", "b"]  # by final loss (a and c tie: by name)
    a = summary.set_index("model").loc["a"]
    assert a.final_val_loss == pytest.approx(0.6)
    assert (a.final_val_loss_low, a.final_val_loss_high) == pytest.approx(t_bounds([0.5, 0.7, 0.6]))
    assert a.final_val_ppl == pytest.approx(math.exp(0.6)) and a.final_val_ppl_high == pytest.approx(
        math.exp(a.final_val_loss_high))
    assert a.final_val_ppl_min == pytest.approx(math.exp(0.5)) and a.final_val_ppl_max == pytest.approx(math.exp(0.7))
    steps_a = [per_seed[("a", s)] for s in range(3)]
    assert a.steps_to_target == pytest.approx(np.mean(steps_a))
    assert (a.steps_to_target_low, a.steps_to_target_high) == pytest.approx(t_bounds(steps_a))
    assert a.seconds_to_target == pytest.approx(a.steps_to_target / 10)
    assert a.seeds_reaching_target == 3 and a.learning_rate == 0.01 and a.seeds == 3
    b = summary.set_index("model").loc["b"]
    assert np.isnan(b.steps_to_target) and np.isnan(b.steps_to_target_low) and b.seeds_reaching_target == 2
    assert b.steps_to_target_min == pytest.approx(10 + 10 * 1.1 / 1.3) and b.steps_to_target_max == pytest.approx(19.0)
    with pytest.raises(ValueError, match="target"):
        convergence_summary(runs_table(evals), evals, target=None)
    with pytest.raises(ValueError, match="two or more"):
        convergence_summary(runs_table(evals)[lambda f: f.seed == 0], evals, target=1.1)


def test_separations_by_interval_and_by_paired_difference():
    evals = curves()
    runs, summary = convergence_summary(runs_table(evals), evals, target=1.1)
    pairs = separations(summary, runs, "final_val_loss").set_index(["a", "b"])
    assert list(pairs.index) == [("a", "c"), ("a", "b"), ("c", "b")]
    # a: 0.5/0.7/0.6 and b: 1.0/1.2/0.9: the intervals [0.352, 0.848] and [0.654, 1.41] overlap ...
    assert t_bounds([0.5, 0.7, 0.6])[1] > t_bounds([1.0, 1.2, 0.9])[0]
    assert not pairs.loc[("a", "b"), "separated"]
    # ... but the per-seed differences -0.5, -0.5, -0.3 are consistently negative
    diff = [-0.5, -0.5, -0.3]
    assert pairs.loc[("a", "b"), "difference"] == pytest.approx(np.mean(diff))
    assert (pairs.loc[("a", "b"), "difference_low"], pairs.loc[("a", "b"), "difference_high"]) == pytest.approx(
        t_bounds(diff))
    assert bool(pairs.loc[("a", "b"), "paired_separated"])
    assert not pairs.loc[("a", "c"), "separated"] and not pairs.loc[("a", "c"), "paired_separated"]  # identical
    assert pairs.loc[("a", "c"), ["difference_low", "difference_high"]].tolist() == [0.0, 0.0]  # no spread
    far = runs.assign(final_val_loss=np.where(runs.model == "b", runs.final_val_loss + 2, runs.final_val_loss))
    _, far_summary = convergence_summary(far.assign(final_val_ppl=np.exp(far.final_val_loss)), evals, target=1.1)
    assert bool(separations(far_summary, far, "final_val_loss").set_index(["a", "b"]).loc[("a", "b"), "separated"])
    steps = separations(summary, runs, "steps_to_target").set_index(["a", "b"])
    assert not steps.loc[("a", "b"), "separated"] and np.isnan(steps.loc[("a", "b"), "difference"])  # b misses a seed
    with pytest.raises(ValueError, match="column"):
        separations(summary, runs, "params")


def test_separations_of_any_quantity_with_its_interval_columns():
    """Report 08 ranks by test accuracy: any column works when the summary holds its mean and t-interval bounds."""
    runs = pd.DataFrame({"model": ["x"] * 3 + ["y"] * 3 + ["z"] * 3, "seed": [0, 1, 2] * 3,
                         "test_accuracy": [0.90, 0.95, 0.92, 0.20, 0.25, 0.10, 0.10, 0.80, 0.15]})
    rows = []
    for model, group in runs.groupby("model"):
        low, high = t_bounds(group.test_accuracy.tolist())
        rows.append({"model": model, "test_accuracy": group.test_accuracy.mean(), "test_accuracy_low": low,
                     "test_accuracy_high": high})
    summary = pd.DataFrame(rows)
    pairs = separations(summary, runs, "test_accuracy").set_index(["a", "b"])
    assert list(pairs.index) == [("x", "y"), ("x", "z"), ("y", "z")]
    assert bool(pairs.loc[("x", "y"), "separated"]) and bool(pairs.loc[("x", "y"), "paired_separated"])
    # z's seeds spread from 0.10 to 0.80: its interval reaches y's, and the differences y - z (0.10, -0.55, -0.05)
    # change sign
    assert not pairs.loc[("y", "z"), "separated"] and not pairs.loc[("y", "z"), "paired_separated"]
    diff = [0.10, -0.55, -0.05]
    assert pairs.loc[("y", "z"), "difference"] == pytest.approx(np.mean(diff))
    assert (pairs.loc[("y", "z"), "difference_low"], pairs.loc[("y", "z"), "difference_high"]) == pytest.approx(
        t_bounds(diff))
    alone = separations(summary[summary.model == "x"], runs[runs.model == "x"], "test_accuracy")
    assert alone.empty and list(alone.columns) == list(pairs.reset_index().columns)  # one architecture: no pairs
    with pytest.raises(ValueError, match="test_accuracy_high"):
        separations(summary.drop(columns="test_accuracy_high"), runs, "test_accuracy")
    with pytest.raises(ValueError, match="runs.test_accuracy"):
        separations(summary, runs.rename(columns={"test_accuracy": "accuracy"}), "test_accuracy")


def test_identical_pairs_and_format_steps():
    assert identical_pairs(curves(), ["a", "b", "c"]) == [("a", "c")]
    assert format_steps(None) == format_steps(float("nan")) == "not reached" and format_steps(12.34) == "12.3"


def test_memory_fits_and_table():
    memory = pd.DataFrame([{"model": m, "seq_len": n, "peak_bytes": k * n**e, "grad_bytes": 10, "optimizer_state_bytes": 20}
                           for m, k, e in (("x", 3.0, 1.0), ("y", 1.0, 2.0)) for n in (256, 512, 1024, 2048)])
    assert memory_fit_lens([256, 512, 1024, 2048]) == [1024, 2048] and memory_fit_lens([256, 512, 1024]) == [512, 1024]
    assert memory_fit_lens([1, 2]) == [1, 2]
    fits = memory_fits(memory, [1024, 2048], [256, 512, 1024, 2048])
    assert list(zip(fits.model, fits.lengths)) == [("x", "all"), ("x", "upper half"), ("y", "all"), ("y", "upper half")]
    assert fits.exponent.tolist() == pytest.approx([1, 1, 2, 2]) and fits.prefactor_bytes.tolist() == pytest.approx([3, 3, 1, 1])
    assert fits.seq_lens.iloc[1] == "1024 2048"
    table = memory_table(memory, fits, 2048, batch_size=2)
    assert table.loc["x", "peak MiB at 2048"] == 3 * 2048 / 2**20
    assert table.loc["y", "KiB per token at 2048"] == 2048**2 / 1024 / (2048 * 2)
    assert table.loc["y", "exponent (upper half)"] == pytest.approx(2)


def test_run_row():
    run = SimpleNamespace(params=7, train_seconds=2.0, tokens_per_s=5.0, history=[{"train_loss": 2.5}],
                          evals=[{"val_loss": 3.0}, {"val_loss": 1.0, "val_ppl": math.e, "val_bpb": 1 / math.log(2)}])
    row = run_row("bsbr", 1, run, steps=4, tokens=64, learning_rate=0.01)
    assert row == {"model": "bsbr", "seed": 1, "learning_rate": 0.01, "params": 7, "steps": 4, "tokens": 64,
                   "train_seconds": 2.0, "tokens_per_s": 5.0, "initial_val_loss": 3.0, "final_train_loss": 2.5,
                   "final_val_loss": 1.0, "final_val_ppl": math.e, "final_val_bpb": 1 / math.log(2)}


def test_check_training_parameters_names_the_bad_one():
    good = dict(models=None, seeds=[0, 1], tune_seed=0, learning_rates=[0.001, 0.01], target_loss=None,
                target_margin=0.1, confidence=0.95, ngram_orders=[1, 2, 3], memory_seq_lens=[256, 512],
                warmup_steps=2, steps=10, batch_size=2, seq_len=8, hidden_dim=8, num_heads=2, threads=1)
    assert check_training_parameters(**good) == sorted(bsbr.available_models())
    for key, bad, match in (("models", ["nope"], "models"), ("models", [], "models"), ("seeds", [0, 0], "seeds"),
                            ("seeds", [-1, 0], "seeds"), ("seeds", [0], "seeds"), ("tune_seed", 5, "tune_seed"),
                            ("learning_rates", [], "learning_rates"), ("learning_rates", [0.1, -1], "learning_rates"),
                            ("learning_rates", [0.1, 0.1], "learning_rates"), ("steps", 0, "steps"),
                            ("seq_len", 1, "seq_len"), ("hidden_dim", 9, "hidden_dim"),
                            ("warmup_steps", 10, "warmup_steps"), ("target_loss", 0, "target_loss"),
                            ("target_margin", -0.1, "target_margin"), ("confidence", 1.0, "confidence"),
                            ("ngram_orders", [1, 3], "ngram_orders"), ("ngram_orders", [2, 9], "ngram_orders"),
                            ("memory_seq_lens", [512, 256], "memory_seq_lens"),
                            ("memory_seq_lens", [256], "memory_seq_lens"), ("threads", 0, "threads")):
        with pytest.raises(ValueError, match=match):
            check_training_parameters(**{**good, key: bad})
