"""Notebook 01 runs end to end through the pipeline runner (smoke parameters) and writes what it promises."""

from __future__ import annotations

import json

import nbformat
import pandas as pd

from tests.conftest import SCALING_SMOKE

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
    assert set(metrics) == {"seq_len", "models", "bsbr_vs_standard", "machine"}
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
    assert "points: 100%" in printed  # tqdm progress reached the end
    assert any("image/png" in o.get("data", {}) for o in outputs)
