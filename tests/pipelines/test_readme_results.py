"""pipelines/readme_results.py: the README's result blocks are what the metrics files give."""

from __future__ import annotations

import json
import re
import sys

import yaml

from bsbr import formatting
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "pipelines"))  # the stage scripts are top-level modules
import build_index  # noqa: E402
import readme_results  # noqa: E402


def test_readme_result_blocks_match_the_metrics_files():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- results:02_conversion_similarity -->" in readme
    assert readme_results.stale_blocks(readme) == [], "run python pipelines/readme_results.py"


def test_a_changed_metric_makes_its_block_stale_and_render_rewrites_it(tmp_path):
    metrics = json.loads((ROOT / "reports" / "metrics" / "02_conversion_similarity.json").read_text())
    readme = (ROOT / "README.md").read_text()
    metrics["perplexity"]["all"]["terraced_lora"]["ratio"] = 1.2345
    (tmp_path / "02_conversion_similarity.json").write_text(json.dumps(metrics))
    assert readme_results.stale_blocks(readme, tmp_path) == ["02_conversion_similarity"]
    rewritten = readme_results.render(readme, tmp_path)
    assert "1.234×" in rewritten or "1.235×" in rewritten
    assert readme_results.stale_blocks(rewritten, tmp_path) == []
    def block_02(text):
        return next(m.group(2) for m in readme_results.BLOCK.finditer(text) if m.group(1) == "02_conversion_similarity")

    assert rewritten.replace(block_02(rewritten), "") == readme.replace(block_02(readme), "")  # nothing else changed


def test_a_quick_profile_run_renders_every_block_and_names_what_it_did_not_measure():
    """`make repro` (the quick profile) rewrites README from metrics that lack the longest lengths: every block
    renders, and a target the run did not reach reads "not measured", at its own length."""
    quick = ROOT / "tests" / "pipelines" / "quick_profile_metrics"  # make repro on a fresh clone at 8a1e831
    readme = (ROOT / "README.md").read_text()
    rewritten = readme_results.render(readme, quick)
    assert readme_results.stale_blocks(rewritten, quick) == []
    scaling = json.loads((quick / "01_scaling.json").read_text())
    ratio = scaling["attention"]["at_longest"]["module_forward_ratio"]
    assert (f"**not measured (goal ≥ 20×)** at 65,536 (this run's longest: 16,384, BSBR "
            in readme_results.scaling(scaling))
    assert f"{ratio:.1f}×); the attention cores alone" in readme_results.scaling(scaling)
    assert "BSBR's peak growth from 16,384 to 65,536 tokens: not measured (goal ≤ 1.1×)." in rewritten
    assert "5 depths × 1 trial: n = 5 per length" in rewritten  # report 05 at the quick size
    blocks = "".join(match.group(2) for match in readme_results.BLOCK.finditer(rewritten))
    assert not re.search(r"\b(None|nan|n/a)\b", blocks)


def test_every_result_block_has_a_formatter_and_the_passkey_caveat_follows_the_metrics():
    readme = (ROOT / "README.md").read_text()
    names = [match.group(1) for match in readme_results.BLOCK.finditer(readme)]
    assert {"04_attention_analysis", "05_long_range"} <= set(names)
    assert all(name in readme_results.FORMATTERS or name in readme_results.REPORT_BLOCKS
               or name in readme_results.EXTRA_BLOCKS for name in names)
    metrics = json.loads((ROOT / "reports" / "metrics" / "05_long_range.json").read_text())
    weak = min(metrics["accuracy"]["original"].values()) < 0.95
    assert ("cannot test the ≥ 95% goal" in readme_results.long_range(metrics)) == weak
    for length in metrics["accuracy"]["original"]:
        metrics["accuracy"]["original"][length] = 1.0
    assert "cannot test" not in readme_results.long_range(metrics)
    metrics["task"] = "passkey"
    assert "Mohtashami & Jaggi's passkey test" in readme_results.long_range(metrics)
    # each accuracy as the report writes it (bsbr.passkey.accuracy_text), with correct/trials
    n, low, high = metrics["trials_per_headline_cell"], *metrics["ci95"]["original"]["1024"]
    assert (f"the original {metrics['accuracy']['original']['1024']:.2f} [{low:.2f}, {high:.2f}] "
            f"({round(metrics['accuracy']['original']['1024'] * n)}/{n})") in readme_results.long_range(metrics)
    metrics["task"] = "fact_in_text"
    assert "a fact in held-out text" in readme_results.long_range(metrics)


