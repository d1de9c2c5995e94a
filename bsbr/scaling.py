"""The tables of the scaling experiment (notebook ``01_scaling``): power-law fits, full attention extrapolated where it
was not run, who wins at each length and the crossover, memory growth, the module/core time split, the DeltaNet
operator ratios, the speed/memory targets, and the metrics built from them.

Every function takes and returns pandas tables of measured points (one row per point, as
:func:`bsbr.benchmarks.measure_forward` / :func:`bsbr.benchmarks.measure_attention` return them): times in seconds, memory in
bytes (``peak_bytes``: peak RSS over the process baseline), lengths and positions in tokens. Nothing here measures;
the values a notebook computes from the same measurements are the values these functions return.

Vocabulary:

* **ratio** is *full attention time / BSBR time* (or standard / BSBR): above 1 means BSBR is faster.
* A ratio within ``1 ± tie_tolerance`` is a **tie**: below ``1 / (1 + tie_tolerance)`` the other side leads.
* The **crossover** is the shortest length from which BSBR leads beyond the tolerance at that and every longer length.
* A **target** is ``value <comparison> threshold`` (``≥``, ``≤`` or ``>``); a value that was not measured is
  ``not measured``, never passed. A target from timed calls carries the range of the ratio that the two medians'
  intervals allow (``low``, ``high``; :func:`median_interval`, :func:`ratio_range`): it passes or fails only when the
  whole range does, and is ``undecided`` when the range straddles the threshold (the run cannot tell at its own noise).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from bsbr.benchmarks import ATTENTION_IMPLS, MODULE_IMPLS
from bsbr.fitting import fit_power_law
from bsbr.formatting import quantity
from bsbr.measure import MEDIAN_CONFIDENCE, median_interval  # noqa: F401 - re-exported: report 01 names them here
from bsbr.experiment import check_ints
from bsbr.registry import available_models, build_model

__all__ = ["ATTENTION_COLUMNS", "DECODE_COLUMNS", "FIT_COLUMNS", "FULL_IMPLS", "MEDIAN_CONFIDENCE", "MODEL_COLUMNS",
           "MODES", "MODE_LABEL", "OPERATORS", "PAIRS", "TARGET_COLUMNS", "attention_metrics", "check_target",
           "crossover", "crossover_text", "extrapolate_times", "find_fit", "layer_fits", "layer_metrics",
           "layer_targets", "layer_targets_text", "leader", "median_interval", "memory_curves", "memory_growth",
           "model_comparison", "model_comparison_metrics", "model_comparison_text", "model_fits", "model_headline",
           "module_time_split", "module_time_split_text", "operator_ratios", "parameter_counts",
           "power_law_fits", "ratio_range", "rounded", "scaling_parameters",
           "speed_memory_targets", "targets_text", "targets_view", "time_of", "upper_half", "value_at", "who_wins"]

#: Full (softmax over every earlier token) attention impls: measured only up to a length, extrapolated beyond it.
FULL_IMPLS = ("standard", "sdpa_core")
#: The compared pairs: (level, BSBR impl, full-attention impl).
PAIRS = (("module", "bsbr", "standard"), ("core", "bsbr_core", "sdpa_core"))
#: Timed modes of the attention points, and how tables and figures name them.
MODES = ("forward", "backward")
MODE_LABEL = {"forward": "forward", "backward": "forward+backward"}
#: The four operator impls of the DeltaNet / linear-attention comparison.
OPERATORS = ("delta_chunkwise", "delta_recurrent", "linear_chunkwise", "linear_recurrent")
#: Columns kept of a whole-model point (:func:`bsbr.benchmarks.measure_forward`).
MODEL_COLUMNS = ["model", "seq_len", "batch_size", "repeats", "warmup", "threads", "median_s", "min_s", "max_s",
                 "peak_bytes", "baseline_rss_bytes", "peak_rss_bytes", "memory_method"]
#: Columns kept of a forward / forward+backward attention point (:func:`bsbr.benchmarks.measure_attention`).
ATTENTION_COLUMNS = ["impl", "mode", "seq_len", "batch_size", "hidden_dim", "num_heads", "chunk_size", "threads",
                     "repeats", "warmup", "median_s", "mean_s", "min_s", "max_s", "median_low_s", "median_high_s",
                     "flops", "gflops_per_s", "peak_bytes", "baseline_rss_bytes", "peak_rss_bytes", "memory_method"]
#: Columns kept of a decode point (:func:`bsbr.benchmarks.measure_attention` with ``mode="decode"``).
DECODE_COLUMNS = ["impl", "position", "batch_size", "threads", "repeats", "warmup", "median_s", "mean_s", "min_s",
                  "max_s", "median_low_s", "median_high_s", "prefill_s", "state_bytes", "state_tokens", "peak_bytes",
                  "baseline_rss_bytes", "peak_rss_bytes"]
#: Columns of a power-law fit table after the grouping columns.
FIT_COLUMNS = ["lengths", "first_len", "last_len", "exponent", "prefactor", "r2"]
#: Columns of a target table (:func:`check_target` rows).
TARGET_COLUMNS = ["target", "description", "value", "low", "high", "comparison", "threshold", "unit", "extrapolated",
                  "status", "passed"]


def scaling_parameters(params: dict) -> dict:
    """Check and normalise the scaling notebook's parameters before anything is measured.

    Args:
        params: the notebook's ``parameters`` cell (name -> value).
    Returns:
        ``params`` with ``seq_lens``, ``attn_seq_lens``, ``decode_positions``, ``operator_seq_lens`` sorted and
        deduplicated and ``attn_impls``/``baseline_impls`` in the benchmark's fixed order, plus ``model_names`` (None
        -> every registered model), ``configs`` (name -> ``build_model`` keywords: the common sizes, BSBR's
        ``chunk_size``), ``decode_impls`` (bsbr/standard among ``attn_impls``) and ``full_max_len`` (mode -> the
        longest length full attention is run at).
    Raises:
        ValueError: a parameter out of range or naming an unknown model/impl, named.
    """
    p = dict(params)
    check_ints(1, **{key: p[key] for key in (
        "batch_size", "vocab_size", "hidden_dim", "num_heads", "num_layers", "ff_dim", "chunk_size", "repeats",
        "decode_steps", "full_forward_max_len", "full_backward_max_len", "quadratic_max_len",
        "operator_target_seq_len")})
    check_ints(0, warmup=p["warmup"], threads=p["threads"], seed=p["seed"])
    p["model_names"] = available_models() if p["models"] is None else list(p["models"])
    if unknown := sorted(set(p["model_names"]) - set(available_models())):
        raise ValueError(f"models {unknown} are not in bsbr.available_models() = {available_models()}")
    for key in ("seq_lens", "attn_seq_lens", "decode_positions", "operator_seq_lens"):
        p[key] = sorted(set(int(n) for n in p[key]))
    if len(p["seq_lens"]) < 2:
        raise ValueError("seq_lens needs at least two lengths to fit a power law")
    if bad := sorted(set(p["attn_impls"]) - set(ATTENTION_IMPLS)):
        raise ValueError(f"attn_impls {bad} are not in {list(ATTENTION_IMPLS)}")
    others = [impl for impl in MODULE_IMPLS if impl not in ("bsbr", "standard")]
    if bad := sorted(set(p["baseline_impls"]) - set(others)):
        raise ValueError(f"baseline_impls {bad} are not attention layers other than bsbr/standard: {sorted(others)}")
    if p["operator_target_seq_len"] not in p["operator_seq_lens"]:
        raise ValueError(f"operator_target_seq_len {p['operator_target_seq_len']} must be one of operator_seq_lens "
                         f"{p['operator_seq_lens']}")
    p["attn_impls"] = [impl for impl in ATTENTION_IMPLS if impl in p["attn_impls"]]
    p["baseline_impls"] = [impl for impl in MODULE_IMPLS if impl in p["baseline_impls"]]
    p["decode_impls"] = [impl for impl in ("bsbr", "standard") if impl in p["attn_impls"]]
    p["full_max_len"] = {"forward": p["full_forward_max_len"], "backward": p["full_backward_max_len"]}
    common = {key: p[key] for key in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "ff_dim")}
    p["configs"] = {name: {**common, "dropout": 0.0, **({"chunk_size": p["chunk_size"]} if name == "bsbr" else {})}
                    for name in p["model_names"]}
    return p


def upper_half(lengths) -> list:
    """The upper half of ``lengths`` (sorted), where the asymptotic term of a power law dominates: ``lengths[n // 2:]``
    with four or more lengths, all of them with fewer."""
    lengths = sorted(lengths)
    return lengths[len(lengths) // 2:] if len(lengths) >= 4 else lengths


def power_law_fits(table: pd.DataFrame, by: list[str], value: str = "median_s") -> pd.DataFrame:
    """``value ≈ prefactor · seq_lenᵏ`` per group of ``by``, on the upper half of the group's lengths and on all.

    Points whose ``value`` is not positive (e.g. memory below the RSS resolution) are left out; a span with fewer
    than two lengths left gives no row.

    Args:
        table: one row per point, with ``seq_len`` (tokens), ``value`` and the ``by`` columns.
        by: grouping columns, e.g. ``["model"]`` or ``["mode", "impl"]``.
        value: the fitted column (seconds or bytes).
    Returns:
        ``[*by, lengths ("upper half" | "all"), first_len, last_len, exponent, prefactor, r2]`` in group order,
        upper half first (:func:`bsbr.fitting.fit_power_law`).
    """
    rows = []
    for key, group in table.groupby(list(by)):
        key = key if isinstance(key, tuple) else (key,)
        lens = sorted(group.seq_len)
        for span, chosen in (("upper half", upper_half(lens)), ("all", lens)):
            part = group[group.seq_len.isin(chosen) & (group[value] > 0)]
            if part.seq_len.nunique() < 2:
                continue
            exponent, prefactor, r2 = fit_power_law(part.seq_len, part[value])
            rows.append(dict(zip(by, key), lengths=span, first_len=int(part.seq_len.min()),
                             last_len=int(part.seq_len.max()), exponent=exponent, prefactor=prefactor, r2=r2))
    return pd.DataFrame(rows, columns=[*by, *FIT_COLUMNS])


def model_fits(results: pd.DataFrame) -> pd.DataFrame:
    """Time (``median_s``) and memory (``peak_bytes``) power laws of every whole model (:func:`power_law_fits`).

    Returns:
        ``[model, quantity ("time" | "memory"), lengths, first_len, last_len, exponent, prefactor, r2]``, time first,
        then by model, upper half before all.
    """
    parts = [power_law_fits(results, ["model"], column).assign(quantity=quantity)
             for quantity, column in (("time", "median_s"), ("memory", "peak_bytes"))]
    fits = pd.concat([part for part in parts if len(part)] or parts)[["model", "quantity", *FIT_COLUMNS]]
    return fits.sort_values(["quantity", "model", "lengths"], ascending=[False, True, False]).reset_index(drop=True)


def layer_fits(layers: pd.DataFrame) -> pd.DataFrame:
    """Forward-time exponent of each attention layer on the upper half of its measured lengths
    (:func:`power_law_fits` by impl).

    Returns:
        ``[impl, first_len, last_len, time_exponent, r2]``, one row per impl measured at two lengths or more.
    """
    fits = power_law_fits(layers, ["impl"])
    fits = fits[fits.lengths == "upper half"].rename(columns={"exponent": "time_exponent"})
    return fits[["impl", "first_len", "last_len", "time_exponent", "r2"]].reset_index(drop=True)


def parameter_counts(configs: dict, seed: int = 0) -> pd.DataFrame:
    """Parameters of ``bsbr.build_model(name, **config)`` for each name -> config (built after
    ``torch.manual_seed(seed)``).

    Returns:
        ``[model, parameters, attention_parameters_per_layer, vs_standard]`` sorted by model; ``vs_standard`` is the
        count over standard attention's (NaN without a ``standard`` entry).
    """
    rows = []
    for name, config in configs.items():
        torch.manual_seed(seed)
        built = build_model(name, **config)
        rows.append(dict(model=name, parameters=sum(p.numel() for p in built.parameters()),
                         attention_parameters_per_layer=sum(p.numel() for p in built.layers[0].attention.parameters())))
        del built
    counts = pd.DataFrame(rows).sort_values("model").reset_index(drop=True)
    counts["vs_standard"] = counts.parameters / counts.set_index("model").parameters.get("standard", np.nan)
    return counts


def find_fit(fits: pd.DataFrame, span: str = "upper half", **keys):
    """The row of ``fits`` with ``lengths == span`` and the given column values (e.g. ``impl="bsbr", mode="forward"``),
    or None."""
    match = fits[fits.lengths == span]
    for column, wanted in keys.items():
        match = match[match[column] == wanted]
    return match.iloc[0] if len(match) else None


def value_at(table: pd.DataFrame, column: str, **keys) -> float | None:
    """``float(table[column])`` of the first row matching every ``keys`` column value, or None when no row does."""
    hit = table
    for name, wanted in keys.items():
        hit = hit[hit[name] == wanted]
    return float(hit[column].iloc[0]) if len(hit) else None


def extrapolate_times(attention: pd.DataFrame, impls, seq_lens, fits: pd.DataFrame,
                      extrapolate=FULL_IMPLS) -> pd.DataFrame:
    """Every (mode, impl, length): the measured median, or for an ``extrapolate`` impl not run at that length the power
    law fitted on the upper half of its measured lengths (``prefactor · nᵏ``).

    Args:
        attention: measured points ``[impl, mode, seq_len, median_s, ...]``.
        impls, seq_lens: the impls and lengths wanted.
        fits: :func:`power_law_fits` of ``attention`` by ``["impl", "mode"]``.
    Returns:
        ``[mode, impl, seq_len, median_s, median_low_s, median_high_s (s), source ("measured" |
        "extrapolated")]``, sorted (``median_low_s``, ``median_high_s``: the interval of the median from the timed
        calls, :func:`median_interval`; NaN where extrapolated); a point neither measured nor extrapolable has no row.
    """
    rows = []
    for mode in MODES:
        for impl in impls:
            for n in seq_lens:
                hit = attention[(attention["mode"] == mode) & (attention.impl == impl) & (attention.seq_len == n)]
                if len(hit):
                    rows.append(dict(mode=mode, impl=impl, seq_len=n, median_s=float(hit.median_s.iloc[0]),
                                     median_low_s=float(hit.median_low_s.iloc[0]),
                                     median_high_s=float(hit.median_high_s.iloc[0]), source="measured"))
                elif impl in extrapolate and (fit := find_fit(fits, impl=impl, mode=mode)) is not None:
                    rows.append(dict(mode=mode, impl=impl, seq_len=n,
                                     median_s=float(fit.prefactor * n**fit.exponent), median_low_s=np.nan,
                                     median_high_s=np.nan, source="extrapolated"))
    times = pd.DataFrame(rows, columns=["mode", "impl", "seq_len", "median_s", "median_low_s", "median_high_s",
                                        "source"])
    return times.sort_values(["mode", "impl", "seq_len"]).reset_index(drop=True)


def time_of(times: pd.DataFrame, impl: str, mode: str, seq_len: int):
    """``(median seconds, source)`` of one point of :func:`extrapolate_times`, or ``(None, None)``."""
    hit = times[(times["mode"] == mode) & (times.impl == impl) & (times.seq_len == seq_len)]
    return (float(hit.median_s.iloc[0]), hit.source.iloc[0]) if len(hit) else (None, None)


def ratio_range(slow: tuple, fast: tuple) -> tuple[float | None, float | None]:
    """The range of ``slow / fast`` that the two medians' intervals allow: ``(slow low / fast high, slow high / fast
    low)`` from ``(low, high)`` pairs of seconds (:func:`median_interval`); ``(None, None)`` if a bound is missing or
    NaN (an extrapolated time). Held together, two 95 % intervals give a range that covers the ratio of the medians
    with at least 90 % probability."""
    (slow_min, slow_max), (fast_min, fast_max) = slow, fast
    if any(x is None or pd.isna(x) for x in (slow_min, slow_max, fast_min, fast_max)):
        return None, None
    return float(slow_min) / float(fast_max), float(slow_max) / float(fast_min)


def _call_range(table: pd.DataFrame, **where) -> tuple:
    """``(median_low_s, median_high_s)`` of the one row of ``table`` matching ``where``, or ``(None, None)``."""
    hit = table
    for column, value in where.items():
        hit = hit[hit[column] == value]
    return (float(hit.median_low_s.iloc[0]), float(hit.median_high_s.iloc[0])) if len(hit) else (None, None)


def leader(ratio: float, tie_tolerance: float, faster: str = "BSBR", slower: str = "standard") -> str:
    """Who leads at an (other / BSBR) ratio: ``faster`` above ``1 + tie_tolerance``, ``slower`` below
    ``1 / (1 + tie_tolerance)``, else ``"tie"``."""
    if ratio > 1 + tie_tolerance:
        return faster
    if ratio < 1 / (1 + tie_tolerance):
        return slower
    return "tie"


def crossover(ratio: pd.Series, tie_tolerance: float) -> int | None:
    """The shortest length (index of ``ratio``, sorted ascending) from which the ratio exceeds ``1 + tie_tolerance``
    at that and every longer length; None if there is none."""
    leading = ratio > 1 + tie_tolerance
    for n in ratio.index:
        if leading.loc[n:].all():
            return int(n)
    return None


def model_comparison(results: pd.DataFrame, tie_tolerance: float) -> pd.DataFrame:
    """The bsbr and standard models length by length.

    Args:
        results: whole-model points ``[model, seq_len, median_s, peak_bytes, ...]`` holding both models.
    Returns:
        indexed by ``seq_len``: ``bsbr_s, standard_s`` (s), ``bsbr_peak_MiB, standard_peak_MiB``, ``time_ratio`` and
        ``memory_ratio`` (standard / BSBR; memory NaN where BSBR's peak is 0), ``faster`` and ``less_memory``
        (:func:`leader`; ``"n/a"`` without a memory ratio).
    """
    by = results.set_index(["model", "seq_len"])
    comparison = pd.DataFrame({
        "bsbr_s": by.loc["bsbr"].median_s, "standard_s": by.loc["standard"].median_s,
        "bsbr_peak_MiB": by.loc["bsbr"].peak_bytes / 2**20, "standard_peak_MiB": by.loc["standard"].peak_bytes / 2**20,
    })
    comparison["time_ratio"] = comparison.standard_s / comparison.bsbr_s
    comparison["memory_ratio"] = comparison.standard_peak_MiB / comparison.bsbr_peak_MiB.where(
        comparison.bsbr_peak_MiB > 0)
    comparison["faster"] = comparison.time_ratio.map(lambda r: leader(r, tie_tolerance))
    comparison["less_memory"] = comparison.memory_ratio.map(lambda r: leader(r, tie_tolerance) if pd.notna(r) else "n/a")
    return comparison


def model_comparison_metrics(comparison: pd.DataFrame, tie_tolerance: float) -> dict:
    """The ``bsbr_vs_standard`` metrics of :func:`model_comparison` at its longest length: time and memory ratios
    (standard / BSBR, 4 digits; memory None without a ratio), time and memory crossovers (tokens or None; no memory
    ratio counts as not leading), and the tie tolerance."""
    last = comparison.iloc[-1]
    return {"time_ratio_standard_over_bsbr": round(float(last.time_ratio), 4),
            "memory_ratio_standard_over_bsbr": rounded(last.memory_ratio),
            "time_crossover_seq_len": crossover(comparison.time_ratio, tie_tolerance),
            "memory_crossover_seq_len": crossover(comparison.memory_ratio.fillna(0), tie_tolerance),
            "tie_tolerance": tie_tolerance}


def model_comparison_text(comparison: pd.DataFrame, fits: pd.DataFrame, tie_tolerance: float) -> str:
    """Markdown: the head-to-head of :func:`model_comparison` at the longest length, the crossover, who leads below
    it, the fitted time exponents (``fits``: :func:`power_law_fits` by model with a ``quantity`` column)."""
    lengths_all = [int(n) for n in comparison.index]
    longest, time_cross = lengths_all[-1], crossover(comparison.time_ratio, tie_tolerance)
    last = comparison.loc[longest]
    text = [f"At the longest length, **{longest} tokens**, BSBR takes **{last.bsbr_s:.3f} s** and standard attention "
            f"**{last.standard_s:.3f} s** per forward pass: BSBR is "
            + (f"**{last.time_ratio:.2f}× faster**." if last.time_ratio > 1 else f"**{1 / last.time_ratio:.2f}× slower**.")]
    if time_cross is None:
        text.append(f"BSBR is not ahead by more than {tie_tolerance:.0%} from any measured length on: no crossover "
                    f"up to {longest} tokens.")
    elif time_cross == lengths_all[0]:
        text.append(f"BSBR is faster by more than {tie_tolerance:.0%} at every measured length "
                    f"({lengths_all[0]}–{longest}).")
    else:
        text.append(f"Crossover: BSBR is faster by more than {tie_tolerance:.0%} from **{time_cross} tokens** on.")
    below = [n for n in lengths_all if time_cross is None or n < time_cross]
    if below:
        lengths = {word: [n for n in lengths_all if comparison.faster.loc[n] == word and n in below]
                   for word in ("standard", "tie", "BSBR")}
        parts = [f"{label} at {', '.join(f'{n:,}' for n in lengths[word])} tokens" for word, label in
                 (("standard", "standard attention is faster"), ("tie", f"the two are within {tie_tolerance:.0%}"),
                  ("BSBR", "BSBR is faster")) if lengths[word]]
        text.append(("Per length: " if time_cross is None else "Below that, ") + "; ".join(parts) + ".")
    bsbr_k, std_k = (find_fit(fits, model=name, quantity="time") for name in ("bsbr", "standard"))
    if bsbr_k is not None and std_k is not None:
        text.append(f"Fitted time exponents (upper half of the lengths): BSBR k = {bsbr_k.exponent:.2f} "
                    f"(R² {bsbr_k.r2:.3f}), standard k = {std_k.exponent:.2f} (R² {std_k.r2:.3f}).")
    mem_word = {"BSBR": "less", "standard": "more", "tie": "about the same", "n/a": "n/a"}[last.less_memory]
    text.append(f"Forward memory at {longest} tokens: BSBR {last.bsbr_peak_MiB:.0f} MiB, standard "
                f"{last.standard_peak_MiB:.0f} MiB over their baselines, so BSBR uses **{mem_word}** memory "
                + (f"(standard/BSBR = {last.memory_ratio:.2f})." if pd.notna(last.memory_ratio) else "."))
    text.append("Standard attention here is torch's fused `scaled_dot_product_attention` (causal), which on CPU "
                "does not materialise the seq_len × seq_len score matrix, so its memory also grows about linearly; "
                "the memory comparison is between two linear-memory implementations, not against a naive O(n²) one.")
    return "\n\n".join(text)


def who_wins(times: pd.DataFrame, seq_lens, tie_tolerance: float) -> pd.DataFrame:
    """Full attention / BSBR time for each pair of :data:`PAIRS`, mode and length where both times exist.

    Returns:
        ``[level, mode, seq_len, bsbr_impl, full_impl, bsbr_s, full_s, full_source, ratio, winner]`` sorted by level,
        mode, length; ``winner`` is ``"BSBR"``, ``"full attention"`` or ``"tie"`` (:func:`leader`).
    """
    rows = []
    for level, fast, full in PAIRS:
        for mode in MODES:
            for n in seq_lens:
                (bsbr_s, _), (full_s, source) = time_of(times, fast, mode, n), time_of(times, full, mode, n)
                if bsbr_s is None or full_s is None:
                    continue
                rows.append(dict(level=level, mode=mode, seq_len=n, bsbr_impl=fast, full_impl=full, bsbr_s=bsbr_s,
                                 full_s=full_s, full_source=source, ratio=full_s / bsbr_s,
                                 winner=leader(full_s / bsbr_s, tie_tolerance, slower="full attention")))
    wins = pd.DataFrame(rows, columns=["level", "mode", "seq_len", "bsbr_impl", "full_impl", "bsbr_s", "full_s",
                                       "full_source", "ratio", "winner"])
    return wins.sort_values(["level", "mode", "seq_len"]).reset_index(drop=True)


def crossover_text(wins: pd.DataFrame, crossovers: dict, tie_tolerance: float) -> str:
    """Markdown, one bullet per ``"<level>_<mode>"`` of ``crossovers``: where BSBR leads from, and the ratio at the
    longest length of :func:`who_wins` (marked where full attention is extrapolated)."""
    lines = []
    for key, value in sorted(crossovers.items()):
        level, mode = key.split("_")
        group = wins[(wins.level == level) & (wins["mode"] == mode)]
        longest = group.iloc[-1]
        if value is None:
            where = f"no crossover: BSBR is not ahead by more than {tie_tolerance:.0%} from any length on"
        else:
            where = f"BSBR leads from **{value} tokens** on"
            where += " (from the first measured length)" if value == group.seq_len.min() else ""
        extra = " (full attention extrapolated)" if longest.full_source == "extrapolated" else ""
        lines.append(f"* **{level} {MODE_LABEL[mode]}**: {where}; at {int(longest.seq_len)} tokens full attention / "
                     f"BSBR = **{longest.ratio:.2f}×**{extra}.")
    return "\n".join(lines)


def memory_curves(attention: pd.DataFrame, models: pd.DataFrame, impls, model_names, num_layers: int) -> dict:
    """The peak-memory curves of the memory figure and the growth table, each ascending in length.

    Args:
        attention: measured attention points; models: whole-model points (every length measured, one table).
        impls: the attention impls (forward curves; bsbr and standard also forward+backward).
        model_names: the models drawn; num_layers: their depth (for the label).
    Returns:
        label -> ``(lengths, peak bytes, name, line style)``: ``"<impl> forward"`` (``"-"``),
        ``"<impl> forward+backward"`` (``":"``), ``"<model> model (<num_layers> layers)"`` (``"-."``); ``name`` is the
        architecture or core the colour follows.
    """
    curves = {}
    for mode, label, style, chosen in (("forward", "forward", "-", impls),
                                       ("backward", "forward+backward", ":",
                                        [impl for impl in impls if impl in ("bsbr", "standard")])):
        for impl in chosen:
            part = attention[(attention["mode"] == mode) & (attention.impl == impl)]
            curves[f"{impl} {label}"] = (part.seq_len.to_numpy(), part.peak_bytes.to_numpy(), impl, style)
    for name in model_names:
        part = models[models.model == name].sort_values("seq_len")
        curves[f"{name} model ({num_layers} layers)"] = (part.seq_len.to_numpy(), part.peak_bytes.to_numpy(), name,
                                                         "-.")
    return curves


def memory_growth(curves: dict) -> pd.DataFrame:
    """Memory growth between consecutive lengths against linear growth: ``(peak₂ / peak₁) / (n₂ / n₁)``, 1 = linear.

    Args:
        curves: label -> (lengths in tokens, peak bytes, ...), ascending in length (:func:`memory_curves`).
    Returns:
        ``[curve, from_len, to_len, from_MiB, to_MiB, growth_vs_linear]`` (NaN where ``peak₁`` is not positive).
    """
    rows = []
    for label, (lens, peaks, *_) in curves.items():
        pairs = list(zip(lens, peaks))
        for (n1, m1), (n2, m2) in zip(pairs, pairs[1:]):
            rows.append(dict(curve=label, from_len=int(n1), to_len=int(n2), from_MiB=m1 / 2**20, to_MiB=m2 / 2**20,
                             growth_vs_linear=(m2 / m1) / (n2 / n1) if m1 > 0 else np.nan))
    return pd.DataFrame(rows, columns=["curve", "from_len", "to_len", "from_MiB", "to_MiB", "growth_vs_linear"])


def check_target(name: str, description: str, value, comparison: str, threshold, extrapolated: bool = False,
                 unit: str = "", low=None, high=None, threshold_low=None, threshold_high=None) -> dict:
    """One target row: ``status`` is ``"pass"``/``"FAIL"`` from ``value <comparison> threshold``, or
    ``"not measured"`` (``passed`` None) when either is None.

    With ``low`` and ``high`` (the range of the value that the timed calls allow, e.g. :func:`ratio_range` of two
    medians' intervals) the status follows the range, not the point: ``"pass"`` if the whole range meets the
    threshold, ``"FAIL"`` if none of it does, ``"undecided"`` (``passed`` None) if it straddles the threshold. A
    threshold that is itself measured may carry its range too (``threshold_low``, ``threshold_high``): then the
    value's range is held against the threshold's whole range.

    Raises:
        ValueError: ``comparison`` not one of ``"≥"``, ``"≤"``, ``">"``; only one of ``low``/``high`` given.
    """
    if comparison not in ("≥", "≤", ">"):
        raise ValueError(f"comparison must be one of '≥', '≤', '>', got {comparison!r}")
    if (low is None) != (high is None):
        raise ValueError(f"low and high must be given together, got low={low!r}, high={high!r}")

    def holds(x, t):
        return x >= t if comparison == "≥" else x <= t if comparison == "≤" else x > t

    if value is None or threshold is None:
        passed, status = None, "not measured"
    elif low is None:
        passed = bool(holds(value, threshold))
        status = "pass" if passed else "FAIL"
    else:
        t_low = threshold if threshold_low is None else threshold_low
        t_high = threshold if threshold_high is None else threshold_high
        # the worst and best case of the value against the threshold's worst and best case
        worst, best = (high, low) if comparison == "≤" else (low, high)
        t_worst, t_best = (t_low, t_high) if comparison == "≤" else (t_high, t_low)
        passed = True if holds(worst, t_worst) else False if not holds(best, t_best) else None
        status = {True: "pass", False: "FAIL", None: "undecided"}[passed]
    return dict(target=name, description=description, value=value, low=low, high=high, comparison=comparison,
                threshold=threshold, unit=unit, extrapolated=extrapolated, status=status, passed=passed)


def speed_memory_targets(attention: pd.DataFrame, times: pd.DataFrame, decode: pd.DataFrame, matmul_rate: float,
                         target_seq_lens, target_decode_positions) -> pd.DataFrame:
    """The BSBR attention module's speed, memory, decode and efficiency targets.

    At the two lengths ``short < long`` of ``target_seq_lens`` and positions ``first < last`` of
    ``target_decode_positions``: module forward speedup over standard attention ≥ 5× at ``short`` and ≥ 20× at
    ``long``; the cores' speedup above the modules' at ``long``; BSBR forward peak ≤ 1.5 GB (1.5e9 bytes) at ``long``
    and its growth ``short → long`` ≤ 1.1× linear; BSBR decode time per token at ``last`` ≤ 1.5× that at ``first``;
    BSBR forward GFLOP/s at ``short`` ≥ 30 % of the fp32 matmul rate. The time ratios carry the range that the
    intervals of their two medians allow (:func:`median_interval`, :func:`ratio_range`) and are ``undecided`` where it
    straddles the goal (:func:`check_target`); a ratio from an extrapolated time has no range and is judged by its
    value (flagged ``extrapolated``).

    Args:
        attention: measured attention points (``[impl, mode, seq_len, peak_bytes, gflops_per_s, ...]``).
        times: :func:`extrapolate_times` (a speedup from an extrapolated time is flagged ``extrapolated``).
        decode: decode points ``[impl, position, median_s, ...]``.
        matmul_rate: the machine's fp32 matmul rate, GFLOP/s.
    Returns:
        the :func:`check_target` rows in that order.
    """
    short, long = sorted(int(n) for n in target_seq_lens)
    first_pos, last_pos = sorted(int(n) for n in target_decode_positions)

    def speedup(fast, full, n):
        """(full / fast median ratio, extrapolated, (low, high) from the timed calls)"""
        (bsbr_s, _), (full_s, source) = time_of(times, fast, "forward", n), time_of(times, full, "forward", n)
        if bsbr_s is None or full_s is None:
            return None, False, (None, None)
        calls = ratio_range(_call_range(times, impl=full, mode="forward", seq_len=n),
                            _call_range(times, impl=fast, mode="forward", seq_len=n))
        return full_s / bsbr_s, source == "extrapolated", calls

    rows = []
    for n, goal in ((short, 5.0), (long, 20.0)):
        ratio, extra, (low, high) = speedup("bsbr", "standard", n)
        rows.append(check_target(f"module_forward_speedup_{n}", f"module forward: standard / BSBR time at {n} tokens",
                                 ratio, "≥", goal, extra, "×", low, high))
    module_long, module_extra, module_range = speedup("bsbr", "standard", long)
    core_long, core_extra, (core_low, core_high) = speedup("bsbr_core", "sdpa_core", long)
    both = core_low is not None and module_range[0] is not None  # both ranges, or judge by the values
    rows.append(check_target(f"core_gap_larger_{long}",
                             f"cores alone: sdpa / BSBR time at {long} tokens, above the module ratio",
                             core_long, ">", module_long, core_extra or module_extra, "×",
                             *((core_low, core_high, *module_range) if both else ())))
    peak_long = value_at(attention, "peak_bytes", impl="bsbr", mode="forward", seq_len=long)
    peak_short = value_at(attention, "peak_bytes", impl="bsbr", mode="forward", seq_len=short)
    rows.append(check_target(f"bsbr_forward_peak_memory_{long}",
                             f"BSBR module forward peak memory at {long} tokens (GB: 10⁹ bytes)",
                             None if peak_long is None else peak_long / 1e9, "≤", 1.5, unit="GB"))
    growth = None if peak_long is None or not peak_short else (peak_long / peak_short) / (long / short)
    rows.append(check_target(f"bsbr_memory_growth_{short}_{long}",
                             f"BSBR module forward peak memory growth {short} → {long}, vs linear",
                             growth, "≤", 1.1, unit="× linear"))
    late = value_at(decode, "median_s", impl="bsbr", position=last_pos)
    early = value_at(decode, "median_s", impl="bsbr", position=first_pos)
    low, high = ratio_range(_call_range(decode, impl="bsbr", position=last_pos),
                            _call_range(decode, impl="bsbr", position=first_pos))
    rows.append(check_target(f"bsbr_decode_latency_{last_pos}_vs_{first_pos}",
                             f"BSBR decode: median time per token at position {last_pos} / at {first_pos}",
                             None if late is None or early is None else late / early, "≤", 1.5, unit="×",
                             low=low, high=high))
    bsbr_rate = value_at(attention, "gflops_per_s", impl="bsbr", mode="forward", seq_len=short)
    rows.append(check_target(f"bsbr_matmul_fraction_{short}", f"BSBR module forward GFLOP/s at {short} tokens / fp32 "
                             f"matmul rate ({matmul_rate:.1f} GFLOP/s)",
                             None if bsbr_rate is None else bsbr_rate / matmul_rate, "≥", 0.30))
    return pd.DataFrame(rows, columns=TARGET_COLUMNS)


def _shown(value, unit):
    return "—" if value is None or pd.isna(value) else f"{value:.3g} {unit}".strip()


def _range_shown(low, high):
    return "" if low is None or pd.isna(low) else f" [{low:.3g}, {high:.3g}]"


def targets_view(targets: pd.DataFrame) -> pd.DataFrame:
    """The target table as a reader sees it: target, measured (with unit and, in brackets, the range the medians'
    intervals allow, marked extrapolated), required, status."""
    return pd.DataFrame({
        "target": targets.description,
        "measured": [_shown(v, u) + _range_shown(lo, hi) + (" (extrapolated)" if e else "")
                     for v, u, lo, hi, e in zip(targets.value, targets.unit, targets.low, targets.high,
                                                targets.extrapolated)],
        "required": [f"{c} {_shown(t, u)}" for c, t, u in zip(targets.comparison, targets.threshold, targets.unit)],
        "status": targets.status,
    })


def targets_text(targets: pd.DataFrame, target_seq_lens, target_decode_positions) -> str:
    """Markdown: how many of BSBR's targets (:func:`speed_memory_targets`) pass, which fail, which were not measured
    (the operator targets of :func:`layer_targets` have their own line, :func:`layer_targets_text`)."""
    short, long = sorted(int(n) for n in target_seq_lens)
    first_pos, last_pos = sorted(int(n) for n in target_decode_positions)
    failed = targets[targets.status == "FAIL"]
    undecided = targets[targets.status == "undecided"]
    missing = targets[targets.status == "not measured"]
    summary = [f"BSBR's speed and memory targets: **{(targets.status == 'pass').sum()} of {len(targets)} pass**"
               + (f"; **{len(failed)} fail**: " + "; ".join(failed.description) if len(failed) else "")
               + (f"; **{len(undecided)} undecided at this noise** (the range the medians' intervals allow, in "
                  "brackets, straddles the goal): " + "; ".join(undecided.description) if len(undecided) else "")
               + (f"; {len(missing)} not measured in this profile (lengths {short}/{long}, positions "
                  f"{first_pos}/{last_pos} not all run)" if len(missing) else "") + "."]
    if targets.extrapolated.any():
        summary.append("Values marked *extrapolated* use full attention's fitted power law at a length where it was "
                       "not run (a conservative estimate, see above).")
    return "\n\n".join(summary)


def module_time_split(times: pd.DataFrame, seq_lens) -> pd.DataFrame:
    """Forward time of the modules minus their cores: what BSBR spends outside attention proper (projections, chunk
    means, meta-projections, layout), and the module ratio a free BSBR core would give (an upper bound).

    Returns:
        ``[seq_len, bsbr_module_s, bsbr_core_s, bsbr_outside_core_s, outside_share, full_module_s, full_source,
        full_core_s, module_ratio, ratio_if_bsbr_core_were_free]`` (seconds), for lengths with the BSBR module, its
        core and the standard module.
    """
    rows = []
    for n in seq_lens:
        (bsbr_s, _), (core_s, _) = time_of(times, "bsbr", "forward", n), time_of(times, "bsbr_core", "forward", n)
        (full_s, full_source), (sdpa_s, _) = time_of(times, "standard", "forward", n), time_of(times, "sdpa_core",
                                                                                                 "forward", n)
        if None in (bsbr_s, core_s, full_s):
            continue
        outside = bsbr_s - core_s
        rows.append(dict(seq_len=n, bsbr_module_s=bsbr_s, bsbr_core_s=core_s, bsbr_outside_core_s=outside,
                         outside_share=outside / bsbr_s, full_module_s=full_s, full_source=full_source,
                         full_core_s=sdpa_s, module_ratio=full_s / bsbr_s,
                         ratio_if_bsbr_core_were_free=full_s / outside if outside > 0 else None))
    return pd.DataFrame(rows, columns=["seq_len", "bsbr_module_s", "bsbr_core_s", "bsbr_outside_core_s",
                                       "outside_share", "full_module_s", "full_source", "full_core_s",
                                       "module_ratio", "ratio_if_bsbr_core_were_free"])


def module_time_split_text(split: pd.DataFrame) -> str:
    """Markdown: the longest length of :func:`module_time_split` in words ("" for an empty table)."""
    if not len(split):
        return ""
    last = split.iloc[-1]
    return (f"At {int(last.seq_len):,} tokens the BSBR module takes {quantity(last.bsbr_module_s, 's')}, of which the "
            f"core is {quantity(last.bsbr_core_s, 's')} and the rest (mostly the four projections) "
            f"{quantity(last.bsbr_outside_core_s, 's')} ({last.outside_share:.0%}); full attention's module takes "
            f"{quantity(last.full_module_s, 's')} ({last.full_source}). The module ratio is "
            f"{quantity(last.module_ratio, '×')}; with a BSBR core of zero cost it would be at most "
            f"{quantity(last.ratio_if_bsbr_core_were_free, '×')}.")


def operator_ratios(operators: pd.DataFrame, seq_lens) -> pd.DataFrame:
    """Per length: the four :data:`OPERATORS`' median times (``<impl>_ms``, milliseconds) and the ratios
    ``delta_recurrent_over_chunkwise``, ``linear_recurrent_over_chunkwise``, ``delta_over_linear_chunkwise``.

    Raises:
        TypeError: an operator not measured at one of ``seq_lens`` (its time is None).
    """
    rows = []
    for n in seq_lens:
        times = {impl: value_at(operators, "median_s", impl=impl, seq_len=n) for impl in OPERATORS}
        rows.append(dict(
            seq_len=n, **{f"{impl}_ms": t * 1e3 for impl, t in times.items()},
            delta_recurrent_over_chunkwise=times["delta_recurrent"] / times["delta_chunkwise"],
            linear_recurrent_over_chunkwise=times["linear_recurrent"] / times["linear_chunkwise"],
            delta_over_linear_chunkwise=times["delta_chunkwise"] / times["linear_chunkwise"]))
    return pd.DataFrame(rows)


def layer_targets(operator_view: pd.DataFrame, layers: pd.DataFrame, seq_len: int) -> pd.DataFrame:
    """The DeltaNet operator targets and the no-``n × n`` memory target of every layer but standard attention.

    At ``seq_len`` (a length of ``operator_view``, :func:`operator_ratios`): DeltaNet recurrent / chunkwise time
    ≥ 20×, DeltaNet chunkwise / linear-attention chunkwise ≤ 3×; per layer (``layers``: forward points
    ``[impl, seq_len, peak_bytes, ...]``) the forward peak at its longest length ≤ one fp32 ``n × n`` matrix
    (``4·n²`` bytes).

    Returns:
        ``[target, description, value, comparison, threshold, unit, status, passed]``.
    """
    rows = []
    at = operator_view.set_index("seq_len").loc[int(seq_len)]
    rows.append(check_target(f"delta_chunkwise_speedup_{seq_len}",
                             f"DeltaNet recurrent / chunkwise time at {seq_len} tokens",
                             float(at.delta_recurrent_over_chunkwise), "≥", 20.0, unit="×"))
    rows.append(check_target(f"delta_vs_linear_{seq_len}",
                             f"DeltaNet chunkwise / linear attention chunkwise time at {seq_len} tokens",
                             float(at.delta_over_linear_chunkwise), "≤", 3.0, unit="×"))
    for impl in [name for name in sorted(layers.impl.unique()) if name != "standard"]:
        row = layers[layers.impl == impl].sort_values("seq_len").iloc[-1]
        n = int(row.seq_len)
        matrix = quantity(4 * n * n / 2**20, "MiB")
        rows.append(check_target(f"no_nxn_{impl}", f"{impl} forward peak at {n} tokens / one n×n fp32 matrix ({matrix})",
                                 float(row.peak_bytes) / (4 * n * n), "≤", 1.0, unit="× 4n² bytes"))
    return pd.DataFrame(rows, columns=TARGET_COLUMNS).drop(columns=["extrapolated", "low", "high"])  # one value each


def layer_targets_text(targets: pd.DataFrame) -> str:
    """Markdown: all targets of :func:`layer_targets` pass, or the missed ones with their values."""
    failed = targets[~targets.passed.astype(bool)]
    if not len(failed):
        return "All operator and memory targets pass."
    return "**Operator and memory targets missed:** " + "; ".join(
        f"{r.description}: {r.value:.3g}{r.unit.split()[0] if r.unit else ''} (target {r.comparison} {r.threshold:g})"
        for r in failed.itertuples())


def rounded(value, digits: int = 4):
    """``round(float(value), digits)``, or None for None, NaN or infinity (a metric not produced: JSON has no NaN)."""
    return None if value is None or pd.isna(value) or not np.isfinite(float(value)) else round(float(value), digits)


def model_headline(results: pd.DataFrame, fits: pd.DataFrame, name: str, seq_len: int) -> dict:
    """Metrics of one whole model at ``seq_len``: median/min/max seconds, peak and baseline bytes, and the time and
    memory exponents and R² (upper half: ``time_exponent``; all lengths: ``time_exponent_all``), rounded to 4 digits."""
    row = results[(results.model == name) & (results.seq_len == seq_len)].iloc[0]
    entry = {"median_s": float(row.median_s), "min_s": float(row.min_s), "max_s": float(row.max_s),
             "peak_bytes": int(row.peak_bytes), "baseline_rss_bytes": int(row.baseline_rss_bytes)}
    for quantity in ("time", "memory"):
        for span, suffix in (("upper half", ""), ("all", "_all")):
            fit = find_fit(fits, span, model=name, quantity=quantity)
            if fit is not None:
                entry[f"{quantity}_exponent{suffix}"] = round(float(fit.exponent), 4)
                entry[f"{quantity}_r2{suffix}"] = round(float(fit.r2), 4)
    return entry


def _target_metrics(targets: pd.DataFrame, extrapolated: bool) -> dict:
    return {row.target: {"value": rounded(row.value), "threshold": rounded(row.threshold),
                         **({"low": rounded(row.low), "high": rounded(row.high)}
                            if "low" in targets and row.low is not None and pd.notna(row.low) else {}),
                         "comparison": row.comparison, **({"extrapolated": bool(row.extrapolated)} if extrapolated
                                                          else {}), "status": row.status}
            for row in targets.itertuples()}


def attention_metrics(attention: pd.DataFrame, wins: pd.DataFrame, crossovers: dict, decode: pd.DataFrame,
                      targets: pd.DataFrame, matmul_rate: float, longest: int, config: dict,
                      tie_tolerance: float) -> dict:
    """The ``attention`` section of the scaling metrics: config, matmul rate, the ratios and BSBR's time/peak/GFLOP/s
    at the ``longest`` length (tokens), crossovers, BSBR's forward fraction of the matmul rate per length, decode
    medians/means (s) and state bytes per impl and position, and the targets (:func:`speed_memory_targets`)."""
    at_longest = {}
    for level, _, _ in PAIRS:
        for mode in MODES:
            hit = wins[(wins.level == level) & (wins["mode"] == mode) & (wins.seq_len == longest)]
            if len(hit):
                at_longest[f"{level}_{mode}_ratio"] = rounded(hit.ratio.iloc[0])
                at_longest[f"{level}_{mode}_full_extrapolated"] = bool(hit.full_source.iloc[0] == "extrapolated")
    for mode in MODES:
        for column, key in (("median_s", "s"), ("peak_bytes", "peak_bytes"), ("gflops_per_s", "gflops_per_s")):
            value = value_at(attention, column, impl="bsbr", mode=mode, seq_len=longest)
            if value is not None:
                at_longest[f"bsbr_{mode}_{key}"] = int(value) if column == "peak_bytes" else rounded(value, 6)
    bsbr_forward = attention[(attention["mode"] == "forward") & (attention.impl == "bsbr")]
    return {
        "config": config,
        "matmul_gflops_per_s": rounded(matmul_rate, 2),
        "longest_seq_len": longest,
        "at_longest": at_longest,
        "crossover_seq_len": crossovers,
        "bsbr_forward_gflops_fraction_of_matmul": {
            str(int(n)): rounded(rate / matmul_rate) for n, rate in zip(bsbr_forward.seq_len,
                                                                         bsbr_forward.gflops_per_s)},
        "decode": {impl: {str(int(row.position)): {"median_s": rounded(row.median_s, 7),
                                                   "mean_s": rounded(row.mean_s, 7),
                                                   "state_bytes": int(row.state_bytes)}
                          for row in group.itertuples()} for impl, group in decode.groupby("impl")},
        "targets": _target_metrics(targets, extrapolated=True),
        "tie_tolerance": tie_tolerance,
    }


def layer_metrics(layers: pd.DataFrame, layer_fits: pd.DataFrame, layer_decode: pd.DataFrame,
                  operator_view: pd.DataFrame, targets: pd.DataFrame) -> dict:
    """The ``layers`` section of the scaling metrics: forward median seconds and peak bytes per layer and length,
    time exponents, decode medians per position, operator times (ms) and ratios, and :func:`layer_targets`."""
    return {
        "forward_median_s": {impl: {str(int(r.seq_len)): rounded(r.median_s, 6) for r in group.itertuples()}
                             for impl, group in layers.groupby("impl")},
        "forward_peak_bytes": {impl: {str(int(r.seq_len)): int(r.peak_bytes) for r in group.itertuples()}
                               for impl, group in layers.groupby("impl")},
        "time_exponent": {r.impl: rounded(r.time_exponent) for r in layer_fits.itertuples()},
        "decode_median_s": {impl: {str(int(r.position)): rounded(r.median_s, 7) for r in group.itertuples()}
                            for impl, group in layer_decode.groupby("impl")},
        "operators": {str(int(r.seq_len)): {key: rounded(getattr(r, key)) for key in (
            "delta_chunkwise_ms", "delta_recurrent_ms", "linear_chunkwise_ms", "linear_recurrent_ms",
            "delta_recurrent_over_chunkwise", "linear_recurrent_over_chunkwise", "delta_over_linear_chunkwise")}
            for r in operator_view.itertuples()},
        "targets": _target_metrics(targets, extrapolated=False),
    }
