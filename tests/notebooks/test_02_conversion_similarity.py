"""Notebook 02 (conversion similarity) run as its stage runs it, with smoke parameters: the perplexity table with
intervals, the paired comparisons, both calibration stages' files reloaded, the metrics and the report's provenance."""

from __future__ import annotations

import copy
import json
import math

import nbformat
import pandas as pd
import pytest
import torch

from bsbr.convert import BSBRLlamaAttention, default_model_path
from tests.conftest import ROOT, run_notebook_cli

SMOKE = {"seq_len": 128, "windows_per_source": 1, "chunk_size": 32, "sink_size": 4, "transfer_windows_per_source": 1,
         "transfer_steps": 2, "lora_steps": 2, "lora_eval_every": 1, "lora_seq_len": 96, "curve_windows_per_source": 1,
         "normalized_calibration_steps": 1, "bootstrap_block": 16,
         "bootstrap_resamples": 200, "gpt2_model": None}
VARIANTS = ["seed", "own_chunk_sinks", "normalized_calibrated", "terraced_exact", "terraced", "terraced_transfer",
            "terraced_lora", "sliding_chunk_sinks", "sliding_span_sinks", "sliding_span_sinks_lora"]
SOURCES = ["pydoc", "shakespeare"]
SCORED = 2 * (128 - 1 - 32)  # two windows (one per source), predictions at positions 32..126


@pytest.fixture(scope="module")
def conversion_smoke(tmp_path_factory):
    try:
        default_model_path()
    except FileNotFoundError as error:
        pytest.fail(f"notebook 02 needs the SmolLM2 checkpoint: {error}")
    for split in ("validation", "train"):
        if not (ROOT / "data" / "corpus" / f"{split}.jsonl").is_file():
            pytest.fail(f"notebook 02 needs data/corpus/{split}.jsonl: run `dvc repro prepare_corpus`")
    out = tmp_path_factory.mktemp("conversion")
    metrics = out / "metrics" / "02_conversion_similarity.json"
    proc = run_notebook_cli(ROOT / "notebooks" / "02_conversion_similarity.ipynb", "02_conversion_similarity", out,
                            overrides={**SMOKE, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()),
            "notebook": nbformat.read(out / "02_conversion_similarity.ipynb", as_version=4)}


def _windows(tokenizer, split="validation", skip=0, seq_len=128):
    from bsbr.data import load_split, source_windows

    by_source = source_windows(tokenizer, load_split(ROOT / "data" / "corpus", split), seq_len, 1, skip=skip)
    assert list(by_source) == SOURCES
    return torch.cat(list(by_source.values()))  # [2, seq_len]