def test_the_meta_routed_blocks_variant_is_named_and_its_whole_chunks_counted_apart():
    """blocks_meta retrieves whole chunks: its attended tokens are stated on their own, not as the query routers'."""
    metrics = json.loads((ROOT / "tests" / "pipelines" / "quick_profile_metrics" / "05_long_range.json").read_text())
    query_routed = max(metrics["attended_tokens"]["blocks_minmax"].values())
    for key in ("accuracy", "ci95", "attended_tokens"):
        metrics[key]["blocks_meta"] = dict(metrics[key]["blocks_minmax"])
    metrics["attended_tokens"]["blocks_meta"] = {n: 1028 for n in metrics["attended_tokens"]["blocks_meta"]}
    text = readme_results.long_range(metrics)
    assert (f"at most {query_routed:,} tokens attended per query; BSBR's meta router: whole chunks, at most 1,028 "
            "tokens") in text  # thousands separators, as every count in README
    assert "blocks (BSBR's meta router, whole chunks) 1.00 [" in text


def _mqar_metrics(standard: float, difference: float, low, high) -> dict:
    arch = lambda acc, state, rate: {"accuracy": acc, "ci_low": None if low is None else acc - 0.01,
                                     "ci_high": None if high is None else min(1.0, acc + 0.01), "state_values": state,
                                     "learning_rate": rate}
    return {
        "task": {"vocab_size": 256, "seq_len": 64, "num_pairs": 4, "test_answers": 2048},
        "model": {"hidden_dim": 64, "short_conv": 3},
        "training": {"steps": 200, "batch_size": 32, "learning_rates": [0.003, 0.01, 0.03], "seeds": [0, 1, 2]},
        "spans": [8], "outside_fraction": {"chunk_8": 1.0, "window_8": 0.668},
        "architectures": {"standard": arch(standard, 16768, 0.01), "bsbr": arch(0.5, 19968, 0.03),
                          "linear": arch(0.25, 2560, 0.003)},
        "goals": {"attention_accuracy": {"goal": 0.95, "value": standard, "met": standard >= 0.95},
                  "bsbr_vs": [{"other": "linear", "span": 8, "difference": difference, "ci_low": low, "ci_high": high,
                               "verdict": "BSBR above" if low is not None and low > 0 else "undecided",
                               "bsbr_state_values": 19968, "other_state_values": 2560}]},
        "run_seconds": 600.0,
    }


