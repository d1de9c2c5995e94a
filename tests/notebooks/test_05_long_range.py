"""Notebook 05 (passkey retrieval: original, block retrieval with both summaries and with BSBR's meta router, the exact
region alone, the terraced conversion, a sliding window) through the pipeline runner with smoke parameters: 512-token contexts, chunk 128,
32-token blocks, top-2, 4 sinks, an uncalibrated terraced conversion with zero LoRA saved into tmp_path, two depths,
two trials, 1 thread; task "passkey" (the pipeline's default; the held-out-text task's filler placement is tested in
tests/test_passkey.py)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from bsbr.analysis import wilson_interval
from bsbr.passkey import VARIANTS as PASSKEY_VARIANTS
from tests.conftest import run_notebook_smoke

CHUNK, SINKS, WINDOW, BLOCK, TOP_K = 128, 4, 256, 32, 2
LENGTHS, DEPTHS, TRIALS = [512], [0.05, 0.95], 2
VARIANTS = ["blocks_mean", "blocks_meta", "blocks_minmax", "exact_region", "original", "sliding_window",
            "terraced"]  # sorted
SMOKE = {"task": "passkey", "split": "validation", "lengths": LENGTHS, "long_lengths": [], "long_trials": None, "depths": DEPTHS,
         "trials": TRIALS,
         "variants": ["original", "blocks_minmax", "blocks_mean", "blocks_meta", "exact_region", "terraced",
                      "sliding_window"],
         "chunk_size": CHUNK, "blocks_options": {"block_size": BLOCK, "top_k": TOP_K, "selection": "group",
                                                 "sink_size": SINKS, "dense_layers": []},
         "window": WINDOW, "window_sinks": SINKS, "check_generate": True, "threads": 1, "seed": 0}


@pytest.fixture(scope="module")
def terraced_files(tmp_path_factory):
    """An uncalibrated terraced conversion of the embedded SmolLM2 (chunk 128, 4 sinks) and a LoRA on it (zero
    update, as PEFT initialises it), written as notebook 02 writes them."""
    import torch

    from bsbr.convert import add_lora, converted_copy, load_pretrained, save_conversion, save_lora

    folder = tmp_path_factory.mktemp("terraced")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, _ = load_pretrained()
        terraced = converted_copy(base, CHUNK, retrieval="terraced", sink_size=SINKS)
        save_conversion(terraced, folder / "terraced.safetensors")
        save_lora(add_lora(copy.deepcopy(terraced), rank=2), folder / "terraced_lora.safetensors")
        # blocks_meta's router: a normalised conversion's meta projections (uncalibrated: q_proj/k_proj copies)
        save_conversion(converted_copy(base, CHUNK, retrieval="normalized", sink_size=SINKS),
                        folder / "calibrated.safetensors")
    finally:
        torch.set_num_threads(threads)
    return folder


def smoke_params(terraced_files, resume_dir):
    return {**SMOKE, "terraced_path": str(terraced_files / "terraced.safetensors"),
            "terraced_lora_path": str(terraced_files / "terraced_lora.safetensors"),
            "calibrated_path": str(terraced_files / "calibrated.safetensors"), "resume_dir": str(resume_dir)}


@pytest.fixture(scope="module")
def resume_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, terraced_files, resume_dir):
    return run_notebook_smoke(tmp_path_factory.mktemp("long_range"), "05_long_range",
                              smoke_params(terraced_files, resume_dir))


def test_trials_table_is_paired_and_respects_what_each_variant_sees(smoke):
    trials = pd.read_csv(smoke["out"] / "trials.csv", dtype={"passkey": str})
    expected = [(n, d, v, t) for n in LENGTHS for d in DEPTHS for v in VARIANTS for t in range(TRIALS)]
    assert list(zip(trials.length, trials.depth, trials.variant, trials.trial)) == expected
    # every variant scores the same samples: one passkey and fact position per (length, depth, trial)
    per_sample = trials.groupby(["length", "depth", "trial"])[["passkey", "fact_start"]].nunique()
    assert (per_sample == 1).all().all()
    assert trials.filler_start.isna().all()  # task "passkey": the repeated sentences, the same filler in every cell
    assert trials.passkey.str.fullmatch(r"\d{5}").all()
    assert trials.groupby("variant").passkey.apply(tuple).nunique() == 1
    # visibility flags from the geometry: the answer's first prediction is at answer_start - 1
    query = trials.answer_start - 1
    region_start = ((query // CHUNK - 1) * CHUNK).clip(lower=0)
    assert (trials.fact_visible_own_chunk == (trials.fact_start // CHUNK == query // CHUNK)).all()
    assert (trials.fact_visible_exact_region == (trials.fact_start >= region_start)).all()
    assert (trials.fact_visible_window == (query - trials.fact_start < WINDOW)).all()
    late, early = trials.depth == 0.95, trials.depth == 0.05
    assert trials.fact_visible_exact_region[late].all() and not trials.fact_visible_exact_region[early].any()
    assert trials.fact_visible_window[late].all() and not trials.fact_visible_window[early].any()
    # without retrieval a 5-digit number cannot be guessed: correct only where the fact is in view
    for variant, flag in (("exact_region", "fact_visible_exact_region"), ("sliding_window", "fact_visible_window")):
        mine = trials[trials.variant == variant]
        assert not (mine.correct & ~mine[flag]).any()
    # the original model finds the passkey where the fact is close (the far one it may miss: a measurement)
    assert trials[(trials.variant == "original") & late].correct.all()
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
    far = pd.read_csv(smoke["out"] / "accuracy_out_of_reach.csv")
    assert far.variant.tolist() == VARIANTS and (far.trials == TRIALS).all()  # depth 0.05: out of reach
    times = pd.read_csv(smoke["out"] / "forward_times.csv")
    assert (times.forwards == TRIALS * len(DEPTHS)).all() and (times.median_s > 0).all() and (times.threads == 1).all()


def test_attended_tokens_follow_each_variant_s_settings(smoke):
    attended = pd.read_csv(smoke["out"] / "attended_tokens.csv").set_index("variant")
    local = 2 * CHUNK + SINKS
    blocks = local + TOP_K * BLOCK
    meta = local + CHUNK  # whole chunks: ceil(TOP_K · BLOCK / CHUNK) = 1 chunk, at least the query routers' tokens
    assert attended.attended_tokens.to_dict() == {"blocks_mean": blocks, "blocks_minmax": blocks, "blocks_meta": meta,
                                                  "exact_region": local, "original": 512,
                                                  "sliding_window": WINDOW + SINKS, "terraced": local}
    assert attended.states.to_dict() == {v: v == "terraced" for v in VARIANTS}
    assert (attended.length == 512).all()
    variants = pd.read_csv(smoke["out"] / "variants.csv").set_index("variant")
    assert not variants.past_trained_range.any() and variants.loc["blocks_minmax", "retrieved"] == TOP_K * BLOCK


def test_one_forward_score_equals_greedy_generation(smoke):
    check = pd.read_csv(smoke["out"] / "generate_check.csv", dtype={"generated": str, "answer": str},
                        keep_default_na=False)
    assert check.variant.tolist() == ["original", "blocks_minmax"]
    assert (check.greedy_correct == check.one_forward_correct).all()
    assert (check.greedy_correct == (check.generated == check.answer)).all()  # the greedy text is the answer
    assert check.set_index("variant").loc["original", "greedy_correct"]  # a real success: the original got it
    assert (check.length == min(LENGTHS)).all()
    assert smoke["metrics"]["generate_check"] == {"original": True, "blocks_minmax": True}


def test_metrics_goals_and_the_report_starts_with_the_findings(smoke):
    metrics = smoke["metrics"]
    by_length = pd.read_csv(smoke["out"] / "accuracy_by_length.csv").set_index(["length", "variant"])
    for variant in VARIANTS:
        row = by_length.loc[(512, variant)]
        assert metrics["accuracy"][variant]["512"] == pytest.approx(row.accuracy, abs=1e-4)
        assert metrics["ci95"][variant]["512"] == pytest.approx([row.ci_low, row.ci_high], abs=1e-4)
    assert (metrics["chunk_size"], metrics["sink_size"], metrics["max_position_embeddings"]) == (CHUNK, SINKS, 8192)
    assert metrics["out_of_reach_trials"] == TRIALS and metrics["trials_per_headline_cell"] == TRIALS * len(DEPTHS)
    trials = pd.read_csv(smoke["out"] / "trials.csv")
    far = trials[trials.depth == 0.05].groupby("variant").correct.mean()  # depth 0.05: out of reach
    assert metrics["out_of_reach_accuracy"] == pytest.approx(far.to_dict(), abs=1e-4)
    assert metrics["out_of_reach_accuracy"]["exact_region"] == 0 == metrics["out_of_reach_accuracy"]["sliding_window"]
    assert metrics["attended_tokens"]["blocks_mean"] == {"512": 2 * CHUNK + SINKS + TOP_K * BLOCK}
    assert metrics["headline_trials_needed"] == 39 and metrics["full_profile_estimated_hours"] > 0
    blocks = [v for v in VARIANTS if PASSKEY_VARIANTS[v].build == "blocks"]  # the headline cells: half their interval
    assert sorted(metrics["headline_half_width"]) == sorted(blocks) and metrics["headline_cells"] == len(blocks)
    halves = {v: (metrics["ci95"][v]["512"][1] - metrics["ci95"][v]["512"][0]) / 2 for v in blocks}
    assert {v: h["512"] for v, h in metrics["headline_half_width"].items()} == pytest.approx(halves, abs=2e-4)
    assert metrics["headline_cells_within_half_width"] == sum(h <= 0.15 for h in halves.values())
    assert metrics["machine"]["threads"] == 1 and metrics["machine"]["cores"] >= 1  # the timings' machine header
    assert metrics["load_average"]["before"] == metrics["machine"]["load_average"]  # and after the forwards
    assert len(metrics["load_average"]["after"]) == 3 and metrics["freed_memory_kept"] is True
    assert metrics["long_trials_per_cell"] == TRIALS  # long_trials None: as trials
    for variant in ("blocks_minmax", "blocks_mean", "blocks_meta"):  # 512 tokens is below every goal length
        assert metrics["goals"][variant] == {"accuracy_to_8k": "not measured", "not_below_original": "not measured",
                                             "attended_at_8k": "met", "accuracy_past_8k": "not measured"}
    goals = pd.read_csv(smoke["out"] / "goals.csv")
    assert dict(zip(goals[goals.key == "attended_at_8k"].variant, goals[goals.key == "attended_at_8k"].evidence)) == {
        "blocks_minmax": "324 tokens per query (from the settings)",
        "blocks_mean": "324 tokens per query (from the settings)",
        "blocks_meta": "388 tokens per query (from the settings)"}
    cells = smoke["notebook"].cells
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # the page: no progress bar, warning or stderr; the first output is the "what we found" box
    assert not [o for o in outputs if o.output_type == "stream"]
    first = outputs[0]["data"]["text/html"]
    assert first.count("What we found") == 1 and "n = 4</b> per headline cell" in first and "n ≥ 39" in first
    assert "blocks retrieval, min/max keys (Quest)" in first
    correct = int(trials[trials.variant == "original"].correct.sum())
    assert f"({correct}/4)" in first
    html = "".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert "Load average (1 min)" in first and "Other processes used" in first
    assert metrics["other_cores_before"] >= 0 and isinstance(metrics["busy"], bool)
    for line in ("git revision:", "threads: 1", "CPU:", "The pass key is", "keeps freed memory for reuse",
                 "model: SmolLM2-135M-Instruct.Q4_1.gguf", "-p trials=8", "Appendix C"):
        assert line in html, line
    assert "samples:" not in html and "IProgress" not in html
    assert (smoke["out"] / "accuracy.png").stat().st_size > 1000  # the headline figure: every depth pooled
    assert (smoke["out"] / "accuracy_by_depth.png").stat().st_size > 1000  # one panel per length


def test_a_stopped_run_continues_from_its_scoring_log(smoke, tmp_path_factory, terraced_files, resume_dir):
    """The first run logged every scored (sample, variant) pair; a run stopped after half of them (and killed while
    writing the next) continues: it scores only the rest, and its tables equal the uninterrupted run's."""
    logs = list(resume_dir.glob("*.jsonl"))
    assert len(logs) == 1
    lines = logs[0].read_text().splitlines()
    pairs = len(LENGTHS) * len(DEPTHS) * TRIALS * len(VARIANTS)
    assert len(lines) == pairs and smoke["metrics"]["resumed_pairs"] == 0
    logs[0].write_text("\n".join(lines[: pairs // 2]) + "\n" + lines[pairs // 2][:40])  # stopped mid-line
    again = run_notebook_smoke(tmp_path_factory.mktemp("long_range_resumed"), "05_long_range",
                               smoke_params(terraced_files, resume_dir))
    assert again["metrics"]["resumed_pairs"] == pairs // 2
    columns = ["length", "depth", "variant", "trial", "passkey", "correct", "answer_logprob"]
    first = pd.read_csv(smoke["out"] / "trials.csv", dtype={"passkey": str})[columns]
    second = pd.read_csv(again["out"] / "trials.csv", dtype={"passkey": str})[columns]
    pd.testing.assert_frame_equal(first, second)
    assert smoke["metrics"]["accuracy"] == again["metrics"]["accuracy"]
    times = pd.read_csv(again["out"] / "forward_times.csv")
    assert times.resumed.sum() == pairs // 2 and (times.forwards == TRIALS * len(DEPTHS)).all()
    first_screen = [o for c in again["notebook"].cells if c.cell_type == "code" for o in c.outputs][0]
    assert f"{pairs // 2} of {pairs} scored (sample, variant) pairs" in first_screen["data"]["text/html"]
    assert len([line for line in logs[0].read_text().splitlines() if line.startswith('{"')]) == pairs + 1  # + cut
