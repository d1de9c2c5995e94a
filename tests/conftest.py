"""Shared fixtures: the repo root, tiny random HF models (Llama, GPT-2) for the converter tests, and one smoke run of
notebook 01 reused by the notebook and pipeline tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

#: Notebook 01 shrunk to seconds: two tiny models, two lengths, one timed call each; tiny attention modules.
SCALING_SMOKE = {
    "models": ["bsbr", "standard"],
    "seq_lens": [64, 128],
    "batch_size": 1,
    "vocab_size": 128,
    "hidden_dim": 32,
    "num_heads": 2,
    "num_layers": 1,
    "ff_dim": 64,
    "chunk_size": 32,
    "repeats": 1,
    "warmup": 0,
    "threads": 1,
    "seed": 0,
    "attn_impls": ["bsbr", "standard", "bsbr_core", "sdpa_core"],
    "attn_seq_lens": [32, 64, 128],
    "full_forward_max_len": 64,  # full attention at 128 tokens is extrapolated
    "full_backward_max_len": 64,
    "decode_positions": [32, 64],
    "decode_steps": 4,
    "matmul_shapes": [[128, 64, 64]],
    "model_memory_seq_lens": [256],
    "target_seq_lens": [64, 128],  # the scaling goals checked at smoke lengths (the values mean nothing here)
    "target_decode_positions": [32, 64],
    "baseline_impls": ["linear", "delta_net", "sliding_window", "hopfield", "gau"],
    "quadratic_max_len": 64,  # hopfield is not measured at 128
    "operator_seq_lens": [32, 64],
    "operator_target_seq_len": 64,
}



def tokens(batch: int = 2, length: int = 23, seed: int = 1):
    """``[batch, length]`` random token ids below 100 (the tiny models' vocabulary); 23 is odd on purpose, so the
    last chunk is partial for every chunk size the converter tests use."""
    import torch

    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_llama(attn_implementation: str = "sdpa", seed: int = 0):
    """A tiny random ``LlamaForCausalLM`` in eval mode (nothing downloaded): 2 layers, hidden 64, 4 query / 2 key-value
    heads (GQA), head_dim 16, RoPE, 256 positions, vocab 100."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A tiny random ``GPT2LMHeadModel`` in eval mode (nothing downloaded): 2 layers, hidden 64, 4 heads (head_dim 16),
    64 learned positions, vocab 100; ``overrides`` go to ``GPT2Config``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, attn_implementation=attn_implementation, **overrides)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): small ops are faster and the 2 cores stay shared.
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def run_notebook_cli(notebook: Path, section: str, out: Path, params_file: Path | None = None,
                     overrides: dict | None = None) -> subprocess.CompletedProcess:
    """Run pipelines/run_notebook.py exactly as a DVC stage does, with ``-p key=<json>`` overrides."""
    cmd = [sys.executable, str(ROOT / "pipelines" / "run_notebook.py"), str(notebook), "--section", section,
           "--out", str(out)]
    if params_file is not None:
        cmd += ["--params", str(params_file)]
    for key, value in (overrides or {}).items():
        cmd += ["-p", f"{key}={json.dumps(value)}"]  # JSON is YAML
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_notebook_smoke(out: Path, section: str, overrides: dict) -> dict:
    """Run ``notebooks/<section>.ipynb`` as its stage does, with ``overrides`` and ``out_dir``/``metrics_path`` inside
    ``out``; assert it succeeded. Returns ``{"out": out, "metrics": metrics dict, "notebook": executed notebook}``."""
    import nbformat

    metrics = out / "metrics" / f"{section}.json"
    proc = run_notebook_cli(ROOT / "notebooks" / f"{section}.ipynb", section, out,
                            overrides={**overrides, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()),
            "notebook": nbformat.read(out / f"{section}.ipynb", as_version=4)}


#: chunk size and sink tokens of :func:`normalized_checkpoint`
CHECKPOINT_CHUNK, CHECKPOINT_SINKS = 128, 4


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct and its tokenizer (data/model, from `dvc repro fetch_model`); fails with what to
    run when the checkpoint is missing."""
    from bsbr.convert import default_model_path, load_pretrained

    try:
        default_model_path()
    except FileNotFoundError as error:
        pytest.fail(f"the real-model tests need the SmolLM2 checkpoint: {error}")
    return load_pretrained()


@pytest.fixture(scope="session")
def normalized_checkpoint(tmp_path_factory) -> Path:
    """An uncalibrated normalised-retrieval conversion of the embedded SmolLM2 (chunk 128, 4 sink tokens) written with
    ``save_conversion``: the stand-in for the pipeline's calibrated weights in notebook smoke runs (CI has no
    data/02_conversion_similarity)."""
    import torch

    from bsbr.convert import converted_copy, load_pretrained, save_conversion

    path = tmp_path_factory.mktemp("checkpoint") / "normalized.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, _ = load_pretrained()
        save_conversion(converted_copy(base, CHECKPOINT_CHUNK, retrieval="normalized", sink_size=CHECKPOINT_SINKS),
                        path)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="session")
def scaling_smoke(tmp_path_factory) -> dict:
    """Notebook 01 executed by the runner with SCALING_SMOKE into a temp folder.

    Returns ``{"out": folder, "notebook": executed .ipynb, "metrics": metrics JSON path, "proc": CompletedProcess}``.
    """
    out = tmp_path_factory.mktemp("scaling")
    metrics = out / "metrics" / "01_scaling.json"
    proc = run_notebook_cli(ROOT / "notebooks" / "01_scaling.ipynb", "01_scaling", out,
                            overrides={**SCALING_SMOKE, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "notebook": out / "01_scaling.ipynb", "metrics": metrics, "proc": proc}
