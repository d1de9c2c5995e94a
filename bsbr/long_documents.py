"""The long-document experiment (notebook ``06_long_documents``): pick a held-out play, check that streaming equals one
full forward, and turn the streamed runs of a BSBR model and the original (:func:`bsbr.streaming_eval.stream_nll`)
into tables — every call, per-token NLL, perplexity bins, decode latency per position, linear fits — and the numbers
of the conclusion.

Units: positions and lengths in tokens, times in seconds, memory in bytes, NLL in nats.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from bsbr.data import SPLITS, load_split
from bsbr.experiment import check_ints
from bsbr.streaming_eval import binned_nll, kv_cache_nbytes, normalized_cache_nbytes, stream_nll

__all__ = ["NLL_TOLERANCE", "bytes_per_token", "check_long_document_parameters", "choose_play", "decode_latency",
           "held_out_plays", "line_fit", "perplexity_bins", "predict", "steps_table", "stream_fits",
           "stream_matches_full_forward", "stream_summary", "token_nll_table"]

#: Max |NLL difference| (nats) allowed between the stream and one full forward on the first tokens.
NLL_TOLERANCE = 1e-3


def check_long_document_parameters(splits, min_play_tokens, max_tokens, piece_size, decode_every, decode_steps,
                                   original_max_tokens, bin_size, threads) -> None:
    """Raise ValueError naming the parameter unless the token counts are integers >= 1 (``max_tokens`` and
    ``original_max_tokens`` may be None: as far as possible), ``threads`` >= 0, ``decode_steps < decode_every``, and
    ``splits`` held-out corpus splits (never ``train``: the calibration text)."""
    check_ints(1, min_play_tokens=min_play_tokens, piece_size=piece_size, decode_every=decode_every,
               bin_size=bin_size)
    check_ints(0, threads=threads)
    check_ints(1, allow_none=True, max_tokens=max_tokens, original_max_tokens=original_max_tokens)
    check_ints(1, decode_steps=decode_steps)
    if decode_steps >= decode_every:
        raise ValueError(f"decode_steps ({decode_steps}) must be smaller than decode_every ({decode_every})")
    if not splits or "train" in splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"splits must be held-out splits among {[s for s in SPLITS if s != 'train']}, got {splits!r}")


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
        namespace ``split`` (of the play, or the splits joined by ``+``), ``title``, ``doc_ids``, ``tokens`` (list of
        ids), ``note`` (a sentence saying which text it is).
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
    return SimpleNamespace(split="+".join(splits), title=title, doc_ids=doc_ids, tokens=tokens,
                           note=f"no held-out play has {min_play_tokens} tokens: {len(doc_ids)} plays concatenated "
                                f"({title})")


def stream_matches_full_forward(lm, cache, input_ids: torch.Tensor, chunk_size: int) -> float:
    """Max |NLL difference| (nats) between one full forward of ``input_ids`` (``[1, n]``) and streaming it through
    ``cache`` in pieces of ``chunk_size // 2 + 3`` tokens with two single-token steps at the end of the first chunk."""
    full = -torch.log_softmax(lm(input_ids).logits[0, :-1].float(), -1).gather(-1, input_ids[0, 1:, None])[:, 0]
    run = stream_nll(lm, input_ids, cache, piece_size=max(1, chunk_size // 2 + 3), decode_positions=[chunk_size - 1],
                     decode_steps=2)
    return (run.nll - full).abs().max().item()


def steps_table(runs: dict, config, chunk_size: int, sink_size: int, feature_dim: int) -> pd.DataFrame:
    """Every call of every run (``runs``: model name -> :func:`bsbr.streaming_eval.stream_nll` result), with
    ``finishes_chunk`` (a BSBR call ending on a chunk boundary, which folds the chunk into the state) and
    ``expected_cache_bytes`` (:func:`~bsbr.streaming_eval.normalized_cache_nbytes` for ``bsbr``,
    :func:`~bsbr.streaming_eval.kv_cache_nbytes` for the others), sorted by model and start."""
    steps = pd.DataFrame([{"model": name, **step} for name, run in runs.items() for step in run.steps])
    steps["finishes_chunk"] = (steps.model == "bsbr") & (steps.end % chunk_size == 0)
    steps["expected_cache_bytes"] = [
        normalized_cache_nbytes(config, end, chunk_size, sink_size, feature_dim) if name == "bsbr"
        else kv_cache_nbytes(config, end) for name, end in zip(steps.model, steps.end)]
    return steps.sort_values(["model", "start"]).reset_index(drop=True)


def token_nll_table(runs: dict, input_ids: torch.Tensor) -> pd.DataFrame:
    """Per position ``t`` (``bsbr`` run's length): the target token ``t + 1`` and each model's NLL of it
    (``original_nll`` NaN beyond the original's run)."""
    per_token = pd.DataFrame({"position": np.arange(len(runs["bsbr"].nll)),
                              "target_token": input_ids[0, 1:len(runs["bsbr"].nll) + 1].numpy(),
                              "bsbr_nll": runs["bsbr"].nll.numpy()})
    per_token["original_nll"] = np.nan
    per_token.loc[: len(runs["original"].nll) - 1, "original_nll"] = runs["original"].nll.numpy()
    return per_token


def perplexity_bins(runs: dict, bin_size: int) -> pd.DataFrame:
    """:func:`bsbr.streaming_eval.binned_nll` of every run, with a ``model`` column, sorted by model and bin."""
    bins = pd.DataFrame([{"model": name, **row} for name, run in runs.items() for row in binned_nll(run.nll, bin_size)])
    return bins.sort_values(["model", "bin"]).reset_index(drop=True)


def decode_latency(steps: pd.DataFrame, decode_every: int) -> pd.DataFrame:
    """Single-token decode steps grouped by the position ``k·decode_every − 1`` they start at: median/min/max seconds
    and count of the ordinary steps, and ``chunk_finish_s`` of the BSBR step that finishes a chunk (NaN if none)."""
    decode = steps[steps.kind == "decode"].copy()
    decode["position"] = decode.start
    decode["decode_position"] = decode.groupby("model").position.transform(
        lambda p: (p + 1) // decode_every * decode_every - 1)  # the first position of its group
    latency = (decode[~decode.finishes_chunk].groupby(["model", "decode_position"])
               .seconds.agg(["median", "min", "max", "count"]).reset_index()
               .rename(columns={"median": "median_s", "min": "min_s", "max": "max_s", "count": "steps"}))
    finishing = decode[decode.finishes_chunk].set_index(["model", "decode_position"]).seconds.rename("chunk_finish_s")
    return latency.join(finishing, on=["model", "decode_position"]).sort_values(["model", "decode_position"])


def line_fit(x, y) -> tuple[float, float, float]:
    """Least-squares line ``y = slope·x + intercept``: ``(slope, intercept, r2)``; with fewer than two distinct ``x``,
    ``(NaN, mean(y) or NaN, NaN)``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.unique(x).size < 2:
        return float("nan"), float(np.mean(y)) if len(y) else float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    return float(slope), float(intercept), float(1 - np.sum(residual**2) / total) if total > 0 else 1.0


def stream_fits(names, steps: pd.DataFrame, latency: pd.DataFrame, piece_size: int) -> pd.DataFrame:
    """Per model, :func:`line_fit` against position of: decode latency of an ordinary step (s), cost per token of a
    full ``piece_size`` piece (s), cache bytes after every call.

    Returns:
        ``[model, quantity, unit, points, slope_per_token, intercept, r2, x_max]`` sorted by model and quantity.
    """
    rows = []
    for name in names:
        lat = latency[latency.model == name]
        pieces = steps[(steps.model == name) & (steps.kind == "piece") & (steps.tokens == piece_size)]
        own = steps[steps.model == name]
        for quantity, x, y, unit in (("decode_latency", lat.decode_position, lat.median_s, "s"),
                                     ("piece_time_per_token", pieces.start, pieces.seconds_per_token, "s"),
                                     ("cache_bytes", own.end, own.cache_bytes, "bytes")):
            slope, intercept, r2 = line_fit(x, y)
            rows.append({"model": name, "quantity": quantity, "unit": unit, "points": len(x),
                         "slope_per_token": slope, "intercept": intercept, "r2": r2,
                         "x_max": int(np.max(x)) if len(x) else 0})
    return pd.DataFrame(rows).sort_values(["model", "quantity"]).reset_index(drop=True)


def predict(fits: pd.DataFrame, name: str, quantity: str, n):
    """The fitted line of :func:`stream_fits` for ``(name, quantity)`` at position(s) ``n``."""
    fit = fits.set_index(["model", "quantity"]).loc[(name, quantity)]
    return fit.slope_per_token * n + fit.intercept


def bytes_per_token(config, chunk_size: int, feature_dim: int) -> dict:
    """Bytes per token of context: the KV cache's (``original``) and BSBR's chunk states (``bsbr``: one more chunk's
    state, no sinks, over ``chunk_size``)."""
    return {"original": kv_cache_nbytes(config, 1),
            "bsbr": (normalized_cache_nbytes(config, 3 * chunk_size, chunk_size, 0, feature_dim)
                     - normalized_cache_nbytes(config, 2 * chunk_size, chunk_size, 0, feature_dim)) / chunk_size}


def stream_summary(runs: dict, steps, bins, latency, fits, config, *, original_tokens: int, streamed: int,
                   chunk_size: int, sink_size: int, feature_dim: int, bin_size: int, piece_size: int) -> SimpleNamespace:
    """The numbers of the conclusion, from the runs and tables above.

    Returns:
        namespace with ``common`` (positions both models streamed), perplexities ``ppl_common``/``ppl_after`` (dicts
        per model: positions before ``common``, and after BSBR's first chunk), ``ppl_bsbr_total``, BSBR's bins
        (``reference_bin_ppl``: median up to ``max(bin_size, common)``; ``degrade_from``: first bin beyond ``common``
        above twice that, or None; ``peak_bin``, ``last_bin_ppl``), decode latency (``last_common`` position,
        ``lat_common`` per model, ``last_bsbr``/``first_bsbr`` positions, ``lat_bsbr_end``, ``lat_bsbr_first``,
        ``lat_original_end`` from the original's fitted line, ``finish_end``: BSBR's chunk-finishing step), memory
        (``state_end``, ``kv_end``, ``kv_common``, ``state_common``, ``rss`` per model, ``memory_ratio``), pieces
        (``original_pieces``, ``piece_early``/``piece_late``: BSBR medians of its first and last quarter),
        ``slope_us`` (µs per 1,000 tokens), ``bsbr_ppl_loses``, ``latency_wins``.
    """
    s = SimpleNamespace(common=original_tokens)
    bsbr_nll, original_nll = runs["bsbr"].nll, runs["original"].nll
    n_common = min(len(original_nll), s.common - 1)

    def ppl(nll):
        return float(torch.exp(nll.double().mean()))

    s.ppl_common = {"bsbr": ppl(bsbr_nll[:n_common]), "original": ppl(original_nll[:n_common])}
    after_first = slice(chunk_size, n_common)  # where BSBR differs from the original (after its first chunk)
    s.ppl_after = {k: ppl(v[after_first]) if n_common > chunk_size else float("nan")
                   for k, v in (("bsbr", bsbr_nll), ("original", original_nll))}
    s.ppl_bsbr_total = ppl(bsbr_nll)
    bsbr_bins = bins[bins.model == "bsbr"]
    s.reference_bin_ppl = float(bsbr_bins[bsbr_bins.end <= max(bin_size, s.common)].ppl.median())
    degraded = bsbr_bins[(bsbr_bins.start >= s.common) & (bsbr_bins.ppl > 2 * s.reference_bin_ppl)]
    s.degrade_from = int(degraded.start.iloc[0]) if len(degraded) else None
    s.peak_bin = bsbr_bins.loc[bsbr_bins.ppl.idxmax()]
    s.last_bin_ppl = float(bsbr_bins.ppl.iloc[-1])
    s.last_common = latency[latency.decode_position < s.common].groupby("model").decode_position.max().min()
    lat_at = latency.set_index(["model", "decode_position"])
    if not pd.isna(s.last_common):
        s.lat_common = {k: float(lat_at.loc[(k, s.last_common), "median_s"]) for k in runs}
    else:
        s.lat_common = {k: float("nan") for k in runs}
    has_bsbr = (latency.model == "bsbr").any()
    s.last_bsbr = int(latency[latency.model == "bsbr"].decode_position.max()) if has_bsbr else None
    s.lat_bsbr_end = float(lat_at.loc[("bsbr", s.last_bsbr), "median_s"]) if s.last_bsbr is not None else float("nan")
    s.lat_original_end = (float(predict(fits, "original", "decode_latency", s.last_bsbr)) if s.last_bsbr is not None
                          else float("nan"))
    s.first_bsbr = int(latency[latency.model == "bsbr"].decode_position.min()) if s.last_bsbr is not None else None
    s.lat_bsbr_first = (float(lat_at.loc[("bsbr", s.first_bsbr), "median_s"]) if s.first_bsbr is not None
                        else float("nan"))
    s.finish_end = (float(lat_at.loc[("bsbr", s.last_bsbr), "chunk_finish_s"]) if s.last_bsbr is not None
                    else float("nan"))
    s.state_end = int(steps[steps.model == "bsbr"].cache_bytes.iloc[-1])
    s.kv_end = kv_cache_nbytes(config, streamed)
    s.kv_common = int(steps[steps.model == "original"].cache_bytes.iloc[-1])
    s.state_common = normalized_cache_nbytes(config, s.common, chunk_size, sink_size, feature_dim)
    s.rss = steps.groupby("model").rss_bytes.max()
    s.original_pieces = steps[(steps.model == "original") & (steps.kind == "piece")].seconds_per_token
    bsbr_pieces = steps[(steps.model == "bsbr") & (steps.kind == "piece") & (steps.tokens == piece_size)]
    quarter = max(1, len(bsbr_pieces) // 4)
    s.piece_early = float(bsbr_pieces.seconds_per_token.iloc[:quarter].median())
    s.piece_late = float(bsbr_pieces.seconds_per_token.iloc[-quarter:].median())
    fit = fits.set_index(["model", "quantity"])
    s.slope_us = {k: fit.loc[(k, "decode_latency"), "slope_per_token"] * 1e6 * 1000 for k in runs}
    s.bsbr_ppl_loses = s.ppl_common["bsbr"] > s.ppl_common["original"]
    s.latency_wins = s.lat_common["bsbr"] < s.lat_common["original"]
    s.memory_ratio = s.state_end / s.kv_end
    return s
