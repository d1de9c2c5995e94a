"""The passkey-retrieval experiment (notebook ``05_long_range``): the model variants it compares (:data:`VARIANTS`),
trials built from held-out text, scoring with one forward, accuracy tables with Wilson intervals, the goals of the
experiment, the trials a ±15-point interval needs, and run-time estimates from measured forward times.

The task (Mohtashami & Jaggi 2023, arXiv 2305.16300) and one sample's layout are :func:`bsbr.analysis.passkey_sample`;
the exact-match score is :func:`bsbr.analysis.answer_exact_match`. The variants are :data:`VARIANTS`; each records
how it is built (:func:`build_variant`) and how many tokens one query attends at most (:func:`attended_tokens`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from bsbr.analysis import PASSKEY_TEMPLATES, answer_exact_match, passkey_sample, repeated_filler, wilson_interval
from bsbr.convert import converted_copy, load_conversion, load_lora, load_meta_router, set_retrieval
from bsbr.convert.checkpoint import conversion_settings
from bsbr.data import token_windows
from bsbr.masks import band_mask

__all__ = ["FULL_PROFILE", "GOALS", "HEADLINE_HALF_WIDTH", "TRAINED_LENGTHS", "VARIANTS", "PasskeyVariant",
           "accuracy_table", "accuracy_text", "answer_logits", "answer_logprob_table", "attended_tokens",
           "build_variant", "check_passkey_parameters", "filler_starts", "format_accuracy", "goal_verdicts",
           "headline_table", "out_of_reach", "passkey_trials",
           "profile_seconds", "reach_settings", "score_trial", "summarize_trials", "token_stream",
           "trials_for_half_width", "variant_mask"]


@dataclass(frozen=True)
class PasskeyVariant:
    """One model variant of the passkey experiment.

    Attributes:
        label: how tables and figures name it.
        build: how it is built (:func:`build_variant`): ``"original"`` (the pretrained model), ``"band_mask"`` (the
            original with a sliding-window mask, :func:`variant_mask`), ``"blocks"`` (``retrieval="blocks"`` conversion
            with ``summary`` and ``blocks_options``), ``"blocks_off"`` (the same conversion with retrieval off: the
            exact region), ``"terraced"`` (notebook 02's terraced conversion + LoRA files, retrieval on).
        summary: the block key summary of a ``"blocks"`` variant (``"minmax"``: Quest's bound; ``"mean"``).
        positions: the ``positions`` option of a ``"blocks"`` variant when it overrides ``blocks_options``
            (``"compact"``: RoPE distances kept inside the trained range).
        router: the ``router`` of a ``"blocks"`` variant (``"query"``: each token's own query against the block
            summaries; ``"meta"``: BSBR's meta-query/meta-key chunk router with notebook 02's calibrated meta
            projections, choosing whole chunks, at least the same number of retrieved tokens: :func:`build_variant`).

    Whether a variant may run past the model's trained positions (``long_lengths``) depends on its settings:
    :func:`reach_settings` ``["past_trained_range"]``.
    """

    label: str
    build: str
    summary: str | None = None
    positions: str | None = None
    router: str = "query"


#: Variant name -> :class:`PasskeyVariant`, in table order.
VARIANTS: dict[str, PasskeyVariant] = {
    "original": PasskeyVariant("original (full attention)", "original"),
    "blocks_minmax": PasskeyVariant("blocks retrieval, min/max keys (Quest)", "blocks", summary="minmax"),
    "blocks_mean": PasskeyVariant("blocks retrieval, mean keys", "blocks", summary="mean"),
    "blocks_mean_compact": PasskeyVariant("blocks retrieval, mean keys, compact positions", "blocks", summary="mean",
                                          positions="compact"),
    "blocks_meta": PasskeyVariant("blocks retrieval, BSBR's meta router (whole chunks)", "blocks", summary="mean",
                                  router="meta"),
    "exact_region": PasskeyVariant("exact region only (own + previous chunk + sinks)", "blocks_off"),
    "terraced": PasskeyVariant("terraced + states (02: transfer + LoRA)", "terraced"),
    "sliding_window": PasskeyVariant("sliding window + sinks (original)", "band_mask"),
}
#: The positions SmolLM2-135M was trained on: the goals up to here are "to 8k", beyond it "past the trained range".
TRAINED_LENGTHS = (1024, 2048, 4096, 8192)
#: The half-width (accuracy points / 100) the 95 % Wilson interval of a headline cell (one length and variant, depths
#: pooled) must not exceed in the full profile.
HEADLINE_HALF_WIDTH = 0.15
#: The goals of issue "block retrieval that retrieves": blocks retrieval at least ``accuracy`` in every (length,
#: depth) cell to 8k and never below the original in a cell; at most ``attended_tokens`` per query at 8,192 tokens;
#: at least ``long_accuracy`` at each of ``long_lengths``.
GOALS = {"accuracy": 0.95, "attended_tokens": 1024, "attended_at": 8192, "long_accuracy": 0.90,
         "long_lengths": (16384, 32768)}


def trials_for_half_width(half_width: float, z: float = 1.959963984540054) -> int:
    """Fewest trials ``n`` from which on the Wilson interval (:func:`bsbr.analysis.wilson_interval`) of every outcome
    ``0..n`` correct is at most ``±half_width``: the half-width is at most ``z / (2·sqrt(n + z²))`` (reached at
    ``n/2`` correct), so ``n = ceil((z / (2·half_width))² − z²)``. (A single trial can be narrower than two: ``0/1``
    has no ``p̂ = 1/2``; this counts the width every larger ``n`` keeps.)

    Raises:
        ValueError: ``half_width`` not in (0, 0.5).
    """
    if isinstance(half_width, bool) or not isinstance(half_width, (int, float)) or not 0 < half_width < 0.5:
        raise ValueError(f"half_width must be a number in (0, 0.5), got {half_width!r}")
    return max(1, math.ceil((z / (2 * half_width)) ** 2 - z * z - 1e-9))


_FULL_DEPTHS = [0.05, 0.25, 0.5, 0.75, 0.95]
#: The documented full profile: every variant at 1k-8k, ``long_lengths`` for the variants past the trained range,
#: 5 depths, and enough trials per (length, depth) cell that a headline cell (depths pooled) has a 95 % Wilson
#: interval no wider than ±:data:`HEADLINE_HALF_WIDTH`.
FULL_PROFILE = {"lengths": list(TRAINED_LENGTHS), "long_lengths": list(GOALS["long_lengths"]), "depths": _FULL_DEPTHS,
                "trials": math.ceil(trials_for_half_width(HEADLINE_HALF_WIDTH) / len(_FULL_DEPTHS))}


def _check_lengths(name, values, allow_empty=False):
    if not isinstance(values, list) or (not values and not allow_empty) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in values):
        kind = "list" if allow_empty else "non-empty list"
        raise ValueError(f"{name} must be a {kind} of integers >= 64, got {values!r}")


def check_passkey_parameters(split, lengths, long_lengths, depths, variants, blocks_options, check_generate,
                             task="fact_in_text") -> None:
    """Raise ValueError naming the parameter unless ``task`` names a :data:`bsbr.analysis.PASSKEY_TEMPLATES` entry,
    ``split`` is held out (not ``"train"``: the calibration text),
    ``lengths`` a non-empty list of integers >= 64 (tokens), ``long_lengths`` a list of such integers (may be empty),
    ``depths`` a non-empty list of numbers in [0, 1], ``variants`` distinct names of :data:`VARIANTS`,
    ``blocks_options`` a dict of ``retrieval="blocks"`` options without ``summary`` (each blocks variant sets its own;
    the converter checks the rest), ``check_generate`` a bool."""
    if not isinstance(task, str) or task not in PASSKEY_TEMPLATES:
        raise ValueError(f"task must be one of {sorted(PASSKEY_TEMPLATES)}, got {task!r}")
    if split == "train":
        raise ValueError("split must be a held-out split ('validation' or 'test'): the calibration used 'train'")
    _check_lengths("lengths", lengths)
    _check_lengths("long_lengths", long_lengths, allow_empty=True)
    if not isinstance(depths, list) or not depths or any(
            isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    if not isinstance(variants, list) or not variants or set(variants) - set(VARIANTS) \
            or len(set(variants)) != len(variants):
        raise ValueError(f"variants must be distinct names from {list(VARIANTS)}, got {variants!r}")
    if not isinstance(blocks_options, dict) or "summary" in blocks_options:
        raise ValueError(f"blocks_options must be a dict of retrieval='blocks' options without 'summary' (each "
                         f"blocks variant sets its own), got {blocks_options!r}")
    if not isinstance(check_generate, bool):
        raise ValueError(f"check_generate must be True or False, got {check_generate!r}")


# --- the variants ----------------------------------------------------------------------------------------------------


def build_variant(name: str, base, chunk_size: int, blocks_options: dict, terraced_path=None,
                  terraced_lora_path=None, calibrated_path=None):
    """The model a variant runs (eval mode); the pretrained tensors are shared with ``base`` except for ``terraced``.

    Args:
        name: a :data:`VARIANTS` name.
        base: the original pretrained model (returned itself for ``original`` and ``sliding_window``).
        chunk_size, blocks_options: the ``retrieval="blocks"`` conversion of the blocks variants and ``exact_region``
            (:func:`bsbr.convert.converted_copy`; each blocks variant adds its ``summary``). A ``router="meta"``
            variant retrieves whole chunks (``block_size = chunk_size``, no pages) and ``top_k = ceil(top_k ·
            block_size / chunk_size)`` of them: at least the tokens the query-routed variants retrieve.
        terraced_path, terraced_lora_path: notebook 02's ``save_conversion`` and ``save_lora`` files (``terraced``),
            loaded onto a copy of ``base`` (:func:`bsbr.convert.load_conversion`, :func:`bsbr.convert.load_lora`).
        calibrated_path: notebook 02's normalised conversion (``save_conversion``), whose calibrated meta
            projections a ``router="meta"`` variant routes with (:func:`bsbr.convert.load_meta_router`).
    Raises:
        ValueError: an unknown name, bad options (from the converter, naming them), or no ``calibrated_path`` for a
            ``router="meta"`` variant.
    """
    if name not in VARIANTS:
        raise ValueError(f"name must be one of {list(VARIANTS)}, got {name!r}")
    variant = VARIANTS[name]
    if variant.build in ("original", "band_mask"):
        return base
    if variant.build == "terraced":
        model = load_conversion(copy.deepcopy(base), terraced_path, retrieval="terraced")
        return set_retrieval(load_lora(model, terraced_lora_path), True).eval()
    options = dict(blocks_options)
    if variant.summary is not None:
        options["summary"] = variant.summary
    if variant.positions is not None:
        options["positions"] = variant.positions
    if variant.router == "meta":
        if calibrated_path is None:
            raise ValueError(f"calibrated_path: variant {name!r} routes with notebook 02's calibrated meta projections; "
                             "pass the normalised conversion file")
        retrieved = options.get("top_k", 4) * options.get("block_size", chunk_size)
        options.update(router="meta", block_size=chunk_size, page_size=None, top_k=-(-retrieved // chunk_size))
    model = converted_copy(base, chunk_size, retrieval="blocks", **options).eval()
    if variant.router == "meta":
        load_meta_router(model, calibrated_path)
    return set_retrieval(model, variant.build == "blocks")


def variant_mask(name: str, seq_len: int, window: int, window_sinks: int):
    """The attention mask a variant's forward gets: the sliding window's :func:`bsbr.masks.band_mask` for
    ``band_mask`` variants (``[1, 1, seq_len, seq_len]`` bool), else None."""
    return band_mask(seq_len, window, window_sinks) if VARIANTS[name].build == "band_mask" else None


def reach_settings(name: str, model, window: int, window_sinks: int) -> dict:
    """What a variant's queries can reach, from the built model's settings: ``{"chunk_size", "sink_size",
    "retrieved", "window", "dense_layers", "states", "past_trained_range"}`` — the local region is the own chunk up
    to the token plus the previous chunk (``chunk_size`` None: none), ``retrieved`` the tokens of the top-k blocks
    (``top_k·block_size``), ``window`` a sliding window's width (None: none), ``dense_layers`` the layers with full
    causal attention, ``states`` whether older chunks are read from compressed states (terraced),
    ``past_trained_range`` whether it may run past the trained positions: a blocks conversion with
    ``positions="compact"`` (no RoPE distance beyond ``sink_size + block_size + 2·chunk_size``, however long the
    input; :class:`bsbr.convert.retrieval.BlocksMode`)."""
    build = VARIANTS[name].build
    reach = {"chunk_size": None, "sink_size": 0, "retrieved": 0, "window": None, "dense_layers": 0, "states": False,
             "past_trained_range": False}
    if build == "original":
        return {**reach, "dense_layers": model.config.num_hidden_layers}
    if build == "band_mask":
        return {**reach, "window": window, "sink_size": window_sinks}
    settings = conversion_settings(model)
    options = settings["normalized_options"]
    reach.update(chunk_size=settings["chunk_size"], sink_size=options.get("sink_size", 0))
    if build == "terraced":
        return {**reach, "states": True}
    reach["dense_layers"] = len(options.get("dense_layers", ()))
    reach["past_trained_range"] = options.get("positions", "original") == "compact"
    if build == "blocks":
        reach["retrieved"] = options["top_k"] * options["block_size"]
    return reach


def attended_tokens(reach: dict, seq_len: int) -> int:
    """Most tokens one query attends exactly at length ``seq_len``, in its widest layer (a dense layer: all).

    Local region ``2·chunk_size`` (own chunk up to the token + the previous chunk) or a ``window``, plus
    ``sink_size`` sinks and ``retrieved`` tokens, capped at ``seq_len``; ``seq_len`` with full attention (no local
    limit, or ``dense_layers`` > 0). Compressed states (terraced) are not tokens and are not counted.

    Args:
        reach: :func:`reach_settings`.
    """
    if reach["dense_layers"] or (reach["chunk_size"] is None and reach["window"] is None):
        return seq_len
    local = reach["window"] if reach["window"] is not None else 2 * reach["chunk_size"]
    return min(seq_len, local + reach["sink_size"] + reach["retrieved"])


def answer_logits(model, input_ids: torch.Tensor, tail: int, attention_mask=None) -> torch.Tensor:
    """Logits of the last ``tail`` positions (the LM head only where the answer is scored).

    Args:
        model: a causal LM with ``.model`` (the decoder) and ``.lm_head`` (:func:`build_variant`).
        input_ids: ``[batch, seq_len]``; attention_mask: :func:`variant_mask`.
    Returns:
        ``[batch, tail, vocab]``.
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.lm_head(hidden[:, -tail:])


# --- trials ----------------------------------------------------------------------------------------------------------


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


def filler_starts(stream_tokens: int, lengths, depths, trials: int, trials_at: dict | None = None) -> dict[tuple, int]:
    """Where in the stream each (length, depth, trial) cell takes its filler: spread evenly over the whole stream.

    Cells are numbered trial-major (``i = trial·|lengths|·|depths| + length index·|depths| + depth index``, skipping
    the trials a length does not run) and cell ``i`` starts at ``i·stride``, ``stride = (stream_tokens -
    max(lengths)) // (cells - 1)``: every cell starts elsewhere, and the trials of one (length, depth) are about
    ``|lengths|·|depths|`` strides apart (a ``1/trials`` share of the stream).

    Args:
        trials: trials per (length, depth) cell; ``trials_at``: length -> its own count instead (e.g. fewer at the
            longest lengths), lengths not in it run ``trials``.
    Returns:
        ``{(length, depth, trial): start}`` (tokens).
    Raises:
        ValueError: a stream too short for ``max(lengths)`` tokens from a distinct start for every cell.
    """
    count = {n: (trials_at or {}).get(n, trials) for n in lengths}
    cells = [(n, d, t) for t in range(max(count.values())) for n in lengths for d in depths if t < count[n]]
    room = stream_tokens - max(lengths)
    stride = room // max(len(cells) - 1, 1)
    if room < 0 or (len(cells) > 1 and stride < 1):
        raise ValueError(f"trials: the stream ({stream_tokens} tokens) is too short for {len(cells)} cells of up to "
                         f"{max(lengths)} tokens, each from its own start")
    return {cell: i * stride for i, cell in enumerate(cells)}


def passkey_trials(tokenizer, stream: torch.Tensor | None, lengths, depths, trials: int, seed: int,
                   task: str = "fact_in_text", trials_at: dict | None = None) -> list[dict]:
    """Every (length, depth, trial) sample once; the variants all score these.

    ``task`` names a :data:`bsbr.analysis.PASSKEY_TEMPLATES` entry. With real-text filler (``"fact_in_text"``) each
    cell takes its filler from ``stream[start:]`` (:func:`filler_starts`, recorded as ``filler_start``); with a
    repeated filler (``"passkey"``: Mohtashami & Jaggi's sentences) every cell has the same filler, ``stream`` is not
    read (may be None) and ``filler_start`` is None. Each sample gets its own 5-digit passkey drawn from
    ``torch.Generator().manual_seed(seed)`` in (length, depth, trial) order. The same arguments give the same samples.
    ``trials_at`` maps a length to its own number of trials (lengths not in it run ``trials``).

    Returns:
        dicts ``{length, depth, trial, filler_start, passkey, input_ids, answer_start, fact_start, fact_end,
        answer_ids}`` (:func:`bsbr.analysis.passkey_sample`), in (length, depth, trial) order.
    Raises:
        ValueError: unknown ``task``; a ``trials_at`` entry not a positive integer for one of ``lengths``;
            ``stream`` too short (:func:`filler_starts`).
    """
    if task not in PASSKEY_TEMPLATES:
        raise ValueError(f"task must be one of {sorted(PASSKEY_TEMPLATES)}, got {task!r}")
    trials_at = dict(trials_at or {})
    for n, count in trials_at.items():
        if n not in lengths or isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"trials_at must map lengths of {list(lengths)} to integers >= 1, got {n!r}: {count!r}")
    template = PASSKEY_TEMPLATES[task]
    if template.filler is None:
        starts = filler_starts(len(stream), lengths, depths, trials, trials_at)
    else:
        repeated = repeated_filler(tokenizer, template, max(lengths))
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials_at.get(length, trials)):
                passkey = str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))
                start = starts[(length, depth, trial)] if template.filler is None else None
                filler = stream[start:] if template.filler is None else repeated
                sample = passkey_sample(tokenizer, filler, length, depth, passkey, template)
                samples.append({"length": length, "depth": depth, "trial": trial, "filler_start": start,
                                "passkey": passkey, **sample})
    return samples


