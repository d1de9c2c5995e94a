"""Analysis helpers shared by the attention-analysis (04) and long-range (05) notebooks.

* attention maps: :func:`causal_attention_probs` (the original model's softmax attention of one layer),
  :func:`chunk_mass` (attention mass per key chunk or block, sinks apart) and :func:`retrieval_weights` (a normalised
  BSBR layer's chunk routing); :mod:`bsbr.router_recall` builds the router-recall measurement on them;
* the passkey tasks (:data:`PASSKEY_TEMPLATES`): :func:`passkey_sample` (a fact at a controlled depth of filler —
  Mohtashami & Jaggi's repeated sentences, :func:`repeated_filler`, or real text —, a question at the end)
  and :func:`answer_exact_match` (greedy exact match of the answer scored with one teacher-forced forward);
* :func:`wilson_interval` (binomial confidence interval of an accuracy).

Conventions: ``n`` tokens, ``C = chunk_size``; tensors ``[batch, heads, ...]`` as in :mod:`bsbr.normalized`;
queries carry RoPE; GQA keys are repeated to the query heads in HF ``repeat_kv`` order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bsbr._checks import check_int_at_least, check_positive_int
from bsbr.utils import check_sink_size, repeat_kv

__all__ = [
    "answer_exact_match",
    "causal_attention_probs",
    "chunk_mass",
    "PASSKEY_TEMPLATES",
    "PasskeyTemplate",
    "passkey_sample",
    "repeated_filler",
    "retrieval_weights",
    "wilson_interval",
]


def causal_attention_probs(query: torch.Tensor, key: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Causal softmax attention probabilities ``softmax_u(q_t·k_u / sqrt(d))`` over ``u <= t``.

    Args:
        query: ``[batch, heads, n, d]``; key: ``[batch, kv_heads, n, d]`` (``kv_heads`` divides ``heads``).
        start: only the query rows ``t = start .. n-1`` are computed (``0 <= start < n``).
    Returns:
        ``[batch, heads, n - start, n]``, zero above the diagonal (key ``u > t``), every row summing to 1 (memory
        ``heads·(n - start)·n`` values).
    Raises:
        ValueError: shapes that do not match, or ``start`` outside ``[0, n)``.
    """
    if query.dim() != 4 or key.dim() != 4 or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"query [b, h, n, d] and key [b, kv_h, n, d] expected, got {list(query.shape)}, "
                         f"{list(key.shape)}")
    n, d = query.shape[2:]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n:
        raise ValueError(f"start must be an integer in [0, {n}), got {start!r}")
    key = repeat_kv(key, query.shape[1], "key")
    scores = query[:, :, start:] @ key.transpose(-1, -2) / math.sqrt(d)  # [batch, heads, n - start, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()[start:]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def retrieval_weights(meta_query: torch.Tensor, meta_key: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """BSBR chunk-routing weights ``w_ij = softmax_{j<i}(r_{i-1}·h_j / sqrt(d))`` for chunks ``i = 1..num_chunks-1``.

    Args:
        meta_query: ``[batch, heads, rows, d]`` (row ``j`` from chunk ``j``, routing chunk ``j+1``); meta_key:
            ``[batch, kv_heads or heads, rows, d]``; ``rows >= num_chunks - 1``.
        num_chunks: chunks of the sequence (>= 2).
    Returns:
        ``[batch, heads, num_chunks-1, num_chunks-1]``: row ``r`` = query chunk ``r+1``, column ``j`` = earlier chunk
        ``j`` (zero for ``j > r``); rows sum to 1. The same weights as in
        :func:`bsbr.normalized.normalized_bsbr_attention`.
    Raises:
        ValueError: ``num_chunks < 2`` or too few meta rows.
    """
    check_int_at_least(2, num_chunks=num_chunks)
    retrieving = num_chunks - 1
    if meta_query.shape[2] < retrieving or meta_key.shape[2] < retrieving:
        raise ValueError(f"meta_query/meta_key need >= {retrieving} rows, got {list(meta_query.shape)}, "
                         f"{list(meta_key.shape)}")
    heads, d = meta_query.shape[1], meta_query.shape[3]
    meta_key = repeat_kv(meta_key[:, :, :retrieving], heads, "meta_key")
    scores = meta_query[:, :, :retrieving] @ meta_key.transpose(-1, -2) / math.sqrt(d)  # [b, h, chunks-1, chunks-1]
    visible = torch.ones(retrieving, retrieving, dtype=torch.bool, device=scores.device).tril()
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def chunk_mass(probs: torch.Tensor, chunk_size: int, sink_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass per key chunk, the first ``sink_size`` tokens counted apart.

    Args:
        probs: ``[..., rows, n]`` attention weights (query rows, e.g. ``n`` of them or the rows from
            :func:`causal_attention_probs` with ``start``; ``n`` key columns).
        chunk_size: tokens per chunk (>= 1); the last chunk may be partial.
        sink_size: keys ``0..sink_size-1`` go to the sink mass instead of chunk 0 (``0 <= sink_size <= chunk_size``).
    Returns:
        ``(mass [..., rows, chunks], sink [..., rows])``: ``mass[..., t, j]`` = Σ of row ``t`` over the non-sink keys of
        chunk ``j``; ``mass.sum(-1) + sink`` = the row sums.
    Raises:
        ValueError: bad ``chunk_size``/``sink_size`` or ``probs`` with fewer than 2 dimensions.
    """
    check_positive_int(chunk_size=chunk_size)
    check_sink_size(sink_size, chunk_size)
    n = probs.shape[-1]
    if probs.dim() < 2:
        raise ValueError(f"probs must be [..., rows, n], got {list(probs.shape)}")
    chunks = -(-n // chunk_size)
    sink = probs[..., :sink_size].sum(-1)
    rest = torch.nn.functional.pad(probs[..., sink_size:], (sink_size, chunks * chunk_size - n))  # sinks zeroed
    return rest.unflatten(-1, (chunks, chunk_size)).sum(-1), sink


def wilson_interval(successes, trials, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default).

    ``p̂ = successes / trials``; centre ``(p̂ + z²/2n) / (1 + z²/n)``, half-width
    ``z / (1 + z²/n) · sqrt(p̂(1-p̂)/n + z²/4n²)``. Source: Wilson 1927, JASA 22(158); Brown, Cai & DasGupta 2001.

    Args:
        successes: integer in ``[0, trials]``; trials: integer >= 1; z: normal quantile (> 0).
    Returns:
        ``(low, high)`` with ``0 <= low <= p̂ <= high <= 1``.
    Raises:
        ValueError: bad counts or ``z``.
    """
    check_positive_int(trials=trials)
    check_int_at_least(0, successes=successes)
    if successes > trials:
        raise ValueError(f"successes must be <= trials={trials}, got {successes}")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z!r}")
    p, n = successes / trials, trials
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The interval always contains p̂; min/max only remove fp rounding at p̂ = 0 or 1.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


#: The passkey texts: the fact, the question that ends the context, and the answer (``{passkey}`` is replaced).
PASSKEY_FACT = "\nThe secret number is {passkey}. Remember it.\n"
PASSKEY_QUESTION = "\nWhat is the secret number? The secret number is"
PASSKEY_ANSWER = " {passkey}"


@dataclass(frozen=True)
class PasskeyTemplate:
    """The texts of one passkey task (``{passkey}`` is replaced in ``fact`` and ``answer``).

    Attributes:
        prefix: text before the filler ("" for none), e.g. a task description.
        fact: the sentence hidden at a depth of the filler.
        question: the text that ends the context.
        answer: the continuation scored (exact match of greedy decoding).
        filler: the sentence repeated as filler, or None: the filler is real text the caller supplies.
    """

    prefix: str
    fact: str
    question: str
    answer: str
    filler: str | None


#: Passkey tasks by name:
#:
#: * ``"passkey"`` — Mohtashami & Jaggi 2023 (arXiv 2305.16300; their ``landmark-attention`` repository's passkey
#:   test, also used by Quest and InfLLM): a task description, the sentence "The grass is green. The sky is blue. The
#:   sun is yellow. Here we go. There and back again." repeated as filler, the pass-key line, the question; the
#:   parts joined by newlines as there;
#: * ``"fact_in_text"`` — the same kind of fact hidden in real held-out text (the filler the caller gives), with no
#:   task description: harder, the filler competes with the fact.
PASSKEY_TEMPLATES: dict[str, PasskeyTemplate] = {
    "passkey": PasskeyTemplate(
        prefix="There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.\n",
        fact="\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n",
        question="\nWhat is the pass key? The pass key is",
        answer=" {passkey}",
        filler="The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "),
    "fact_in_text": PasskeyTemplate(prefix="", fact=PASSKEY_FACT, question=PASSKEY_QUESTION, answer=PASSKEY_ANSWER,
                                    filler=None),
}


def repeated_filler(tokenizer, template: PasskeyTemplate, num_tokens: int) -> torch.Tensor:
    """``num_tokens`` tokens of ``template.filler`` repeated (tokenized once, the token sequence repeated and cut).

    Returns:
        LongTensor ``[num_tokens]``.
    Raises:
        ValueError: ``template.filler`` is None (the task's filler is real text) or ``num_tokens`` < 1.
    """
    check_positive_int(num_tokens=num_tokens)
    if template.filler is None:
        raise ValueError("template has no repeated filler: its filler is real text the caller supplies")
    sentence = tokenizer.encode(template.filler, add_special_tokens=False)
    return torch.tensor((sentence * (num_tokens // len(sentence) + 1))[:num_tokens], dtype=torch.long)


def passkey_sample(tokenizer, filler_ids: torch.Tensor, length: int, depth: float, passkey: str,
                   template: PasskeyTemplate = PASSKEY_TEMPLATES["fact_in_text"]) -> dict:
    """One passkey / fact-retrieval sequence of exactly ``length`` tokens, in the style of Mohtashami & Jaggi 2023
    (arXiv 2305.16300).

    Layout: ``prefix + filler[:p] + fact + filler[p:m] + question + answer`` where ``m`` filler tokens fill the
    length, ``p = round(depth · m)``; prefix, fact, question and answer are the ``template``'s texts
    (:data:`PASSKEY_TEMPLATES`) with ``passkey`` inserted, each tokenized alone (``add_special_tokens=False``).

    Args:
        tokenizer: has ``encode(text, add_special_tokens=False) -> list[int]``.
        filler_ids: 1-D LongTensor of filler tokens (held-out text, or :func:`repeated_filler`), at least ``m`` of
            them (the first ``m`` are used).
        length: total tokens (answer included).
        depth: where the fact goes, as a fraction of the filler in [0, 1] (0 = start, 1 = right before the question).
        passkey: the secret (e.g. ``"48213"``).
        template: the task's texts (default: the fact in real text).
    Returns:
        ``{"input_ids": LongTensor [length], "answer_start": int (first answer token), "fact_start": int,
        "fact_end": int (exclusive), "answer_ids": list[int]}``.
    Raises:
        ValueError: bad ``length``/``depth``/``passkey``/``template``, or too little filler for ``length``.
    """
    check_positive_int(length=length)
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if not isinstance(passkey, str) or not passkey:
        raise ValueError(f"passkey must be a non-empty string, got {passkey!r}")
    if not isinstance(template, PasskeyTemplate):
        raise ValueError(f"template must be a PasskeyTemplate (PASSKEY_TEMPLATES), got {template!r}")
    prefix = tokenizer.encode(template.prefix, add_special_tokens=False) if template.prefix else []
    fact, question, answer = (tokenizer.encode(text.format(passkey=passkey), add_special_tokens=False)
                              for text in (template.fact, template.question, template.answer))
    filler_len = length - len(prefix) - len(fact) - len(question) - len(answer)
    if filler_len < 0:
        raise ValueError(f"length must be >= {length - filler_len} (prefix + fact + question + answer), got {length}")
    if filler_ids.dim() != 1 or filler_ids.shape[0] < filler_len:
        raise ValueError(f"filler_ids must be 1-D with >= {filler_len} tokens, got {list(filler_ids.shape)}")
    split = round(depth * filler_len)
    filler = filler_ids[:filler_len].tolist()
    ids = prefix + filler[:split] + fact + filler[split:] + question + answer
    fact_start = len(prefix) + split
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "answer_start": length - len(answer),
            "fact_start": fact_start, "fact_end": fact_start + len(fact), "answer_ids": answer}


def answer_exact_match(logits: torch.Tensor, input_ids: torch.Tensor, answer_start: int) -> torch.Tensor:
    """Greedy exact match of the answer, from one teacher-forced forward.

    Greedy decoding from ``input_ids[:, :answer_start]`` produces exactly the answer tokens
    ``input_ids[:, answer_start:]`` iff, fed the correct answer prefix, the argmax at every position
    ``answer_start-1 .. n-2`` is the next answer token (by induction over the answer: each greedy step sees the same
    prefix as the teacher-forced one as long as all earlier steps were right). So one forward scores greedy generation.

    Args:
        logits: ``[batch, m, vocab]``, the logits of the *last* ``m`` positions of the sequence, ``m >= n -
            answer_start + 1`` (position ``t`` predicts token ``t + 1``); input_ids: ``[batch, n]``.
        answer_start: index of the first answer token, ``1 <= answer_start < n``.
    Returns:
        ``[batch]`` bool.
    Raises:
        ValueError: bad ``answer_start`` or too few logit positions.
    """
    n = input_ids.shape[1]
    if isinstance(answer_start, bool) or not isinstance(answer_start, int) or not 1 <= answer_start < n:
        raise ValueError(f"answer_start must be an integer in [1, {n}), got {answer_start!r}")
    needed = n - answer_start + 1
    if logits.shape[1] < needed:
        raise ValueError(f"logits must cover the last >= {needed} positions, got {list(logits.shape)}")
    predicted = logits[:, -needed:-1].argmax(-1)  # positions answer_start-1 .. n-2
    return (predicted == input_ids[:, answer_start:]).all(-1)
