"""bsbr.metrics on tiny inputs whose values are worked out by hand (shapes [batch, seq_len, features])."""

import math

import pytest
import torch

from bsbr import metrics


def test_cosine_similarity_hand_values():
    reference = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 2.0]]])
    candidate = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [6.0, 8.0], [-1.0, -2.0]]])
    got = metrics.cosine_similarity(reference, candidate)
    assert got.shape == (1, 4)
    torch.testing.assert_close(got, torch.tensor([[0.0, 1 / math.sqrt(2), 1.0, -1.0]]))


def test_squared_error_hand_values():
    reference = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    candidate = torch.tensor([[[3.0, 2.0], [1.0, -1.0]]])
    # (2² + 0²) / 2 = 2 ; (1² + 1²) / 2 = 1
    torch.testing.assert_close(metrics.squared_error(reference, candidate), torch.tensor([[2.0, 1.0]]))


def test_kl_divergence_hand_values():
    reference = torch.tensor([[[0.0, 0.0], [5.0, -1.0]]])  # p = [1/2, 1/2]; second row identical to candidate
    candidate = torch.tensor([[[math.log(3.0), 0.0], [5.0, -1.0]]])  # q = [3/4, 1/4]
    # KL(p||q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    expected = torch.tensor([[0.5 * math.log(4 / 3), 0.0]])
    torch.testing.assert_close(metrics.kl_divergence(reference, candidate), expected)


def test_kl_divergence_is_not_symmetric():
    p = torch.tensor([[[0.0, 0.0]]])
    q = torch.tensor([[[math.log(3.0), 0.0]]])
    # KL(q||p) = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert metrics.kl_divergence(q, p).item() == pytest.approx(expected, abs=1e-6)


def test_topk_agreement_hand_values():
    reference = torch.tensor([[[0.0, 3.0, 1.0, 2.0], [9.0, 0.0, 0.0, 0.0]]])  # top-1 tokens: 1, 0
    candidate = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [9.0, 1.0, 2.0, 3.0]]])  # order: 0,2,1,3 and 0,3,2,1
    assert metrics.topk_agreement(reference, candidate, 1).tolist() == [[0.0, 1.0]]
    assert metrics.topk_agreement(reference, candidate, 2).tolist() == [[0.0, 1.0]]
    assert metrics.topk_agreement(reference, candidate, 3).tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="k must be"):
        metrics.topk_agreement(reference, candidate, 5)
    with pytest.raises(ValueError, match="k must be"):
        metrics.topk_agreement(reference, candidate, 0)


def test_token_nll_and_perplexity_hand_values():
    # vocab 2; p(next) = [1/4, 3/4] at both scored positions; the last position is not scored.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)], [7.0, 7.0]]])
    input_ids = torch.tensor([[0, 0, 1]])  # targets: token 0 (p=1/4), token 1 (p=3/4)
    nll = metrics.token_nll(logits, input_ids)
    torch.testing.assert_close(nll, torch.tensor([[math.log(4.0), math.log(4 / 3)]]))
    # exp(mean(ln 4, ln 4/3)) = sqrt(4 * 4/3)
    assert metrics.perplexity(nll) == pytest.approx(4 / math.sqrt(3), rel=1e-6)


def test_uniform_logits_have_perplexity_vocab_size():
    logits = torch.zeros(2, 5, 7)
    input_ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(0))
    assert metrics.perplexity(metrics.token_nll(logits, input_ids)) == pytest.approx(7.0, rel=1e-6)


def test_summarize_weighs_every_token_equally():
    summary = metrics.summarize({
        "nll": [torch.tensor([math.log(2.0)]), torch.tensor([[math.log(8.0), math.log(8.0)]])],
        "cos": torch.tensor([[1.0, 0.0, 0.5, 0.5]]),
    })
    assert summary["nll"] == pytest.approx(7 / 3 * math.log(2.0))
    assert summary["ppl"] == pytest.approx(2 ** (7 / 3))
    assert summary["cos"] == pytest.approx(0.5)
    assert set(summary) == {"nll", "ppl", "cos"}


def test_identical_outputs_give_perfect_scores():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8)
    logits = torch.randn(2, 6, 11)
    torch.testing.assert_close(metrics.cosine_similarity(hidden, hidden), torch.ones(2, 6))
    assert metrics.squared_error(hidden, hidden).abs().max().item() == 0.0
    assert metrics.kl_divergence(logits, logits).abs().max().item() < 1e-6
    assert metrics.topk_agreement(logits, logits, 1).min().item() == 1.0


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.cosine_similarity(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="input_ids"):
        metrics.token_nll(torch.zeros(1, 4, 5), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        metrics.token_nll(torch.zeros(1, 1, 5), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        metrics.perplexity(torch.zeros(0))
