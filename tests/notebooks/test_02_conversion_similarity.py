"""Notebook 02 (conversion similarity) run as its stage runs it, with smoke parameters: tables, metrics, the
calibrated file and the report's provenance."""

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


# --- notebook 02, smoke parameters --------------------------------------------------------------------------

NOTEBOOK_SMOKE = {"seq_len": 64, "chunk_sizes": [32], "calibration_chunk_size": 32, "num_windows": 1,
                  "calibration_windows": 1, "calibration_steps": 2, "sink_size": 4, "gpt2_model": "gpt2"}
NOTEBOOK_VARIANTS = ["calibrated", "normalized", "own_chunk", "own_chunk_sinks", "seed", "sliding_window",
                     "sliding_window_sinks"]  # sorted, as the CSV


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
                            overrides={**NOTEBOOK_SMOKE, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()),
            "notebook": nbformat.read(out / "02_conversion_similarity.ipynb", as_version=4)}


def test_notebook_writes_sorted_results_csv(conversion_smoke):
    table = pd.read_csv(conversion_smoke["out"] / "conversion_similarity.csv")
    assert list(zip(table.seq_len, table.chunk_size, table.variant)) == [(64, 32, v) for v in NOTEBOOK_VARIANTS]
    # Scored after the first chunk only: logit positions 32..62, each predicting the next token.
    assert (table.num_chunks == 2).all() and (table.tokens_scored == 31).all()
    assert table.ppl_original.nunique() == 1 and 1 < table.ppl_original.iloc[0] < 1000
    assert table.ppl.map(math.isfinite).all() and (table.ppl >= 1).all()
    assert ((table.top1 <= table.top5) & (table.top5 <= table.top10)).all()
    assert table.cos.between(-1, 1).all() and (table.kl >= 0).all() and (table.mse >= 0).all()
    for row in table.itertuples():
        assert row.ppl == pytest.approx(math.exp(row.nll), rel=1e-9)
        assert row.ppl_ratio == pytest.approx(row.ppl / row.ppl_original, rel=1e-9)
    by_variant = table.set_index("variant")
    # Every variant differs from the original after the first chunk; the seed formula's retrieval swamps the output.
    assert (by_variant.kl > 1e-3).all()
    assert by_variant.ppl["seed"] > by_variant.ppl["own_chunk"] > by_variant.ppl_original["own_chunk"]


def test_notebook_per_chunk_table_shows_first_chunk_exact(conversion_smoke):
    per_chunk = pd.read_csv(conversion_smoke["out"] / "per_chunk.csv")
    for variant in NOTEBOOK_VARIANTS:  # the first chunk retrieves nothing and sees everything before it
        first = per_chunk[(per_chunk.variant == variant) & (per_chunk.chunk_index == 0)].set_index("metric").value
        assert first["cos"] == pytest.approx(1.0, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-4)
        assert first["top1"] == 1.0
    second = per_chunk[(per_chunk.variant == "seed") & (per_chunk.chunk_index == 1)].set_index("metric").value
    assert second["kl"] > 0.01
    original = per_chunk[per_chunk.variant == "original"]
    assert list(original.chunk_index) == [0, 1] and set(original.metric) == {"nll"}
    seed_nll = per_chunk[(per_chunk.variant == "seed") & (per_chunk.metric == "nll")].value
    assert seed_nll.iloc[0] == pytest.approx(original.value.iloc[0], abs=1e-4)


def test_notebook_measures_retrieved_term_per_layer(conversion_smoke):
    scale = pd.read_csv(conversion_smoke["out"] / "retrieval_scale.csv")
    assert list(scale.layer) == list(range(30)) and (scale.chunk_size == 32).all()
    assert (scale.median_ratio > 0).all() and (scale.p90_ratio >= scale.median_ratio).all()


def test_notebook_calibration_table(conversion_smoke):
    table = pd.read_csv(conversion_smoke["out"] / "calibration.csv")
    assert list(table.layer) == list(range(30))
    for column in ("own_chunk_rel_mse", "initial_rel_mse", "final_rel_mse", "seconds"):
        assert (table[column] >= 0).all() and table[column].map(math.isfinite).all()
    assert table.final_rel_mse.median() <= table.initial_rel_mse.median()
    assert table.mean_share.between(0, 1).all()