def score_trial(sample: dict, variant: str, logits: torch.Tensor, chunk_size: int, sink_size: int, window: int,
                window_sinks: int) -> dict:
    """One row of the trials table: exact match, the answer's log-probability (nats, float64), and whether the
    answer's first prediction (the query at ``t = answer_start - 1``, chunk ``c = t // chunk_size``) sees the whole
    fact without retrieval:

    * ``fact_visible_own_chunk``: the fact starts in chunk ``c``, or lies inside the first ``sink_size`` tokens;
    * ``fact_visible_exact_region``: the fact lies inside ``[L_c, t]``, ``L_c = max(0, (c - 1)·chunk_size)`` (own
      and previous chunk), or inside the sinks;
    * ``fact_visible_window``: inside the sliding window ``[t - window + 1, t]`` or its ``window_sinks``.

    Args:
        sample: :func:`passkey_trials` item; logits: ``[1, answer_len + 1, vocab]`` (:func:`answer_logits`).
    """
    x = sample["input_ids"][None]  # [1, length]
    answer_start = sample["answer_start"]
    log_probs = torch.log_softmax(logits[0, :-1].double(), dim=-1)  # [answer_len, vocab]
    query = answer_start - 1
    chunk = query // chunk_size
    region_start = max(0, (chunk - 1) * chunk_size)
    in_sinks = sample["fact_end"] <= sink_size
    return {
        "length": sample["length"], "depth": sample["depth"], "trial": sample["trial"], "variant": variant,
        "passkey": sample["passkey"], "filler_start": sample["filler_start"], "fact_start": sample["fact_start"],
        "answer_start": answer_start,
        "correct": bool(answer_exact_match(logits, x, answer_start)[0]),
        "answer_logprob": log_probs.gather(-1, x[0, answer_start:, None]).sum().item(),
        "fact_visible_own_chunk": sample["fact_start"] // chunk_size == chunk or in_sinks,
        "fact_visible_exact_region": sample["fact_start"] >= region_start or in_sinks,
        "fact_visible_window": query - sample["fact_start"] < window or sample["fact_end"] <= window_sinks,
    }