def test_associative_recall_block_ranks_by_accuracy_and_states_the_goals():
    text = readme_results.associative_recall(_mqar_metrics(0.976, 0.25, 0.2, 0.3))
    assert text.index("standard 97.6% [96.6, 98.6] (16,768)") < text.index("bsbr 50.0%") < text.index("linear 25.0%")
    assert "Full attention ≥ 95%: **met**." in text and "too small" not in text
    assert "100% of the answers lie outside BSBR's own chunk, 67% outside the window" in text
    assert "BSBR vs linear (span 8): **BSBR above**, 25.0 points [20.0, 30.0] with 7.8× its state." in text
    assert text.endswith(" **Learning-rate sweep edges.** 2 of 3 models chose an edge of the 3 swept rates [0.003, "
                         "0.01, 0.03] (the lowest, 0.003: linear; the highest, 0.03: bsbr). A sweep of 3 rates brackets "
                         "only a choice inside it (1 model here): for the 2 at an edge it cannot tell whether the best "
                         "rate lies beyond it. Run: 10.0 min.")
    assert "Separated by their intervals" not in text  # metrics that do not carry the ranking
    ranked = _mqar_metrics(0.976, 0.25, 0.2, 0.3)
    ranked["separations"] = {"span": 8, "pairs": 3, "separated": 1, "paired_separated": 2,
                             "undecided": [["bsbr", "linear"]]}
    assert ("Full attention ≥ 95%: **met**. Separated by their intervals at span 8: 1 of 3 pairs (2 by the "
            "seed-paired difference); undecided: bsbr–linear.") in readme_results.associative_recall(ranked)
    ranked["separations"].update(separated=3, paired_separated=3, undecided=[])
    assert "Separated by their intervals at span 8: 3 of 3 pairs (3 by the seed-paired difference). " in (
        readme_results.associative_recall(ranked))
    missed = readme_results.associative_recall(_mqar_metrics(0.5, 0.0, None, None))
    assert "Full attention ≥ 95%: **missed** (the quick tier's budget is too small to learn the task)." in missed
    assert "**undecided**, 0 points with" in missed  # one seed: no interval printed
    # BSBR with block retrieval: its settings, locality and comparisons, named as such
    metrics = _mqar_metrics(0.976, 0.25, 0.2, 0.3)
    metrics["bsbr_blocks"] = {"chunk_size": 4, "block_size": 4, "top_k": 1, "summary": "minmax", "sink_size": 0,
                              "attended_tokens_max": 12}
    metrics["outside_fraction"]["own_and_previous_4"] = 0.55
    metrics["goals"]["bsbr_vs"].append({"model": "bsbr_blocks", "other": "bsbr", "span": 4, "other_span": 8,
                                        "difference": -0.1,
                                        "ci_low": -0.2, "ci_high": -0.05, "verdict": "BSBR blocks below",
                                        "bsbr_state_values": 20608, "other_state_values": 19968})
    text = readme_results.associative_recall(metrics)
    assert ("(`bsbr_blocks`: chunk 4, top-1 of 4-token blocks, ≤ 12 tokens attended per query): 55% of the answers "
            "lie outside its own and previous chunk.") in text
    assert ("BSBR blocks vs bsbr (span 4 vs 8): **BSBR blocks below**, -10.0 points [-20.0, -5.00] with 1.0× its "
            "state.") in text
    # BSBR compressed at a second span: its comparison shown where the states are within 2×, and the frontier rows
    metrics["bsbr_compression_factor"] = 16
    metrics["goals"]["bsbr_vs"] += [
        {"model": "bsbr_compressed", "other": other, "span": 32, "other_span": 32 if other == "sliding_window" else 8,
         "difference": 0.05, "ci_low": 0.01, "ci_high": 0.09, "verdict": "BSBR compressed above",
         "bsbr_state_values": 2816, "other_state_values": state} for other, state in (("sliding_window", 8064),
                                                                                     ("linear", 2304))]
    metrics["goals"]["frontier"] = [
        {"model": "bsbr", "span": 8, "label": "bsbr", "state_values": 19968, "frontier": "standard",
         "frontier_state_values": 16768, "difference": -0.476, "ci_low": -0.5, "ci_high": -0.45,
         "verdict": "below the frontier"},
        {"model": "bsbr_compressed", "span": 32, "label": "bsbr_compressed (32)", "state_values": 1000,
         "frontier": None, "frontier_state_values": None, "difference": None, "ci_low": None, "ci_high": None,
         "verdict": "the smallest state: it is the frontier there"}]
    text = readme_results.associative_recall(metrics)
    assert "BSBR compressed (`bsbr_compressed`): BSBR with each chunk state compressed 16× by a learned" in text
    assert "BSBR compressed vs linear (span 32): **BSBR compressed above**, 5.00 points [1.00, 9.00]" in text
    assert "BSBR compressed vs sliding_window (span 32)" not in text  # 0.35× its state: not comparable, report only
    assert "(1 more comparison, between states more than 2× apart, in the report.)" in text  # said, not hidden
    assert ("On the accuracy-vs-state frontier (against the most accurate other architecture with no larger state, "
            "paired by seed): bsbr (19,968): **below the frontier**, -47.6 points [-50.0, -45.0] against standard "
            "(16,768); bsbr_compressed (32) (1,000): the smallest state: it is the frontier there.") in text


