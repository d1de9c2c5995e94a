"""bsbr.convergence: steps to a target loss, ranking with seed spread, identical runs, memory power laws."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

import bsbr
from bsbr.convergence import (check_training_parameters, convergence_summary, crossing, format_steps,
                              identical_pairs, memory_fit_lens, memory_fits, memory_table, ranking, run_row)


def curves():
    """Validation losses at steps 0, 10, 20 for two seeds of a (fast), b (slow) and c (= a)."""
    losses = {("a", 0): [3.0, 1.0, 0.5], ("a", 1): [3.0, 1.5, 0.7], ("b", 0): [3.0, 2.0, 1.0],
              ("b", 1): [3.0, 2.5, 1.2], ("c", 0): [3.0, 1.0, 0.5], ("c", 1): [3.0, 1.5, 0.7]}
    return pd.DataFrame([{"model": m, "seed": s, "step": step, "val_loss": loss, "elapsed_s": step / 10}
                         for (m, s), values in losses.items() for step, loss in zip((0, 10, 20), values)])


def runs_table(evals):
    last = evals[evals.step == 20]
    return pd.DataFrame([{"model": r.model, "seed": r.seed, "params": 100, "final_val_loss": r.val_loss,
                          "final_val_ppl": math.exp(r.val_loss), "final_val_bpb": r.val_loss / math.log(2),
                          "tokens_per_s": 10.0, "train_seconds": 2.0} for r in last.itertuples()])


def test_crossing_interpolates_step_and_seconds():
    frame = pd.DataFrame({"step": [10, 0, 20], "val_loss": [1.0, 3.0, 0.5], "elapsed_s": [1.0, 0.0, 4.0]})
    assert crossing(frame, 2.0) == (5.0, 0.5)
    assert crossing(frame, 0.75) == (15.0, 2.5)
    assert crossing(frame, 0.1) == (None, None)


def test_convergence_summary_with_the_worst_final_loss_as_target():
    evals = curves()
    runs, summary, target, source, mean_curves = convergence_summary(runs_table(evals), evals)
    assert target == pytest.approx(1.1) and source == "the worst final seed-mean validation loss (b)"
    per_seed = runs.set_index(["model", "seed"]).steps_to_target
    assert per_seed[("a", 0)] == pytest.approx(10 * 1.9 / 2.0)  # 3.0 -> 1.0 over steps 0-10
    assert per_seed[("a", 1)] == pytest.approx(10 + 10 * 0.4 / 0.8) and per_seed[("b", 0)] == pytest.approx(19.0)
    assert per_seed[("b", 1)] is None or pd.isna(per_seed[("b", 1)])  # ends at 1.2 > 1.1
    a = summary.set_index("model").loc["a"]
    # a's mean curve: 3.0, 1.25, 0.6 -> reaches 1.1 between 10 and 20: 10 + 10 · 0.15 / 0.65
    assert a.steps_to_target == pytest.approx(10 + 10 * 0.15 / 0.65)
    assert a.seconds_to_target == pytest.approx(a.steps_to_target / 10)
    assert a.seeds_reaching_target == 2 and a.final_val_ppl_mean == pytest.approx((math.exp(0.5) + math.exp(0.7)) / 2)
    b = summary.set_index("model").loc["b"]
    assert b.steps_to_target == pytest.approx(20.0) and b.seeds_reaching_target == 1  # seed 1 ends at 1.2
    assert mean_curves[mean_curves.model == "b"].val_loss.tolist() == pytest.approx([3.0, 2.25, 1.1])
    _, _, target, source, _ = convergence_summary(runs_table(evals), evals, target_loss=2)
    assert (target, source) == (2.0, "the target_loss parameter")


def test_ranking_margins_and_seed_separation():
    evals = curves()
    _, summary, _, _, _ = convergence_summary(runs_table(evals), evals)
    rank = ranking(summary, [0, 1])
    assert rank.fastest.model == "a" and rank.runner_up.model == "c"  # a and c tie; a's final loss sorts first
    assert rank.step_margin == 0.0 and rank.step_ratio == 1.0 and rank.step_separated is False
    assert rank.best_final.model == "a" and rank.final_margin == 0.0 and rank.final_separated is False
    two = ranking(summary[summary.model != "c"].reset_index(drop=True), [0, 1])
    assert two.runner_up.model == "b" and two.step_margin == pytest.approx(20 - two.fastest.steps_to_target)
    # a's slowest seed reaches 1.1 at 15, before b's only seed at 19: beyond the spread
    assert two.step_separated is True and two.final_separated is True
    assert ranking(summary[summary.model == "a"], [0, 1]).runner_up is None


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
    row = run_row("bsbr", 1, run, steps=4, tokens=64)
    assert row == {"model": "bsbr", "seed": 1, "params": 7, "steps": 4, "tokens": 64, "train_seconds": 2.0,
                   "tokens_per_s": 5.0, "initial_val_loss": 3.0, "final_train_loss": 2.5, "final_val_loss": 1.0,
                   "final_val_ppl": math.e, "final_val_bpb": 1 / math.log(2)}


def test_check_training_parameters_names_the_bad_one():
    good = dict(models=None, seeds=[0, 1], target_loss=None, memory_seq_lens=[256, 512], warmup_steps=2, steps=10,
                batch_size=2, seq_len=8, hidden_dim=8, num_heads=2, threads=1)
    assert check_training_parameters(**good) == sorted(bsbr.available_models())
    for key, bad, match in (("models", ["nope"], "models"), ("models", [], "models"), ("seeds", [0, 0], "seeds"),
                            ("seeds", [-1], "seeds"), ("steps", 0, "steps"), ("seq_len", 1, "seq_len"),
                            ("hidden_dim", 9, "hidden_dim"), ("warmup_steps", 10, "warmup_steps"),
                            ("target_loss", 0, "target_loss"), ("memory_seq_lens", [512, 256], "memory_seq_lens"),
                            ("memory_seq_lens", [256], "memory_seq_lens"), ("threads", 0, "threads")):
        with pytest.raises(ValueError, match=match):
            check_training_parameters(**{**good, key: bad})
