"""Similarity and language-modelling metrics comparing a reference model's outputs with a candidate's.

Pure functions of tensors. The per-position functions return one value per token so that values from several
windows (or batches) can be concatenated and then averaged with :func:`summarize`; every average is an
unweighted mean over token positions.

Conventions: ``reference`` is the original model, ``candidate`` the converted one; hidden states are
``[batch, seq_len, hidden]``; logits are ``[batch, seq_len, vocab]`` (position ``t`` predicts token ``t+1``);
natural logarithms (nats) throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "cosine_similarity",
    "kl_divergence",
    "perplexity",
    "squared_error",
    "summarize",
    "token_nll",
    "topk_agreement",
]


def _check_pair(reference: torch.Tensor, candidate: torch.Tensor, what: str) -> None:
    if not isinstance(reference, torch.Tensor) or not isinstance(candidate, torch.Tensor):
        raise TypeError(f"{what} must be torch.Tensors")
    if reference.shape != candidate.shape or reference.dim() < 2:
        raise ValueError(
            f"{what} must have the same shape [batch, seq_len, features]; got {list(reference.shape)} and "
            f"{list(candidate.shape)}"
        )


def cosine_similarity(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the two hidden-state vectors at every position.

    Args:
        reference, candidate: ``[batch, seq_len, hidden]``.
    Returns:
        ``[batch, seq_len]`` float32 in [-1, 1] (zero vectors give 0).
    Raises:
        ValueError: shapes differ. TypeError: not tensors.
    """
    _check_pair(reference, candidate, "hidden states")
    return F.cosine_similarity(reference.float(), candidate.float(), dim=-1, eps=1e-12)


def squared_error(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden dimension at every position (its mean over positions is the MSE).

    Args:
        reference, candidate: ``[batch, seq_len, hidden]``.
    Returns:
        ``[batch, seq_len]`` float32, ``mean_k (reference_k - candidate_k)²``.
    """
    _check_pair(reference, candidate, "hidden states")
    return (reference.float() - candidate.float()).pow(2).mean(-1)


def kl_divergence(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) of the next-token distributions at every position, in nats.

    ``Σ_v p_ref(v) (log p_ref(v) - log p_cand(v))`` with ``p = softmax(logits)``.

    Args:
        reference_logits, candidate_logits: ``[batch, seq_len, vocab]``.
    Returns:
        ``[batch, seq_len]`` float32, >= 0.
    """
    _check_pair(reference_logits, candidate_logits, "logits")
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(candidate_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def topk_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Whether the reference's top-1 token is among the candidate's ``k`` highest logits, at every position.

    ``k=1``: the two models' greedy next tokens agree. Ties are broken by ``torch.topk``/``argmax`` order.

    Args:
        reference_logits, candidate_logits: ``[batch, seq_len, vocab]``.
        k: integer in ``[1, vocab]``.
    Returns:
        ``[batch, seq_len]`` float32 of 0/1 (mean = agreement rate).
    Raises:
        ValueError: bad ``k`` or shapes.
    """
    _check_pair(reference_logits, candidate_logits, "logits")
    vocab = reference_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}], got {k!r}")
    target = reference_logits.argmax(-1, keepdim=True)  # [batch, seq_len, 1]
    top = candidate_logits.topk(k, dim=-1).indices  # [batch, seq_len, k]
    return (top == target).any(-1).float()


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token: position ``t``'s logits scored on ``input_ids[:, t+1]``.

    Args:
        logits: ``[batch, seq_len, vocab]``; input_ids: ``[batch, seq_len]`` integer token ids.
    Returns:
        ``[batch, seq_len - 1]`` float32, in nats (the last position has no next token and is not scored).
    Raises:
        ValueError: shapes that do not match or ``seq_len < 2``.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [batch, seq_len, vocab] and input_ids [batch, seq_len]; got {list(logits.shape)} "
            f"and {list(input_ids.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError("seq_len must be >= 2 to score a next token")
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, seq_len-1, vocab]
    return -log_probs.gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)`` over all scored positions.

    Args:
        nll: per-token negative log-likelihoods in nats, any shape (e.g. from :func:`token_nll`,
            concatenated over windows).
    Returns:
        perplexity (float, >= 1 for NLL >= 0).
    Raises:
        ValueError: empty input.
    """
    if nll.numel() == 0:
        raise ValueError("nll is empty: no scored positions")
    return math.exp(nll.double().mean().item())


def summarize(values: dict[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, float]:
    """Average per-position metrics: ``{name: tensor or list of tensors}`` -> ``{name: mean over all values}``.

    Lists are flattened and concatenated first, so several windows of different lengths weigh per token.
    Names starting with ``nll`` are turned into ``ppl...`` perplexities (``exp`` of the mean) as well.

    Raises:
        ValueError: an empty entry.
    """
    summary = {}
    for name, value in values.items():
        flat = torch.cat([v.reshape(-1) for v in value]) if isinstance(value, (list, tuple)) else value.reshape(-1)
        if flat.numel() == 0:
            raise ValueError(f"{name} has no values")
        summary[name] = flat.double().mean().item()
        if name.startswith("nll"):
            summary["ppl" + name[3:]] = perplexity(flat)
    return summary