# --- tables and goals ------------------------------------------------------------------------------------------------


def summarize_trials(group: pd.DataFrame) -> pd.Series:
    """Accuracy of a group of trials rows with its Wilson 95 % interval, the mean answer log-probability, and the
    share of trials whose fact was visible to the own chunk / the exact region / the window."""
    correct, n = int(group.correct.sum()), len(group)
    low, high = wilson_interval(correct, n)
    return pd.Series({"trials": n, "correct": correct, "accuracy": correct / n, "ci_low": low, "ci_high": high,
                      "mean_answer_logprob": group.answer_logprob.mean(),
                      "fact_visible_own_chunk": group.fact_visible_own_chunk.mean(),
                      "fact_visible_exact_region": group.fact_visible_exact_region.mean(),
                      "fact_visible_window": group.fact_visible_window.mean()})


def accuracy_table(trials: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """:func:`summarize_trials` per group of ``by`` (sorted by it), ``trials``/``correct`` as integers."""
    table = (trials.groupby(by).apply(summarize_trials, include_groups=False).reset_index().sort_values(by)
             .reset_index(drop=True))
    table[["trials", "correct"]] = table[["trials", "correct"]].astype(int)
    return table


def accuracy_text(accuracy: float, ci_low: float, ci_high: float, trials: int | None = None) -> str:
    """``"0.50 [0.09, 0.91] (1/2)"``: an exact-match accuracy (fraction in [0, 1]), its interval and, given the number
    of trials, correct/trials (correct = accuracy × trials, rounded). The one way the report, the index and the
    README write a passkey accuracy.

    Raises:
        ValueError: ``accuracy`` outside [0, 1], ``ci_low > ci_high``, or ``trials`` not a positive integer.
    """
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy!r}")
    if ci_low > ci_high:
        raise ValueError(f"ci_low ({ci_low!r}) must not exceed ci_high ({ci_high!r})")
    text = f"{accuracy:.2f} [{ci_low:.2f}, {ci_high:.2f}]"
    if trials is None:
        return text
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    return f"{text} ({round(accuracy * trials)}/{trials})"


