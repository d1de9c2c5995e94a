"""MQAR (bsbr.mqar): the generated layout, determinism, the locality fractions on a hand-made example, the state-size
formulas against the states the layers return, the training loop on a tiny run, and the intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bsbr
from bsbr.mqar import (IGNORE_INDEX, MQARData, ShortConvEmbedding, accuracy_interval, answer_distances,
                       build_mqar_lm, evaluate_mqar, multiquery_ar, outside_fraction, state_formula, state_size,
                       train_mqar, train_mqar_runs)
from bsbr.training import build_lm, model_config

N, L, V = 4, 64, 256


@pytest.fixture(scope="module")
def data() -> MQARData:
    return multiquery_ar(num_examples=300, seq_len=L, num_pairs=N, vocab_size=V, seed=0)


def test_pairs_first_keys_and_values_in_their_halves(data):
    inputs, labels = data
    assert inputs.shape == labels.shape == (300, L) and inputs.dtype == labels.dtype == torch.int64
    keys, values = inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in range(300):  # distinct keys and values in every example
        assert len(set(keys[row].tolist())) == N and len(set(values[row].tolist())) == N
    assert ((inputs >= 0) & (inputs < V)).all()
    assert (labels[:, :2 * N] == IGNORE_INDEX).all()  # nothing scored inside the pairs


def test_each_key_queried_once_after_the_pairs_labelled_with_its_value(data):
    inputs, labels = data
    for row in range(inputs.shape[0]):
        positions = torch.nonzero(labels[row] != IGNORE_INDEX).flatten()
        assert len(positions) == N
        assert (positions >= 2 * N).all() and ((positions - 2 * N) % 2 == 0).all()  # Zoology's query slots
        pairs = dict(zip(inputs[row, 0:2 * N:2].tolist(), inputs[row, 1:2 * N:2].tolist()))
        queried = inputs[row, positions].tolist()
        assert sorted(queried) == sorted(pairs)  # every key exactly once
        assert labels[row, positions].tolist() == [pairs[k] for k in queried]
    assert int((labels != IGNORE_INDEX).sum()) == 300 * N  # -100 everywhere else


def test_power_law_puts_most_queries_early():
    inputs, labels = multiquery_ar(2000, L, N, V, seed=3)
    slot = (torch.nonzero(labels != IGNORE_INDEX)[:, 1] - 2 * N) // 2  # gap g of every query, in [0, 28)
    assert int(slot.min()) == 0 and int(slot.max()) <= (L - 2 * N) // 2 - 1
    counts = torch.bincount(slot, minlength=(L - 2 * N) // 2).double()
    # p(g) ∝ (g+1)^-0.99 without replacement: the first slots are the most frequent, the last the rarest
    assert counts[0] > counts[5] > counts[-1]
    assert counts[:7].sum() / counts.sum() > 0.4
    uniform = multiquery_ar(2000, L, N, V, seed=3, power_a=1.0)
    slot_u = (torch.nonzero(uniform.labels != IGNORE_INDEX)[:, 1] - 2 * N) // 2
    assert abs(slot_u.double().mean().item() - 13.5) < 0.6  # uniform over 28 slots: mean 13.5


def test_same_seed_same_data_other_seed_other_data(data):
    again = multiquery_ar(300, L, N, V, seed=0)
    assert torch.equal(again.inputs, data.inputs) and torch.equal(again.labels, data.labels)
    other = multiquery_ar(300, L, N, V, seed=1)
    assert not torch.equal(other.inputs, data.inputs)
    assert (other.inputs != data.inputs).double().mean() > 0.9


def test_answer_distances_and_outside_fraction_by_hand():
    # seq 16, 2 pairs: keys 3, 5 at 0 and 2, values 9, 12 at 1 and 3; key 5 queried at 4, key 3 at 12
    inputs = torch.tensor([[3, 9, 5, 12, 5, 0, 1, 2, 7, 7, 7, 7, 3, 1, 1, 1]])
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[0, 4], labels[0, 12] = 12, 9
    rows = answer_distances(inputs, labels, num_pairs=2)
    assert rows.tolist() == [[4, 3, 1], [12, 1, 11]]
    # chunk 4: value 3 (chunk 0) vs query 4 (chunk 1): outside; value 1 vs query 12: outside
    assert outside_fraction(inputs, labels, 2, span=4, kind="chunk") == 1.0
    # chunk 8: both queries 4 and its value 3 in chunk 0 (inside); query 12 in chunk 1 (outside)
    assert outside_fraction(inputs, labels, 2, span=8, kind="chunk") == 0.5
    assert outside_fraction(inputs, labels, 2, span=16, kind="chunk") == 0.0
    # window w sees distance <= w - 1: distances 1 and 11
    assert outside_fraction(inputs, labels, 2, span=2, kind="window") == 0.5  # 1 <= 1 inside, 11 outside
    assert outside_fraction(inputs, labels, 2, span=1, kind="window") == 1.0
    assert outside_fraction(inputs, labels, 2, span=11, kind="window") == 0.5
    assert outside_fraction(inputs, labels, 2, span=12, kind="window") == 0.0
    # own and previous chunk (block retrieval's local region): chunk 4: value 3 (chunk 0) for query 4 (chunk 1)
    # inside, value 1 (chunk 0) for query 12 (chunk 3) outside; chunk 8: both inside; chunk 2: both outside
    assert outside_fraction(inputs, labels, 2, span=4, kind="own_and_previous") == 0.5
    assert outside_fraction(inputs, labels, 2, span=8, kind="own_and_previous") == 0.0
    assert outside_fraction(inputs, labels, 2, span=2, kind="own_and_previous") == 0.5  # 3//2=1 vs 4//2=2: inside
    assert outside_fraction(inputs, labels, 2, span=1, kind="own_and_previous") == 0.5  # token 3 is the previous


def test_outside_fraction_of_generated_data_with_chunk_of_the_pairs(data):
    # the 2N = 8 pair tokens fill chunk 0 of an 8-token chunk and every query comes later: all outside
    assert outside_fraction(*data, N, span=8, kind="chunk") == 1.0
    assert outside_fraction(*data, N, span=L, kind="chunk") == 0.0
    distances = answer_distances(*data, N)[:, 2]
    for w in (4, 8, 16):
        assert outside_fraction(*data, N, span=w, kind="window") == pytest.approx(
            (distances > w - 1).double().mean().item())


CONFIG = dict(vocab_size=V, hidden_dim=32, num_layers=2, num_heads=2, ff_dim=64)
SETTINGS = {"bsbr": {"chunk_size": 8}, "linear": {"chunk_size": 8}, "delta_net": {"chunk_size": 8},
            "sliding_window": {"window_size": 8}, "gau": {"chunk_size": 8, "qk_dim": 16}, "standard": {},
            "hopfield": {}}


@pytest.mark.parametrize("name", bsbr.available_models())
@pytest.mark.parametrize("seq_len", [5, 16, 21])
def test_state_size_equals_the_states_the_layers_return(name, seq_len):
    config = {**CONFIG, **SETTINGS[name]}
    model = bsbr.build_model(name, **config).eval()
    ids = torch.randint(0, V, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, states = model(ids, return_state=True)
    assert len(states) == config["num_layers"]
    kept = sum(state.nbytes() for state in states)  # float32 tensors the model keeps to continue the sequence
    assert state_size(name, config, seq_len) * 4 == kept
    assert isinstance(state_formula(name), str) and state_formula(name)


@pytest.mark.parametrize("summary", ["minmax", "mean"])
@pytest.mark.parametrize("seq_len", [5, 16, 21])
def test_state_size_of_block_retrieval_equals_the_states_the_layers_return(summary, seq_len):
    config = {**CONFIG, "chunk_size": 8, "retrieval": "blocks", "block_size": 4, "top_k": 1, "summary": summary}
    model = bsbr.build_model("bsbr", **config).eval()
    ids = torch.randint(0, V, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, states = model(ids, return_state=True)
    assert state_size("bsbr", config, seq_len) * 4 == sum(state.nbytes() for state in states)
    # at the experiment's sizes (D 64, H 4, d 16, L 64, blocks of 4, minmax): attention's KV cache + the summaries
    sizes = dict(hidden_dim=64, num_heads=4, num_layers=2, chunk_size=4, retrieval="blocks", block_size=4, summary=summary)
    parts = 2 if summary == "minmax" else 1
    assert state_size("bsbr", sizes, 64) == state_size("standard", sizes, 64) + 2 * 4 * 16 * parts * 16
    assert "2·L·D" in state_formula("bsbr", "blocks") and state_formula("bsbr") != state_formula("bsbr", "blocks")
    with pytest.raises(ValueError, match="retrieval"):
        state_formula("linear", "blocks")


def test_state_size_values_at_the_experiment_sizes():
    config = dict(hidden_dim=64, num_heads=4, num_layers=2)  # d = 16
    assert state_size("standard", config, 64) == 2 * (2 * 64 * 64)
    assert state_size("sliding_window", {**config, "window_size": 8}, 64) == 2 * (2 * 7 * 64)
    assert state_size("linear", config, 64) == 2 * 4 * (16 * 16 + 16)
    assert state_size("delta_net", config, 64) == 2 * 4 * 16 * 16
    # 8 finished chunks of 8, nothing partial: 4·8·(256+16) + 4·256 + 0 + 64 per layer
    assert state_size("bsbr", {**config, "chunk_size": 8}, 64) == 2 * (4 * 8 * 272 + 4 * 256 + 64)
    assert state_size("bsbr", {**config, "chunk_size": 8, "compression_factor": 4}, 64) == 2 * (
        4 * 8 * (64 + 16) + 4 * 256 + 64)
    assert state_size("gau", {**config, "chunk_size": 8}, 64) == 2 * 128 * 128  # qk_dim 128, E = 2·64


def test_state_size_counts_the_short_convolution_once():
    config = dict(hidden_dim=64, num_heads=4, num_layers=2)
    assert state_size("linear", config, 64, short_conv=3) == state_size("linear", config, 64) + 2 * 64
    assert state_size("standard", config, 1, short_conv=3) == state_size("standard", config, 1) + 1 * 64


def test_short_conv_embedding_is_causal_and_sees_kernel_size_tokens():
    torch.manual_seed(0)
    layer = ShortConvEmbedding(torch.nn.Embedding(50, 8), kernel_size=3)
    with torch.no_grad():
        layer.conv.weight.normal_()  # make the mixing visible
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 5] = (ids[:, 5] + 1) % 50
    diff = (layer(changed) - layer(ids)).abs().amax(dim=(0, 2))  # [12]: which positions moved
    assert (diff[:5] == 0).all() and (diff[5:8] > 0).all() and (diff[8:] == 0).all()  # t sees t-2..t
    # the first position sees only itself: the plain embedding plus w_0 ⊙ e_0 + bias
    expected = layer.tokens(ids)[:, 0] * (1 + layer.conv.weight[:, 0, -1]) + layer.conv.bias
    assert torch.allclose(layer(ids)[:, 0], expected, atol=1e-6)


def test_build_mqar_lm_keeps_the_tied_head_and_the_plain_model_without_the_convolution():
    config = model_config("bsbr", 32, 2, 2, 64, 8, vocab_size=V)
    plain, conv = build_mqar_lm("bsbr", config, seed=3, short_conv=0), build_mqar_lm("bsbr", config, seed=3)
    reference = build_lm("bsbr", config, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), reference.state_dict().values()))
    assert isinstance(conv.model.embed_tokens, ShortConvEmbedding)
    assert conv.lm_head.weight is conv.model.embed_tokens.tokens.weight  # still tied
    assert torch.equal(conv.model.embed_tokens.weight, reference.model.embed_tokens.weight)  # same draws first
    extra = sum(p.numel() for p in conv.parameters()) - sum(p.numel() for p in reference.parameters())
    assert extra == 32 * 3 + 32  # depthwise kernel 3 and bias
    with pytest.raises(ValueError, match="short_conv"):
        build_mqar_lm("bsbr", config, short_conv=1)


def test_bad_arguments_raise_naming_them(data):
    for kwargs, word in ((dict(seq_len=63), "seq_len"), (dict(num_pairs=17), "num_pairs"),
                         (dict(vocab_size=8), "vocab_size"), (dict(num_examples=0), "num_examples"),
                         (dict(power_a=0.0), "power_a"), (dict(seed=-1), "seed"), (dict(num_pairs=True), "num_pairs")):
        base = dict(num_examples=4, seq_len=L, num_pairs=N, vocab_size=V, seed=0)
        with pytest.raises(ValueError, match=word):
            multiquery_ar(**{**base, **kwargs})
    with pytest.raises(ValueError, match="span"):
        outside_fraction(*data, N, span=0)
    with pytest.raises(ValueError, match="kind"):
        outside_fraction(*data, N, span=8, kind="block")
    with pytest.raises(ValueError, match="labels"):
        answer_distances(data.inputs, data.labels[:, :10], N)
    with pytest.raises(ValueError, match="inputs"):
        answer_distances(data.inputs.float(), data.labels, N)
    with pytest.raises(ValueError, match="name"):
        state_size("mamba", dict(hidden_dim=64, num_heads=4, num_layers=2), 64)
    with pytest.raises(ValueError, match="config"):
        state_size("standard", dict(hidden_dim=64), 64)
    with pytest.raises(ValueError, match="seq_len"):
        state_size("standard", dict(hidden_dim=64, num_heads=4, num_layers=2), -1)
    config = model_config("standard", 32, 1, 2, 64, 8, vocab_size=V)
    small = multiquery_ar(8, 16, 2, V, seed=0)
    with pytest.raises(ValueError, match="learning_rate"):
        train_mqar("standard", config, small, small, steps=2, batch_size=4, learning_rate=0.0, warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        train_mqar("standard", config, small, small, steps=2, batch_size=4, learning_rate=1e-3, warmup_steps=2)
    with pytest.raises(ValueError, match="batch_size"):
        train_mqar("standard", config, small, small, steps=2, batch_size=16, learning_rate=1e-3, warmup_steps=0)
    with pytest.raises(ValueError, match="vocab_size"):
        train_mqar("standard", {**config, "vocab_size": 100}, small, small, steps=2, batch_size=4,
                   learning_rate=1e-3, warmup_steps=0)
    with pytest.raises(ValueError, match="accuracies"):
        accuracy_interval([1.2])
    with pytest.raises(ValueError, match="together"):
        accuracy_interval([0.5], correct=3)


def test_training_learns_a_tiny_recall_task_and_evaluation_counts_answers():
    torch.set_num_threads(1)
    # 2 pairs in 16 tokens, vocabulary 32: full attention learns it in a few hundred small steps
    train = multiquery_ar(4096, 16, 2, 32, seed=1)
    validation = multiquery_ar(128, 16, 2, 32, seed=2)
    config = model_config("standard", 32, 2, 2, 64, 8, vocab_size=32)
    run = train_mqar("standard", config, train, validation, steps=250, batch_size=32, learning_rate=1e-2,
                     warmup_steps=10, eval_interval=125, seed=0)
    assert [h["step"] for h in run.history] == [125, 250]
    assert run.val_answers == 128 * 2
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]
    assert run.val_accuracy > 0.5  # chance is 1/16 among the values (1/32 over the vocabulary)
    correct, answers, loss = evaluate_mqar(run.model, *validation)
    assert (correct, answers) == (run.val_correct, run.val_answers) and loss < math.log(32)
    # evaluate_mqar counts argmax hits at the answers only: recomputed by hand
    with torch.no_grad():
        logits = run.model(validation.inputs).logits
    scored = validation.labels != IGNORE_INDEX
    assert correct == int((logits.argmax(-1)[scored] == validation.labels[scored]).sum())
    # same seed, same run; another seed, other weights
    short = [train_mqar("standard", config, train, validation, steps=20, batch_size=32, learning_rate=1e-2,
                        warmup_steps=2, eval_interval=10, seed=seed) for seed in (0, 0, 1)]
    assert short[0].history == [{**h, "elapsed_s": short[0].history[i]["elapsed_s"]}
                                for i, h in enumerate(short[1].history)]
    assert short[2].history[0]["train_loss"] != short[0].history[0]["train_loss"]


def test_accuracy_interval_t_over_seeds_and_wilson_over_answers():
    from scipy import stats

    result = accuracy_interval([0.5, 0.6, 0.7], correct=180, answers=300)
    half = stats.t.ppf(0.975, 2) * np.std([0.5, 0.6, 0.7], ddof=1) / math.sqrt(3)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["ci_low"] == pytest.approx(0.6 - half) and result["ci_high"] == pytest.approx(0.6 + half)
    assert result["n_seeds"] == 3 and result["answers"] == 300
    assert result["wilson_low"] == pytest.approx(0.5436, abs=1e-4) and result["wilson_high"] == pytest.approx(
        0.6539, abs=1e-4)
    clipped = accuracy_interval([1.0, 0.98, 0.9])  # a t interval past 1 is clipped to [0, 1]
    assert clipped["ci_high"] == 1.0 and clipped["ci_low"] < 0.96
    single = accuracy_interval([0.25])
    assert single["accuracy"] == 0.25 and math.isnan(single["ci_low"]) and math.isnan(single["ci_high"])


def test_runs_side_by_side_in_worker_processes_equal_the_runs_one_after_another():
    V = 32
    train, validation = multiquery_ar(256, 16, 2, V, seed=1), multiquery_ar(32, 16, 2, V, seed=2)
    jobs = [dict(name=name, config=model_config(name, 32, 1, 2, 64, 8, vocab_size=V), steps=6, batch_size=16,
                 learning_rate=1e-2, warmup_steps=1, eval_interval=3, seed=seed)
            for name, seed in (("standard", 0), ("bsbr", 1), ("standard", 2))]
    threads = torch.get_num_threads()
    serial = train_mqar_runs(jobs, train, validation, workers=1, threads=1)
    assert torch.get_num_threads() == threads  # restored
    parallel = train_mqar_runs(jobs, train, validation, workers=2, threads=1)
    assert [(r.name, r.seed) for r in parallel] == [("standard", 0), ("bsbr", 1), ("standard", 2)]  # job order
    for a, b in zip(serial, parallel):
        drop = lambda history: [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]
        assert drop(a.history) == drop(b.history) and a.val_correct == b.val_correct and a.params == b.params
        state_a, state_b = a.model.state_dict(), b.model.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert serial[0].history != serial[2].history  # the seed matters: the comparison above can fail
    with pytest.raises(ValueError, match="workers"):
        train_mqar_runs(jobs, train, validation, workers=0)
    with pytest.raises(ValueError, match=r"jobs\[0\]"):
        train_mqar_runs([{**jobs[0], "train": train}], train, validation)
    with pytest.raises(RuntimeError, match="learning_rate"):  # a run's error reaches the caller, naming the run
        train_mqar_runs([jobs[0], {**jobs[1], "learning_rate": 0.0}], train, validation, workers=2)