def test_perplexity_table_has_every_variant_with_intervals_per_source(conversion_smoke):
    table = pd.read_csv(conversion_smoke["out"] / "perplexity.csv")
    assert list(dict.fromkeys(table.source)) == ["all", *SOURCES]
    for source, group in table.groupby("source", sort=False):
        assert list(group.variant) == ["original", *VARIANTS]
        assert (group.tokens == (SCORED if source == "all" else SCORED // 2)).all()
        assert (group.windows == (2 if source == "all" else 1)).all()
    assert ((table.ppl_low <= table.ppl) & (table.ppl <= table.ppl_high)).all()
    assert ((table.ratio_low <= table.ratio) & (table.ratio <= table.ratio_high)).all()
    original = table[table.variant == "original"]
    assert (original.ratio == 1).all() and (original.ratio_low == 1).all() and (original.ratio_high == 1).all()
    every = table[table.source == "all"].set_index("variant")
    for variant in VARIANTS:
        assert every.ratio[variant] == pytest.approx(every.ppl[variant] / every.ppl["original"], rel=1e-5)  # CSV: 6 digits
    # the seed formula's unnormalised retrieved term swamps the output; a window as wide as the exact span with the
    # same sinks sees the same tokens as the exact region except the previous chunk's part: the two stay close
    assert every.ratio["seed"] > 10 * every.ratio["terraced_exact"]
    assert every.kl.drop("original").gt(0).all() and every.top1.drop("original").between(0, 1).all()


def test_the_scored_nll_is_the_reloaded_models_nll(conversion_smoke, smollm2):
    from bsbr import metrics as M
    from bsbr.convert import load_conversion, load_lora

    original, tokenizer = smollm2
    out = conversion_smoke["out"]
    windows = _windows(tokenizer)
    terraced = load_conversion(copy.deepcopy(original), out / "terraced.safetensors")
    layers = [m for m in terraced.modules() if isinstance(m, BSBRLlamaAttention)]
    assert len(layers) == 30 and all(m.retrieval_mode == "terraced" and m.chunk_size == 32 for m in layers)
    lora = load_lora(load_conversion(copy.deepcopy(original), out / "terraced.safetensors"),
                     out / "terraced_lora.safetensors")
    with torch.inference_mode():
        nll = {"original": M.token_nll(original(windows).logits, windows)[:, 32:],
               "terraced_transfer": M.token_nll(terraced(windows).logits, windows)[:, 32:],
               "terraced_lora": M.token_nll(lora(windows).logits, windows)[:, 32:]}
    table = pd.read_csv(out / "perplexity.csv")
    every = table[table.source == "all"].set_index("variant")
    for name, values in nll.items():
        assert every.ppl[name] == pytest.approx(M.perplexity(values), rel=1e-4)
    pydoc = table[table.source == "pydoc"].set_index("variant")
    assert pydoc.ppl["terraced_lora"] == pytest.approx(M.perplexity(nll["terraced_lora"][:1]), rel=1e-4)
    assert every.ppl["terraced_lora"] != pytest.approx(every.ppl["terraced_transfer"], rel=1e-6)  # LoRA moved it


def test_paired_comparisons_and_their_verdicts(conversion_smoke):
    paired = pd.read_csv(conversion_smoke["out"] / "paired.csv")
    assert len(paired) == 7 * 3 and set(paired.source) == {"all", *SOURCES}
    assert ((paired.ratio_low <= paired.ratio) & (paired.ratio <= paired.ratio_high)).all()
    for row in paired.itertuples():
        expected = "better" if row.ratio_high < 1 else "worse" if row.ratio_low > 1 else "not separated"
        assert row.verdict == expected
    table = pd.read_csv(conversion_smoke["out"] / "perplexity.csv")
    every = table[table.source == "all"].set_index("variant")
    for row in paired[paired.source == "all"].itertuples():
        assert row.ratio == pytest.approx(every.ppl[row.numerator] / every.ppl[row.denominator], rel=1e-5)


def test_lora_curve_both_runs_same_steps(conversion_smoke):
    curve = pd.read_csv(conversion_smoke["out"] / "lora_curve.csv")
    assert list(dict.fromkeys(curve.run)) == ["terraced_lora", "sliding_span_sinks_lora"]
    for _, group in curve.groupby("run"):
        assert list(group.step) == [0, 1, 2] and group.ppl.map(math.isfinite).all()
        assert math.isnan(group.loss.iloc[0]) and (group.loss.iloc[1:] >= 0).all()


def test_calibration_table_both_modes(conversion_smoke):
    table = pd.read_csv(conversion_smoke["out"] / "calibration.csv")
    for mode in ("normalized", "terraced"):
        rows = table[table.retrieval == mode]
        assert list(rows.layer) == list(range(30))
        assert rows[["own_chunk_rel_mse", "initial_rel_mse", "final_rel_mse"]].map(math.isfinite).all().all()
        assert rows.mean_share.between(0, 1).all()


def test_metrics_json_goals_state_and_files(conversion_smoke):
    metrics = conversion_smoke["metrics"]
    table = pd.read_csv(conversion_smoke["out"] / "perplexity.csv")
    assert metrics["seq_len"] == 128 and metrics["chunk_size"] == 32 and metrics["windows"] == 2
    assert metrics["sources"] == SOURCES and metrics["tokens_scored"] == SCORED
    assert max(metrics["exact_max_abs_logit_diff"].values()) <= 5e-4
    for source, group in table.groupby("source"):
        for row in group.itertuples():
            assert metrics["perplexity"][source][row.variant]["ppl"] == pytest.approx(row.ppl, rel=1e-5, abs=1e-4)
    allowed = {"met", "missed", "undecided (the interval straddles it)"}
    assert set(metrics["goals"]) == {"within_1_05x", "within_1_02x", "beats_sliding_window_same_lora",
                                     "retrieval_helps", "state_40960_within_0_3x"}
    assert all(v in allowed for v in metrics["goals"].values())
    lora = metrics["perplexity"]["all"]["terraced_lora"]
    expected = "met" if lora["ratio_high"] <= 1.05 else "missed" if lora["ratio_low"] > 1.05 else \
        "undecided (the interval straddles it)"
    assert metrics["goals"]["within_1_05x"] == expected
    # SmolLM2: 30 layers × 3 key/value heads × head_dim 64, fp32 keys and values
    assert metrics["state"]["40960"]["kv_cache_bytes"] == 30 * 2 * 3 * 64 * 40960 * 4
    assert metrics["state"]["40960"]["ratio"] < metrics["state"]["2048"]["ratio"] < 1
    calibration = metrics["calibration"]
    assert calibration["transfer"]["tokens"] == 2 * 128 and calibration["lora"]["steps"] == 2
    assert calibration["reload_max_abs_logit_diff"] <= 1e-4 and calibration["terraced_total_seconds"] > 0
    assert metrics["gpt2"]["status"] == "skipped" and len(metrics["gguf_sha256"]) == 64
    for name in ("calibrated.safetensors", "terraced.safetensors", "terraced_lora.safetensors",
                 "sliding_window_lora.safetensors", "perplexity_ratios.png", "lora_curve.png",
                 "per_chunk_and_layer.png"):
        assert (conversion_smoke["out"] / name).stat().st_size > 1000


def test_provenance_and_no_errors(conversion_smoke):
    nb = conversion_smoke["notebook"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "torch ", "threads:", "gguf sha256: ", "seq_len = 128", "windows × variants: 100%",
                 "calibrating layers: 100%", "reloaded with load_conversion", "LoRA reloaded"):
        assert line in printed
    assert "IProgress" not in printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
