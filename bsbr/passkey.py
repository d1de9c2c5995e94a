"""The passkey-retrieval experiment (notebook ``05_long_range``): trials built from held-out text, scoring of each
model variant with one forward, accuracy tables with Wilson intervals, and the run-time estimate of the full profile.

The task (Mohtashami & Jaggi 2023, arXiv 2305.16300) and one sample's layout are :func:`bsbr.analysis.passkey_sample`;
the exact-match score is :func:`bsbr.analysis.answer_exact_match`. The variants compared:

* ``original`` — the pretrained model, full causal attention;
* ``calibrated`` — the normalised BSBR conversion with retrieval;
* ``own_chunk`` — the same conversion with retrieval off (own chunk + sink tokens);
* ``sliding_window`` — the original with :func:`bsbr.masks.band_mask` (a window plus attention sinks).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from bsbr.analysis import answer_exact_match, passkey_sample, wilson_interval
from bsbr.convert import set_retrieval
from bsbr.data import token_windows
from bsbr.masks import band_mask

__all__ = ["FULL_PROFILE", "VARIANTS", "accuracy_table", "answer_logits", "check_passkey_parameters",
           "format_accuracy", "full_profile_estimate", "passkey_trials", "retrieval_verdict", "score_trial",
           "summarize_trials", "token_stream", "trial_stride"]

#: Variant -> how tables and figures name it.
VARIANTS = {"original": "original (full attention)", "calibrated": "calibrated BSBR",
            "own_chunk": "own chunk + sinks (no retrieval)", "sliding_window": "sliding window + sinks (original)"}
#: The documented full profile: 4 lengths × 5 depths × 10 trials (50 trials per length and variant).
FULL_PROFILE = {"lengths": [1024, 2048, 4096, 8192], "depths": [0.1, 0.3, 0.5, 0.7, 0.9], "trials": 10}


def check_passkey_parameters(split, lengths, depths, variants, check_generate) -> None:
    """Raise ValueError naming the parameter unless ``split`` is held out (not ``"train"``: the calibration text),
    ``lengths`` a non-empty list of integers >= 64 (tokens), ``depths`` a non-empty list of numbers in [0, 1],
    ``variants`` distinct names of :data:`VARIANTS`, ``check_generate`` a bool."""
    if split == "train":
        raise ValueError("split must be a held-out split ('validation' or 'test'): the calibration used 'train'")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of integers >= 64, got {lengths!r}")
    if not depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    if not variants or set(variants) - set(VARIANTS) or len(set(variants)) != len(variants):
        raise ValueError(f"variants must be distinct names from {list(VARIANTS)}, got {variants!r}")
    if not isinstance(check_generate, bool):
        raise ValueError(f"check_generate must be True or False, got {check_generate!r}")


def token_stream(tokenizer, documents) -> torch.Tensor:
    """The documents as one token stream: each tokenized alone (no special tokens) and followed by EOS.

    Args:
        tokenizer: has ``encode(text, add_special_tokens=False)`` and ``eos_token_id``.
        documents: dicts with ``"text"`` (a corpus split, :func:`bsbr.data.load_split`).
    Returns:
        LongTensor ``[tokens]``.
    Raises:
        ValueError: no documents or no text (:func:`bsbr.data.token_windows`).
    """
    token_windows(tokenizer, documents, 1, 1)  # validates the split
    stream = []
    for doc in documents:
        stream += tokenizer.encode(doc["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return torch.tensor(stream, dtype=torch.long)


def trial_stride(stream_tokens: int, max_length: int, trials: int) -> int:
    """Tokens between the starts of consecutive trials' filler: as far apart as the stream allows, never more than
    ``max_length`` (so trials overlap as little as the text allows).

    Raises:
        ValueError: a stream of ``stream_tokens`` too short for ``trials`` trials of ``max_length`` tokens.
    """
    stride = (stream_tokens - max_length) // max(trials - 1, 1)
    if stride < 1:
        raise ValueError(f"trials: the stream ({stream_tokens} tokens) is too short for {trials} trials of "
                         f"{max_length} tokens")
    return min(stride, max_length)


def passkey_trials(tokenizer, stream: torch.Tensor, lengths, depths, trials: int, seed: int) -> list[dict]:
    """Every (length, depth, trial) sample once; the variants all score these.

    Trial ``k`` takes its filler from ``stream[k · stride:]`` (:func:`trial_stride`); each sample
    gets its own 5-digit passkey drawn from ``torch.Generator().manual_seed(seed)`` in (length, depth, trial) order.

    Returns:
        dicts ``{length, depth, trial, passkey, input_ids, answer_start, fact_start, fact_end, answer_ids}``
        (:func:`bsbr.analysis.passkey_sample`).
    Raises:
        ValueError: ``stream`` too short for ``trials`` trials of ``max(lengths)`` tokens.
    """
    stride = trial_stride(len(stream), max(lengths), trials)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                passkey = str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))
                sample = passkey_sample(tokenizer, stream[trial * stride :], length, depth, passkey)
                samples.append({"length": length, "depth": depth, "trial": trial, "passkey": passkey, **sample})
    return samples


def answer_logits(variant: str, input_ids: torch.Tensor, tail: int, base, calibrated, window: int,
                  window_sinks: int) -> torch.Tensor:
    """Logits of the last ``tail`` positions under one variant (the LM head only where the answer is scored).

    Args:
        variant: a :data:`VARIANTS` name; ``original``/``sliding_window`` run ``base``, ``calibrated``/``own_chunk``
            run ``calibrated`` with retrieval on/off (:func:`bsbr.convert.set_retrieval`).
        input_ids: ``[batch, seq_len]``.
        window, window_sinks: the sliding window's width and sink tokens (:func:`bsbr.masks.band_mask`).
    Returns:
        ``[batch, tail, vocab]``.
    """
    if variant in ("original", "sliding_window"):
        mask = band_mask(input_ids.shape[1], window, window_sinks) if variant == "sliding_window" else None
        hidden = base.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return base.lm_head(hidden[:, -tail:])
    set_retrieval(calibrated, variant == "calibrated")
    hidden = calibrated.model(input_ids=input_ids).last_hidden_state
    return calibrated.lm_head(hidden[:, -tail:])


def score_trial(sample: dict, variant: str, logits: torch.Tensor, chunk_size: int, sink_size: int, window: int,
                window_sinks: int) -> dict:
    """One row of the trials table: exact match, the answer's log-probability (nats, float64), and whether the
    answer's first prediction (position ``answer_start - 1``) sees the whole fact without retrieval — in its own
    chunk (or the fact inside the sink tokens), or inside the sliding window (or its sinks).

    Args:
        sample: :func:`passkey_trials` item; logits: ``[1, answer_len + 1, vocab]`` (:func:`answer_logits`).
    """
    x = sample["input_ids"][None]  # [1, length]
    answer_start = sample["answer_start"]
    log_probs = torch.log_softmax(logits[0, :-1].double(), dim=-1)  # [answer_len, vocab]
    query = answer_start - 1
    return {
        "length": sample["length"], "depth": sample["depth"], "trial": sample["trial"], "variant": variant,
        "passkey": sample["passkey"], "fact_start": sample["fact_start"], "answer_start": answer_start,
        "correct": bool(answer_exact_match(logits, x, answer_start)[0]),
        "answer_logprob": log_probs.gather(-1, x[0, answer_start:, None]).sum().item(),
        "fact_visible_own_chunk": sample["fact_start"] // chunk_size == query // chunk_size
                                  or sample["fact_end"] <= sink_size,
        "fact_visible_window": query - sample["fact_start"] < window or sample["fact_end"] <= window_sinks,
    }


def summarize_trials(group: pd.DataFrame) -> pd.Series:
    """Accuracy of a group of trials rows with its Wilson 95 % interval, the mean answer log-probability, and the
    share of trials whose fact was visible to the own-chunk / window variants."""
    correct, n = int(group.correct.sum()), len(group)
    low, high = wilson_interval(correct, n)
    return pd.Series({"trials": n, "correct": correct, "accuracy": correct / n, "ci_low": low, "ci_high": high,
                      "mean_answer_logprob": group.answer_logprob.mean(),
                      "fact_visible_own_chunk": group.fact_visible_own_chunk.mean(),
                      "fact_visible_window": group.fact_visible_window.mean()})


def accuracy_table(trials: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """:func:`summarize_trials` per group of ``by`` (sorted by it), ``trials``/``correct`` as integers."""
    table = (trials.groupby(by).apply(summarize_trials, include_groups=False).reset_index().sort_values(by)
             .reset_index(drop=True))
    table[["trials", "correct"]] = table[["trials", "correct"]].astype(int)
    return table


def format_accuracy(row) -> str:
    """``"0.50 [0.09, 0.91] (1/2)"``: accuracy, Wilson interval, correct/trials."""
    return f"{row.accuracy:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}] ({int(row.correct)}/{int(row.trials)})"


def retrieval_verdict(far_summary: pd.DataFrame) -> tuple[str, float]:
    """On facts out of reach of own chunk and window (``far_summary``: :func:`summarize_trials` per variant, with
    ``calibrated`` and ``original``): whether the calibrated BSBR retrieves about as well as the original (its upper
    bound reaches the original's accuracy, and it got at least one right), recovers part of it (its lower bound above
    the best variant without retrieval), or neither.

    Returns:
        (the verdict as a phrase, the best accuracy without retrieval or NaN).
    """
    bsbr, original = far_summary.loc["calibrated"], far_summary.loc["original"]
    baseline = max((far_summary.loc[v].accuracy for v in ("own_chunk", "sliding_window") if v in far_summary.index),
                   default=float("nan"))
    verdict = ("retrieves the fact about as well as the original" if bsbr.ci_high >= original.accuracy
               and bsbr.accuracy > 0 else
               "recovers part of the original's retrieval" if bsbr.ci_low > baseline else
               "does not retrieve the fact measurably better than attention without retrieval")
    return verdict, baseline


def full_profile_estimate(times: pd.DataFrame, profile: dict = FULL_PROFILE) -> tuple[dict, float]:
    """Seconds of the full profile from the measured median forward times.

    Args:
        times: ``[length, variant, median_s]`` (seconds per forward).
        profile: ``{"lengths", "depths", "trials"}``.
    Returns:
        (length -> seconds of one sample through every variant: measured, or beyond the longest measured length a
        power law whose exponent comes from the two longest measured lengths — or 1, linear, a lower bound, with one;
        total seconds of the profile).
    """
    median = times.groupby("length").median_s.sum()  # seconds of one sample through every variant
    if len(median) >= 2:
        exponent = float(np.log(median.iloc[-1] / median.iloc[-2]) / np.log(median.index[-1] / median.index[-2]))
    else:
        exponent = 1.0
    estimate = {n: float(median.loc[n]) if n in median.index else
                float(median.iloc[-1] * (n / median.index[-1]) ** exponent) for n in profile["lengths"]}
    total = sum(estimate[n] * len(profile["depths"]) * profile["trials"] for n in estimate)
    return estimate, total