def format_accuracy(row) -> str:
    """``"0.50 [0.09, 0.91] (1/2)"``: a row of :func:`accuracy_table` as :func:`accuracy_text` writes it."""
    return accuracy_text(float(row.accuracy), float(row.ci_low), float(row.ci_high), int(row.trials))


def _cell_name(row) -> str:
    return f"{int(row.length)} tokens, depth {row.depth:g}: {format_accuracy(row)}"


def goal_verdicts(cells: pd.DataFrame, by_length: pd.DataFrame, attended: pd.DataFrame, variant: str,
                  goals: dict = GOALS, trained_lengths=TRAINED_LENGTHS,
                  past_trained_range: bool | None = None) -> list[dict]:
    """The goals (:data:`GOALS`) for one blocks-retrieval variant, each ``met``, ``missed`` or ``not measured``
    (with what was measured so far) from the point estimates; the evidence names the cell that decides, with its
    Wilson interval and n.

    * accuracy ≥ ``goals["accuracy"]`` in every (length, depth) cell up to the trained range (``cells``); met only
      when every one of ``trained_lengths`` was measured;
    * never below ``original`` in a cell (the same cells; not measured without the original);
    * at most ``goals["attended_tokens"]`` per query at ``goals["attended_at"]`` tokens (``attended``: ``[variant,
      length, attended_tokens]``, computed from the settings at that length);
    * accuracy ≥ ``goals["long_accuracy"]`` at each of ``goals["long_lengths"]`` (``by_length``, depths pooled).
      When no such length was measured, the evidence gives the one reason that applies: ``past_trained_range``
      (:func:`reach_settings`) False — the variant cannot run past the trained positions; True — the run measured
      no length past them; None (unknown) — both.

    Returns:
        ``[{"variant", "key", "goal", "verdict", "evidence"}]``, ``key`` one of ``accuracy_to_8k``,
        ``not_below_original``, ``attended_at_8k``, ``accuracy_past_8k`` (in this order).
    """
    rows = []
    mine = cells[(cells.variant == variant) & cells.length.isin(trained_lengths)]
    measured = sorted(int(n) for n in mine.length.unique())
    missing = [n for n in trained_lengths if n not in measured]

    def partial(verdict_if_complete):
        if verdict_if_complete != "met" or not missing:
            return verdict_if_complete
        return f"not measured at {', '.join(map(str, missing))} (holds at {', '.join(map(str, measured))})"

    goal = f"≥ {goals['accuracy']:.0%} in every (length, depth) cell to {max(trained_lengths):,} tokens"
    if mine.empty:
        rows.append({"key": "accuracy_to_8k", "goal": goal, "verdict": "not measured", "evidence": "no cell"})
    else:
        worst = mine.sort_values(["accuracy", "length", "depth"]).iloc[0]
        rows.append({"key": "accuracy_to_8k", "goal": goal,
                     "verdict": partial("met" if worst.accuracy >= goals["accuracy"] else "missed"),
                     "evidence": f"lowest cell {_cell_name(worst)}"})
    goal = "never below the original in a cell"
    original = cells[(cells.variant == "original") & cells.length.isin(trained_lengths)]
    if mine.empty or original.empty:
        rows.append({"key": "not_below_original", "goal": goal, "verdict": "not measured",
                     "evidence": "needs both variants"})
    else:
        paired = mine.merge(original, on=["length", "depth"], suffixes=("", "_original"))
        paired["gap"] = paired.accuracy - paired.accuracy_original
        worst = paired.sort_values(["gap", "length", "depth"]).iloc[0]
        rows.append({"key": "not_below_original", "goal": goal,
                     "verdict": partial("met" if worst.gap >= 0 else "missed"),
                     "evidence": f"smallest margin at {int(worst.length)} tokens, depth {worst.depth:g}: "
                                 f"{worst.accuracy:.2f} vs the original's {worst.accuracy_original:.2f} "
                                 f"(n = {int(worst.trials)} each)"})
    at = attended[(attended.variant == variant) & (attended.length == goals["attended_at"])]
    goal = f"≤ {goals['attended_tokens']:,} attended tokens per query at {goals['attended_at']:,}"
    if at.empty:
        rows.append({"key": "attended_at_8k", "goal": goal, "verdict": "not measured",
                     "evidence": "no attended-token count at that length"})
    else:
        count = int(at.attended_tokens.iloc[0])
        rows.append({"key": "attended_at_8k", "goal": goal,
                     "verdict": "met" if count <= goals["attended_tokens"] else "missed",
                     "evidence": f"{count:,} tokens per query (from the settings)"})
    goal = f"≥ {goals['long_accuracy']:.0%} at {' and '.join(f'{n:,}' for n in goals['long_lengths'])} tokens"
    long = by_length[(by_length.variant == variant) & by_length.length.isin(goals["long_lengths"])]
    if long.empty:
        reason = {False: "this variant does not go past the trained range",
                  True: "this run measured no length past the trained range (its profile's long_lengths)",
                  None: "this variant does not go past the trained range, or the run has no long lengths"}
        rows.append({"key": "accuracy_past_8k", "goal": goal, "verdict": "not measured",
                     "evidence": reason[past_trained_range]})
    else:
        worst = long.sort_values(["accuracy", "length"]).iloc[0]
        verdict = "met" if worst.accuracy >= goals["long_accuracy"] else "missed"
        absent = [n for n in goals["long_lengths"] if n not in set(long.length)]
        if verdict == "met" and absent:
            verdict = f"not measured at {', '.join(map(str, absent))}"
        rows.append({"key": "accuracy_past_8k", "goal": goal, "verdict": verdict,
                     "evidence": f"lowest {int(worst.length)} tokens: {format_accuracy(worst)}"})
    return [{"variant": variant, **row} for row in rows]


