"""Notebook 05 (passkey retrieval: original, normalised BSBR, own chunk, sliding window) through the pipeline runner
with smoke parameters: 512-token contexts, chunk 128 (an uncalibrated normalised conversion saved into tmp_path),
two depths, two trials, 1 thread."""

from __future__ import annotations


import pandas as pd
import pytest

from bsbr.analysis import wilson_interval
from tests.conftest import CHECKPOINT_CHUNK, CHECKPOINT_SINKS, run_notebook_smoke

CHUNK, SINKS, WINDOW = CHECKPOINT_CHUNK, CHECKPOINT_SINKS, 128
LENGTHS, DEPTHS, TRIALS = [512], [0.1, 0.9], 2
VARIANTS = ["calibrated", "original", "own_chunk", "sliding_window"]  # sorted
SMOKE = {"split": "validation", "lengths": LENGTHS, "depths": DEPTHS, "trials": TRIALS, "window": WINDOW,
         "window_sinks": SINKS, "check_generate": True, "threads": 1, "seed": 0}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, normalized_checkpoint):
    return run_notebook_smoke(tmp_path_factory.mktemp("long_range"), "05_long_range",
                              {**SMOKE, "calibrated_path": str(normalized_checkpoint)})


def test_trials_table_is_paired_and_respects_what_each_variant_sees(smoke):
    trials = pd.read_csv(smoke["out"] / "trials.csv", dtype={"passkey": str})
    expected = [(n, d, v, t) for n in LENGTHS for d in DEPTHS for v in VARIANTS for t in range(TRIALS)]
    assert list(zip(trials.length, trials.depth, trials.variant, trials.trial)) == expected
    # every variant scores the same samples: one passkey and fact position per (length, depth, trial)
    per_sample = trials.groupby(["length", "depth", "trial"])[["passkey", "fact_start"]].nunique()
    assert (per_sample == 1).all().all()
    assert trials.passkey.str.fullmatch(r"\d{5}").all()
    assert trials.groupby("variant").passkey.apply(tuple).nunique() == 1
    # visibility flags from the geometry: the answer's first prediction is at answer_start - 1
    query = trials.answer_start - 1
    assert (trials.fact_visible_own_chunk == (trials.fact_start // CHUNK == query // CHUNK)).all()
    assert (trials.fact_visible_window == (query - trials.fact_start < WINDOW)).all()
    assert (trials.fact_visible_window[trials.depth == 0.9]).all() and not trials.fact_visible_window[trials.depth == 0.1].any()
    # without retrieval a 5-digit number cannot be guessed: correct only where the fact is in view
    local = trials[trials.variant == "own_chunk"]
    assert not (local.correct & ~local.fact_visible_own_chunk).any()
    window = trials[trials.variant == "sliding_window"]
    assert not (window.correct & ~window.fact_visible_window).any()
    # the original model finds the passkey at short context
    assert trials[trials.variant == "original"].correct.all()
    assert (trials.answer_logprob <= 0).all()
    assert (trials.correct <= (trials.answer_logprob > -20)).all()


def test_accuracy_cells_counts_and_wilson_intervals(smoke):
    trials = pd.read_csv(smoke["out"] / "trials.csv")
    cells = pd.read_csv(smoke["out"] / "accuracy.csv")
    assert list(zip(cells.length, cells.depth, cells.variant)) == [(n, d, v) for n in LENGTHS for d in DEPTHS
                                                                    for v in VARIANTS]
    assert (cells.trials == TRIALS).all()
    counts = trials.groupby(["length", "depth", "variant"]).correct.sum().to_numpy()
    assert cells.correct.tolist() == counts.tolist()
    for row in cells.itertuples():
        assert row.accuracy == row.correct / row.trials
        assert (row.ci_low, row.ci_high) == pytest.approx(wilson_interval(row.correct, row.trials), abs=1e-12)
        assert row.ci_low <= row.accuracy <= row.ci_high
    by_length = pd.read_csv(smoke["out"] / "accuracy_by_length.csv")
    assert list(zip(by_length.length, by_length.variant)) == [(n, v) for n in LENGTHS for v in VARIANTS]
    assert (by_length.trials == TRIALS * len(DEPTHS)).all()
    assert by_length.correct.tolist() == trials.groupby(["length", "variant"]).correct.sum().tolist()
    times = pd.read_csv(smoke["out"] / "forward_times.csv")
    assert (times.forwards == TRIALS * len(DEPTHS)).all() and (times.median_s > 0).all() and (times.threads == 1).all()


def test_one_forward_score_equals_greedy_generation(smoke):
    check = pd.read_csv(smoke["out"] / "generate_check.csv", dtype={"generated": str, "answer": str},
                        keep_default_na=False)
    assert check.variant.tolist() == ["original", "calibrated"]
    assert (check.greedy_correct == check.one_forward_correct).all()
    assert (check.greedy_correct == (check.generated == check.answer)).all()  # the greedy text is the answer
    # each variant is checked on a trial it got right where there is one: the original's is a real success
    assert check.set_index("variant").loc["original", "greedy_correct"]
    assert (check.length == min(LENGTHS)).all()
    assert smoke["metrics"]["generate_check"] == {"original": True, "calibrated": True}


def test_metrics_match_tables_and_notebook_ran_clean(smoke):
    metrics = smoke["metrics"]
    by_length = pd.read_csv(smoke["out"] / "accuracy_by_length.csv").set_index(["length", "variant"])
    for variant in VARIANTS:
        row = by_length.loc[(512, variant)]
        assert metrics["accuracy"][variant]["512"] == pytest.approx(row.accuracy, abs=1e-4)
        assert metrics["ci95"][variant]["512"] == pytest.approx([row.ci_low, row.ci_high], abs=1e-4)
    assert metrics["chunk_size"] == CHUNK and metrics["max_position_embeddings"] == 8192
    assert metrics["out_of_reach_trials"] == TRIALS  # depth 0.1: before the question's chunk and window
    assert metrics["out_of_reach_accuracy"]["own_chunk"] == 0 and metrics["out_of_reach_accuracy"]["original"] == 1
    outputs = [o for c in smoke["notebook"].cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "threads: 1", "CPU:", "samples: 100%", "The secret number is"):
        assert line in printed
    assert "IProgress" not in printed  # importing bsbr.experiment first filters tqdm.auto's warning
    assert "model: SmolLM2-135M-Instruct.Q4_1.gguf" in printed and "loaded the model and " in printed
    assert (smoke["out"] / "accuracy.png").stat().st_size > 1000
