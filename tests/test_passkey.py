"""bsbr.passkey: trials, scoring, accuracy tables and estimates of the passkey notebook, with a character tokenizer and
stub models (no checkpoint needed)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from bsbr.analysis import wilson_interval
from bsbr.masks import band_mask
from bsbr.passkey import (VARIANTS, accuracy_table, answer_logits, check_passkey_parameters, format_accuracy,
                          full_profile_estimate, passkey_trials, retrieval_verdict, score_trial, summarize_trials,
                          token_stream, trial_stride)


class CharTokenizer:
    """One token per character (its code point); EOS = 0."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


DOCS = [{"text": "abc"}, {"text": "de"}]


def test_token_stream_joins_documents_with_eos():
    assert token_stream(CharTokenizer(), DOCS).tolist() == [97, 98, 99, 0, 100, 101, 0]
    with pytest.raises(ValueError):
        token_stream(CharTokenizer(), [])


def test_trial_stride_spreads_trials_and_refuses_a_short_stream():
    assert trial_stride(1000, 100, 3) == 100  # (1000 - 100) // 2 = 450, capped at the length
    assert trial_stride(250, 100, 4) == 50
    assert trial_stride(150, 100, 1) == 50
    with pytest.raises(ValueError, match="too short for 3 trials of 100 tokens"):
        trial_stride(101, 100, 3)


def test_passkey_trials_are_seeded_placed_and_distinct():
    stream = torch.arange(1, 2001) % 90 + 33  # printable characters, no EOS
    samples = passkey_trials(CharTokenizer(), stream, [200], [0.0, 1.0], 2, seed=0)
    assert [(s["length"], s["depth"], s["trial"]) for s in samples] == [(200, 0.0, 0), (200, 0.0, 1), (200, 1.0, 0),
                                                                       (200, 1.0, 1)]
    again = passkey_trials(CharTokenizer(), stream, [200], [0.0, 1.0], 2, seed=0)
    assert [s["passkey"] for s in samples] == [s["passkey"] for s in again]
    assert all(len(s["passkey"]) == 5 and s["input_ids"].shape == (200,) for s in samples)
    assert samples[0]["fact_start"] == 0 and samples[2]["fact_start"] > 100  # depth 0: first; depth 1: last
    answer = samples[1]
    assert CharTokenizer().decode(answer["answer_ids"]).strip() == answer["passkey"]
    # trial 1's filler starts one stride (capped at 200 tokens) later in the stream
    assert answer["input_ids"][answer["fact_end"]].item() == stream[200].item()


def test_score_trial_exact_match_logprob_and_visibility():
    sample = {"length": 16, "depth": 0.5, "trial": 0, "passkey": "12345", "fact_start": 4, "fact_end": 6,
              "answer_start": 14, "input_ids": torch.tensor([1] * 14 + [3, 5])}
    logits = torch.full((1, 3, 8), -30.0)
    logits[0, 0, 3] = logits[0, 1, 5] = 0.0  # predicts 3 at position 13 and 5 at 14: exact
    row = score_trial(sample, "calibrated", logits, chunk_size=8, sink_size=0, window=4, window_sinks=0)
    assert row["correct"] and row["answer_logprob"] == pytest.approx(0.0, abs=1e-10)
    assert row["fact_visible_own_chunk"] is False  # fact in chunk 0, the query (13) in chunk 1
    assert row["fact_visible_window"] is False  # 13 - 4 >= 4
    assert score_trial(sample, "x", logits, 16, 0, 10, 0)["fact_visible_own_chunk"] is True
    assert score_trial(sample, "x", logits, 8, 6, 4, 0)["fact_visible_own_chunk"] is True  # fact inside the sinks
    assert score_trial(sample, "x", logits, 8, 0, 4, 6)["fact_visible_window"] is True
    wrong = logits.clone()
    wrong[0, 1, 5], wrong[0, 1, 6] = -30.0, 0.0
    row = score_trial(sample, "x", wrong, 8, 0, 4, 0)
    assert not row["correct"] and row["answer_logprob"] == pytest.approx(-30.0, abs=1e-9)