def test_associative_recall_block_writes_accuracies_and_differences_as_report_08_does():
    """3 significant digits, no plus signs, the unit once (bsbr.formatting.with_interval, as the notebook): report 08
    gave "7.35 points [-1.65, 16.3]" where README gave "+7.3 [-1.6, +16.3]"."""
    metrics = _mqar_metrics(0.241, 0.073512, -0.016512, 0.163)
    metrics["architectures"]["standard"].update(ci_low=0.2, ci_high=0.3)
    text = readme_results.associative_recall(metrics)
    assert "BSBR vs linear (span 8): **undecided**, 7.35 points [-1.65, 16.3] with 7.8× its state." in text
    assert "standard 24.1% [20.0, 30.0] (16,768)" in text
    one_seed = _mqar_metrics(0.976, -0.1324, None, None)
    assert "linear 25.0% (2,560)" in readme_results.associative_recall(one_seed)
    assert "**undecided**, -13.2 points with" in readme_results.associative_recall(one_seed)
    # the index's 08 rows are written by the same functions
    assert readme_results.percent_text is build_index.percent_text
    assert readme_results.points_text is build_index.points_text


def test_attention_analysis_block_names_the_best_router_in_words():
    metrics = json.loads((ROOT / "reports" / "metrics" / "04_attention_analysis.json").read_text())
    metrics["best_router"]["method"] = "minmax_p8_head"
    assert "Best router — min/max keys (Quest), 8-token pages, per head: recall **" in (
        readme_results.attention_analysis(metrics))
    assert readme_results.router_words("mean_p8_group") == "mean keys, 8-token pages, per group"
    assert readme_results.router_words is build_index.router_words is formatting.router_words  # one function for all


def test_training_block_ranks_by_loss_and_steps_with_intervals():
    row = lambda loss, steps, rate, reached=3: {
        "params": 116480, "learning_rate": rate, "final_val_loss": loss, "final_val_loss_low": loss - 0.01,
        "final_val_loss_high": loss + 0.01, "steps_to_target": steps, "steps_to_target_low": None if steps is None else steps - 20,
        "steps_to_target_high": None if steps is None else steps + 20, "seeds_reaching_target": reached}
    metrics = {"setup": {"hidden_dim": 64, "num_layers": 2, "steps": 500, "tokens_per_run": 512000, "seeds": 3,
                         "learning_rates": [0.001, 0.003, 0.01], "max_param_difference": 0.0011},
               "ngram_floors": {"unigram": {"val_loss": 3.445}, "bigram": {"val_loss": 2.636}},
               "target_val_loss": 2.536, "target_source": "the bigram floor minus 0.100 nats/byte",
               "below_bigram_floor": ["gau", "bsbr"],
               "separated": {"final_val_loss": [["gau", "linear"]], "final_val_loss_paired": [["gau", "linear"], ["gau", "bsbr"]],
                             "steps_to_target": [], "steps_to_target_paired": [], "pairs": 3},
               "models": {"bsbr": row(2.4, 250.0, 0.003), "linear": row(2.7, None, 0.01, 1), "gau": row(2.3, 300.0, 0.01)},
               "load_average": {"before": [1.02, 1, 1], "after": [2.0, 2, 2]}, "run_seconds": 720.0,
               "machine": {"threads": 1}}
    text = readme_results.training(metrics)
    assert "Final validation loss (nats/byte): gau 2.300 [2.290, 2.310], bsbr 2.400 [2.390, 2.410], linear 2.700" in text
    assert "below the bigram floor with the whole interval: gau, bsbr; above it: linear." in text
    assert "unigram 3.445, bigram 2.636" in text
    assert ("(the bigram floor minus 0.100 nats/byte): bsbr 250 [230, 270], gau 300 [280, 320], linear not reached by "
            "every seed (1/3)") in text
    assert "1 of 3 pairs by final loss (2 by the seed-paired difference), 0 by steps (0 paired)" in text
    assert "matched within 0.11%" in text and "Chosen rates: gau 0.01, bsbr 0.003, linear 0.01." in text
    assert ("**Learning-rate sweep edges.** 2 of 3 models chose an edge of the 3 swept rates [0.001, 0.003, 0.01] (the "
            "highest, 0.01: gau, linear). A sweep of 3 rates brackets only a choice inside it (1 model here)" in text)
    assert "12.0 min on 1 thread(s); load average 1.02 at the start, 2.00 at the end." in text
    # an interval that holds the floor is neither below nor above it
    metrics["models"]["linear"].update(final_val_loss_low=2.6, final_val_loss_high=2.8)
    assert ("below the bigram floor with the whole interval: gau, bsbr; undecided (the interval holds the floor): "
            "linear." in readme_results.training(metrics))


