"""The long-document experiment (notebook ``06_long_documents``): held-out plays streamed to tens of thousands of
tokens through several variants of one model, and the tables and goal verdicts of its report.

Variants (:data:`VARIANTS`): ``blocks`` (the converted model with block retrieval, :mod:`bsbr.blocks`),
``exact_region`` (the same conversion with retrieval off: own + previous chunk and the sinks — the control that
locates a collapse), ``original`` (the pretrained model with its KV cache, as far as the machine allows),
``original_fresh`` (the original started fresh on the last stretch of the stream: the model's own perplexity on that
text, the reference for the late bins) and, optionally, ``normalized`` (the calibrated normalised BSBR).

Units: positions and lengths in tokens, times in seconds, memory in bytes, NLL in nats.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from bsbr._checks import check_positive_int, check_positive_number
from bsbr.data import SPLITS, load_split
from bsbr.experiment import check_ints
from bsbr.streaming_eval import binned_nll, stream_nll

__all__ = ["BLOCK_OPTIONS", "DECODE_RATIO", "DECODE_STEP_SECONDS", "FLAT_RATIO", "NLL_TOLERANCE", "STREAM_COST",
           "VARIANTS", "check_long_document_parameters", "choose_play", "decode_goal", "decode_latency",
           "decode_positions", "estimate_stream_seconds", "flatness", "flatness_against_original", "held_out_plays",
           "late_perplexity", "memory_table", "perplexity_bins", "steps_table", "stream_matches_full_forward",
           "stream_windows"]

#: Max |NLL difference| (nats) allowed between the stream and one full forward on the first tokens.
NLL_TOLERANCE = 1e-3
#: The variants a run may stream, in report order.
VARIANTS = ("blocks", "exact_region", "original", "original_fresh", "normalized")
#: Options of ``retrieval="blocks"`` the notebook passes on (:class:`bsbr.convert.retrieval.BlocksMode`).
BLOCK_OPTIONS = ("block_size", "top_k", "summary", "selection", "sink_size", "positions", "page_size")
#: The quality goal: no full perplexity bin at or beyond ``flat_from`` above ``FLAT_RATIO`` × the median of the bins
#: that end by ``flat_from``.
FLAT_RATIO = 1.5
#: The decode goal: the slowest single-token step of the last decode group at most ``DECODE_RATIO`` × its median.
DECODE_RATIO = 1.5
#: Seconds to stream ``n`` tokens from position 0 in 256-token pieces on 2 quiet threads of this project's machine
#: (2-core x86), modelled as ``a·n + b·n²/2`` (``a`` per token, ``b`` per token and token of context: the original's
#: attention over its growing KV cache), for SmolLM2-135M at chunk 256, blocks of 64, top-4. Measured 2026-12-01 on a
#: shared machine (load 5–6 on 2 cores) as CPU seconds of 1k-token spans on one thread — blocks 12.5 ms per token at
#: 0.5k–4.6k of context, exact region 4.8 ms, the original 3.95 ms at 0.5k–1.5k and 8.35 ms at 4.1k–4.6k — and scaled
#: by 0.36, the ratio of those blocks figures to the 4.5 ms per token that blocks take on 2 quiet threads. An
#: estimate, not a measurement: each run prints its own times beside it. ``normalized`` is not measured (a guess).
STREAM_COST = {"blocks": (4.5e-3, 0.0), "exact_region": (1.7e-3, 0.0), "original": (0.95e-3, 4.75e-7),
               "original_fresh": (0.95e-3, 4.75e-7), "normalized": (6.0e-3, 0.0)}
#: Seconds of one single-token decode step in the same conditions (the same scaling of ~130 ms CPU under load).
DECODE_STEP_SECONDS = 0.05


def check_long_document_parameters(*, splits, min_stream_tokens, max_tokens, variants, blocks, chunk_size, piece_size,
                                   decode_every, decode_steps, original_max_tokens, fresh_tokens, bin_size, flat_from,
                                   threads) -> None:
    """Raise ValueError naming the parameter unless: token counts are integers >= 1 (``max_tokens`` and
    ``original_max_tokens`` may be None: the whole text), ``threads`` >= 0, ``decode_steps < decode_every``,
    ``bin_size`` divides ``flat_from``, ``splits`` are held-out corpus splits (never ``train``: the calibration
    text), ``variants`` distinct names of :data:`VARIANTS` including ``"blocks"``, and ``blocks`` a dict of
    :data:`BLOCK_OPTIONS` (their values are checked by the conversion)."""
    check_ints(1, min_stream_tokens=min_stream_tokens, chunk_size=chunk_size, piece_size=piece_size,
               decode_every=decode_every, decode_steps=decode_steps, fresh_tokens=fresh_tokens, bin_size=bin_size,
               flat_from=flat_from)
    check_ints(0, threads=threads)
    check_ints(1, allow_none=True, max_tokens=max_tokens, original_max_tokens=original_max_tokens)
    if decode_steps >= decode_every:
        raise ValueError(f"decode_steps ({decode_steps}) must be smaller than decode_every ({decode_every})")
    if flat_from % bin_size:
        raise ValueError(f"bin_size ({bin_size}) must divide flat_from ({flat_from}): bins before and beyond it")
    if not isinstance(splits, (list, tuple)) or not splits or "train" in splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"splits must be held-out splits among {[s for s in SPLITS if s != 'train']}, got {splits!r}")
    if (not isinstance(variants, (list, tuple)) or "blocks" not in variants or len(set(variants)) != len(variants)
            or any(v not in VARIANTS for v in variants)):
        raise ValueError(f"variants must be distinct names among {list(VARIANTS)} including 'blocks', got {variants!r}")
    if not isinstance(blocks, dict) or set(blocks) - set(BLOCK_OPTIONS):
        raise ValueError(f"blocks must be a dict of options among {list(BLOCK_OPTIONS)}, got {blocks!r}")


def held_out_plays(tokenizer, corpus_dir, splits) -> tuple[list, pd.DataFrame]:
    """The Shakespeare documents of ``splits``, tokenized (no special tokens).

    Returns:
        (``[(split, document, token ids)]`` in split then file order, the catalogue ``[split, doc_id, title, tokens]``
        sorted by split and doc_id).
    Raises:
        ValueError: the splits hold no Shakespeare document.
    """
    plays = []
    for split in splits:
        for doc in load_split(corpus_dir, split):
            if doc["source"] == "shakespeare":
                plays.append((split, doc, tokenizer.encode(doc["text"], add_special_tokens=False)))
    if not plays:
        raise ValueError(f"splits {splits} hold no Shakespeare documents")
    catalogue = pd.DataFrame([{"split": s, "doc_id": d["doc_id"], "title": d["title"], "tokens": len(t)}
                              for s, d, t in plays]).sort_values(["split", "doc_id"]).reset_index(drop=True)
    return plays, catalogue


def choose_play(plays, splits, min_play_tokens: int, eos_token_id: int) -> SimpleNamespace:
    """The shortest play with at least ``min_play_tokens`` tokens (ties: smallest doc_id); if none is that long, the
    plays concatenated in split order, then doc_id order, separated by EOS, until the length is reached.

    Returns:
        namespace ``split`` (of the play, or the splits of the joined plays, joined by ``+``), ``title``,
        ``doc_ids``, ``tokens`` (list of ids), ``note`` (a sentence saying which text it is).
    """
    long_enough = [p for p in plays if len(p[2]) >= min_play_tokens]
    if long_enough:
        split, doc, tokens = min(long_enough, key=lambda p: (len(p[2]), p[1]["doc_id"]))
        return SimpleNamespace(split=split, title=doc["title"], doc_ids=[doc["doc_id"]], tokens=tokens,
                               note=f"the held-out play *{doc['title']}* ({split} split)")
    tokens, doc_ids = [], []
    for _, doc, play_tokens in sorted(plays, key=lambda p: (splits.index(p[0]), p[1]["doc_id"])):
        if tokens:
            tokens.append(eos_token_id)
        tokens += play_tokens
        doc_ids.append(doc["doc_id"])
        if len(tokens) >= min_play_tokens:
            break
    title = " + ".join(doc_ids)
    used = [s for s in splits if s in {split for split, doc, _ in plays if doc["doc_id"] in doc_ids}]
    return SimpleNamespace(split="+".join(used), title=title, doc_ids=doc_ids, tokens=tokens,
                           note=f"no held-out play has {min_play_tokens:,} tokens: {len(doc_ids)} plays concatenated "
                                f"({title}), separated by EOS")


def stream_windows(streamed: int, variants, original_max_tokens: int | None, fresh_tokens: int,
                   bin_size: int) -> dict:
    """The positions ``(start, end)`` each variant streams: ``[0, streamed)``; the original ``[0, min(streamed,
    original_max_tokens))``; ``original_fresh`` the last ``fresh_tokens`` or more: from ``streamed − fresh_tokens``
    rounded down to a multiple of ``bin_size`` (so its bins are the others' bins), or 0, to ``streamed``."""
    windows = {}
    for name in variants:
        if name == "original":
            windows[name] = (0, streamed if original_max_tokens is None else min(streamed, original_max_tokens))
        elif name == "original_fresh":
            windows[name] = (max(0, (streamed - fresh_tokens) // bin_size * bin_size), streamed)
        else:
            windows[name] = (0, streamed)
    return windows


def decode_positions(end: int, decode_every: int, decode_steps: int) -> list[int]:
    """Where a stream of ``end`` tokens switches to ``decode_steps`` single-token steps: each group ends at a multiple
    of ``decode_every`` below ``end``, and the last at ``end`` (the longest context measured):
    ``[k·decode_every − decode_steps] + [end − decode_steps]`` (positions >= 0 only)."""
    positions = [k - decode_steps for k in range(decode_every, end, decode_every)] + [end - decode_steps]
    return [p for p in positions if p >= 0]


def estimate_stream_seconds(windows: dict, decode_calls: dict | None = None, cost: dict | None = None,
                            step_seconds: float = DECODE_STEP_SECONDS) -> dict:
    """Estimated seconds to stream each window ``(start, end)`` (``windows`` as :func:`stream_windows`) from a fresh
    cache: ``a·n + b·n²/2`` with ``n = end − start`` and ``(a, b) = cost[variant]`` (default :data:`STREAM_COST`),
    plus ``step_seconds`` per single-token decode call (``decode_calls``: variant -> calls; default none)."""
    cost = STREAM_COST if cost is None else cost
    decode_calls = decode_calls or {}
    estimate = {}
    for name, (start, end) in windows.items():
        a, b = cost[name]
        n = end - start
        estimate[name] = a * n + b * n * n / 2 + step_seconds * decode_calls.get(name, 0)
    return estimate


def stream_matches_full_forward(lm, cache, input_ids: torch.Tensor, chunk_size: int) -> float:
    """Max |NLL difference| (nats) between one full forward of ``input_ids`` (``[1, n]``) and streaming it through
    ``cache`` in pieces of ``chunk_size // 2 + 3`` tokens with two single-token steps at the end of the first chunk."""
    full = -torch.log_softmax(lm(input_ids).logits[0, :-1].float(), -1).gather(-1, input_ids[0, 1:, None])[:, 0]
    run = stream_nll(lm, input_ids, cache, piece_size=max(1, chunk_size // 2 + 3), decode_positions=[chunk_size - 1],
                     decode_steps=2)
    return (run.nll - full).abs().max().item()


def steps_table(runs: dict, windows: dict) -> pd.DataFrame:
    """Every call of every run (``runs``: variant -> :func:`bsbr.streaming_eval.stream_nll` result over its window),
    positions made absolute (``start``/``end`` + the window's start), sorted by variant and start."""
    rows = []
    for name, run in runs.items():
        offset = windows[name][0]
        rows += [{"variant": name, **step, "start": step["start"] + offset, "end": step["end"] + offset}
                 for step in run.steps]
    return pd.DataFrame(rows).sort_values(["variant", "start"]).reset_index(drop=True)


def perplexity_bins(runs: dict, windows: dict, bin_size: int) -> pd.DataFrame:
    """:func:`bsbr.streaming_eval.binned_nll` of every run with absolute positions (a window's start is a multiple of
    ``bin_size``, so bin ``i`` covers positions ``[i·bin_size, (i+1)·bin_size)`` in every variant; position ``t``
    predicts token ``t + 1``): ``[variant, bin, start, end, tokens, nll, ppl, ...]`` sorted by variant and bin. The
    cumulative columns run from the window's start.

    Raises:
        ValueError: a window start that is not a multiple of ``bin_size``.
    """
    rows = []
    for name, run in runs.items():
        offset = windows[name][0]
        if offset % bin_size:
            raise ValueError(f"window of {name} starts at {offset}, not a multiple of bin_size={bin_size}")
        for row in binned_nll(run.nll, bin_size):
            rows.append({"variant": name, **row, "bin": row["bin"] + offset // bin_size,
                         "start": row["start"] + offset, "end": row["end"] + offset})
    return pd.DataFrame(rows).sort_values(["variant", "bin"]).reset_index(drop=True)


def flatness(bins: pd.DataFrame, flat_from: int, bin_size: int, ratio: float = FLAT_RATIO) -> pd.DataFrame:
    """The quality goal per variant: over its full bins (``tokens == bin_size``), the median perplexity of the bins
    that end by ``flat_from`` (``reference_ppl``, ``bins_before``) against the bins that start at or beyond it
    (``bins_beyond``, ``max_beyond_ppl`` at ``max_beyond_start``, ``exceeding``: how many are above ``ratio ×
    reference_ppl``, ``first_exceeding_start``), ``max_over_reference``, and ``met`` (no bin exceeds; None when the
    variant has no full bin before or none beyond). The same rule inside the range before ``flat_from``, where no
    position is past the trained context, says how far the text alone moves a bin: ``max_before_ppl`` at
    ``max_before_start``, ``max_before_over_reference`` and ``exceeding_before`` (bins before above ``ratio ×
    reference_ppl``; NaN / None / 0 without bins before).

    Returns:
        one row per variant, sorted by variant.
    """
    rows = []
    for name, group in bins[bins.tokens == bin_size].groupby("variant"):
        before, beyond = group[group.end <= flat_from], group[group.start >= flat_from]
        reference = float(before.ppl.median()) if len(before) else float("nan")
        row = {"variant": name, "bins_before": len(before), "reference_ppl": reference, "bins_beyond": len(beyond),
               "max_beyond_ppl": float("nan"), "max_beyond_start": None, "max_over_reference": float("nan"),
               "exceeding": 0, "first_exceeding_start": None, "met": None, "max_before_ppl": float("nan"),
               "max_before_start": None, "max_before_over_reference": float("nan"), "exceeding_before": 0}
        if len(before):
            top = before.loc[before.ppl.idxmax()]
            row.update(max_before_ppl=float(top.ppl), max_before_start=int(top.start),
                       max_before_over_reference=float(top.ppl) / reference,
                       exceeding_before=int((before.ppl > ratio * reference).sum()))
        if len(before) and len(beyond):
            peak = beyond.loc[beyond.ppl.idxmax()]
            over = beyond[beyond.ppl > ratio * reference]
            row.update(max_beyond_ppl=float(peak.ppl), max_beyond_start=int(peak.start),
                       max_over_reference=float(peak.ppl) / reference, exceeding=len(over),
                       first_exceeding_start=int(over.start.iloc[0]) if len(over) else None, met=len(over) == 0)
        rows.append(row)
    return pd.DataFrame(rows).sort_values("variant").reset_index(drop=True)


def flatness_against_original(bins: pd.DataFrame, flat_from: int, bin_size: int, ratio: float = FLAT_RATIO,
                              early_reference: str = "original",
                              late_reference: str = "original_fresh") -> pd.DataFrame:
    """The flatness goal with the text held fixed: a variant's perplexity in a bin divided by the original's on the
    *same* tokens, where the original is within its trained context — ``early_reference`` (the original's KV-cache
    stream) in the bins that end by ``flat_from``, ``late_reference`` (the original started fresh on the late
    stretch) in the bins at or beyond it, less its first bin (almost no context there). Per-bin perplexity on a play
    swings 2-4× with the text itself (a song, a list of names); the ratio removes that and leaves what the long
    context costs. ``met`` when no late ratio exceeds ``ratio`` × the median early ratio.

    Args:
        bins: :func:`perplexity_bins` rows (``variant``, ``start``, ``end``, ``tokens``, ``ppl``).
        flat_from: the first position of the late stretch (the trained context); bin_size: tokens per full bin.
        ratio: the allowed growth of the ratio; early_reference, late_reference: the reference variants.
    Returns:
        one row per other variant with full bins (sorted): ``bins_before`` / ``bins_beyond`` (paired bins),
        ``reference_ratio`` (median early ratio), ``max_beyond_ratio`` at ``max_beyond_start``,
        ``max_over_reference``, ``exceeding``, ``met`` (None without paired bins on both sides).
    Raises:
        ValueError: ``ratio`` not a finite number above 0, or ``bin_size`` / ``flat_from`` not positive ints.
    """
    check_positive_number(ratio=ratio)
    check_positive_int(bin_size=bin_size, flat_from=flat_from)
    full = bins[bins.tokens == bin_size]
    early = full[(full.variant == early_reference) & (full.end <= flat_from)].set_index("start").ppl
    late = full[(full.variant == late_reference) & (full.start >= flat_from)].set_index("start").ppl.sort_index()
    late = late.iloc[1:]  # its first bin has almost no context (as in late_perplexity's range)
    rows = []
    for name, group in full[~full.variant.isin([early_reference, late_reference])].groupby("variant"):
        mine = group.set_index("start").ppl
        before = (mine / early).dropna()
        beyond = (mine / late).dropna()
        row = {"variant": name, "bins_before": len(before), "reference_ratio": float("nan"),
               "bins_beyond": len(beyond), "max_beyond_ratio": float("nan"), "max_beyond_start": None,
               "max_over_reference": float("nan"), "exceeding": 0, "met": None}
        if len(before):
            row["reference_ratio"] = float(before.median())
        if len(before) and len(beyond):
            row.update(max_beyond_ratio=float(beyond.max()), max_beyond_start=int(beyond.idxmax()),
                       max_over_reference=float(beyond.max()) / row["reference_ratio"],
                       exceeding=int((beyond > ratio * row["reference_ratio"]).sum()))
            row["met"] = row["exceeding"] == 0
        rows.append(row)
    columns = ["variant", "bins_before", "reference_ratio", "bins_beyond", "max_beyond_ratio", "max_beyond_start",
               "max_over_reference", "exceeding", "met"]
    return pd.DataFrame(rows, columns=columns).sort_values("variant").reset_index(drop=True)


def decode_latency(steps: pd.DataFrame) -> pd.DataFrame:
    """Single-token decode steps grouped by consecutive runs of one variant: ``context`` (tokens in the cache after
    the group's last step), ``steps``, ``median_s``, ``min_s``, ``max_s``, ``max_over_median``; sorted by variant and
    context."""
    decode = steps[steps.kind == "decode"].sort_values(["variant", "start"])
    group = (decode.start != decode.groupby("variant").end.shift()).cumsum()  # a new group where a run breaks
    table = decode.groupby([decode.variant, group]).agg(context=("end", "max"), steps=("seconds", "size"),
                                                        median_s=("seconds", "median"), min_s=("seconds", "min"),
                                                        max_s=("seconds", "max"))
    table = table.reset_index(level=0).reset_index(drop=True)
    table["max_over_median"] = table.max_s / table.median_s
    return table.sort_values(["variant", "context"]).reset_index(drop=True)


def decode_goal(latency: pd.DataFrame, variant: str = "blocks", ratio: float = DECODE_RATIO) -> dict:
    """The decode goal for ``variant``: its last decode group (the longest context) — ``context``, ``steps``,
    ``median_s``, ``max_s``, ``max_over_median`` and ``met`` (``max_s <= ratio · median_s``; None without a group);
    with ``first_context``/``first_median_s`` of its first group (how the ordinary step grows with context)."""
    group = latency[latency.variant == variant]
    if group.empty:
        return {"variant": variant, "met": None}
    first, last = group.iloc[0], group.iloc[-1]
    return {"variant": variant, "context": int(last.context), "steps": int(last.steps),
            "median_s": float(last.median_s), "max_s": float(last.max_s),
            "max_over_median": float(last.max_over_median), "met": bool(last.max_s <= ratio * last.median_s),
            "first_context": int(first.context), "first_median_s": float(first.median_s)}


def memory_table(final: dict, expected: dict, kv_bytes_per_token: float) -> pd.DataFrame:
    """Memory per token of every variant, from its cache after the stream.

    Args:
        final: variant -> ``{"tokens": tokens in the cache, "cache_bytes": bytes in use (nbytes), "capacity_bytes":
            bytes allocated}``.
        expected: variant -> bytes the variant's formula gives for those tokens (:mod:`bsbr.streaming_eval`).
        kv_bytes_per_token: the original's KV cache per token (the reference of ``vs_kv_cache``).
    Returns:
        ``[variant, tokens, cache_bytes, capacity_bytes, expected_bytes, bytes_per_token, capacity_per_token,
        vs_kv_cache]`` in :data:`VARIANTS` order.
    """
    rows = []
    for name in [v for v in VARIANTS if v in final]:
        f = final[name]
        per_token = f["cache_bytes"] / f["tokens"]
        rows.append({"variant": name, "tokens": f["tokens"], "cache_bytes": f["cache_bytes"],
                     "capacity_bytes": f["capacity_bytes"], "expected_bytes": expected[name],
                     "bytes_per_token": per_token, "capacity_per_token": f["capacity_bytes"] / f["tokens"],
                     "vs_kv_cache": per_token / kv_bytes_per_token})
    return pd.DataFrame(rows)


def late_perplexity(bins: pd.DataFrame, start: int, end: int) -> dict:
    """Perplexity of each variant over the full bins in ``[start, end)`` (token-weighted mean NLL): variant -> ppl
    (only variants with bins covering the whole range)."""
    inside = bins[(bins.start >= start) & (bins.end <= end)]
    result = {}
    for name, group in inside.groupby("variant"):
        if group.tokens.sum() == end - start:
            result[name] = float(np.exp((group.nll * group.tokens).sum() / group.tokens.sum()))
    return result