def test_accuracy_table_wilson_and_formatting():
    trials = pd.DataFrame({"length": [512] * 4, "variant": ["a", "a", "a", "b"], "correct": [True, True, False, False],
                           "answer_logprob": [-1.0, -2.0, -3.0, -4.0], "fact_visible_own_chunk": [True, False, False, True],
                           "fact_visible_window": [False] * 4})
    table = accuracy_table(trials, ["length", "variant"])
    assert table.variant.tolist() == ["a", "b"] and table.trials.tolist() == [3, 1] and table.correct.tolist() == [2, 0]
    assert table.trials.dtype.kind == "i"
    a = table.iloc[0]
    assert a.accuracy == pytest.approx(2 / 3) and (a.ci_low, a.ci_high) == pytest.approx(wilson_interval(2, 3))
    assert a.mean_answer_logprob == -2.0 and a.fact_visible_own_chunk == pytest.approx(1 / 3)
    assert format_accuracy(a) == f"0.67 [{a.ci_low:.2f}, {a.ci_high:.2f}] (2/3)"


def far(accuracies, trials=10):
    rows = {v: summarize_trials(pd.DataFrame({"correct": [i < round(acc * trials) for i in range(trials)],
                                              "answer_logprob": [0.0] * trials, "fact_visible_own_chunk": [False] * trials,
                                              "fact_visible_window": [False] * trials}))
            for v, acc in accuracies.items()}
    return pd.DataFrame(rows).T


def test_retrieval_verdict_three_outcomes():
    assert retrieval_verdict(far({"calibrated": 0.8, "original": 0.9, "own_chunk": 0.0}))[0].startswith(
        "retrieves the fact about as well")
    verdict, baseline = retrieval_verdict(far({"calibrated": 0.4, "original": 1.0, "own_chunk": 0.0,
                                               "sliding_window": 0.0}))
    assert verdict == "recovers part of the original's retrieval" and baseline == 0.0
    assert retrieval_verdict(far({"calibrated": 0.1, "original": 1.0, "own_chunk": 0.1}))[0].startswith("does not")


def test_full_profile_estimate_extrapolates_with_the_last_two_lengths():
    times = pd.DataFrame({"length": [100, 100, 200], "variant": ["a", "b", "a"], "median_s": [1.0, 1.0, 8.0]})
    estimate, total = full_profile_estimate(times, {"lengths": [100, 400], "depths": [0.5], "trials": 2})
    assert estimate == {100: 2.0, 400: pytest.approx(32.0)}  # 2 -> 8 s from 100 to 200: exponent 2
    assert total == pytest.approx(2 * (2.0 + 32.0))
    one = pd.DataFrame({"length": [100], "variant": ["a"], "median_s": [3.0]})
    assert full_profile_estimate(one, {"lengths": [300], "depths": [0.1, 0.2], "trials": 1})[0] == {300: 9.0}


def test_check_passkey_parameters_names_the_bad_one():
    check_passkey_parameters("validation", [64], [0.0, 1], list(VARIANTS), True)
    for args, match in ((("train", [64], [0.5], ["original"], True), "split"),
                        (("test", [63], [0.5], ["original"], True), "lengths"),
                        (("test", [64], [1.5], ["original"], True), "depths"),
                        (("test", [64], [0.5], ["original", "original"], True), "variants"),
                        (("test", [64], [0.5], ["original"], 1), "check_generate")):
        with pytest.raises(ValueError, match=match):
            check_passkey_parameters(*args)


class Stub(nn.Module):
    """A causal LM stand-in: ``model(input_ids, attention_mask)`` records the mask; hidden = ids as floats."""

    def __init__(self):
        super().__init__()
        self.masks = []
        stub = self

        class Inner(nn.Module):
            def forward(self, input_ids, attention_mask=None):
                stub.masks.append(attention_mask)
                return type("Out", (), {"last_hidden_state": input_ids[..., None].float()})

        self.model = Inner()
        self.lm_head = nn.Identity()


def test_answer_logits_runs_the_variant_s_model_and_mask(monkeypatch):
    switched = []
    monkeypatch.setattr("bsbr.passkey.set_retrieval", lambda model, enabled: switched.append((model, enabled)))
    base, calibrated = Stub(), Stub()
    x = torch.arange(10)[None]
    out = answer_logits("sliding_window", x, 3, base, calibrated, window=4, window_sinks=2)
    assert out[0, :, 0].tolist() == [7.0, 8.0, 9.0]  # the last 3 positions only
    assert torch.equal(base.masks[-1], band_mask(10, 4, 2))
    answer_logits("original", x, 3, base, calibrated, 4, 2)
    assert base.masks[-1] is None and not calibrated.masks
    answer_logits("own_chunk", x, 1, base, calibrated, 4, 2)
    answer_logits("calibrated", x, 1, base, calibrated, 4, 2)
    assert calibrated.masks == [None, None] and switched == [(calibrated, False), (calibrated, True)]