def test_a_time_target_shows_the_range_of_its_timed_calls_and_says_undecided():
    record = {"value": 21.1218, "low": 19.6, "high": 22.41, "comparison": "≥", "threshold": 20.0,
              "status": "undecided", "extrapolated": False}
    assert readme_results._target(record) == "21.1× [19.6, 22.4] (goal ≥ 20×: undecided at this noise)"
    record.update(low=20.3, status="pass")
    assert readme_results._target(record) == "21.1× [20.3, 22.4] (goal ≥ 20×: met)"
    del record["low"], record["high"]  # metrics made before the ranges: the value and its verdict
    assert readme_results._target(record) == "21.1× (goal ≥ 20×: met)"


def test_stage_times_block_reads_each_reports_run_time_and_profile(tmp_path):
    def report(name, seconds, profile):
        ran = "" if seconds is None else f'<p class="stage-run" data-run-seconds="{seconds}">ran</p>'
        (tmp_path / f"{name}.html").write_text(f"<pre>params profile: {profile}</pre>{ran}")

    assert readme_results.stage_times(tmp_path) is None  # no report says how long it ran: the block is left alone
    report("01_scaling", 613.5, "publication")
    report("02_conversion_similarity", 2144.1, "publication")
    report("03_chunk_size_ablation", None, "publication")  # rendered before reports carried their run time
    (tmp_path / "index.html").write_text('<p data-run-seconds="999">not a report</p>')
    text = readme_results.stage_times(tmp_path)
    assert text.endswith("in minutes, in the publication profile: 01 10.2, 02 35.7; 0.8 h in all.")
    report("02_conversion_similarity", 2144.1, "quick")  # a mixed set names each report's profile
    assert "the profile named beside each: 01 10.2 (publication), 02 35.7 (quick); 0.8 h in all." in (
        readme_results.stage_times(tmp_path))
    (tmp_path / "metrics").mkdir()  # a stage that resumed from its scoring log: the time is its last start's
    (tmp_path / "metrics" / "01_scaling.json").write_text(json.dumps({"resumed_pairs": 218}))
    assert "01 10.2 (publication) (its last start; 218 scored pairs came from the log of earlier starts), 02" in (
        readme_results.stage_times(tmp_path))
    (tmp_path / "metrics" / "01_scaling.json").write_text(json.dumps({"resumed_pairs": 0}))
    assert "01 10.2 (publication), 02" in readme_results.stage_times(tmp_path)
    readme = "a\n<!-- results:stage_times -->\nold\n<!-- /results:stage_times -->\nb"
    assert readme_results.stale_blocks(readme, tmp_path / "metrics", tmp_path) == ["stage_times"]
    block = readme_results.stage_times(tmp_path)
    assert readme_results.render(readme, tmp_path / "metrics", tmp_path) == (
        f"a\n<!-- results:stage_times -->\n{block}\n<!-- /results:stage_times -->\nb")


