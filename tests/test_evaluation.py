"""bsbr.evaluation: variants scored against a reference on common positions, checked against written-out sums on a
tiny random Llama (hidden 16, 2 layers) and hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from bsbr import metrics as M
from bsbr.evaluation import (chunk_means, final_hidden_and_logits, per_token_metrics, positions_from,
                             score_against_reference, seed_retrieval_ratio)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_final_hidden_and_logits_are_the_model_outputs(tiny_llama):
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden, logits = final_hidden_and_logits(tiny_llama, ids)
        full = tiny_llama(ids, output_hidden_states=True)
    assert hidden.shape == (2, 12, 16) and logits.shape == (2, 12, 40)
    torch.testing.assert_close(logits, full.logits)
    torch.testing.assert_close(hidden, full.hidden_states[-1])
    # a 4-D mask is used as given: a window of one token changes the outputs after position 0
    mask = torch.eye(12, dtype=torch.bool)[None, None].expand(2, 1, 12, 12)
    with torch.inference_mode():
        _, masked = final_hidden_and_logits(tiny_llama, ids, mask)
    torch.testing.assert_close(masked[:, 0], logits[:, 0])
    assert (masked[:, 1:] - logits[:, 1:]).abs().max() > 1e-3


def _random_pair(seed=0, batch=2, n=10, vocab=7, hidden=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, n), generator=g)
    ref_h, ref_l = torch.randn(batch, n, hidden, generator=g), torch.randn(batch, n, vocab, generator=g)
    h, l = ref_h + 0.3 * torch.randn(batch, n, hidden, generator=g), ref_l + torch.randn(batch, n, vocab, generator=g)
    return ids, ref_h, ref_l, h, l


def test_score_against_reference_matches_the_written_out_sums():
    ids, ref_h, ref_l, h, l = _random_pair()
    start, n = 4, ids.shape[1]
    scores = score_against_reference(ref_h, ref_l, h, l, ids, start)
    log_p, log_q = ref_l.log_softmax(-1), l.log_softmax(-1)
    nll, kl, top1, cos = [], [], [], []
    for b in range(ids.shape[0]):
        for t in range(start, n - 1):  # logits at t predict token t + 1
            nll.append(-log_q[b, t, ids[b, t + 1]].item())
            kl.append((log_p[b, t].exp() * (log_p[b, t] - log_q[b, t])).sum().item())
            top1.append(float(ref_l[b, t].argmax() == l[b, t].argmax()))
            cos.append(torch.nn.functional.cosine_similarity(ref_h[b, t], h[b, t], dim=0).item())
    assert scores["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert scores["kl_to_original"] == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    assert scores["top1_agreement"] == pytest.approx(sum(top1) / len(top1))
    assert scores["hidden_cosine"] == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    same = score_against_reference(ref_h, ref_l, ref_h, ref_l, ids, start)
    assert same["kl_to_original"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1
    assert same["hidden_cosine"] == pytest.approx(1)


@pytest.mark.parametrize("start", [-1, 9, 10, 2.0, True])
def test_score_against_reference_rejects_bad_start(start):
    ids, ref_h, ref_l, h, l = _random_pair()
    with pytest.raises(ValueError, match="start must be an integer"):
        score_against_reference(ref_h, ref_l, h, l, ids, start)


def test_per_token_metrics_shapes_and_values():
    ids, ref_h, ref_l, h, l = _random_pair(batch=1)
    values = per_token_metrics(ref_h, ref_l, h, l, ids, topk=(1, 5))
    assert sorted(values) == ["cos", "kl", "mse", "nll", "top1", "top5"]
    assert values["nll"].shape == (1, 9) and all(values[k].shape == (1, 10) for k in ("cos", "kl", "mse", "top1"))
    torch.testing.assert_close(values["kl"], M.kl_divergence(ref_l, l))
    torch.testing.assert_close(values["mse"], ((ref_h - h) ** 2).mean(-1))
    assert (values["top5"] >= values["top1"]).all()


def test_positions_from_and_chunk_means():
    parts = [torch.arange(6.0)[None], 10 + torch.arange(6.0)[None]]  # two windows, [1, 6] each
    assert positions_from(parts, 4).tolist() == [4.0, 5.0, 14.0, 15.0]
    # mean over windows: 5, 6, 7, 8, 9, 10; chunks of 4: [5..8] and [9, 10]
    assert chunk_means(parts, 4) == [6.5, 9.5]
    assert chunk_means(parts, 6) == [7.5] and chunk_means(parts, 1) == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_seed_retrieval_ratio_is_zero_in_the_first_chunk_only(tiny_llama):
    from bsbr.convert import converted_copy

    chunk = 4
    ids = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(2))
    seed = converted_copy(tiny_llama, chunk)
    with torch.inference_mode():
        rows = seed_retrieval_ratio(tiny_llama, seed, ids, chunk)
        whole = seed_retrieval_ratio(tiny_llama, seed, ids, 0)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["median_ratio"] > 0 and r["p90_ratio"] >= r["median_ratio"] for r in rows)
    assert all(layer.self_attn.retrieval for layer in seed.model.layers)  # left on
    # tokens of the first chunk retrieve nothing: including them lowers the median (4 zeros out of 12)
    assert all(w["median_ratio"] <= r["median_ratio"] for w, r in zip(whole, rows))


# --- notebook 02's checks and tables ---------------------------------------------------------------------------

def test_one_chunk_logit_differences_are_rounding_and_the_half_window_control_is_not():
    from bsbr.evaluation import one_chunk_logit_differences
    from tests.conftest import tiny_llama as build_tiny_llama

    base = build_tiny_llama()
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(3))
    diffs = one_chunk_logit_differences(base, ids, sink_size=2)
    assert set(diffs) == {"seed", "normalized", "terraced", "sliding_window", "half_window", "max_abs_logit"}
    assert diffs["seed"] <= 1e-5 and diffs["sliding_window"] <= 1e-5 and diffs["normalized"] <= 1e-4
    assert diffs["terraced"] <= 1e-4
    assert diffs["half_window"] > 1e-3  # 12 of 24 tokens visible: the mask is honoured
    with torch.inference_mode():
        assert diffs["max_abs_logit"] == pytest.approx(base(ids).logits.abs().max().item(), rel=1e-6)
    assert not any(type(m).__name__.startswith("BSBR") for m in base.modules())  # the conversions were copies
    with pytest.raises(ValueError, match="input_ids must be"):
        one_chunk_logit_differences(base, ids[0])


def _collected():
    """Hand-made per-token values of one window of 8 tokens: the original and one variant at chunk size 4."""
    original_nll = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])  # [1, n - 1]
    variant = {"nll": [original_nll + 1], "kl": [torch.arange(8.0)[None]], "cos": [torch.full((1, 8), 0.5)],
               "mse": [torch.ones(1, 8)], "top1": [torch.tensor([[1.0, 1, 1, 1, 1, 0, 1, 0]])]}
    return {(0, "original"): {"nll": [original_nll]}, (4, "seed"): variant}


def test_similarity_table_scores_the_positions_after_the_first_chunk():
    from bsbr.evaluation import similarity_table

    table = similarity_table(_collected(), 8, {"seed": "BSBR, seed"}, topk=(1,))
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.seq_len, row.chunk_size, row.variant, row.label) == (8, 4, "seed", "BSBR, seed")
    assert (row.num_chunks, row.windows, row.tokens_scored) == (2, 1, 3)  # nll positions 4, 5, 6
    assert row.nll == pytest.approx(7.0) and row.ppl == pytest.approx(math.exp(7.0))  # mean of 6, 7, 8
    assert row.ppl_original == pytest.approx(math.exp(6.0)) and row.ppl_ratio == pytest.approx(math.e)
    assert row.kl == pytest.approx(5.5) and row.cos == pytest.approx(0.5) and row.mse == pytest.approx(1.0)
    assert row.top1 == pytest.approx(0.5)  # positions 4..7: 1, 0, 1, 0
    with pytest.raises(KeyError):
        similarity_table({(4, "seed"): _collected()[(4, "seed")]}, 8, {"seed": "x"})


def test_per_chunk_table_means_each_chunk_and_groups_the_original_by_every_size():
    from bsbr.evaluation import per_chunk_table

    table = per_chunk_table(_collected(), 8, [4, 8])
    assert list(table.columns) == ["seq_len", "chunk_size", "variant", "chunk_index", "metric", "value"]
    original = table[table.variant == "original"]
    assert list(zip(original.chunk_size, original.chunk_index, original.value)) == [
        (4, 0, 2.5), (4, 1, 6.0), (8, 0, 4.0)]  # nll has 7 positions: the last chunk of 4 holds 3
    kl = table[(table.variant == "seed") & (table.metric == "kl")]
    assert list(kl.value) == [1.5, 5.5] and set(table[table.variant == "seed"].chunk_size) == {4}
    assert list(table[table.variant == "seed"].metric.unique()) == ["cos", "kl", "mse", "nll", "top1"]  # sorted


def test_seed_perplexity_is_the_written_out_perplexity_of_both_models():
    from bsbr.convert import converted_copy
    from bsbr.evaluation import seed_perplexity
    from tests.conftest import tiny_gpt2

    lm = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(4))
    result = seed_perplexity(lm, ids, 8)
    bsbr_lm = converted_copy(lm, 8)
    with torch.inference_mode():
        expected = {name: math.exp(torch.cat([M.token_nll(m(ids[w : w + 1]).logits, ids[w : w + 1])[:, 8:]
                                              for w in range(2)], 1).mean().item())
                    for name, m in (("original", lm), ("seed", bsbr_lm))}
    assert result["chunk_size"] == 8 and result["tokens_scored"] == 2 * 23
    assert result["original_ppl"] == pytest.approx(expected["original"], abs=1e-4)
    assert result["seed_ppl"] == pytest.approx(expected["seed"], abs=1e-4)
    assert result["seed_ppl"] != result["original_ppl"]  # the second chunk onwards retrieves
    with pytest.raises(ValueError, match="chunk_size must be"):
        seed_perplexity(lm, ids, 31)


def test_gpt2_perplexity_reports_a_model_it_cannot_load(tmp_path):
    from bsbr.evaluation import gpt2_perplexity

    assert gpt2_perplexity(None, ["text"], 64, 1, 32) == {"model": None, "status": "skipped",
                                                          "reason": "gpt2_model is None"}
    result = gpt2_perplexity(str(tmp_path), ["text"], 64, 1, 32)  # a folder without a checkpoint
    assert result["model"] == str(tmp_path) and result["status"] == "skipped"
    assert result["reason"].startswith(f"load_pretrained({str(tmp_path)!r}) failed: ")
    assert "\n" not in result["reason"] and not result["reason"].endswith(".")


def test_perplexity_from_scores_the_positions_from_start_under_the_mask():
    from bsbr.evaluation import perplexity_from
    from bsbr.masks import band_mask
    from bsbr.metrics import token_nll
    from tests.conftest import tiny_llama as build_tiny_llama

    lm = build_tiny_llama()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        nll = token_nll(lm(ids).logits, ids)[:, 5:]  # [2, 10]: predictions at positions 5..14
        masked = token_nll(lm(ids, attention_mask=band_mask(16, 4)).logits, ids)[:, 5:]
    assert perplexity_from(lm, ids, 5) == pytest.approx(nll.mean().exp().item(), rel=1e-6)
    assert perplexity_from(lm, ids, 5, band_mask(16, 4)) == pytest.approx(masked.mean().exp().item(), rel=1e-6)
    assert perplexity_from(lm, ids, 5, band_mask(16, 4)) != pytest.approx(perplexity_from(lm, ids, 5), rel=1e-3)
    for bad in (-1, 15, 2.0):
        with pytest.raises(ValueError, match="start must be"):
            perplexity_from(lm, ids, bad)
    with pytest.raises(ValueError, match="windows must be"):
        perplexity_from(lm, ids[0], 0)