def profile_seconds(times: pd.DataFrame, lengths: dict, samples_per_length: int) -> pd.DataFrame:
    """Seconds a profile takes, from measured median forward times.

    Args:
        times: ``[length, variant, median_s]`` (seconds per forward, measured).
        lengths: variant -> the lengths it runs in the profile.
        samples_per_length: depths × trials.
    Returns:
        ``[variant, length, forward_s, extrapolated, seconds]`` (``seconds = forward_s · samples_per_length``): a
        measured length's median, or beyond a variant's longest measured length a power law ``t ∝ nᵖ`` with ``p`` from
        its two longest measured lengths, at least 1 (a forward is at least linear in the length; with one measured
        length ``p = 1``, a lower bound where attention grows faster).
    Raises:
        ValueError: a variant without a measured time.
    """
    rows = []
    for variant, wanted in lengths.items():
        mine = times[times.variant == variant].set_index("length").median_s.sort_index()
        if mine.empty:
            raise ValueError(f"times has no measured forward of variant {variant!r}")
        exponent = 1.0
        if len(mine) >= 2:
            exponent = max(1.0, float(np.log(mine.iloc[-1] / mine.iloc[-2]) / np.log(mine.index[-1] / mine.index[-2])))
        for n in wanted:
            measured = n in mine.index
            if measured:
                forward = float(mine.loc[n])
            else:  # from the nearest measured length: the longest one below n, or the shortest one above it
                ref = max((m for m in mine.index if m < n), default=min(mine.index))
                forward = float(mine.loc[ref] * (n / ref) ** exponent)
            rows.append({"variant": variant, "length": n, "forward_s": forward, "extrapolated": not measured,
                         "seconds": forward * samples_per_length})
    return pd.DataFrame(rows, columns=["variant", "length", "forward_s", "extrapolated", "seconds"])