def test_long_documents_block_quotes_the_cpu_other_processes_cores_and_the_busy_warning():
    metrics = json.loads((ROOT / "reports" / "metrics" / "06_long_documents.json").read_text())
    metrics["machine"] = {**metrics["machine"], "cpu": "Some CPU", "cores": 2}
    metrics["other_cores"], metrics["busy"] = {"before": 0.01, "after": 0.005}, False
    assert readme_results.long_documents(metrics).endswith(
        "Timed on Some CPU, 2 logical CPUs; other processes' cores around the streams: 0.01 before and 0.01 after.")
    metrics["other_cores"], metrics["busy"] = {"before": 0.9, "after": None}, True
    assert readme_results.long_documents(metrics).endswith(
        "Timed on Some CPU, 2 logical CPUs; other processes' cores around the streams: 0.90 before (**busy: these times "
        "are not a quiet-machine result**).")
    del metrics["other_cores"], metrics["busy"]  # a run made before they were measured: the load average
    metrics["load_average"] = {"before": [1.18, 0.9, 0.9], "after": [1.93, 1.9, 1.8]}
    assert readme_results.long_documents(metrics).endswith(
        "Timed on Some CPU, 2 logical CPUs; load average 1.18 before, 1.93 after.")
    del metrics["machine"]  # a metrics file without a machine record says so instead of guessing
    assert readme_results.long_documents(metrics).endswith(
        "Timed on an unrecorded CPU; load average 1.18 before, 1.93 after.")


def test_long_documents_block_applies_the_flatness_rule_inside_the_trained_range_when_the_run_recorded_it():
    metrics = json.loads((ROOT / "reports" / "metrics" / "06_long_documents.json").read_text())
    original = {k: v for k, v in metrics["flatness"]["original"].items() if not k.endswith("_before")}
    metrics["flatness"]["original"] = {**original, "max_before_ppl": None}  # a run made before it was recorded
    assert "The same rule before" not in readme_results.long_documents(metrics)
    metrics["flatness"]["original"] = {**original, "reference_ppl": 28.5, "max_before_ppl": 48.6,
                                       "max_before_start": 7168, "exceeding_before": 1}
    assert (" The same rule before 8,192, where nothing is past the trained context: the original has 1 bin above "
            "1.5× its median, the highest 48.6 at 7,168 (1.71×). With the text held fixed") in \
        readme_results.long_documents(metrics)


def test_long_documents_block_states_the_flatness_threshold_the_run_recorded():
    """The threshold is the metrics' flat_ratio, written as notebook 06 writes it (f"{FLAT_RATIO}×"), in the goal,
    in each variant's flatness and in the rule applied inside the trained range."""
    metrics = json.loads((ROOT / "reports" / "metrics" / "06_long_documents.json").read_text())
    metrics["flatness"]["original"].update(reference_ppl=28.5, max_before_ppl=48.6, max_before_start=7168,
                                           exceeding_before=1)
    metrics["flatness"]["blocks"].update(met=False, exceeding=11)
    metrics["flat_ratio"] = 1.25
    text = readme_results.long_documents(metrics)
    assert "above 1.5×" not in text  # (the decode goal, decode_ratio, is another 1.5×)
    assert (f"Flatness goal for blocks (no 1,024-token bin past {metrics['flat_from']:,} above 1.25× the median "
            "before): missed: 11 bins above 1.25× its median before") in text
    assert "the original has 1 bin above 1.25× its median, the highest 48.6 at 7,168" in text
    assert text.count("1.25×") == 5  # the goal; the original's, blocks', exact region's flatness; the trained range


def test_scaling_block_names_the_cpu_its_times_come_from():
    metrics = json.loads((ROOT / "reports" / "metrics" / "01_scaling.json").read_text())
    metrics["machine"] = {**metrics["machine"], "cpu": "Some CPU", "cores": 2}
    assert "fp32, 2 threads; Some CPU, 2 logical CPUs; BSBRAttention" in readme_results.scaling(metrics)


