"""Notebook 01 runs end to end through the pipeline runner (smoke parameters) and writes what it promises."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest

import bsbr
from bsbr.benchmarks import attention_flops
from tests.conftest import SCALING_SMOKE

SMOKE_SIZES = dict(hidden_dim=SCALING_SMOKE["hidden_dim"], num_heads=SCALING_SMOKE["num_heads"],
                   chunk_size=SCALING_SMOKE["chunk_size"])
ATTENTION_COLUMNS = ["impl", "mode", "seq_len", "batch_size", "hidden_dim", "num_heads", "chunk_size", "threads",
                     "repeats", "warmup", "median_s", "mean_s", "min_s", "max_s", "median_low_s", "median_high_s",
                     "flops", "gflops_per_s", "peak_bytes", "baseline_rss_bytes", "peak_rss_bytes", "memory_method"]
FULL_MAX = {"forward": SCALING_SMOKE["full_forward_max_len"], "backward": SCALING_SMOKE["full_backward_max_len"]}

CSV_COLUMNS = ["model", "seq_len", "batch_size", "repeats", "warmup", "threads", "median_s", "min_s", "max_s",
               "peak_bytes", "baseline_rss_bytes", "peak_rss_bytes", "memory_method"]


def test_scaling_csv_has_one_sorted_row_per_point(scaling_smoke):
    table = pd.read_csv(scaling_smoke["out"] / "scaling.csv")
    assert list(table.columns) == CSV_COLUMNS
    expected = [(m, n) for m in sorted(SCALING_SMOKE["models"]) for n in SCALING_SMOKE["seq_lens"]]
    assert list(zip(table.model, table.seq_len)) == expected
    assert (table.batch_size == 1).all() and (table.repeats == 1).all() and (table.threads == 1).all()
    assert (table.min_s > 0).all()
    assert (table.min_s <= table.median_s).all() and (table.median_s <= table.max_s).all()
    assert (table.baseline_rss_bytes > 10 * 2**20).all()  # at least the Python + torch runtime
    assert (table.peak_rss_bytes >= table.baseline_rss_bytes).all()
    assert (table.peak_bytes == table.peak_rss_bytes - table.baseline_rss_bytes).all()


def test_scaling_fits_and_machine_header(scaling_smoke):
    fits = pd.read_csv(scaling_smoke["out"] / "fits.csv")
    time_fits = fits[fits.quantity == "time"]
    assert set(time_fits.model) == {"bsbr", "standard"}
    assert set(time_fits.lengths) == {"upper half", "all"}
    assert time_fits.r2.between(-1e-9, 1 + 1e-9).all()  # two points: an exact line
    machine = json.loads((scaling_smoke["out"] / "machine.json").read_text())
    assert {"cpu", "cores", "torch", "threads"} <= set(machine) and machine["threads"] == 1
    assert (scaling_smoke["out"] / "scaling.png").stat().st_size > 1000


def test_scaling_metrics_json(scaling_smoke):
    metrics = json.loads(scaling_smoke["metrics"].read_text())
    assert set(metrics) == {"seq_len", "models", "bsbr_vs_standard", "attention", "layers", "machine", "other_cores",
                            "busy"}
    others = metrics["other_cores"]  # cores other processes used right before and after the timings (/proc)
    assert set(others) == {"before", "after"} and all(0 <= x <= metrics["machine"]["cores"] for x in others.values())
    assert metrics["busy"] is (max(others.values()) > 0.5)
    assert metrics["seq_len"] == max(SCALING_SMOKE["seq_lens"])
    table = pd.read_csv(scaling_smoke["out"] / "scaling.csv").set_index(["model", "seq_len"])
    for name in ("bsbr", "standard"):
        entry = metrics["models"][name]
        assert {"median_s", "min_s", "max_s", "peak_bytes", "baseline_rss_bytes", "time_exponent",
                "time_r2", "time_exponent_all"} <= set(entry)
        assert entry["median_s"] == table.loc[(name, 128), "median_s"]
    head = metrics["bsbr_vs_standard"]
    assert set(head) == {"time_ratio_standard_over_bsbr", "memory_ratio_standard_over_bsbr",
                         "time_crossover_seq_len", "memory_crossover_seq_len", "tie_tolerance"}
    assert head["tie_tolerance"] == 0.2  # from params.yaml: the smoke run overrides only sizes
    ratio = metrics["models"]["standard"]["median_s"] / metrics["models"]["bsbr"]["median_s"]
    assert abs(head["time_ratio_standard_over_bsbr"] - ratio) < 1e-3 * ratio
    assert head["time_crossover_seq_len"] in (None, 64, 128)


def test_executed_notebook_has_parameters_provenance_and_no_errors(scaling_smoke):
    nb = nbformat.read(scaling_smoke["notebook"], as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "seq_lens = [64, 128]" in injected[0].source
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "torch ", "threads per measurement: 1", "CPU:", "seq_lens = [64, 128]"):
        assert line in printed
    for bar in ("points: 100%", "attention points: 100%", "model memory points: 100%"):
        assert bar in printed  # tqdm progress reached the end
    assert any("image/png" in o.get("data", {}) for o in outputs)


# ----------------------------------------------------------------------------- attention modules and cores


def test_attention_csv_has_one_sorted_row_per_measured_point(scaling_smoke):
    table = pd.read_csv(scaling_smoke["out"] / "attention.csv")
    assert list(table.columns) == ATTENTION_COLUMNS
    expected = [(mode, impl, n) for mode in ("backward", "forward") for impl in sorted(SCALING_SMOKE["attn_impls"])
                for n in SCALING_SMOKE["attn_seq_lens"] if impl in ("bsbr", "bsbr_core") or n <= FULL_MAX[mode]]
    assert list(zip(table["mode"], table.impl, table.seq_len)) == expected  # full attention at 128: not run
    assert (table.threads == 1).all() and (table.repeats == 1).all() and (table.warmup == 0).all()
    assert (table.min_s <= table.median_s).all() and (table.median_s <= table.max_s).all() and (table.min_s > 0).all()
    assert (table.peak_bytes == table.peak_rss_bytes - table.baseline_rss_bytes).all()
    for row in table.itertuples():
        assert row.flops == attention_flops(row.impl, row.seq_len, **SMOKE_SIZES, mode=row.mode)
        assert row.gflops_per_s == pytest.approx(row.flops / row.median_s / 1e9)


def test_full_attention_is_extrapolated_where_not_run_and_labelled(scaling_smoke):
    out = scaling_smoke["out"]
    times = pd.read_csv(out / "attention_times.csv")
    fits = pd.read_csv(out / "attention_fits.csv")
    measured = pd.read_csv(out / "attention.csv").set_index(["mode", "impl", "seq_len"])
    assert len(times) == 2 * len(SCALING_SMOKE["attn_impls"]) * len(SCALING_SMOKE["attn_seq_lens"])
    extrapolated = times[times.source == "extrapolated"]
    assert sorted(zip(extrapolated["mode"], extrapolated.impl, extrapolated.seq_len)) == [
        (mode, impl, 128) for mode in ("backward", "forward") for impl in ("sdpa_core", "standard")]
    for row in times.itertuples():
        if row.source == "measured":
            assert row.median_s == measured.loc[(row.mode, row.impl, row.seq_len), "median_s"]
        else:  # the power law through its two measured lengths (32, 64), evaluated at 128
            fit = fits[(fits.impl == row.impl) & (fits["mode"] == row.mode) & (fits.lengths == "upper half")].iloc[0]
            assert (fit.first_len, fit.last_len) == (32, 64)
            assert row.median_s == pytest.approx(fit.prefactor * 128**fit.exponent, rel=1e-9)
            a, b = (measured.loc[(row.mode, row.impl, n), "median_s"] for n in (32, 64))
            assert row.median_s == pytest.approx(b * (b / a), rel=1e-6)


def test_who_wins_table_and_crossovers(scaling_smoke):
    wins = pd.read_csv(scaling_smoke["out"] / "who_wins.csv")
    assert list(zip(wins.level, wins["mode"], wins.seq_len)) == [
        (level, mode, n) for level in ("core", "module") for mode in ("backward", "forward")
        for n in SCALING_SMOKE["attn_seq_lens"]]
    assert set(zip(wins.level, wins.bsbr_impl, wins.full_impl)) == {("module", "bsbr", "standard"),
                                                                     ("core", "bsbr_core", "sdpa_core")}
    assert ((wins.full_source == "extrapolated") == (wins.seq_len == 128)).all()
    for row in wins.itertuples():
        assert row.ratio == pytest.approx(row.full_s / row.bsbr_s)
        expected = "BSBR" if row.ratio > 1.2 else "full attention" if row.ratio < 1 / 1.2 else "tie"
        assert row.winner == expected
    metrics = json.loads(scaling_smoke["metrics"].read_text())["attention"]
    assert set(metrics["crossover_seq_len"]) == {"module_forward", "module_backward", "core_forward", "core_backward"}
    for key, value in metrics["crossover_seq_len"].items():
        level, mode = key.split("_")
        group = wins[(wins.level == level) & (wins["mode"] == mode)].set_index("seq_len")
        leads = group.ratio > 1.2
        assert value == next((n for n in group.index if leads.loc[n:].all()), None)


def test_decode_csv_states_and_memory_tables(scaling_smoke):
    out = scaling_smoke["out"]
    decode = pd.read_csv(out / "decode.csv")
    assert list(zip(decode.impl, decode.position)) == [(impl, p) for impl in ("bsbr", "standard")
                                                      for p in SCALING_SMOKE["decode_positions"]]
    assert (decode.repeats == SCALING_SMOKE["decode_steps"]).all() and (decode.median_s > 0).all()
    assert (decode.state_tokens == decode.position + SCALING_SMOKE["decode_steps"]).all()  # warmup is 0
    # each median's interval lies within the calls and holds the median (few steps here: the fastest and slowest)
    assert ((decode.min_s <= decode.median_low_s) & (decode.median_low_s <= decode.median_s)
            & (decode.median_s <= decode.median_high_s) & (decode.median_high_s <= decode.max_s)).all()
    hidden = SCALING_SMOKE["hidden_dim"]
    layer = bsbr.BSBRAttention(hidden, SCALING_SMOKE["num_heads"], SCALING_SMOKE["chunk_size"])
    for row in decode.itertuples():
        expected = 2 * 4 * row.state_tokens * hidden if row.impl == "standard" else layer.state_nbytes(row.state_tokens)
        assert row.state_bytes == expected  # a KV cache of every token vs BSBR's chunk states
    model_memory = pd.read_csv(out / "model_memory.csv")
    assert list(zip(model_memory.model, model_memory.seq_len)) == [("bsbr", 256)]
    assert (model_memory.repeats == 1).all() and (model_memory.warmup == 0).all()
    growth = pd.read_csv(out / "memory_growth.csv")
    assert {"bsbr forward", "bsbr_core forward", "bsbr forward+backward"} <= set(growth.curve)
    for row in growth.itertuples():
        assert row.growth_vs_linear == pytest.approx((row.to_MiB / row.from_MiB) / (row.to_len / row.from_len))
    matmul = json.loads((out / "matmul.json").read_text())
    assert [(r["m"], r["k"], r["n"]) for r in matmul["shapes"]] == [tuple(s) for s in SCALING_SMOKE["matmul_shapes"]]
    gflops = pd.read_csv(out / "gflops.csv")
    assert list(gflops.fraction_of_matmul) == pytest.approx(list(gflops.gflops_per_s / matmul["gflops_per_s"]))
    for name in ("attention_time.png", "memory.png", "decode.png", "gflops.png"):
        assert (out / name).stat().st_size > 1000


def test_targets_table_and_attention_metrics(scaling_smoke):
    out = scaling_smoke["out"]
    targets = pd.read_csv(out / "targets.csv").set_index("target")
    assert list(targets.index) == [
        "module_forward_speedup_64", "module_forward_speedup_128", "core_gap_larger_128",
        "bsbr_forward_peak_memory_128", "bsbr_memory_growth_64_128", "bsbr_decode_latency_64_vs_32",
        "bsbr_matmul_fraction_64"]
    assert list(targets.threshold.iloc[[0, 1, 3, 4, 5, 6]]) == [5.0, 20.0, 1.5, 1.1, 1.5, 0.3]
    # full attention ran at 64 but not at 128: only ratios at 128 use an extrapolated time
    assert list(targets.extrapolated) == [False, True, True, False, False, False, False]
    attention = pd.read_csv(out / "attention.csv").set_index(["mode", "impl", "seq_len"])
    decode_calls = pd.read_csv(out / "decode.csv").set_index(["impl", "position"])
    # the ranges the medians' intervals allow: the low end of one side against the high end of the other
    full, fast = attention.loc[("forward", "standard", 64)], attention.loc[("forward", "bsbr", 64)]
    assert (targets.loc["module_forward_speedup_64", "low"], targets.loc["module_forward_speedup_64", "high"]) == \
        pytest.approx((full.median_low_s / fast.median_high_s, full.median_high_s / fast.median_low_s))
    late, early = decode_calls.loc[("bsbr", 64)], decode_calls.loc[("bsbr", 32)]
    assert (targets.loc["bsbr_decode_latency_64_vs_32", "low"], targets.loc["bsbr_decode_latency_64_vs_32", "high"]) \
        == pytest.approx((late.median_low_s / early.median_high_s, late.median_high_s / early.median_low_s))
    assert targets.low.isna().tolist() == [False, True, True, True, True, False, True]  # extrapolated: no range
    for row in targets.itertuples():
        def holds(x, t):
            return {"≥": x >= t, "≤": x <= t, ">": x > t}[row.comparison]
        if pd.isna(row.low):
            assert row.status == ("pass" if holds(row.value, row.threshold) else "FAIL")
        else:  # decided only when the whole range is on one side
            worst, best = (row.high, row.low) if row.comparison == "≤" else (row.low, row.high)
            assert row.status == ("pass" if holds(worst, row.threshold) else
                                  "FAIL" if not holds(best, row.threshold) else "undecided")
            assert row.low <= row.value <= row.high
    wins = pd.read_csv(out / "who_wins.csv").set_index(["level", "mode", "seq_len"])
    module_ratio = wins.loc[("module", "forward", 128), "ratio"]
    assert targets.loc["module_forward_speedup_128", "value"] == pytest.approx(module_ratio)
    assert targets.loc["core_gap_larger_128", "threshold"] == pytest.approx(module_ratio)
    assert targets.loc["core_gap_larger_128", "value"] == pytest.approx(wins.loc[("core", "forward", 128), "ratio"])
    peaks = attention.loc[("forward", "bsbr"), "peak_bytes"]
    assert targets.loc["bsbr_forward_peak_memory_128", "value"] == pytest.approx(peaks.loc[128] / 1e9)
    assert targets.loc["bsbr_memory_growth_64_128", "value"] == pytest.approx(peaks.loc[128] / peaks.loc[64] / 2)
    decode = pd.read_csv(out / "decode.csv").set_index(["impl", "position"]).median_s
    latency_ratio = decode.loc[("bsbr", 64)] / decode.loc[("bsbr", 32)]
    assert targets.loc["bsbr_decode_latency_64_vs_32", "value"] == pytest.approx(latency_ratio)
    matmul = json.loads((out / "matmul.json").read_text())["gflops_per_s"]
    assert targets.loc["bsbr_matmul_fraction_64", "value"] == pytest.approx(
        attention.loc[("forward", "bsbr", 64), "gflops_per_s"] / matmul)

    metrics = json.loads(scaling_smoke["metrics"].read_text())["attention"]
    assert set(metrics) == {"config", "matmul_gflops_per_s", "longest_seq_len", "at_longest", "crossover_seq_len",
                            "bsbr_forward_gflops_fraction_of_matmul", "decode", "targets", "tie_tolerance"}
    assert metrics["config"] == {**SMOKE_SIZES, "batch_size": 1, "threads": 1}
    assert metrics["longest_seq_len"] == 128 and metrics["matmul_gflops_per_s"] == pytest.approx(matmul, abs=0.01)
    at = metrics["at_longest"]
    assert at["module_forward_full_extrapolated"] is True and at["core_backward_full_extrapolated"] is True
    assert at["module_forward_ratio"] == pytest.approx(module_ratio, abs=1e-4)
    assert at["bsbr_forward_peak_bytes"] == attention.loc[("forward", "bsbr", 128), "peak_bytes"]
    assert set(metrics["bsbr_forward_gflops_fraction_of_matmul"]) == {"32", "64", "128"}
    assert set(metrics["decode"]) == {"bsbr", "standard"}
    assert metrics["decode"]["standard"]["64"]["state_bytes"] == 2 * 4 * 68 * SCALING_SMOKE["hidden_dim"]
    assert {name: entry["status"] for name, entry in metrics["targets"].items()} == targets.status.to_dict()


def test_module_time_split_is_module_minus_core(scaling_smoke):
    split = pd.read_csv(scaling_smoke["out"] / "module_time_split.csv")
    attention = pd.read_csv(scaling_smoke["out"] / "attention.csv")
    forward = attention[attention["mode"] == "forward"].set_index(["impl", "seq_len"]).median_s
    assert list(split.seq_len) == SCALING_SMOKE["attn_seq_lens"]
    for row in split.itertuples():
        assert row.bsbr_module_s == forward[("bsbr", row.seq_len)]
        assert row.bsbr_core_s == forward[("bsbr_core", row.seq_len)]
        assert abs(row.bsbr_outside_core_s - (row.bsbr_module_s - row.bsbr_core_s)) < 1e-12
        assert abs(row.module_ratio - row.full_module_s / row.bsbr_module_s) < 1e-9 * row.module_ratio
        assert row.full_source == ("measured" if row.seq_len <= SCALING_SMOKE["full_forward_max_len"]
                                   else "extrapolated")
        if row.bsbr_outside_core_s > 0:
            assert row.ratio_if_bsbr_core_were_free >= row.module_ratio


def test_parameter_counts_match_the_built_models(scaling_smoke):
    import bsbr

    counts = pd.read_csv(scaling_smoke["out"] / "parameters.csv").set_index("model")
    assert sorted(counts.index) == sorted(SCALING_SMOKE["models"])
    common = {key: SCALING_SMOKE[key] for key in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "ff_dim")}
    for name in counts.index:
        extra = {"chunk_size": SCALING_SMOKE["chunk_size"]} if name == "bsbr" else {}
        model = bsbr.build_model(name, **common, **extra)
        assert counts.loc[name, "parameters"] == sum(p.numel() for p in model.parameters())
        assert counts.loc[name, "attention_parameters_per_layer"] == sum(
            p.numel() for p in model.layers[0].attention.parameters())
    assert counts.loc["standard", "vs_standard"] == 1.0
    assert counts.loc["bsbr", "parameters"] > counts.loc["standard", "parameters"]  # BSBR adds meta-projections


def test_all_seven_layers_operators_and_their_targets(scaling_smoke):
    out = scaling_smoke["out"]
    layers = pd.read_csv(out / "layers.csv")
    quadratic_max, full_max = SCALING_SMOKE["quadratic_max_len"], SCALING_SMOKE["full_forward_max_len"]
    expected = sorted((impl, n) for impl in ["bsbr", "standard", *SCALING_SMOKE["baseline_impls"]]
                      for n in SCALING_SMOKE["attn_seq_lens"]
                      if (impl != "hopfield" or n <= quadratic_max) and (impl != "standard" or n <= full_max))
    assert list(zip(layers.impl, layers.seq_len)) == expected
    assert (layers.median_s > 0).all()
    attention = pd.read_csv(out / "attention.csv")
    forward = attention[attention["mode"] == "forward"].set_index(["impl", "seq_len"]).median_s
    for row in layers[layers.impl.isin(["bsbr", "standard"])].itertuples():
        assert row.median_s == forward[(row.impl, row.seq_len)]  # the module points above, not re-measured
    layer_decode = pd.read_csv(out / "layer_decode.csv")
    expected = sorted((impl, p) for impl in ["bsbr", "standard", *SCALING_SMOKE["baseline_impls"]]
                      for p in SCALING_SMOKE["decode_positions"] if impl != "hopfield" or p <= quadratic_max)
    assert list(zip(layer_decode.impl, layer_decode.position)) == expected
    assert (layer_decode.state_tokens == layer_decode.position + SCALING_SMOKE["decode_steps"]).all()
    hidden, heads = SCALING_SMOKE["hidden_dim"], SCALING_SMOKE["num_heads"]
    constant = layer_decode[layer_decode.impl.isin(["linear", "delta_net"])].groupby("impl").state_bytes.nunique()
    assert (constant == 1).all()  # recurrent states do not grow with position
    delta = bsbr.DeltaNet(hidden, heads)
    assert (layer_decode[layer_decode.impl == "delta_net"].state_bytes == delta.state_nbytes()).all()

    operators = pd.read_csv(out / "operators.csv").set_index(["impl", "seq_len"]).median_s
    ratios = pd.read_csv(out / "operator_ratios.csv").set_index("seq_len")
    assert list(ratios.index) == SCALING_SMOKE["operator_seq_lens"]
    for n, row in ratios.iterrows():
        assert row.delta_recurrent_over_chunkwise == pytest.approx(
            operators[("delta_recurrent", n)] / operators[("delta_chunkwise", n)])
        assert row.delta_over_linear_chunkwise == pytest.approx(
            operators[("delta_chunkwise", n)] / operators[("linear_chunkwise", n)])
    targets = pd.read_csv(out / "layer_targets.csv").set_index("target")
    n = SCALING_SMOKE["operator_target_seq_len"]
    assert list(targets.index) == [f"delta_chunkwise_speedup_{n}", f"delta_vs_linear_{n}"] + [
        f"no_nxn_{impl}" for impl in sorted(["bsbr", *SCALING_SMOKE["baseline_impls"]])]
    assert targets.loc[f"delta_chunkwise_speedup_{n}", "value"] == pytest.approx(
        ratios.loc[n, "delta_recurrent_over_chunkwise"])
    for row in targets.itertuples():
        holds = row.value >= row.threshold if row.comparison == "≥" else row.value <= row.threshold
        assert row.status == ("pass" if holds else "FAIL")
    longest = layers.sort_values("seq_len").groupby("impl").last()
    assert targets.loc["no_nxn_hopfield", "value"] == pytest.approx(
        longest.loc["hopfield", "peak_bytes"] / (4 * quadratic_max**2))
    metrics = json.loads(scaling_smoke["metrics"].read_text())["layers"]
    assert set(metrics["forward_median_s"]) == {"bsbr", "standard", *SCALING_SMOKE["baseline_impls"]}
    assert {k: v["status"] for k, v in metrics["targets"].items()} == targets.status.to_dict()
    assert (out / "layers.png").stat().st_size > 1000


def test_what_we_found_states_the_targets_the_load_and_shows_the_time_figure(scaling_smoke):
    import nbformat

    notebook = nbformat.read(scaling_smoke["notebook"], as_version=4)
    heading = next(i for i, cell in enumerate(notebook.cells)
                   if cell.cell_type == "markdown" and cell.source.startswith("## What we found"))
    outputs = notebook.cells[heading + 1].outputs
    text = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "BSBR's speed and memory targets: **" in text
    assert "Load average (1, 5, 15 min): start " in text and "; end " in text
    others = json.loads(scaling_smoke["metrics"].read_text())["other_cores"]
    assert f"Cores used by other processes: before {others['before']:.2f}, after {others['after']:.2f}." in text
    busy = json.loads(scaling_smoke["metrics"].read_text())["busy"]
    assert ("The machine was busy while these timings ran" in text) is busy
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the attention time figure
    everything = "".join(str(o) for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert '"bsbr_vs_standard"' not in everything  # no JSON dump of the metrics in the page
