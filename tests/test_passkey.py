"""bsbr.passkey: variants, trials, scoring, accuracy tables, goals and estimates of the passkey notebook, with a
character tokenizer, stub models and the tiny random Llama (no checkpoint needed)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from torch import nn

from bsbr.analysis import wilson_interval
from bsbr.convert import add_lora, converted_copy, save_conversion, save_lora
from bsbr.convert.base import converted_layers
from bsbr.convert.checkpoint import conversion_settings
from bsbr.masks import band_mask
from bsbr.passkey import (FULL_PROFILE, GOALS, VARIANTS, accuracy_table, answer_logits, attended_tokens,
                          build_variant, check_passkey_parameters, filler_starts, format_accuracy, goal_verdicts,
                          headline_table, out_of_reach, passkey_trials, profile_seconds, reach_settings, score_trial,
                          summarize_trials, token_stream, trials_for_half_width, variant_mask)
from bsbr.analysis import PASSKEY_TEMPLATES
from tests.conftest import tiny_llama, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_filler_starts_spread_every_cell_over_the_stream_trial_major():
    starts = filler_starts(1000, [100, 200], [0.0, 1.0], 2)  # 8 cells, (1000 - 200) // 7 = 114 tokens apart
    assert starts == {(100, 0.0, 0): 0, (100, 1.0, 0): 114, (200, 0.0, 0): 228, (200, 1.0, 0): 342,
                      (100, 0.0, 1): 456, (100, 1.0, 1): 570, (200, 0.0, 1): 684, (200, 1.0, 1): 798}
    assert max(starts.values()) + 200 <= 1000  # the longest cell fits after the last start
    assert filler_starts(300, [300], [0.5], 1) == {(300, 0.5, 0): 0}
    with pytest.raises(ValueError, match="too short for 8 cells of up to 200 tokens"):
        filler_starts(206, [100, 200], [0.0, 1.0], 2)
    with pytest.raises(ValueError, match="too short"):
        filler_starts(199, [200], [0.5], 1)


def test_filler_starts_and_passkey_trials_take_a_trial_count_per_length():
    starts = filler_starts(1000, [100, 200], [0.0, 1.0], 2, {200: 1})  # 6 cells, (1000 - 200) // 5 = 160 apart
    assert starts == {(100, 0.0, 0): 0, (100, 1.0, 0): 160, (200, 0.0, 0): 320, (200, 1.0, 0): 480,
                      (100, 0.0, 1): 640, (100, 1.0, 1): 800}
    assert filler_starts(1000, [100, 200], [0.0, 1.0], 2, {}) == filler_starts(1000, [100, 200], [0.0, 1.0], 2)
    stream = torch.arange(1, 4001) % 90 + 33
    samples = passkey_trials(CharTokenizer(), stream, [100, 200], [0.0, 1.0], 2, seed=0, trials_at={200: 3})
    assert [(s["length"], s["depth"], s["trial"]) for s in samples] == (
        [(100, d, t) for d in (0.0, 1.0) for t in range(2)] + [(200, d, t) for d in (0.0, 1.0) for t in range(3)])
    plain = passkey_trials(CharTokenizer(), stream, [100, 200], [0.0, 1.0], 2, seed=0)
    assert [s["passkey"] for s in samples[:4]] == [s["passkey"] for s in plain[:4]]  # drawn in the same order
    repeated = passkey_trials(CharTokenizer(), None, [600, 700], [0.5], 2, seed=0, task="passkey", trials_at={700: 1})
    assert [(s["length"], s["trial"], s["filler_start"]) for s in repeated] == [(600, 0, None), (600, 1, None),
                                                                                (700, 0, None)]
    for bad in ({300: 1}, {200: 0}, {200: True}, {200: 1.5}):
        with pytest.raises(ValueError, match="trials_at must map lengths"):
            passkey_trials(CharTokenizer(), stream, [100, 200], [0.0], 1, seed=0, trials_at=bad)


def test_passkey_trials_start_elsewhere_per_cell_and_are_deterministic_by_seed():
    stream = torch.arange(1, 4001) % 90 + 33  # printable characters, no EOS
    samples = passkey_trials(CharTokenizer(), stream, [200], [0.0, 1.0], 2, seed=0)
    assert [(s["length"], s["depth"], s["trial"]) for s in samples] == [(200, 0.0, 0), (200, 0.0, 1), (200, 1.0, 0),
                                                                       (200, 1.0, 1)]
    starts = [s["filler_start"] for s in samples]
    assert starts == [0, 2 * 1266, 1266, 3 * 1266]  # (4000 - 200) // 3 = 1266; trial-major numbering
    for s in samples:  # depth 1: the filler comes first, from the cell's own start
        if s["depth"] == 1.0:
            assert torch.equal(s["input_ids"][:10], stream[s["filler_start"]: s["filler_start"] + 10])
    again = passkey_trials(CharTokenizer(), stream, [200], [0.0, 1.0], 2, seed=0)
    for a, b in zip(samples, again):
        assert a["passkey"] == b["passkey"] and torch.equal(a["input_ids"], b["input_ids"])
    other = passkey_trials(CharTokenizer(), stream, [200], [0.0, 1.0], 2, seed=1)
    assert [s["passkey"] for s in other] != [s["passkey"] for s in samples]
    assert [s["filler_start"] for s in other] == starts  # the seed draws the passkeys, the geometry the starts
    assert all(len(s["passkey"]) == 5 and s["input_ids"].shape == (200,) for s in samples)
    assert samples[0]["fact_start"] == 0 and samples[2]["fact_start"] > 100  # depth 0: first; depth 1: last
    answer = samples[1]
    assert CharTokenizer().decode(answer["answer_ids"]).strip() == answer["passkey"]
    assert answer["input_ids"][answer["fact_end"]].item() == stream[answer["filler_start"]].item()


def sample_at(fact_start, fact_end, answer_start=14, length=16):
    return {"length": length, "depth": 0.5, "trial": 0, "passkey": "12345", "filler_start": 7, "fact_start": fact_start,
            "fact_end": fact_end, "answer_start": answer_start, "input_ids": torch.tensor([1] * 14 + [3, 5])}


def test_score_trial_exact_match_logprob_and_visibility():
    sample = sample_at(4, 6)
    logits = torch.full((1, 3, 8), -30.0)
    logits[0, 0, 3] = logits[0, 1, 5] = 0.0  # predicts 3 at position 13 and 5 at 14: exact
    row = score_trial(sample, "blocks_minmax", logits, chunk_size=8, sink_size=0, window=4, window_sinks=0)
    assert row["correct"] and row["answer_logprob"] == pytest.approx(0.0, abs=1e-10)
    assert row["filler_start"] == 7
    assert row["fact_visible_own_chunk"] is False  # fact in chunk 0, the query (13) in chunk 1
    assert row["fact_visible_exact_region"] is True  # chunk 1's region starts at L_1 = 0
    assert row["fact_visible_window"] is False  # 13 - 4 >= 4
    assert score_trial(sample, "x", logits, 16, 0, 10, 0)["fact_visible_own_chunk"] is True
    assert score_trial(sample, "x", logits, 8, 6, 4, 0)["fact_visible_own_chunk"] is True  # fact inside the sinks
    assert score_trial(sample, "x", logits, 8, 0, 4, 6)["fact_visible_window"] is True
    # chunk 4: query 13 is in chunk 3, its region starts at L_3 = 8: a fact at 4 is out of it unless in the sinks
    assert score_trial(sample, "x", logits, 4, 0, 4, 0)["fact_visible_exact_region"] is False
    assert score_trial(sample, "x", logits, 4, 6, 4, 0)["fact_visible_exact_region"] is True
    assert score_trial(sample_at(8, 10), "x", logits, 4, 0, 4, 0)["fact_visible_exact_region"] is True  # at L_3
    assert score_trial(sample_at(7, 9), "x", logits, 4, 0, 4, 0)["fact_visible_exact_region"] is False  # one before
    wrong = logits.clone()
    wrong[0, 1, 5], wrong[0, 1, 6] = -30.0, 0.0
    row = score_trial(sample, "x", wrong, 8, 0, 4, 0)
    assert not row["correct"] and row["answer_logprob"] == pytest.approx(-30.0, abs=1e-9)


def trials_frame(**columns):
    n = len(next(iter(columns.values())))
    base = {"answer_logprob": [-1.0] * n, "fact_visible_own_chunk": [False] * n,
            "fact_visible_exact_region": [False] * n, "fact_visible_window": [False] * n}
    return pd.DataFrame({**base, **columns})


def test_accuracy_table_wilson_and_formatting():
    trials = trials_frame(length=[512] * 4, variant=["a", "a", "a", "b"], correct=[True, True, False, False],
                          answer_logprob=[-1.0, -2.0, -3.0, -4.0], fact_visible_own_chunk=[True, False, False, True],
                          fact_visible_exact_region=[True, True, False, True])
    table = accuracy_table(trials, ["length", "variant"])
    assert table.variant.tolist() == ["a", "b"] and table.trials.tolist() == [3, 1] and table.correct.tolist() == [2, 0]
    assert table.trials.dtype.kind == "i"
    a = table.iloc[0]
    assert a.accuracy == pytest.approx(2 / 3) and (a.ci_low, a.ci_high) == pytest.approx(wilson_interval(2, 3))
    assert a.mean_answer_logprob == -2.0 and a.fact_visible_own_chunk == pytest.approx(1 / 3)
    assert a.fact_visible_exact_region == pytest.approx(2 / 3)
    assert format_accuracy(a) == f"0.67 [{a.ci_low:.2f}, {a.ci_high:.2f}] (2/3)"


def test_accuracy_text_is_one_format_for_report_index_and_readme():
    from bsbr.passkey import accuracy_text

    assert accuracy_text(0.8, 0.376, 0.964, trials=5) == "0.80 [0.38, 0.96] (4/5)"
    assert accuracy_text(1.0, 0.7225, 1.0) == "1.00 [0.72, 1.00]"
    for args, message in [((1.2, 0.5, 1.0), "accuracy must be a fraction"), ((0.5, 0.9, 0.1), "ci_low"),
                          ((0.5, 0.1, 0.9, 0), "trials must be a positive integer"),
                          ((0.5, 0.1, 0.9, 2.0), "trials must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            accuracy_text(*args)


def test_trials_for_half_width_is_the_fewest_that_reach_it():
    n = trials_for_half_width(0.15)
    assert n == 39  # z / (2·sqrt(n + z²)) <= 0.15 at n/2 correct
    widest = lambda m: max(h - l for l, h in (wilson_interval(k, m) for k in range(m + 1))) / 2  # noqa: E731
    assert all(widest(m) <= 0.15 for m in range(n, n + 40)) and widest(n - 1) > 0.15
    assert trials_for_half_width(0.4) == 3 and widest(1) < 0.4 < widest(2)  # 1 trial is narrower than 2
    assert FULL_PROFILE["trials"] == 8 and len(FULL_PROFILE["depths"]) * FULL_PROFILE["trials"] >= n
    assert FULL_PROFILE["lengths"] == [1024, 2048, 4096, 8192] and FULL_PROFILE["long_lengths"] == [16384, 32768]
    for bad in (0, 0.5, True, "0.1"):
        with pytest.raises(ValueError, match="half_width"):
            trials_for_half_width(bad)


def test_reach_and_attended_tokens_from_each_variant_s_settings():
    base = tiny_llama()
    options = {"block_size": 4, "top_k": 2, "sink_size": 1}
    built = {name: build_variant(name, base, 8, options) for name in ("original", "sliding_window", "blocks_minmax",
                                                                     "blocks_mean", "exact_region")}
    reach = {name: reach_settings(name, model, window=6, window_sinks=2) for name, model in built.items()}
    assert reach["blocks_minmax"] == {"chunk_size": 8, "sink_size": 1, "retrieved": 8, "window": None,
                                      "dense_layers": 0, "states": False, "past_trained_range": False}
    assert not any(r["past_trained_range"] for r in reach.values())  # every key at its own RoPE position
    assert reach["exact_region"]["retrieved"] == 0 and reach["exact_region"]["chunk_size"] == 8
    counts = {name: [attended_tokens(r, n) for n in (10, 100)] for name, r in reach.items()}
    assert counts == {"original": [10, 100], "sliding_window": [8, 8], "blocks_minmax": [10, 25],
                      "blocks_mean": [10, 25], "exact_region": [10, 17]}
    dense = build_variant("blocks_minmax", base, 8, {**options, "dense_layers": [0]})
    assert attended_tokens(reach_settings("blocks_minmax", dense, 6, 2), 100) == 100  # a dense layer attends all
    for name in ("blocks_mean", "exact_region"):  # compact positions: no RoPE distance grows with the input
        compact = build_variant(name, base, 8, {**options, "positions": "compact"})
        assert reach_settings(name, compact, 6, 2) == {**reach[name], "past_trained_range": True}
    terraced = {"chunk_size": 8, "sink_size": 1, "retrieved": 0, "window": None, "dense_layers": 0, "states": True}
    assert attended_tokens(terraced, 100) == 17  # the exact tokens; the states are not counted


def test_build_variant_makes_each_model_as_registered(tmp_path):
    base = tiny_llama()
    options = {"block_size": 4, "top_k": 2, "sink_size": 1}
    assert build_variant("original", base, 8, options) is base
    assert build_variant("sliding_window", base, 8, options) is base
    for name, summary in (("blocks_minmax", "minmax"), ("blocks_mean", "mean")):
        model = build_variant(name, base, 8, options)
        settings = conversion_settings(model)
        assert settings["retrieval"] == "blocks" and settings["chunk_size"] == 8
        assert settings["normalized_options"]["summary"] == summary and settings["normalized_options"]["top_k"] == 2
        assert all(layer.retrieval for _, layer in converted_layers(model)) and not model.training
        assert model.model.embed_tokens.weight is base.model.embed_tokens.weight  # shares the pretrained tensors
    exact = build_variant("exact_region", base, 8, options)
    assert not any(layer.retrieval for _, layer in converted_layers(exact))
    # terraced: notebook 02's two files onto a copy of the original, retrieval on
    terraced = converted_copy(base, 8, retrieval="terraced", sink_size=1)
    save_conversion(terraced, tmp_path / "terraced.safetensors")
    trained = add_lora(copy.deepcopy(terraced), rank=2)
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)  # non-zero adapters, so loading them shows
    save_lora(trained, tmp_path / "terraced_lora.safetensors")
    model = build_variant("terraced", base, 8, options, tmp_path / "terraced.safetensors",
                          tmp_path / "terraced_lora.safetensors")
    assert model is not base and conversion_settings(model)["retrieval"] == "terraced" and not model.training
    x = tokens(1, 23)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, trained.eval()(x).logits, atol=1e-5, rtol=0)
    assert reach_settings("terraced", model, 6, 2)["states"] is True
    # BSBR's meta router: whole chunks, at least the query routers' retrieved tokens, 02's meta projections
    normalized = converted_copy(base, 8, retrieval="normalized")
    with torch.no_grad():
        for name, parameter in normalized.named_parameters():
            if ".meta_" in name:
                parameter.add_(0.05)  # calibrated: away from the q_proj/k_proj initialisation
    save_conversion(normalized, tmp_path / "calibrated.safetensors")
    meta = build_variant("blocks_meta", base, 8, {**options, "page_size": 2}, calibrated_path=tmp_path /
                         "calibrated.safetensors")
    assert conversion_settings(meta)["normalized_options"] | {"dense_layers": []} == {
        "block_size": 8, "top_k": 1, "summary": "mean", "sink_size": 1, "selection": "group", "positions": "original",
        "page_size": None, "router": "meta", "dense_layers": []}  # 2 blocks of 4 tokens -> 1 chunk of 8
    layer, calibrated = converted_layers(meta)[0][1], converted_layers(normalized)[0][1]
    torch.testing.assert_close(layer.meta_q_proj.weight, calibrated.meta_q_proj.weight, atol=0, rtol=0)
    assert reach_settings("blocks_meta", meta, 6, 2)["retrieved"] == 8
    with pytest.raises(ValueError, match="calibrated_path"):
        build_variant("blocks_meta", base, 8, options)
    with pytest.raises(ValueError, match="name must be one of"):
        build_variant("calibrated", base, 8, options)
    with pytest.raises(ValueError, match="unknown options"):
        build_variant("blocks_mean", base, 8, {"bogus": 1})


def test_variant_mask_and_answer_logits():
    assert torch.equal(variant_mask("sliding_window", 10, 4, 2), band_mask(10, 4, 2))
    assert all(variant_mask(name, 10, 4, 2) is None for name in VARIANTS if name != "sliding_window")

    class Stub(nn.Module):  # hidden = ids as floats; records the mask it got
        def __init__(self):
            super().__init__()
            self.masks = []
            stub = self

            class Inner(nn.Module):
                def forward(self, input_ids, attention_mask=None):
                    stub.masks.append(attention_mask)
                    return type("Out", (), {"last_hidden_state": input_ids[..., None].float()})

            self.model, self.lm_head = Inner(), nn.Identity()

    stub, x = Stub(), torch.arange(10)[None]
    mask = band_mask(10, 4, 2)
    assert answer_logits(stub, x, 3, mask)[0, :, 0].tolist() == [7.0, 8.0, 9.0]  # the last 3 positions only
    assert stub.masks[-1] is mask
    base = tiny_llama()
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(base, x, 4), base(x).logits[:, -4:], atol=1e-6, rtol=0)


def cells_frame(rows):
    """(variant, length, depth, correct, trials) -> accuracy cells with Wilson intervals."""
    table = pd.DataFrame(rows, columns=["variant", "length", "depth", "correct", "trials"])
    table["accuracy"] = table.correct / table.trials
    table[["ci_low", "ci_high"]] = [wilson_interval(c, t) for c, t in zip(table.correct, table.trials)]
    return table


def test_goal_verdicts_met_missed_and_not_measured():
    attended = pd.DataFrame({"variant": ["b"] * 2, "length": [4096, 8192], "attended_tokens": [772, 772]})
    full = [(v, n, d, c, 10) for v, c in (("b", 10), ("original", 10)) for n in (1024, 2048, 4096, 8192)
            for d in (0.1, 0.9)]
    cells = cells_frame(full)
    by_length = cells_frame([(v, n, None, 20, 20) for v in ("b", "original") for n in (1024, 2048, 4096, 8192)])
    verdicts = {r["key"]: r for r in goal_verdicts(cells, by_length, attended, "b")}
    assert list(verdicts) == ["accuracy_to_8k", "not_below_original", "attended_at_8k", "accuracy_past_8k"]
    assert [r["verdict"] for r in verdicts.values()] == ["met", "met", "met", "not measured"]
    assert verdicts["accuracy_to_8k"]["evidence"] == "lowest cell 1024 tokens, depth 0.1: 1.00 [0.72, 1.00] (10/10)"
    assert verdicts["attended_at_8k"]["evidence"] == "772 tokens per query (from the settings)"
    assert verdicts["attended_at_8k"]["goal"] == "≤ 1,024 attended tokens per query at 8,192"
    assert all(r["variant"] == "b" for r in verdicts.values())
    # one cell at 9/10 (below 95 % and below the original's 10/10) misses both accuracy goals
    cells.loc[(cells.variant == "b") & (cells.length == 4096) & (cells.depth == 0.9), ["correct", "accuracy"]] = 9, 0.9
    rows = goal_verdicts(cells, by_length, attended, "b")
    assert [r["verdict"] for r in rows[:2]] == ["missed", "missed"]
    assert rows[0]["evidence"].startswith("lowest cell 4096 tokens, depth 0.9: 0.90")
    assert rows[1]["evidence"] == ("smallest margin at 4096 tokens, depth 0.9: 0.90 vs the original's 1.00 "
                                   "(n = 10 each)")
    # a profile at 2048 only: holds so far but is not measured at the other trained lengths; no original; 8k budget
    short = cells[cells.length == 2048]
    rows = goal_verdicts(short[short.variant == "b"], by_length, attended[attended.length == 4096], "b")
    assert rows[0]["verdict"] == "not measured at 1024, 4096, 8192 (holds at 2048)"
    assert [r["verdict"] for r in rows[1:]] == ["not measured"] * 3
    # no long length measured: the evidence gives the one reason that applies
    reasons = [goal_verdicts(cells, by_length, attended, "b", past_trained_range=p)[3]["evidence"]
               for p in (False, True)]
    assert reasons == ["this variant does not go past the trained range",
                       "this run measured no length past the trained range (its profile's long_lengths)"]
    over = attended.assign(attended_tokens=[4096, 8192])
    assert goal_verdicts(cells, by_length, over, "b")[2]["verdict"] == "missed"
    # past the trained range: measured at 16k only
    long = pd.concat([by_length, cells_frame([("b", 16384, None, 19, 20)])])
    assert goal_verdicts(cells, long, attended, "b")[3]["verdict"] == "not measured at 32768"
    long = pd.concat([long, cells_frame([("b", 32768, None, 17, 20)])])
    last = goal_verdicts(cells, long, attended, "b")[3]
    assert last["verdict"] == "missed" and last["evidence"].startswith("lowest 32768 tokens: 0.85")
    assert GOALS["attended_tokens"] == 1024 and GOALS["accuracy"] == 0.95


def test_profile_seconds_measured_and_extrapolated_per_variant():
    times = pd.DataFrame({"length": [100, 200, 100], "variant": ["a", "a", "b"], "median_s": [1.0, 4.0, 3.0]})
    table = profile_seconds(times, {"a": [100, 400], "b": [100, 300]}, samples_per_length=2)
    assert table.to_dict("records") == [
        {"variant": "a", "length": 100, "forward_s": 1.0, "extrapolated": False, "seconds": 2.0},
        {"variant": "a", "length": 400, "forward_s": pytest.approx(16.0), "extrapolated": True,
         "seconds": pytest.approx(32.0)},  # 1 -> 4 s from 100 to 200: exponent 2
        {"variant": "b", "length": 100, "forward_s": 3.0, "extrapolated": False, "seconds": 6.0},
        {"variant": "b", "length": 300, "forward_s": pytest.approx(9.0), "extrapolated": True,
         "seconds": pytest.approx(18.0)}]  # one length: linear
    flat = pd.DataFrame({"length": [100, 200], "variant": ["a", "a"], "median_s": [2.0, 2.0]})
    assert profile_seconds(flat, {"a": [800]}, 1).forward_s.tolist() == [pytest.approx(8.0)]  # exponent at least 1
    with pytest.raises(ValueError, match="no measured forward of variant 'c'"):
        profile_seconds(times, {"c": [100]}, 1)


def test_passkey_task_uses_mohtashami_and_jaggis_texts_and_the_same_filler_in_every_cell():
    tok = CharTokenizer()
    samples = passkey_trials(tok, None, [600], [0.0, 0.5, 1.0], 2, seed=0, task="passkey")
    template = PASSKEY_TEMPLATES["passkey"]
    prefix = template.prefix
    for s in samples:
        text = tok.decode(s["input_ids"].tolist())
        assert s["filler_start"] is None and len(text) == 600
        assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
        fact = f"\nThe pass key is {s['passkey']}. Remember it. {s['passkey']} is the pass key.\n"
        assert text[s["fact_start"]:s["fact_end"]] == fact
        assert text.endswith(f"\nWhat is the pass key? The pass key is {s['passkey']}")
        filler = text[len(prefix):s["fact_start"]] + text[s["fact_end"]:-len(
            f"\nWhat is the pass key? The pass key is {s['passkey']}")]
        sentence = template.filler
        assert filler == (sentence * (len(filler) // len(sentence) + 1))[:len(filler)]  # the sentence repeated, cut
    depth0 = [s for s in samples if s["depth"] == 0.0]
    assert all(s["fact_start"] == len(prefix) for s in depth0)  # right after the task description
    assert len({s["passkey"] for s in samples}) == len(samples)
    again = passkey_trials(tok, None, [600], [0.0, 0.5, 1.0], 2, seed=0, task="passkey")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again))
    with pytest.raises(ValueError, match="task"):
        passkey_trials(tok, None, [600], [0.5], 1, seed=0, task="needle")


def test_check_passkey_parameters_names_the_bad_one():
    check_passkey_parameters("validation", [64], [], [0.0, 1], list(VARIANTS), {"top_k": 4}, True)
    good = ("test", [64], [16384], [0.5], ["original"], {}, True, "passkey")
    check_passkey_parameters(*good)
    for position, value, match in ((0, "train", "split"), (1, [63], "lengths"), (1, [], "lengths"),
                                   (2, [32], "long_lengths"), (2, None, "long_lengths"), (3, [1.5], "depths"),
                                   (4, ["original", "original"], "variants"), (4, ["calibrated"], "variants"),
                                   (5, {"summary": "mean"}, "blocks_options"), (5, [4], "blocks_options"),
                                   (6, 1, "check_generate"), (7, "secret", "task"), (7, None, "task")):
        args = list(good)
        args[position] = value
        with pytest.raises(ValueError, match=match):
            check_passkey_parameters(*args)


def test_summarize_trials_counts():
    row = summarize_trials(trials_frame(correct=[True, False], fact_visible_window=[True, True]))
    assert (row.trials, row.correct, row.accuracy, row.fact_visible_window) == (2, 1, 0.5, 1.0)


def test_out_of_reach_and_headline_table():
    trials = trials_frame(length=[2048, 2048, 2048, 4096], variant=["original", "original", "blocks_mean", "original"],
                          correct=[True, False, True, True], fact_visible_exact_region=[False, True, False, False],
                          fact_visible_window=[False, False, False, True])
    far = out_of_reach(trials)
    assert far.index.tolist() == [0, 2]  # beyond both the exact region and the window
    by_length = accuracy_table(trials, ["length", "variant"])
    attended = pd.DataFrame({"variant": ["original", "original", "blocks_mean", "terraced"],
                             "length": [4096, 2048, 2048, 2048], "attended_tokens": [4096, 2048, 772, 516],
                             "states": [False, False, False, True]})
    table = headline_table(by_length, accuracy_table(far, ["variant"]), attended,
                           ["original", "blocks_mean", "terraced"], [2048, 4096])
    assert table.columns.tolist() == ["variant", "2,048 tokens", "4,096 tokens", "fact out of reach (lengths all ran)",
                                      "attended tokens per query"]
    assert table.variant.tolist() == [VARIANTS[v].label for v in ("original", "blocks_mean", "terraced")]
    low, high = wilson_interval(1, 2)
    assert table.iloc[0, 1:].tolist() == [f"0.50 [{low:.2f}, {high:.2f}] (1/2)", "1.00 [0.21, 1.00] (1/1)",
                                          "1.00 [0.21, 1.00] (1/1)", "all (= the length)"]
    assert table.iloc[1, 2:].tolist() == ["—", "1.00 [0.21, 1.00] (1/1)", "772 at 2,048"]
    assert table.iloc[2, 1:].tolist() == ["—", "—", "—", "516 at 2,048 (+ states)"]
    attended = pd.DataFrame({"variant": ["blocks_mean"] * 3 + ["terraced"] * 2, "length": [4096, 2048, 1024, 2048, 4096],
                             "attended_tokens": [772, 772, 772, 516, 600], "states": [False] * 3 + [True] * 2})
    table = headline_table(by_length, accuracy_table(far, ["variant"]), attended, ["blocks_mean", "terraced"], [2048])
    assert table["attended tokens per query"].tolist() == ["772 at every length", "516 at 2,048; 600 at 4,096 (+ states)"]


def test_out_of_reach_at_the_lengths_every_variant_ran_keeps_the_comparison_paired():
    from bsbr.passkey import answer_logprob_table

    # the blocks variant also ran a long length the original cannot: pooled over every length the samples differ
    trials = trials_frame(length=[2048, 2048, 16384], depth=[0.05] * 3, trial=[0] * 3,
                          variant=["original", "blocks_mean", "blocks_mean"], correct=[True, True, False],
                          answer_logprob=[-1.0, -1.5, -30.0])
    with pytest.raises(ValueError, match="same samples"):
        answer_logprob_table(out_of_reach(trials))
    shared = out_of_reach(trials, [2048])
    assert shared.length.tolist() == [2048, 2048]
    table = answer_logprob_table(shared, resamples=50)
    assert table.set_index("variant").difference.to_dict() == {"original": 0.0, "blocks_mean": -0.5}


def test_answer_logprob_table_pairs_samples_and_bootstraps_the_mean_difference():
    from bsbr.passkey import answer_logprob_table

    rows = []
    for i, (ref, other) in enumerate([(-1.0, -3.0), (-2.0, -2.5), (-4.0, -20.0)]):
        for variant, value in (("original", ref), ("blocks_mean", other)):
            rows.append({"length": 1024, "depth": 0.5, "trial": i, "variant": variant, "answer_logprob": value})
    table = answer_logprob_table(pd.DataFrame(rows), resamples=500).set_index("variant")
    assert table.loc["original", "difference"] == 0 and table.loc["original", "ci_low"] == 0
    assert table.loc["blocks_mean", "mean_logprob"] == pytest.approx(-25.5 / 3)
    assert table.loc["blocks_mean", "difference"] == pytest.approx((-2.0 - 0.5 - 16.0) / 3)
    # every resample mean lies between the smallest and the largest paired difference
    assert -16.0 <= table.loc["blocks_mean", "ci_low"] <= table.loc["blocks_mean", "ci_high"] <= -0.5
    assert table.loc["blocks_mean", "samples"] == 3
    with pytest.raises(ValueError, match="reference"):
        answer_logprob_table(pd.DataFrame(rows), reference="terraced")
    with pytest.raises(ValueError, match="same samples"):
        answer_logprob_table(pd.DataFrame(rows[:-1]))