def test_calibration_cost_block_derives_its_rates_and_estimate_from_report_02s_metrics(tmp_path):
    """The README's calibration paragraph: each phase's minutes, the rates per step, and the larger calibration's
    estimate at those rates, with the command that runs it; a changed time changes the block."""
    metrics = json.loads((ROOT / "reports" / "metrics" / "02_conversion_similarity.json").read_text())
    cal = metrics["calibration"]
    text = readme_results.calibration_cost(metrics)
    per_window_step = cal["transfer"]["seconds"] / (cal["transfer"]["steps"] * cal["transfer"]["windows"])
    assert f"{per_window_step:.2f} s per step and window" in text
    per_lora_step = sum(cal["lora"]["seconds"].values()) / (2 * cal["lora"]["steps"])
    larger = readme_results.LARGER_CALIBRATION
    windows = larger["transfer_windows_per_source"] * len(metrics["sources"])
    hours = (larger["transfer_steps"] * windows * per_window_step + 2 * larger["lora_steps"] * per_lora_step
             + cal["normalized"]["seconds"]) / 3600
    assert f"would take about {hours:.1f} h at these rates" in text
    block = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert block == {"02_conversion_similarity": larger}  # the keys to set, as YAML
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(larger) <= set(params["02_conversion_similarity"])  # each one a key the stage has
    readme = (ROOT / "README.md").read_text()
    assert "<!-- results:calibration_cost -->" in readme
    cal["transfer"]["seconds"] *= 10  # ten times slower transfer: the block is stale and its rate changes
    (tmp_path / "02_conversion_similarity.json").write_text(json.dumps(metrics))
    assert "calibration_cost" in readme_results.stale_blocks(readme, tmp_path)
    assert f"{per_window_step * 10:.2f} s per step and window" in readme_results.render(readme, tmp_path)


def test_readme_parameter_examples_run_as_written():
    """Every ``dvc exp run -S`` override in README parses with DVC's own parser (Hydra's override grammar, which
    rejects a key that begins with a digit, as ``01_scaling.seq_lens=[…]`` does) and names a key of params.yaml; every
    YAML snippet in README sets keys that its params.yaml section has."""
    from dvc.utils.hydra import to_hydra_overrides

    readme = (ROOT / "README.md").read_text()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = re.findall(r"-S\s+'?([^'\s`=]+=[^'\s`]+)", readme)
    assert overrides, "README shows no -S override (it shows -S profile=publication)"
    for override in overrides:
        (parsed,) = to_hydra_overrides([override])
        node = params
        for part in parsed.key_or_group.split("."):
            assert isinstance(node, dict) and part in node, f"{override}: params.yaml has no {parsed.key_or_group}"
            node = node[part]
    snippets = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)]
    assert len(snippets) >= 2  # 02's larger calibration and 08's GPU tier
    for snippet in snippets:
        for section, keys in snippet.items():
            assert section in params, f"README's YAML names no params.yaml section: {section}"
            assert set(keys) <= set(params[section]), f"{section}: {sorted(set(keys) - set(params[section]))}"


def test_chunk_size_block_times_each_chunk_size_in_order_as_report_03_writes_them():
    """The one-layer times and peaks: chunk sizes smallest first, 3 significant digits with separators (as the report
    writes them: bsbr.formatting.sig), each chunk size's verdict beside its time."""
    metrics = json.loads((ROOT / "reports" / "metrics" / "03_chunk_size_ablation.json").read_text())
    metrics["layer_goal_no_slower"] = {"seq_len": 8192, "met": {"1024": False, "128": True}}
    metrics["layer_median_s"].update({"original c0 n8192": 1.0096, "terraced c1024 n8192": 1.0610,
                                      "terraced c128 n8192": 0.40277})
    metrics["layer_peak_bytes"].update({"original c0 n8192": 159.4 * 2**20, "terraced c1024 n8192": 995.6 * 2**20,
                                        "terraced c128 n8192": 352.0 * 2**20})
    text = readme_results.chunk_size_ablation(metrics)
    assert ("at 8,192 tokens the original layer (fused SDPA) takes 1,010 ms, peak 159 MiB; terraced chunk 128 403 ms "
            "(met), peak 352 MiB, chunk 1,024 1,060 ms (missed), peak 996 MiB;") in text


def test_conversion_block_writes_the_seed_formulas_ratio_as_report_02s_table():
    """The seed formula's perplexity ratio (hundreds of millions) in 3 significant digits with separators, as report
    02's table writes it (bsbr.formatting.sig), not in Python's exponent notation."""
    metrics = json.loads((ROOT / "reports" / "metrics" / "02_conversion_similarity.json").read_text())
    metrics["perplexity"]["all"]["seed"]["ratio"] = 563_184_042.7
    text = readme_results.conversion_similarity(metrics)
    assert "the seed formula 563,000,000×." in text and "e+" not in text