def out_of_reach(trials: pd.DataFrame, lengths=None) -> pd.DataFrame:
    """The trials whose fact neither the exact region nor the sliding window sees (only these test long-range
    retrieval): rows of ``trials`` with ``fact_visible_exact_region`` and ``fact_visible_window`` both False; with
    ``lengths``, only at those lengths (the ones every variant ran, so that the variants are compared on the same
    samples: ``long_lengths`` are run by the variants past the trained range alone)."""
    far = trials[~trials.fact_visible_exact_region.astype(bool) & ~trials.fact_visible_window.astype(bool)]
    return far if lengths is None else far[far.length.isin(list(lengths))]


def answer_logprob_table(trials: pd.DataFrame, reference: str = "original", resamples: int = 2000,
                         seed: int = 0) -> pd.DataFrame:
    """The answer's log-probability per variant and its paired difference from ``reference`` on the same samples:
    a graded view of retrieval where exact match is all-or-nothing (a model that almost recalls the number scores
    near its reference, one that cannot see the fact some 20 nats lower).

    Args:
        trials: rows of :func:`score_trial` (``length, depth, trial, variant, answer_logprob``), every variant on the
            same samples (e.g. :func:`out_of_reach`).
        reference: the variant the differences are taken from.
        resamples, seed: the percentile bootstrap over samples (paired: a resample draws whole samples).
    Returns:
        one row per variant (in order of appearance): ``variant, samples, mean_logprob, difference, ci_low, ci_high``
        (nats; ``difference`` = variant − reference, its 95 % bootstrap interval).
    Raises:
        ValueError: ``reference`` absent, or variants scored on different samples.
    """
    wide = trials.pivot_table(index=["length", "depth", "trial"], columns="variant", values="answer_logprob",
                              sort=False)
    if reference not in wide.columns:
        raise ValueError(f"reference: no trials of {reference!r} (variants: {list(wide.columns)})")
    if wide.isna().any().any():
        raise ValueError("trials: every variant must be scored on the same samples")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(wide), size=(resamples, len(wide)))
    rows = []
    for variant in dict.fromkeys(trials.variant):
        diff = (wide[variant] - wide[reference]).to_numpy()
        low, high = np.percentile(diff[picks].mean(1), [2.5, 97.5])
        rows.append({"variant": variant, "samples": len(wide), "mean_logprob": float(wide[variant].mean()),
                     "difference": float(diff.mean()), "ci_low": float(low), "ci_high": float(high)})
    return pd.DataFrame(rows)