def test_notebook_calibrated_file_reloads_with_the_reported_perplexity(conversion_smoke, smollm2):
    from bsbr import metrics as M
    from bsbr.convert import load_conversion
    from bsbr.data import load_split, token_windows

    original, tokenizer = smollm2
    reloaded = load_conversion(copy.deepcopy(original), conversion_smoke["out"] / "calibrated.safetensors")
    layers = [m for m in reloaded.modules() if isinstance(m, BSBRLlamaAttention) and m.retrieval_mode == "normalized"]
    assert len(layers) == 30 and all(m.chunk_size == 32 and m.normalized.sink_size == 4 for m in layers)
    x = token_windows(tokenizer, load_split(ROOT / "data" / "corpus", "validation"), 64, 1)  # the notebook's window
    with torch.inference_mode():
        ppl = M.perplexity(M.token_nll(reloaded(x).logits, x)[:, 32:])
    metrics = conversion_smoke["metrics"]
    assert ppl == pytest.approx(metrics["perplexity"]["calibrated"], rel=1e-4)
    assert metrics["calibration"]["reload_max_abs_logit_diff"] <= 1e-4


def test_notebook_metrics_json_matches_csv(conversion_smoke):
    metrics = conversion_smoke["metrics"]
    table = pd.read_csv(conversion_smoke["out"] / "conversion_similarity.csv").set_index(["chunk_size", "variant"])
    assert metrics["seq_len"] == 64 and metrics["num_windows"] == 1 and metrics["split"] == "validation"
    assert metrics["calibration_chunk_size"] == 32 and metrics["tokens_scored"] == 31
    assert metrics["exact_max_abs_logit_diff"] <= 5e-4  # the normalised one-chunk check (seed and window: 1e-4)
    assert metrics["original_ppl"] == pytest.approx(table.ppl_original.iloc[0], abs=1e-4)  # JSON: 4 decimals
    assert set(metrics["perplexity"]) == {"original", *NOTEBOOK_VARIANTS}
    for variant in NOTEBOOK_VARIANTS:
        assert metrics["perplexity"][variant] == pytest.approx(table.loc[(32, variant)].ppl, rel=1e-6, abs=1e-4)
    for variant in NOTEBOOK_VARIANTS:
        similarity = metrics["similarity"][variant]
        assert similarity["kl"] == pytest.approx(table.loc[(32, variant)].kl, abs=1e-4)
        assert similarity["top1_agreement"] == pytest.approx(table.loc[(32, variant)].top1, abs=1e-4)
    ppl = metrics["perplexity"]
    assert metrics["retrieval_helps"] == (ppl["calibrated"] < min(ppl["own_chunk"], ppl["own_chunk_sinks"]))
    assert metrics["calibrated_within_1_25x"] == (ppl["calibrated"] <= 1.25 * ppl["original"])
    calibration = metrics["calibration"]
    assert calibration["steps"] == 2 and calibration["windows"] == 1 and calibration["tokens"] == 64
    assert calibration["split"] == "train" and calibration["sink_size"] == 4 and calibration["seconds"] > 0
    head = metrics["chunk_sizes"]["32"]
    assert set(head) == {"bsbr_ppl", "local_only_ppl", "original_ppl", "cos_sim", "kl", "top1_agreement"}
    assert head["bsbr_ppl"] == pytest.approx(table.loc[(32, "seed")].ppl, rel=1e-6, abs=1e-4)
    assert head["local_only_ppl"] == pytest.approx(table.loc[(32, "own_chunk")].ppl, rel=1e-6, abs=1e-4)
    assert head["top1_agreement"] == pytest.approx(table.loc[(32, "seed")].top1, abs=1e-4)
    assert metrics["gpt2"]["model"] == "gpt2" and metrics["gpt2"]["status"] in {"skipped", "measured"}
    if metrics["gpt2"]["status"] == "measured":
        assert math.isfinite(metrics["gpt2"]["original_ppl"]) and math.isfinite(metrics["gpt2"]["seed_ppl"])
    assert len(metrics["gguf_sha256"]) == 64


def test_notebook_provenance_plots_and_no_errors(conversion_smoke):
    nb = conversion_smoke["notebook"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "torch ", "threads:", "gguf sha256: ", "seq_len = 64", "windows × variants: 100%",
                 "calibrating layers: 100%", "with load_conversion: max |logit difference|"):
        assert line in printed
    assert "IProgress" not in printed  # importing bsbr.experiment first filters tqdm.auto's warning
    if conversion_smoke["metrics"]["gpt2"]["status"] == "skipped":
        assert "NOTE: GPT-2 path skipped" in printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    for name in ("conversion_similarity.png", "per_chunk_and_layer.png", "calibrated.safetensors"):
        assert (conversion_smoke["out"] / name).stat().st_size > 1000
