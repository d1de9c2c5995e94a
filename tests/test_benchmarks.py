"""bsbr.benchmarks: per-point isolated measurements of models, attention layers/cores and matmul; FLOP counts.
No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

import bsbr
from bsbr.bench import main as bench_main
from bsbr.benchmarks import (ATTENTION_IMPLS, CONVERTED_IMPLS, CORE_IMPLS, FLOP_IMPLS, MODULE_IMPLS, _attention_call,
                             attention_flop_terms, attention_flops, matmul_throughput, measure_attention,
                             measure_forward)

TINY = dict(vocab_size=64, hidden_dim=256, num_layers=1, num_heads=4, ff_dim=1024)


def test_module_impls_are_the_registered_architectures_in_report_order():
    assert sorted(MODULE_IMPLS) == bsbr.available_models()
    assert MODULE_IMPLS[:7] == ("bsbr", "standard", "linear", "delta_net", "sliding_window", "hopfield", "gau")
    assert ATTENTION_IMPLS == MODULE_IMPLS + CORE_IMPLS + CONVERTED_IMPLS and set(FLOP_IMPLS) <= set(ATTENTION_IMPLS)


def test_measure_forward_in_fresh_subprocesses():
    small = measure_forward("standard", TINY, 64, repeats=2, warmup=1, threads=1)
    large = measure_forward("standard", TINY, 4096, repeats=1, warmup=0, threads=1)
    for result, n, repeats in ((small, 64, 2), (large, 4096, 1)):
        assert (result["model"], result["seq_len"], result["repeats"], result["threads"]) == ("standard", n, repeats, 1)
        assert len(result["times_s"]) == repeats and all(t > 0 for t in result["times_s"])
        assert result["min_s"] <= result["median_s"] <= result["max_s"]
        assert result["baseline_rss_bytes"] > 10 * 2**20  # Python + torch are resident
        assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"]
        assert result["peak_bytes"] == result["peak_rss_bytes"] - result["baseline_rss_bytes"] >= 0
    # 4096 tokens hold a [4096, 1024] fp32 feed-forward activation (16 MiB) that 64 tokens do not need.
    assert large["peak_bytes"] > small["peak_bytes"] + 8 * 2**20
    # Each point is its own process: the baseline is not inflated by this (pytest) process's peak.
    assert abs(large["baseline_rss_bytes"] - small["baseline_rss_bytes"]) < 64 * 2**20


def test_measure_forward_bsbr_takes_its_own_settings():
    result = measure_forward("bsbr", {**TINY, "chunk_size": 16}, 48, repeats=1, warmup=0, threads=1)
    assert result["model"] == "bsbr" and result["seq_len"] == 48 and result["median_s"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "name"),
    (dict(seq_len=0), "seq_len"),
    (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"),
    (dict(batch_size=1.5), "batch_size"),
    (dict(threads=0), "threads"),
    (dict(config={"hidden_dim": 8}), "vocab_size"),
])
def test_measure_forward_rejects_bad_arguments_before_running(kwargs, match):
    args = dict(name="standard", config=TINY, seq_len=16) | kwargs
    with pytest.raises(ValueError, match=match):
        measure_forward(**args)


def test_measure_forward_reports_a_failing_subprocess():
    with pytest.raises(RuntimeError, match="chunk_size"):  # standard attention does not take chunk_size
        measure_forward("standard", {**TINY, "chunk_size": 16}, 16, repeats=1, warmup=0, threads=1)


# ----------------------------------------------------------------------------- attention modules and cores

# hidden 8, 2 heads (head_dim 4), chunk 4, 10 tokens: chunks of 4, 4, 2 tokens (C = 3).
HAND_BSBR_CORE = {
    "local_attention": 2 * 8 * (4 * 5 + 4 * 5 + 2 * 3),  # 2·D·Σ s(s+1) = 736
    "chunk_states": 2 * 2 * 4 * 8 * 4,  # 2·(C-1)·B·D·d = 512: chunks 0 and 1 are ever retrieved
    "meta_scores": 8 * 3 * 2,  # D·C·(C-1) = 48: pairs (1,0), (2,0), (2,1), 2·d FLOPs each, 2 heads
    "state_mixing": 2 * 16 * 3 * 2,  # H·d²·C·(C-1) = 192: the same 3 pairs, 2·d² FLOPs each, 2 heads
    "readout": 2 * 10 * 8 * 4,  # 2·n·D·d = 640: q_t·R_i, a [1, 4] x [4, 4] product per token and head
}


def test_attention_flops_hand_computed_small_cases():
    assert attention_flop_terms("bsbr_core", 10, hidden_dim=8, num_heads=2, chunk_size=4) == HAND_BSBR_CORE
    assert attention_flop_terms("bsbr", 10, hidden_dim=8, num_heads=2, chunk_size=4) == {
        "projections": 4 * 2 * 10 * 64,  # 5120: q, k, v, out on 10 tokens
        "meta_projections": 2 * 2 * 3 * 64,  # 768: meta-query and meta-key of 3 chunk means
        **HAND_BSBR_CORE,
    }
    # full attention, 4 tokens: 1+2+3+4 = 10 causal pairs, 2 products of 2·d FLOPs each per head
    assert attention_flop_terms("sdpa_core", 4, hidden_dim=8, num_heads=2) == {"attention": 10 * 2 * 2 * 4 * 2}
    assert attention_flop_terms("standard", 4, hidden_dim=8, num_heads=2) == {"projections": 2048, "attention": 320}
    assert attention_flops("standard", 4, hidden_dim=8, num_heads=2) == 2368
    assert attention_flops("standard", 4, hidden_dim=8, num_heads=2, mode="backward") == 3 * 2368
    assert attention_flops("bsbr_core", 10, 8, 2, 4, batch_size=3) == 3 * sum(HAND_BSBR_CORE.values())


def test_attention_flops_counts_causal_pairs_and_meets_the_issue_approximations():
    # local attention counts exactly the causal pairs inside each chunk, enumerated here
    for n, chunk in ((1, 4), (7, 3), (64, 16), (130, 32)):
        pairs = sum(t % chunk + 1 for t in range(n))
        assert attention_flop_terms("bsbr_core", n, 16, 2, chunk)["local_attention"] == pairs * 2 * 2 * 8 * 2
    # one chunk covering the sequence: the local part is full causal attention and nothing is retrieved
    one = attention_flop_terms("bsbr_core", 48, 16, 2, 64)
    assert one["local_attention"] == attention_flop_terms("sdpa_core", 48, 16, 2)["attention"]
    assert one["chunk_states"] == one["meta_scores"] == one["state_mixing"] == 0
    # at the issue's sizes each term is within 1 % of its approximate formula
    n, D, H, B = 16384, 512, 8, 128
    d, C = D // H, n // B
    terms = attention_flop_terms("bsbr", n, D, H, B)
    approx = {"projections": 8 * n * D * D, "meta_projections": 4 * C * D * D, "local_attention": 2 * n * B * D,
              "chunk_states": 2 * n * D * d, "state_mixing": C * C * H * d * d, "readout": 2 * n * D * d}
    for key, value in approx.items():
        assert terms[key] == pytest.approx(value, rel=0.01), key
    assert attention_flops("standard", n, D, H) == pytest.approx(8 * n * D * D + 2 * n * n * D, rel=1e-4)


ATTENTION_POINTS = [(impl, mode) for impl in ("bsbr", "standard", "bsbr_core", "sdpa_core")
                    for mode in ("forward", "backward", "decode") if mode != "decode" or impl in ("bsbr", "standard")]
SMALL = dict(hidden_dim=32, num_heads=2, chunk_size=16)


@pytest.fixture(scope="module")
def attention_results():
    """Every (impl, mode) at 64 tokens (4 chunks of 16), two timed calls after one warmup, one thread."""
    return {(impl, mode): measure_attention(impl, 64, mode, **SMALL, repeats=2, warmup=1, threads=1, seed=1)
            for impl, mode in ATTENTION_POINTS}


@pytest.mark.parametrize("impl, mode", ATTENTION_POINTS)
def test_measure_attention_returns_a_well_formed_point(attention_results, impl, mode):
    result = attention_results[(impl, mode)]
    assert {key: result[key] for key in ("impl", "mode", "seq_len", "hidden_dim", "num_heads", "chunk_size",
                                         "batch_size", "repeats", "warmup", "threads")} == dict(
        impl=impl, mode=mode, seq_len=64, **SMALL, batch_size=1, repeats=2, warmup=1, threads=1)
    assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
    assert result["min_s"] <= result["median_s"] <= result["max_s"]
    assert result["min_s"] <= result["mean_s"] <= result["max_s"]
    assert result["baseline_rss_bytes"] > 10 * 2**20  # Python + torch are resident
    assert result["peak_bytes"] == result["peak_rss_bytes"] - result["baseline_rss_bytes"] >= 0
    if mode == "decode":
        assert result["flops"] is None and result["gflops_per_s"] is None
        assert result["position"] == 64 and result["prefill_s"] > 0
        assert result["state_tokens"] == 64 + 1 + 2  # prefill, the warmup token, the two timed tokens
        if impl == "standard":  # a KV cache: keys and values of every token, fp32
            assert result["state_bytes"] == 2 * 4 * 67 * 32
        else:  # BSBR: 4 finished chunks (67 = 4·16 + 3), see BSBRAttention.state_nbytes
            assert result["state_bytes"] == bsbr.BSBRAttention(32, 2, 16).state_nbytes(67)
    else:
        assert result["flops"] == attention_flops(impl, 64, **SMALL, mode=mode)
        assert result["gflops_per_s"] == pytest.approx(result["flops"] / result["median_s"] / 1e9)
        assert "state_bytes" not in result


def test_measure_attention_max_timed_s_stops_early_and_batch_scales_flops():
    result = measure_attention("bsbr_core", 40, "forward", **SMALL, batch_size=2, repeats=5, warmup=0, threads=1,
                               max_timed_s=1e-9)
    assert result["repeats"] == 1 and len(result["times_s"]) == 1  # any call takes longer than a nanosecond
    assert result["flops"] == 2 * attention_flops("bsbr_core", 40, **SMALL)


def test_matmul_throughput_reports_every_shape():
    result = matmul_throughput(threads=1, shapes=[(64, 32, 16), (8, 8, 8)], repeats=2)
    assert result["threads"] == 1 and result["dtype"] == "float32" and result["repeats"] == 2
    assert [(row["m"], row["k"], row["n"]) for row in result["shapes"]] == [(64, 32, 16), (8, 8, 8)]
    for row in result["shapes"]:
        assert row["gflops_per_s"] == pytest.approx(2 * row["m"] * row["k"] * row["n"] / row["best_s"] / 1e9)
    assert result["gflops_per_s"] == max(row["gflops_per_s"] for row in result["shapes"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="flash"), "impl"),
    (dict(mode="train"), "mode"),
    (dict(impl="sdpa_core", mode="decode"), "streams through a module: impl must be one of"),
    (dict(seq_len=0), "seq_len"),
    (dict(hidden_dim=30), "hidden_dim"),
    (dict(num_heads=0), "num_heads"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"),
    (dict(threads=0), "threads"),
    (dict(max_timed_s=0), "max_timed_s"),
    (dict(timeout=-1.0), "timeout"),
])
def test_measure_attention_rejects_bad_arguments_before_running(kwargs, match):
    args = dict(impl="bsbr", seq_len=16, hidden_dim=32, num_heads=4) | kwargs
    with pytest.raises(ValueError, match=match):
        measure_attention(**args)


@pytest.mark.parametrize("call, match", [
    (lambda: attention_flops("bsbr", 16, mode="decode"), "mode"),
    (lambda: attention_flop_terms("linear", 16), "impl"),
    (lambda: attention_flop_terms("bsbr", 16, chunk_size=0), "chunk_size"),
    (lambda: matmul_throughput(shapes=[(4, 4)]), "shapes"),
    (lambda: matmul_throughput(shapes=5), "shapes"),
    (lambda: matmul_throughput(shapes=[(4, 0, 4)]), "k"),
    (lambda: matmul_throughput(repeats=0), "repeats"),
    (lambda: matmul_throughput(threads=-2), "threads"),
])
def test_flop_and_matmul_helpers_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_measure_attention_reports_a_timeout():
    with pytest.raises(RuntimeError, match="longer than"):
        measure_attention("standard", 4096, "forward", repeats=50, warmup=0, threads=1, timeout=0.05)


BASELINE_POINTS = [(impl, mode) for impl in ("linear", "delta_net", "sliding_window", "hopfield", "gau")
                   for mode in ("forward", "decode")]
BASELINE_POINTS += [(impl, "forward") for impl in ("delta_chunkwise", "delta_recurrent", "linear_chunkwise",
                                                    "linear_recurrent")]


@pytest.mark.parametrize("impl, mode", BASELINE_POINTS)
def test_measure_attention_baseline_layers_and_operators(impl, mode):
    result = measure_attention(impl, 48, mode, **SMALL, repeats=2, warmup=1, threads=1, seed=1)
    assert (result["impl"], result["mode"], result["seq_len"], result["repeats"]) == (impl, mode, 48, 2)
    assert result["flops"] is None and result["gflops_per_s"] is None  # no FLOP formula for these
    assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
    assert result["peak_bytes"] == result["peak_rss_bytes"] - result["baseline_rss_bytes"] >= 0
    if mode == "decode":
        assert result["state_tokens"] == 48 + 1 + 2
        d = SMALL["hidden_dim"] // SMALL["num_heads"]
        expected = {"linear": 4 * 2 * (d * d + d), "delta_net": 4 * 2 * d * d,  # constant-size recurrent states
                    "hopfield": 2 * 4 * 51 * 32,  # a KV cache of all 51 tokens
                    "sliding_window": 2 * 4 * 51 * 32}  # window 128 > 51 tokens: every token is still in it
        if impl in expected:
            assert result["state_bytes"] == expected[impl]


def test_build_attention_is_the_layer_build_model_uses():
    for name in bsbr.available_models():
        settings = {"chunk_size": 16} if name == "bsbr" else {}
        layer = bsbr.build_attention(name, 32, 2, **settings)
        model = bsbr.build_model(name, vocab_size=50, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=64, **settings)
        built = model.layers[0].attention
        assert type(layer) is type(built)
        assert [(n, p.shape) for n, p in layer.named_parameters()] == [(n, p.shape) for n, p in built.named_parameters()]
    assert bsbr.build_attention("sliding_window", 32, 2, window_size=7).window_size == 7
    with pytest.raises(ValueError, match="window_size"):
        bsbr.build_attention("linear", 32, 2, window_size=7)
    with pytest.raises(ValueError, match="name must be one of"):
        bsbr.build_attention("mamba", 32, 2)
    with pytest.raises(ValueError, match="FLOP count"):
        attention_flop_terms("delta_chunkwise", 64)


# ----------------------------------------------------------------------------- a converted layer vs the original

LLAMA = dict(hidden_dim=32, num_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("impl, mode", [("llama_original", "forward"), ("llama_normalized", "backward"),
                                        ("llama_terraced", "forward")])
def test_measure_attention_converted_layer_points(impl, mode):
    result = measure_attention(impl, 20, mode, **LLAMA, chunk_size=8, sink_size=2, repeats=2, warmup=1, threads=1)
    assert {key: result[key] for key in ("impl", "mode", "seq_len", "hidden_dim", "num_heads", "num_key_value_heads",
                                         "chunk_size", "sink_size", "repeats")} == dict(
        impl=impl, mode=mode, seq_len=20, **LLAMA, chunk_size=8, sink_size=2, repeats=2)
    assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
    assert result["flops"] is None and result["peak_bytes"] == result["peak_rss_bytes"] - result["baseline_rss_bytes"]


def _layer_output(impl, chunk_size, seq_len=20):
    torch.manual_seed(0)  # the layer's weights, as measure_attention_in_process seeds them
    call, leaves, layer = _attention_call(impl, "forward", seq_len, LLAMA["hidden_dim"], LLAMA["num_heads"],
                                          chunk_size, 1, torch.Generator().manual_seed(0),
                                          LLAMA["num_key_value_heads"], 2)
    with torch.no_grad():
        return call(), leaves[0], layer


def test_converted_layer_point_is_the_original_layer_converted():
    original, hidden, layer = _layer_output("llama_original", 8)
    assert type(layer).__name__ == "LlamaAttention" and layer.config._attn_implementation == "sdpa"
    assert (layer.num_key_value_groups, layer.head_dim) == (2, 8)
    one_chunk, same_hidden, converted = _layer_output("llama_normalized", 32)  # one chunk: exactly the original
    assert type(converted).__name__ == "BSBRLlamaAttention" and converted.normalized.sink_size == 2
    assert torch.equal(hidden, same_hidden) and torch.equal(converted.q_proj.weight, layer.q_proj.weight)
    assert original.shape == (1, 20, 32) and (one_chunk - original).abs().max() < 1e-5
    chunked, _, _ = _layer_output("llama_normalized", 8)  # three chunks: chunk 0 (8 tokens) still exact
    assert (chunked[:, :8] - original[:, :8]).abs().max() < 1e-5 and (chunked - original).abs().max() > 1e-3


def test_terraced_layer_point_is_exact_over_its_first_two_chunks():
    original, hidden, _ = _layer_output("llama_original", 8)
    terraced, same_hidden, layer = _layer_output("llama_terraced", 8)
    assert type(layer).__name__ == "BSBRLlamaAttention" and layer.retrieval_mode == "terraced"
    assert layer.terraced.sink_size == 2 and layer.compression_factor is None and torch.equal(hidden, same_hidden)
    # own chunk + the whole previous chunk: tokens 0..15 see everything before them; token 16 on retrieves
    assert (terraced[:, :16] - original[:, :16]).abs().max() < 1e-5 and (terraced - original).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(sink_size=9), "sink_size"),
    (dict(mode="decode"), "streams through a module"),
])
def test_measure_attention_converted_layer_rejects_bad_arguments(kwargs, match):
    args = dict(impl="llama_normalized", seq_len=16, hidden_dim=32, num_heads=4, chunk_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        measure_attention(**args)


def test_cli_converted_layer_takes_key_value_heads_and_sinks(capsys):
    assert bench_main(["attention", "--impl", "llama_normalized", "--seq-len", "24", "--hidden-dim", "32",
                       "--num-heads", "4", "--num-kv-heads", "2", "--chunk-size", "8", "--sink-size", "3",
                       "--repeats", "1", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["impl"], result["num_key_value_heads"], result["sink_size"], result["chunk_size"]) == (
        "llama_normalized", 2, 3, 8)