def headline_table(by_length: pd.DataFrame, far: pd.DataFrame, attended: pd.DataFrame, variants,
                   lengths) -> pd.DataFrame:
    """The "what we found" table: one row per variant (its :data:`VARIANTS` label), per length its accuracy with
    Wilson interval and n (:func:`format_accuracy`; ``—`` where it did not run), the out-of-reach accuracy (pooled
    over the lengths every variant ran: :func:`out_of_reach`), and the attended tokens per query at each of its lengths (``"516 at
    2,048; 600 at 4,096"``, ``"772 at every length"`` where it does not change, ``"all (= the length)"`` for full
    attention; ``(+ states)`` where older chunks are also read from compressed states).

    Args:
        by_length: :func:`accuracy_table` by ``[length, variant]``; far: :func:`accuracy_table` of the out-of-reach
            trials by ``[variant]``; attended: ``[variant, length, attended_tokens, states]``.
        variants, lengths: the rows and the length columns, in order.
    """
    pooled = by_length.set_index(["length", "variant"])
    far = far.set_index("variant")
    counts = attended.set_index(["variant", "length"])
    rows = []
    for variant in variants:
        row = {"variant": VARIANTS[variant].label}
        for n in lengths:
            row[f"{n:,} tokens"] = format_accuracy(pooled.loc[(n, variant)]) if (n, variant) in pooled.index else "—"
        row["fact out of reach (lengths all ran)"] = format_accuracy(far.loc[variant]) if variant in far.index else "—"
        mine = counts.loc[variant] if variant in counts.index.get_level_values(0) else None
        counts_by_length = ({int(n): int(r.attended_tokens) for n, r in mine.sort_index().iterrows()}
                            if mine is not None else {})
        if len(counts_by_length) > 1 and all(count == n for n, count in counts_by_length.items()):
            attended_text = "all (= the length)"
        elif len(counts_by_length) > 1 and len(set(counts_by_length.values())) == 1:
            attended_text = f"{next(iter(counts_by_length.values())):,} at every length"
        else:
            attended_text = "; ".join(f"{count:,} at {n:,}" for n, count in counts_by_length.items())
        states = mine is not None and bool(mine.states.any())
        row["attended tokens per query"] = attended_text + (" (+ states)" if states else "")
        rows.append(row)
    return pd.DataFrame(rows)
