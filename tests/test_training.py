"""bsbr.training: byte data, windows, schedule, device/dtype checks, a tiny training run, and the memory of a step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bsbr
from bsbr.fitting import fit_power_law
from bsbr.training import (BYTE_VOCAB_SIZE, EOS_BYTE, FP32_ATTENTION, ByteNgram, build_lm, encode_bytes, evaluate,
                           evaluation_windows, learning_rate_at, matched_ff_dims, measure_train_step_memory,
                           model_config, ngram_floors, parameter_count, random_windows, resolve_device_dtype,
                           steps_to_reach, train_lm)

TINY = dict(hidden_dim=16, num_layers=1, num_heads=2, ff_dim=32, chunk_size=8)
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40


pytestmark = pytest.mark.usefixtures("one_thread")


def test_encode_bytes_joins_documents_with_eos():
    stream = encode_bytes([{"text": "ab"}, "é", {"text": "c"}])
    assert stream.dtype == torch.uint8
    assert stream.tolist() == [97, 98, EOS_BYTE, 0xC3, 0xA9, EOS_BYTE, 99]  # "é" is two UTF-8 bytes
    assert BYTE_VOCAB_SIZE == 256
    with pytest.raises(ValueError, match="NUL"):
        encode_bytes(["a\x00b"])
    with pytest.raises(ValueError, match="at least one"):
        encode_bytes([])


def test_random_windows_are_slices_of_the_stream_and_reproducible():
    stream = torch.arange(100, dtype=torch.uint8)
    a = random_windows(stream, 10, 6, torch.Generator().manual_seed(3))
    b = random_windows(stream, 10, 6, torch.Generator().manual_seed(3))
    assert a.shape == (6, 10) and a.dtype == torch.long and torch.equal(a, b)
    assert torch.equal(a - a[:, :1], torch.arange(10).expand(6, 10))  # consecutive tokens
    assert int(a.max()) <= 99
    full = random_windows(stream, 100, 2, torch.Generator().manual_seed(0))  # only one possible offset
    assert torch.equal(full, torch.arange(100).expand(2, 100))
    with pytest.raises(ValueError, match="seq_len"):
        random_windows(stream, 101, 1, torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        random_windows(stream, 10, 0, torch.Generator())


def test_evaluation_windows_spread_without_overlap():
    stream = torch.arange(100, dtype=torch.uint8)
    windows = evaluation_windows(stream, 10, 4)  # stride 25
    assert windows[:, 0].tolist() == [0, 25, 50, 75] and windows.shape == (4, 10)
    assert torch.equal(windows[1], torch.arange(25, 35))
    assert evaluation_windows(stream, 25, 4)[-1, -1] == 99  # exactly tiling
    with pytest.raises(ValueError, match="need 110 tokens"):
        evaluation_windows(stream, 11, 10)


def test_steps_to_reach_interpolates():
    assert steps_to_reach([0, 10, 20], [5.0, 3.0, 1.0], 2.0) == pytest.approx(15.0)
    assert steps_to_reach([0, 10, 20], [5.0, 3.0, 1.0], 3.0) == pytest.approx(10.0)
    assert steps_to_reach([0, 10], [1.0, 0.5], 2.0) == 0.0  # already there
    assert steps_to_reach([0, 10], [5.0, 4.0], 3.0) is None
    assert steps_to_reach([0, 10, 20], [5.0, 2.0, 3.0], 2.5) == pytest.approx(10 * 2.5 / 3)  # first crossing
    with pytest.raises(ValueError, match="increasing"):
        steps_to_reach([0, 0], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="equal length"):
        steps_to_reach([0, 1], [1.0], 1.0)


def test_learning_rate_schedule():
    rates = [learning_rate_at(s, 20, 1.0, 5) for s in range(20)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rates[5] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))  # non-increasing after warmup
    assert learning_rate_at(0, 10, 2.0, 0) == pytest.approx(2.0)


def test_model_config_maps_the_locality_length():
    for name in bsbr.available_models():
        config = model_config(name, **TINY)
        assert config["vocab_size"] == BYTE_VOCAB_SIZE and config["hidden_dim"] == 16
        expected = {"bsbr": "chunk_size", "linear": "chunk_size", "delta_net": "chunk_size", "gau": "chunk_size",
                    "sliding_window": "window_size"}.get(name)
        extra = set(config) - {"vocab_size", "hidden_dim", "num_layers", "num_heads", "ff_dim"}
        assert extra == ({expected} if expected else set())
        if expected:
            assert config[expected] == 8
        bsbr.build_model(name, **config)  # accepted by the registry
    with pytest.raises(ValueError, match="name must be one of"):
        model_config("transformer", **TINY)
    with pytest.raises(ValueError, match="chunk_size"):
        model_config("bsbr", **{**TINY, "chunk_size": 0})


def test_resolve_device_dtype_validates_before_work():
    assert resolve_device_dtype("cpu", "float32") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_device_dtype("cpu", "float64")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_device_dtype("cpu", "float16")
    with pytest.raises(ValueError, match="device"):
        resolve_device_dtype("gpu0", "float32")
    with pytest.raises(ValueError, match="device"):
        resolve_device_dtype(0, "float32")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available") as error:
            resolve_device_dtype("cuda", "float32")
        # a CPU-only torch says so (the README's GPU examples need torch's CUDA build)
        assert ("CPU-only build" in str(error.value)) == (torch.version.cuda is None)
    with pytest.raises(ValueError, match="dtype"):
        train_lm("standard", model_config("standard", **TINY), encode_bytes([TEXT]),
                 torch.zeros(1, 4, dtype=torch.long), steps=2, batch_size=1, seq_len=8, warmup_steps=0,
                 dtype="half")


def test_build_lm_is_seeded_and_fp32_attention_wrapping():
    config = model_config("bsbr", **TINY)
    a, b, c = build_lm("bsbr", config, 0), build_lm("bsbr", config, 0), build_lm("bsbr", config, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied head
    for name in FP32_ATTENTION:
        plain = build_lm(name, model_config(name, **TINY), 0)
        mixed = build_lm(name, model_config(name, **TINY), 0, dtype="bfloat16")
        ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
        assert torch.allclose(plain(ids).logits, mixed(ids).logits, atol=1e-6)  # wrapper changes nothing in fp32


def _train(name, steps=30, seed=0, dtype="float32"):
    stream = encode_bytes([TEXT])
    windows = evaluation_windows(stream, 32, 4)
    return train_lm(name, model_config(name, **TINY), stream, windows, steps=steps, batch_size=4, seq_len=32,
                    learning_rate=1e-2, warmup_steps=3, eval_interval=10, seed=seed, dtype=dtype)


def test_train_lm_records_and_the_loss_decreases():
    run = _train("bsbr")
    assert [row["step"] for row in run.history] == list(range(1, 31))
    assert [row["step"] for row in run.evals] == [0, 10, 20, 30]
    assert run.history[-1]["tokens"] == 30 * 4 * 32 and run.evals[-1]["tokens"] == 30 * 4 * 32
    elapsed = [row["elapsed_s"] for row in run.history]
    assert all(b > a for a, b in zip(elapsed, elapsed[1:])) and run.train_seconds == pytest.approx(elapsed[-1])
    assert run.tokens_per_s == pytest.approx(30 * 4 * 32 / run.train_seconds)
    assert run.evals[0]["val_loss"] == pytest.approx(math.log(256), abs=0.3)  # near-uniform at initialisation
    assert run.evals[-1]["val_loss"] < run.evals[0]["val_loss"] - 1.0  # a repeated sentence is easy to learn
    first, last = run.history[:5], run.history[-5:]
    assert sum(r["train_loss"] for r in last) < sum(r["train_loss"] for r in first)
    for row in run.evals:
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2))
    assert run.params == sum(p.numel() for p in build_lm("bsbr", model_config("bsbr", **TINY)).parameters())


def test_train_lm_is_deterministic_per_seed_and_evaluate_matches():
    a, b, c = _train("linear", steps=10), _train("linear", steps=10), _train("linear", steps=10, seed=1)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert [r["val_loss"] for r in a.evals] == [r["val_loss"] for r in b.evals]
    assert a.history[0]["train_loss"] != c.history[0]["train_loss"]
    stream = encode_bytes([TEXT])
    lm = build_lm("linear", model_config("linear", **TINY), 0)
    windows = evaluation_windows(stream, 32, 4)
    assert evaluate(lm, windows, batch_size=3) == pytest.approx(a.evals[0]["val_loss"], rel=1e-6)
    assert lm.training  # evaluate restores the mode


def test_hopfield_with_defaults_trains_exactly_like_standard():
    hop, std = _train("hopfield", steps=10), _train("standard", steps=10)
    for x, y in zip(hop.evals, std.evals):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-4)


@pytest.mark.parametrize("name", ["delta_net", "gau", "bsbr"])
def test_bfloat16_mixed_precision_runs(name):
    run = _train(name, steps=10, dtype="bfloat16")
    assert all(math.isfinite(r["train_loss"]) for r in run.history)
    assert run.evals[-1]["val_loss"] < run.evals[0]["val_loss"]


def test_train_lm_rejects_bad_arguments():
    stream, windows = encode_bytes([TEXT]), torch.zeros(2, 8, dtype=torch.long)
    config = model_config("standard", **TINY)
    for kwargs, word in ((dict(warmup_steps=5, steps=5), "warmup_steps"), (dict(learning_rate=0), "learning_rate"),
                         (dict(grad_clip=-1.0), "grad_clip"), (dict(weight_decay=-0.1), "weight_decay"),
                         (dict(steps=0), "steps"), (dict(seq_len=10_000), "seq_len")):
        args = {**dict(steps=5, batch_size=2, seq_len=8, warmup_steps=1), **kwargs}
        with pytest.raises(ValueError, match=word):
            train_lm("standard", config, stream, windows, **args)
    with pytest.raises(ValueError, match="val_windows"):
        train_lm("standard", config, stream, torch.zeros(2, 8), steps=2, batch_size=1, seq_len=8, warmup_steps=0)


def test_train_step_memory_in_a_fresh_process():
    config = model_config("standard", **TINY)
    rows = [measure_train_step_memory("standard", config, n, threads=1) for n in (512, 2048)]
    for row, n in zip(rows, (512, 2048)):
        assert row["seq_len"] == n and row["batch_size"] == 1 and row["threads"] == 1
        assert row["peak_bytes"] == row["peak_total_bytes"] - row["baseline_bytes"]
        assert row["baseline_bytes"] > 10 * 2**20  # at least the python + torch runtime
        params = sum(p.numel() for p in build_lm("standard", config).parameters())
        assert row["params"] == params and row["param_bytes"] == 4 * params
        assert row["grad_bytes"] == row["param_bytes"]  # one fp32 gradient per weight
        assert row["optimizer_state_bytes"] >= 2 * row["param_bytes"]  # AdamW exp_avg + exp_avg_sq (+ steps)
        assert math.isfinite(row["loss"])
    # activations grow with the length: 4x the tokens hold at least 2x the step's memory
    assert rows[1]["peak_bytes"] > 2 * rows[0]["peak_bytes"] > 0
    exponent, _, _ = fit_power_law([512, 2048], [r["peak_bytes"] for r in rows])
    assert 0.5 < exponent < 1.5  # fused causal attention: memory linear in the length
    with pytest.raises(ValueError, match="name must be one of"):
        measure_train_step_memory("nope", config, 16)
    with pytest.raises(ValueError, match="dtype"):
        measure_train_step_memory("standard", config, 16, dtype="int8")


# ----------------------------------------------------------------------------- n-gram floors

A, B, C = 97, 98, 99  # "a", "b", "c"


def test_ngram_probabilities_by_hand():
    """Stream "abab": unigram counts a 2, b 2 (N = 4); bigrams ab 2, ba 1 (contexts a 2, b 1); trigrams aba 1, bab 1."""
    model = ByteNgram(torch.tensor([A, B, A, B]), order=3)
    p1 = lambda count: (count + 256 / 256) / (4 + 256)  # alpha_1 = 256: one pseudo-count spread over the 256 bytes
    # window "aba": position 1 is b after a (bigram: only one byte of context), position 2 is a after "ab" (trigram)
    p2_b_a = (2 + 1 * p1(2)) / (2 + 1)  # alpha_2 = 1
    p2_a_b = (1 + 1 * p1(2)) / (1 + 1)
    p3_a_ab = (1 + 2 * p2_a_b) / (1 + 2)  # alpha_3 = 2
    nll = model.nll(torch.tensor([[A, B, A]]), [256, 1, 2])
    assert nll.shape == (1, 2)
    assert nll[0].tolist() == pytest.approx([-math.log(p2_b_a), -math.log(p3_a_ab)])
    # an unseen context falls back to the lower order exactly; an unseen byte keeps the smoothed mass
    assert model.nll(torch.tensor([[C, B]]), [256, 1, 2])[0, 0] == pytest.approx(-math.log(p1(2)))
    assert model.nll(torch.tensor([[A, C]]), [256, 1, 2])[0, 0] == pytest.approx(-math.log(1 * p1(0) / 3))
    # a bigram model on the same window: position 2 from its one byte of context
    bigram = ByteNgram(torch.tensor([A, B, A, B]), order=2)
    assert bigram.nll(torch.tensor([[A, B, A]]), [256, 1])[0].tolist() == pytest.approx(
        [-math.log(p2_b_a), -math.log(p2_a_b)])
    # probabilities over the 256 bytes sum to one at every position
    windows = torch.tensor([[A, B, x] for x in range(256)])
    assert np.exp(-model.nll(windows, [3.0, 0.5, 2.0])[:, 1]).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alphas"):
        model.nll(torch.tensor([[A, B]]), [1.0, 1.0])
    with pytest.raises(ValueError, match="alphas"):
        model.nll(torch.tensor([[A, B]]), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="windows"):
        model.nll(torch.tensor([A, B]), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="order"):
        ByteNgram(torch.tensor([A, B]), order=0)
    with pytest.raises(ValueError, match="stream"):
        ByteNgram(torch.tensor([A, B]), order=3)
    with pytest.raises(ValueError, match="stream"):
        ByteNgram(torch.tensor([0.5, 1.0]), order=1)


def test_ngram_floors_on_a_tiny_corpus():
    rng = np.random.default_rng(0)
    # each byte of "abc" is followed by the next with probability 0.9: a bigram model is far better than a unigram
    stream = [A]
    for _ in range(3000):
        stream.append(A + (stream[-1] - A + 1) % 3 if rng.random() < 0.9 else int(rng.integers(A, A + 3)))
    stream = torch.tensor(stream)
    windows = evaluation_windows(stream[2000:], 16, 8)
    grid = [0.1, 1.0, 10.0]
    rows = ngram_floors(stream[:2000], windows, orders=(1, 2, 3), alphas=grid, holdout_fraction=0.25)
    assert [r["name"] for r in rows] == ["unigram", "bigram", "trigram"]
    assert rows[0]["val_loss"] > rows[1]["val_loss"] + 0.5  # the bigram structure is learned
    assert rows[0]["val_loss"] == pytest.approx(math.log(3), abs=0.05)  # three bytes, nearly uniform
    assert all(r["scored"] == 8 * 15 and r["train_bytes"] == 2000 for r in rows)
    # each alpha is the grid value with the lowest loss on the held-out last quarter, counting on the rest
    head, tail = stream[:1500], stream[1500:2000][None, :]
    chosen = []
    for n in (1, 2, 3):
        model = ByteNgram(head, n)
        losses = [float(model.nll(tail, chosen + [a]).mean()) for a in grid]
        chosen.append(grid[int(np.argmin(losses))])
        assert rows[n - 1]["alpha"] == chosen[-1] and rows[n - 1]["holdout_loss"] == pytest.approx(min(losses))
    # the reported loss: counts on the whole training stream, scored on the windows' positions
    full = ByteNgram(stream[:2000], 3)
    assert rows[2]["val_loss"] == pytest.approx(float(full.nll(windows, chosen).mean()))
    assert rows[1]["val_ppl"] == pytest.approx(math.exp(rows[1]["val_loss"]))
    assert rows[1]["val_bpb"] == pytest.approx(rows[1]["val_loss"] / math.log(2))
    for kwargs, match in ((dict(orders=(0, 2)), "orders"), (dict(orders=(2, 2)), "orders"), (dict(alphas=[]), "alphas"),
                          (dict(alphas=[-1.0]), "alphas"), (dict(holdout_fraction=0.9), "holdout_fraction")):
        with pytest.raises(ValueError, match=match):
            ngram_floors(stream[:2000], windows, **kwargs)
    with pytest.raises(ValueError, match="val_windows"):
        ngram_floors(stream[:2000], stream[:10])


# ----------------------------------------------------------------------------- parameter matching


def test_matched_ff_dims_bring_every_count_within_the_tolerance():
    names = bsbr.available_models()
    sizes = dict(hidden_dim=16, num_layers=2, num_heads=2, ff_dim=128, chunk_size=8)
    matched = matched_ff_dims(names, **sizes)
    reference = parameter_count("standard", model_config("standard", **sizes))
    assert list(matched) == names
    for name, entry in matched.items():
        config = model_config(name, **{**sizes, "ff_dim": entry["ff_dim"]})
        assert entry["params"] == parameter_count(name, config) == sum(p.numel() for p in build_lm(name, config).parameters())
        assert entry["reference_params"] == reference
        assert abs(entry["params"] / reference - 1) <= 0.05 and entry["relative_difference"] == pytest.approx(
            entry["params"] / reference - 1)
        # the width is the best one: one unit more or less is not closer
        for other in (entry["ff_dim"] - 1, entry["ff_dim"] + 1):
            count = parameter_count(name, model_config(name, **{**sizes, "ff_dim": other}))
            assert abs(count - reference) >= abs(entry["params"] - reference), (name, other)
    assert matched["standard"]["ff_dim"] == 128 and matched["standard"]["relative_difference"] == 0
    # at the default sizes (unmatched: 116k-152k) the bigger layers get a narrower feed-forward block
    assert matched["gau"]["ff_dim"] < 128 and matched["bsbr"]["ff_dim"] < 128
    with pytest.raises(ValueError, match="tolerance"):
        matched_ff_dims(names, **sizes, tolerance=0)
    with pytest.raises(ValueError, match="ff_dim: gau cannot be matched"):
        matched_ff_dims(["gau"], **{**sizes, "ff_dim": 1})  # GAU's attention alone outweighs the reference
    with pytest.raises(ValueError, match="name must be one of"):
        matched_ff_dims(["nope"], **sizes)


def test_matched_ff_dim_takes_a_config_beyond_model_config():
    """BSBR with exact block retrieval: its config adds retrieval settings to model_config's; one width for it."""
    from bsbr.training import matched_ff_dim

    sizes = dict(hidden_dim=16, num_layers=2, num_heads=2, chunk_size=4, vocab_size=64)
    blocks = {"retrieval": "blocks", "block_size": 4, "top_k": 1, "summary": "minmax", "sink_size": 0}
    config_at = lambda width: {**model_config("bsbr", ff_dim=width, **sizes), **blocks}  # noqa: E731
    target = parameter_count("standard", model_config("standard", ff_dim=64, **sizes)) + 1000  # 1,000 above it
    entry = matched_ff_dim("bsbr", config_at, 64, target)
    assert entry["params"] == parameter_count("bsbr", config_at(entry["ff_dim"])) and entry["reference_params"] == target
    assert entry["ff_dim"] > 64 and abs(entry["relative_difference"]) <= 0.05
    for other in (entry["ff_dim"] - 1, entry["ff_dim"] + 1):
        assert abs(parameter_count("bsbr", config_at(other)) - target) >= abs(entry["params"] - target)
    assert matched_ff_dims(["bsbr"], ff_dim=64, **sizes)["bsbr"] == matched_ff_dim(
        "bsbr", lambda width: model_config("bsbr", ff_dim=width, **sizes), 64, entry["reference_params"] - 1000,
        reference="standard")  # the same rule for every architecture
    with pytest.raises(ValueError, match="ff_dim: bsbr cannot be matched to standard's 10 parameters"):
        matched_ff_dim("bsbr", config_at, 64, 10, reference="standard")
    with pytest.raises(ValueError, match="tolerance"):
        matched_ff_dim("bsbr", config_at, 64, target, tolerance=1.5)
