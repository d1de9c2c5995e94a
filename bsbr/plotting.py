"""Plot helpers the experiment notebooks share: one fixed colour per architecture / variant across every report,
log-log axes with the measured lengths as ticks, accuracy with interval error bars, and saving a figure.

Figures are static matplotlib PNGs (the reports stay small and open offline).
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd

from bsbr._checks import check_positive_int

# bsbr.scaling (the benchmark stack) is imported by the scaling figures only: a notebook that draws other figures
# does not load it, so its DVC stage does not depend on it.

__all__ = ["COLORS", "color", "errorbars", "log_axes", "plot_attention_times", "plot_calibration_and_scale",
           "plot_training", "plot_training_memory", "plot_conversion_similarity", "plot_decode", "plot_gflops",
           "plot_layers", "plot_long_documents", "plot_lora_curves", "plot_memory_curves", "plot_model_scaling",
           "plot_passkey_accuracy", "plot_passkey_grid", "plot_ratio_intervals", "save_figure"]

_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
#: One colour per architecture (``bsbr.available_models()``), per attention core of the benchmark, and per model
#: variant of the converted-model notebooks. A converted BSBR model shares BSBR's colour and the original
#: (full-attention) model shares standard attention's, so the same colour means the same attention in every report.
COLORS = {
    "bsbr": _TAB10[0], "standard": _TAB10[3], "linear": _TAB10[1], "delta_net": _TAB10[2],
    "sliding_window": _TAB10[4], "hopfield": _TAB10[5], "gau": _TAB10[6],
    "bsbr_core": _TAB10[9], "sdpa_core": _TAB10[8], "own_chunk": _TAB10[7],
    "calibrated": _TAB10[0], "original": _TAB10[3],
    # the other variants of the conversion notebook: a darker / lighter shade of the attention they are a form of
    "seed": "#393b79", "normalized": "#aec7e8", "own_chunk_sinks": "#c7c7c7", "sliding_window_sinks": "#c5b0d5",
    # the terraced conversion (BSBR's blues, darker = more calibration) and its sliding-window controls (purples)
    "normalized_calibrated": "#6b6ecf", "terraced_exact": "#9edae5", "terraced": "#6baed6",
    "terraced_transfer": "#2171b5", "terraced_lora": "#08306b",
    "sliding_chunk_sinks": "#c5b0d5", "sliding_span_sinks": "#9467bd", "sliding_span_sinks_lora": "#54278f",
    # the passkey notebook's block retrieval (greens, one shade per key summary) and its exact region alone (the same
    # region as terraced_exact)
    "blocks_minmax": "#238b45", "blocks_mean": "#74c476", "blocks_mean_compact": "#00441b",
    "blocks_minmax_compact": "#006d2c", "exact_region": "#9edae5",
    # block retrieval routed by BSBR's meta-query/meta-key (whole chunks): the seed formula's dark blue
    "blocks_meta": "#393b79",
    # BSBR trained from scratch with exact block retrieval (the associative-recall notebook): a dark shade of BSBR's
    # blue (block retrieval's greens would sit next to DeltaNet's green in the same figure)
    "bsbr_blocks": "#08519c",
    # ... and with compressed chunk states: a light shade of BSBR's blue
    "bsbr_compressed": "#9ecae1",
}


def color(name: str) -> str:
    """The fixed colour (hex) of an architecture, attention core or model variant.

    Raises:
        ValueError: ``name`` without a colour (the names of :data:`COLORS` are accepted).
    """
    if name not in COLORS:
        raise ValueError(f"name must be one of {sorted(COLORS)}, got {name!r}")
    return COLORS[name]


def log_axes(ax, ticks, xlabel: str = "sequence length (tokens)", ylabel: str | None = None) -> None:
    """Log-log axes with ``ticks`` (the measured lengths) as x ticks and plain-number y labels (minor ticks labelled
    at 2× and 5× each power of ten only, so labels never overlap)."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks(ticks, [str(n) for n in ticks], rotation=45)
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(mticker.FuncFormatter(
        lambda value, _: f"{value:g}" if value > 0 and round(value / 10 ** np.floor(np.log10(value))) in (2, 5) else ""))


def errorbars(ax, x, table, name: str, label: str) -> None:
    """Accuracy with its interval as error bars: ``table`` holds ``accuracy``, ``ci_low`` and ``ci_high`` (one row per
    ``x``), drawn in ``color(name)``."""
    ax.errorbar(x, table.accuracy, yerr=[table.accuracy - table.ci_low, table.ci_high - table.accuracy], marker="o",
                capsize=3, color=color(name), label=label)


def save_figure(fig, path: str | os.PathLike, title: str | None = None, dpi: int = 100) -> None:
    """Give ``fig`` its ``title`` (small, above the panels), lay it out, write it to ``path`` (PNG at ``dpi``) and show
    it (inline in a notebook)."""
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.show()


def _figure(panels: int, figsize, **kwargs):
    fig, axes = plt.subplots(1, panels, figsize=figsize, squeeze=False, **kwargs)
    return fig, list(axes[0])


def _legend_outside(ax, **kwargs):
    """The axes' legend to the right of its panel, so that it never covers data (10 pt, no frame)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=10, frameon=False, borderaxespad=0,
                     **kwargs)


def plot_model_scaling(results, fits, seq_lens):
    """Whole models: forward time (median, min–max band) and forward peak memory over baseline against length, on
    log-log axes, one line per model labelled with its fitted exponent (``fits``: ``bsbr.scaling.model_fits``).

    Args:
        results: ``[model, seq_len, median_s, min_s, max_s, peak_bytes, ...]`` (seconds, bytes).
        seq_lens: the x ticks (tokens).
    Returns:
        the figure (two panels; a panel without positive values stays empty).
    """
    from bsbr.scaling import find_fit

    fig, axes = _figure(2, (12, 4.5))
    plotted = results.assign(peak_MiB=results.peak_bytes / 2**20)
    for ax, column, quantity, ylabel in ((axes[0], "median_s", "time", "forward time, median (s)"),
                                         (axes[1], "peak_MiB", "memory", "forward peak memory over baseline (MiB)")):
        data = plotted[plotted[column] > 0]
        if data.empty:
            continue
        for name, group in data.groupby("model"):
            fit = find_fit(fits, model=name, quantity=quantity)
            ax.plot(group.seq_len, group[column], marker="o", color=color(name),
                    label=name + (f" (k = {fit.exponent:.2f})" if fit is not None else ""))
            if column == "median_s":
                ax.fill_between(group.seq_len, group.min_s, group.max_s, color=color(name), alpha=0.2)
        log_axes(ax, seq_lens, ylabel=ylabel)
        _legend_outside(ax, title="model (fitted\nexponent,\nupper half)")
    axes[0].set_title("Forward time vs length (band: min–max)")
    axes[1].set_title("Forward peak RSS − baseline vs length")
    return fig


def plot_attention_times(times, fits, impls, seq_lens):
    """Attention forward and forward+backward time against length, one panel per mode: measured medians (solid,
    labelled with the fitted exponent) and extrapolated full-attention times (dashed line, open markers).

    Args:
        times: ``bsbr.scaling.extrapolate_times`` (seconds); fits: ``bsbr.scaling.power_law_fits`` by impl and mode.
        impls: the impls drawn; seq_lens: the x ticks (tokens).
    """
    from bsbr.scaling import MODE_LABEL, MODES, find_fit

    fig, axes = _figure(2, (12, 4.8))
    for ax, mode in zip(axes, MODES):
        for impl in impls:
            part = times[(times["mode"] == mode) & (times.impl == impl)]
            measured, extrapolated = part[part.source == "measured"], part[part.source == "extrapolated"]
            if measured.empty:
                continue
            fit = find_fit(fits, impl=impl, mode=mode)
            ax.plot(measured.seq_len, measured.median_s, marker="o", color=color(impl),
                    label=impl + (f" (k = {fit.exponent:.2f})" if fit is not None else ""))
            if len(extrapolated):
                joined = pd.concat([measured.tail(1), extrapolated])
                ax.plot(joined.seq_len, joined.median_s, linestyle="--", color=color(impl))
                ax.plot(extrapolated.seq_len, extrapolated.median_s, linestyle="none", marker="o", mfc="none",
                        color=color(impl), label=f"{impl}, extrapolated (dashed)")
        log_axes(ax, seq_lens, ylabel=f"{MODE_LABEL[mode]} time, median (s)")
        ax.set_title(f"{MODE_LABEL[mode].capitalize()} time vs length")
        _legend_outside(ax, title="impl (fitted\nexponent,\nupper half)")
    return fig


def plot_memory_curves(curves: dict, ticks):
    """Peak memory over baseline (MiB) against length, log-log: ``curves`` is ``bsbr.scaling.memory_curves`` (label ->
    lengths, peak bytes, colour name, line style); points with a peak of 0 bytes are left out."""
    fig, (ax,) = _figure(1, (8, 4.8))
    for label, (lens, peaks, name, style) in curves.items():
        if (keep := peaks > 0).sum():
            ax.plot(lens[keep], peaks[keep] / 2**20, linestyle=style, marker="o", color=color(name), label=label)
    log_axes(ax, ticks, ylabel="peak RSS over baseline (MiB)")
    ax.set_title("Peak memory vs length (measured points only)")
    _legend_outside(ax)
    return fig


def plot_decode(decode, positions):
    """Streaming decode: time per token (median, min–max band, ms) and state size (MiB) against the prefilled
    position, one line per impl (``decode``: ``[impl, position, median_s, min_s, max_s, state_bytes, ...]``)."""
    fig, axes = _figure(2, (12, 4.5))
    for impl, group in decode.groupby("impl"):
        axes[0].plot(group.position, group.median_s * 1e3, marker="o", color=color(impl),
                     label=f"{impl} ({'BSBR state' if impl == 'bsbr' else 'KV cache'})")
        axes[0].fill_between(group.position, group.min_s * 1e3, group.max_s * 1e3, color=color(impl), alpha=0.2)
        axes[1].plot(group.position, group.state_bytes / 2**20, marker="o", color=color(impl), label=impl)
    log_axes(axes[0], positions, xlabel="position (prefilled tokens)", ylabel="time per token, median (ms)")
    log_axes(axes[1], positions, xlabel="position (prefilled tokens)", ylabel="state (MiB)")
    axes[0].set_title("Decode latency per token (band: min–max)")
    axes[1].set_title("Streaming state size")
    for ax in axes:
        _legend_outside(ax)
    return fig


def plot_gflops(gflops, rate: float, impls, seq_lens):
    """Achieved GFLOP/s (counted FLOPs / median time) against length, one panel per mode, with the machine's fp32
    matmul ``rate`` (GFLOP/s) and 30 % of it as reference lines."""
    from bsbr.scaling import MODE_LABEL, MODES

    fig, axes = _figure(2, (12, 4.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        for impl in impls:
            part = gflops[(gflops["mode"] == mode) & (gflops.impl == impl)]
            if len(part):
                ax.plot(part.seq_len, part.gflops_per_s, marker="o", color=color(impl), label=impl)
        ax.axhline(rate, color="grey", linestyle="--", label=f"fp32 matmul rate {rate:.0f}")
        ax.axhline(0.3 * rate, color="grey", linestyle=":", label="30 % of it")
        ax.set(xscale="log", xlabel="sequence length (tokens)", ylabel="achieved GFLOP/s",
               title=f"{MODE_LABEL[mode].capitalize()}: counted FLOPs / median time")
        ax.set_xticks(seq_lens, [str(n) for n in seq_lens], rotation=45)
        ax.xaxis.set_minor_locator(mticker.NullLocator())
    _legend_outside(axes[-1])  # the same lines in both panels: one legend
    return fig


def plot_layers(layers, seq_lens):
    """One attention layer per architecture: forward time (median, s) and forward peak memory over baseline (MiB)
    against length, log-log (``layers``: ``[impl, seq_len, median_s, peak_bytes, ...]``)."""
    fig, axes = _figure(2, (13, 4.8))
    for impl, part in layers.groupby("impl"):
        axes[0].plot(part.seq_len, part.median_s, marker="o", color=color(impl), label=impl)
        keep = part[part.peak_bytes > 0]
        axes[1].plot(keep.seq_len, keep.peak_bytes / 2**20, marker="o", color=color(impl), label=impl)
    log_axes(axes[0], seq_lens, ylabel="forward time, median (s)")
    log_axes(axes[1], seq_lens, ylabel="forward peak RSS over baseline (MiB)")
    axes[0].set_title("One attention layer: forward time (measured points only)")
    axes[1].set_title("One attention layer: forward peak memory")
    _legend_outside(axes[-1])  # the same lines in both panels: one legend
    return fig


def plot_passkey_accuracy(by_length, cells, variants, labels: dict, trials: int | dict, columns: int = 3,
                          panels: str = "all"):
    """Passkey exact-match accuracy with Wilson 95 % intervals: all depths pooled against context length (the pooled
    panel, log₂ axis), and accuracy against fact depth, one panel per length (the depth panels); variants side by
    side (small x offsets), one colour each.

    ``panels="pooled"`` draws the pooled panel alone, wide, with the legend outside it on the right (a report's
    headline figure); ``"depths"`` the depth panels alone; ``"all"`` both. Several panels fill a grid of
    ``columns`` columns and the legend takes the grid's first free cell (or a row of its own below the grid when none
    is free), so it never covers data.

    Args:
        by_length: ``[length, variant, accuracy, ci_low, ci_high]``; cells: the same per ``[length, depth, variant]``.
        variants: the variants drawn; labels: variant -> legend label; trials: trials per (length, depth) cell, or
            length -> trials where lengths differ (shown in the panel titles).
        columns: panels per row (>= 1).
        panels: ``"all"``, ``"pooled"`` or ``"depths"``.
    Raises:
        ValueError: ``columns`` < 1; ``panels`` not one of the three.
    """
    check_positive_int(columns=columns)
    if panels not in ("all", "pooled", "depths"):
        raise ValueError(f"panels must be 'all', 'pooled' or 'depths', got {panels!r}")
    lengths, depths = sorted(by_length.length.unique()), sorted(cells.depth.unique())
    per_cell = {n: trials[n] if isinstance(trials, dict) else trials for n in lengths}
    pooled = sorted({len(depths) * t for t in per_cell.values()})
    offsets = {v: (i - (len(variants) - 1) / 2) * 0.03 for i, v in enumerate(variants)}
    if panels == "pooled":
        fig, ax = plt.subplots(figsize=(11, 4.6))
        axes, spare = [ax], []
    else:
        count = (panels == "all") + len(lengths)
        columns = min(columns, count + 1)  # room for the legend's cell
        rows = -(-(count + 1) // columns)  # the legend takes one cell
        fig, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.5 * rows), squeeze=False)
        cells_flat = list(grid.flat)
        axes, spare = cells_flat[:count], cells_flat[count:]
    if panels in ("all", "pooled"):
        for variant in variants:
            group = by_length[by_length.variant == variant]
            errorbars(axes[0], np.log2(group.length) + offsets[variant] * 2, group, variant, labels[variant])
        axes[0].set_xticks(np.log2(lengths), [f"{n:,}" for n in lengths])
        axes[0].set_xlim(np.log2(min(lengths)) - 0.5, np.log2(max(lengths)) + 0.5)
        axes[0].set(xlabel="context length (tokens)", ylabel="exact-match accuracy", ylim=(-0.03, 1.03),
                    title=f"all depths pooled (n = {'–'.join(map(str, pooled[::max(len(pooled) - 1, 1)]))} / point)")
    depth_axes = axes[1:] if panels == "all" else [] if panels == "pooled" else axes
    for index, (ax, length) in enumerate(zip(depth_axes, lengths), start=len(axes) - len(depth_axes)):
        for variant in variants:
            group = cells[(cells.length == length) & (cells.variant == variant)]
            errorbars(ax, group.depth + offsets[variant], group, variant, labels[variant])
        ax.set(xlabel="fact depth (fraction of the filler)", title=f"{length:,} tokens (n = {per_cell[length]} / point)",
               ylim=(-0.03, 1.03), xlim=(-0.05, 1.05))
        ax.set_ylabel("" if index % columns else "exact-match accuracy")
    handles, names = axes[0].get_legend_handles_labels()
    if panels == "pooled":
        axes[0].legend(handles, names, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=10, frameon=False,
                       title="variant", title_fontsize=10)
        return fig
    legend_ax = spare[0]  # the grid always leaves one cell free for the legend
    legend_ax.axis("off")
    legend_ax.legend(handles, names, loc="center", fontsize=9, frameon=False, title="variant")
    for ax in spare[1:]:
        ax.axis("off")
    return fig


def plot_passkey_grid(cells, variants, labels: dict, columns: int = 3):
    """Passkey results per fact depth as a grid per context length (the "needle in a haystack" chart): one row per
    variant, one column per depth, each cell coloured by its accuracy (red 0 → green 1) and labelled
    ``correct/trials``, so a cell of two trials reads as the two trials it is, not as a point with an interval.

    Args:
        cells: ``[length, depth, variant, trials, correct]`` (e.g. :func:`bsbr.passkey.accuracy_table` per length,
            depth and variant); a missing (length, variant, depth) cell is left blank.
        variants: the rows, top to bottom; labels: variant -> row label.
        columns: grids per row (>= 1).
    Raises:
        ValueError: ``columns`` < 1.
    """
    check_positive_int(columns=columns)
    lengths, depths = sorted(cells.length.unique()), sorted(cells.depth.unique())
    columns = min(columns, len(lengths))
    rows = -(-len(lengths) // columns)
    size = (1.2 * len(depths) * columns + 3.2, 0.42 * len(variants) * rows + 1.4)
    fig, grid = plt.subplots(rows, columns, figsize=size, squeeze=False, sharey=True)
    cmap = plt.get_cmap("RdYlGn")
    for ax, length in zip(grid.flat, lengths):
        table = cells[cells.length == length].set_index(["variant", "depth"])
        values = np.full((len(variants), len(depths)), np.nan)
        for i, variant in enumerate(variants):
            for j, depth in enumerate(depths):
                if (variant, depth) in table.index:
                    row = table.loc[(variant, depth)]
                    values[i, j] = row.correct / row.trials
                    ax.text(j, i, f"{int(row.correct)}/{int(row.trials)}", ha="center", va="center", fontsize=10)
        ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto", alpha=0.75)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(variants)), [labels[v] for v in variants])
        ax.set(title=f"{length:,} tokens", xlabel="fact depth (fraction of the filler)")
        ax.grid(False)
    for ax in list(grid.flat)[len(lengths):]:
        ax.axis("off")
    return fig


def plot_conversion_similarity(head, labels: dict):
    """Converted-model variants against the original at one chunk size, one bar per variant in ``color(variant)``:
    perplexity (log axis, with the original's and 1.25× it as vertical lines), KL(original ‖ variant) (nats/token),
    top-1 agreement and final hidden-state cosine.

    Args:
        head: ``bsbr.evaluation.similarity_table`` rows of one chunk size indexed by variant (``ppl``,
            ``ppl_original``, ``kl``, ``top1``, ``cos``).
        labels: variant -> label, in plotting order (top to bottom); variants not in ``head`` are left out.
    """
    order = [v for v in labels if v in head.index]
    fig, axes = _figure(4, (18, 4.6))
    panels = [("ppl", "perplexity (log scale)"), ("kl", "KL(original ‖ variant), nats/token"),
              ("top1", "top-1 agreement with the original"), ("cos", "cosine similarity, final hidden states")]
    for ax, (column, label) in zip(axes, panels):
        ax.barh([labels[v] for v in order], head.loc[order, column], color=[color(v) for v in order])
        if column == "ppl":
            ax.axvline(head.ppl_original.iloc[0], color="black", lw=1.5, label="original")
            ax.axvline(1.25 * head.ppl_original.iloc[0], color="black", lw=1, ls="--", label="1.25 × original")
            ax.set_xscale("log")
            ax.legend(fontsize=8, loc="lower right")
        ax.set(xlabel=label)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    return fig


def plot_ratio_intervals(table, labels: dict, reference_label: str = "original", xmax: float | None = None):
    """Perplexity ratio to the reference with its interval, one row per variant in ``color(variant)``, one panel per
    text source (a vertical line at 1).

    Args:
        table: rows ``source``, ``variant``, ``ratio``, ``ratio_low``, ``ratio_high``, ``tokens`` (e.g.
            :func:`bsbr.intervals.bootstrap_table` with a ``source`` column); one panel per source in order of
            appearance.
        labels: variant -> label, in plotting order (top to bottom); variants not in ``table`` are left out.
        reference_label: what the ratio is taken to (x-axis label).
        xmax: None (a log axis holding every interval), or where a linear axis ends (> 1), so that the close
            comparisons are legible: a variant whose ratio lies beyond it is drawn as a triangle at the edge with its
            ratio and interval written beside it.
    Raises:
        ValueError: ``xmax`` not above 1.
    """
    if xmax is not None and not xmax > 1:
        raise ValueError(f"xmax must be None or > 1, got {xmax!r}")
    sources = list(dict.fromkeys(table.source))
    fig, axes = _figure(len(sources), (6 * len(sources), 0.45 * len(labels) + 1.6), sharey=True)
    axes[0].invert_yaxis()  # shared y: the first variant on top in every panel
    for ax, source in zip(axes, sources):
        rows = table[table.source == source].set_index("variant")
        order = [v for v in labels if v in rows.index]
        y = np.arange(len(order))
        r = rows.loc[order]
        inside = np.ones(len(order), dtype=bool) if xmax is None else (r.ratio <= xmax).to_numpy()
        shown = r[inside]
        ax.errorbar(shown.ratio, y[inside], xerr=[shown.ratio - shown.ratio_low, shown.ratio_high - shown.ratio],
                    fmt="none", ecolor="black", capsize=3, lw=1)
        ax.scatter(shown.ratio, y[inside], c=[color(v) for v in shown.index], s=60, zorder=3, edgecolor="black",
                   linewidth=0.5)
        ax.axvline(1.0, color="black", lw=1, ls="--")
        ax.set_yticks(y, [labels[v] for v in order])
        ax.set(xlabel=f"perplexity ÷ {reference_label}", title=f"{source}: {int(rows.tokens.iloc[0]):,} scored tokens")
        if xmax is None:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(mticker.FuncFormatter(
                lambda value, _: f"{value:g}" if round(value, 6) in (1.05, 1.1, 1.2, 1.5, 2, 3, 5) else ""))
            ax.tick_params(axis="x", which="minor", labelsize=10)
        else:
            ax.set_xlim(min(0.99, float(shown.ratio_low.min()) - 0.01) if len(shown) else 0.99, xmax)
            for v, yy, row in zip(order, y, r.itertuples()):
                if row.ratio > xmax:  # off the axis: a triangle at the edge, its value beside it
                    ax.scatter([xmax], [yy], marker=">", s=70, color=color(v), edgecolor="black", linewidth=0.5,
                               zorder=3, clip_on=False)
                    ax.annotate(f"{row.ratio:#.3g} [{row.ratio_low:#.3g}, {row.ratio_high:#.3g}] →", (xmax, yy),
                                xytext=(-9, 0), textcoords="offset points", ha="right", va="center", fontsize=10)
        ax.tick_params(axis="x", which="major", labelsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.text(0.5, -0.01, "dots: perplexity ratio on the same tokens; bars: 95% block-bootstrap interval (paired)"
             + ("" if xmax is None else f"; beyond {xmax:.3g}: a triangle at the edge, its value written beside it"),
             ha="center", va="top", fontsize=10)
    return fig


def plot_lora_curves(curves, labels: dict, reference: float | None = None):
    """Perplexity on held-out curve windows against training steps, one line per run in ``color(run)``.

    Args:
        curves: rows ``run``, ``step``, ``ppl`` (and optionally ``seconds``).
        labels: run -> legend label.
        reference: the original model's perplexity on the same tokens (a dashed line), or None.
    """
    fig, axes = _figure(1, (7, 4.2))
    ax = axes[0]
    for run, group in curves.groupby("run", sort=False):
        ax.plot(group.step, group.ppl, marker="o", color=color(run), label=labels.get(run, run))
    if reference is not None:
        ax.axhline(reference, color=color("original"), ls="--", lw=1, label="original")
    ax.set(xlabel="LoRA steps", ylabel="perplexity, curve windows")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


#: the calibration panel's three series per retrieval mode: (column, colour name, label)
_CALIBRATION_SERIES = {
    "normalized": (("own_chunk_rel_mse", "own_chunk_sinks", "own chunk + sinks"),
                   ("initial_rel_mse", "normalized", "normalised, before"),
                   ("final_rel_mse", "calibrated", "normalised, calibrated")),
    "terraced": (("own_chunk_rel_mse", "terraced_exact", "exact region alone (no retrieval)"),
                 ("initial_rel_mse", "terraced", "terraced, before"),
                 ("final_rel_mse", "terraced_transfer", "terraced, after attention transfer")),
}


def plot_calibration_and_scale(per_chunk, calibration, scale, labels: dict, chunk_size: int, calibration_split: str,
                               retrieval: str = "normalized"):
    """Where a conversion goes wrong: next-token NLL per chunk (one line per variant, the original dashed), the
    per-layer relative output error before and after calibration, and the seed formula's retrieved/local ratio per
    layer (median, band up to p90, one colour per chunk size).

    Args:
        per_chunk: ``bsbr.evaluation.per_chunk_table`` (the ``nll`` rows at ``chunk_size`` are drawn).
        calibration: ``bsbr.convert.calibrate_attention_transfer`` rows (``layer``, ``own_chunk_rel_mse``,
            ``initial_rel_mse``, ``final_rel_mse``).
        scale: ``[chunk_size, layer, median_ratio, p90_ratio]`` (``bsbr.evaluation.seed_retrieval_ratio``).
        labels: variant -> legend label; chunk_size: tokens; calibration_split: named in the title.
        retrieval: the mode ``calibration`` was fitted for, ``"normalized"`` or ``"terraced"`` (names the series).
    Raises:
        ValueError: another ``retrieval``.
    """
    if retrieval not in _CALIBRATION_SERIES:
        raise ValueError(f"retrieval must be one of {sorted(_CALIBRATION_SERIES)}, got {retrieval!r}")
    fig, axes = _figure(3, (18, 4.4))
    c = chunk_size
    data = per_chunk[(per_chunk.metric == "nll") & (per_chunk.chunk_size == c)]
    for variant, group in data.groupby("variant"):
        axes[0].plot(group.chunk_index * c + c / 2, group.value, "--" if variant == "original" else "-", marker="o",
                     color=color(variant), label=labels.get(variant, variant))
    axes[0].set(yscale="log", xlabel="token position (chunk centre)", ylabel="next-token NLL (nats), chunk mean",
                title=f"per chunk, chunk {c}")
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    for column, variant, label in _CALIBRATION_SERIES[retrieval]:
        axes[1].plot(calibration.layer, calibration[column], marker="o", color=color(variant), label=label)
    axes[1].set(yscale="log", xlabel="layer", ylabel="relative MSE of the attention output",
                title=f"calibration ({calibration_split} text), per layer")
    axes[1].legend(fontsize=8)
    sizes = sorted(scale.chunk_size.unique())
    colors = dict(zip(sizes, plt.get_cmap("viridis")(np.linspace(0, 1, max(len(sizes), 2)))))
    for size, group in scale.groupby("chunk_size"):
        axes[2].plot(group.layer, group.median_ratio, marker="o", color=colors[size], label=f"chunk {size}, median")
        axes[2].fill_between(group.layer, group.median_ratio, group.p90_ratio, color=colors[size], alpha=0.2)
    axes[2].set(yscale="log", xlabel="layer", ylabel="‖retrieved‖ / ‖local‖ (band: up to p90)",
                title="seed formula: size of the retrieved term")
    axes[2].legend(fontsize=8)
    return fig


def plot_long_documents(bins, latency, steps, *, colors: dict, labels: dict, flat_from: int, reference_ppl: float,
                        ratio: float, trained_context: int | None):
    """The long-document figure, one colour per variant (``colors``/``labels``: variant -> colour name of
    :data:`COLORS` / legend text; ``original_fresh`` and ``exact_region`` dashed; one shared legend, readable, in a
    row of its own below the three panels, outside the data): perplexity per bin against position (log axis when it
    spans more than 10×) with the goal line ``ratio × reference_ppl`` beyond ``flat_from`` and the trained context,
    single-token decode latency (median, min–max band, ms) against context, and cache memory in use (MiB) against
    position.

    Args:
        bins, latency, steps: the tables of :mod:`bsbr.long_documents` (``perplexity_bins``, ``decode_latency``,
            ``steps_table``).
    """
    fig = plt.figure(figsize=(19, 6))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 0.2])
    axes = [fig.add_subplot(grid[0, i]) for i in range(3)] + [fig.add_subplot(grid[1, :])]  # the last: the legend
    styles = {"original_fresh": "--", "exact_region": (0, (4, 3))}  # exact region dashed: its cache equals blocks'
    ax = axes[0]
    for name, group in bins.groupby("variant"):
        ax.plot((group.start + group.end) / 2, group.ppl, marker="o", ms=3, color=color(colors[name]),
                ls=styles.get(name, "-"), label=labels[name])
    if np.isfinite(reference_ppl):
        ax.axhline(ratio * reference_ppl, color="black", lw=1, ls="--",
                   label=f"goal: {ratio:g} × blocks' median before {flat_from}")
        ax.axvline(flat_from, color="black", lw=0.8, ls=":")
    if trained_context and trained_context < bins.end.max():
        ax.axvline(trained_context, color="gray", lw=1, ls=":", label=f"max_position_embeddings {trained_context}")
    wide = bins.ppl.max() > 10 * bins.ppl.min()  # a log axis only where a collapse spans decades
    ax.set(xlabel="position (tokens)", ylabel="perplexity per bin", yscale="log" if wide else "linear",
           title="perplexity against position")
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(mticker.FuncFormatter(
        lambda value, _: f"{value:g}" if value > 0 and round(value / 10 ** np.floor(np.log10(value))) in (2, 5) else ""))
    ax = axes[1]
    for name, group in latency.groupby("variant"):
        ax.plot(group.context, group.median_s * 1e3, marker="o", color=color(colors[name]), ls=styles.get(name, "-"),
                label=labels[name])
        ax.fill_between(group.context, group.min_s * 1e3, group.max_s * 1e3, color=color(colors[name]), alpha=0.2)
    ax.set(xlabel="context (tokens)", ylabel="ms per step", title="single-token decode step (median, min–max)")
    ax.set_ylim(bottom=0)
    ax = axes[2]
    for name, group in steps.groupby("variant"):
        ax.plot(group.end, group.cache_bytes / 2**20, color=color(colors[name]), ls=styles.get(name, "-"),
                label=labels[name])
    ax.set(xlabel="position (tokens)", ylabel="cache in use (MiB)", title="cache memory in use")
    handles, names = [], []
    for ax in axes[:3]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    axes[3].axis("off")  # the legend's own row, below the data
    axes[3].legend(handles, names, loc="center", ncol=min(len(names), 4), fontsize=10, frameon=False)
    return fig


def plot_training(mean_curves, summary, floors, target: float, names, identical=()):
    """The training comparison in three panels, one colour per architecture, the count n-gram floors as grey lines:
    the validation loss against the optimizer step (seed mean at each architecture's chosen learning rate; band:
    min–max over seeds; dashed for an architecture identical to another), the final validation loss (bars from zero,
    whiskers: the t-interval over seeds) and the steps to the ``target`` loss (bars from zero, whiskers: the
    t-interval; no bar where a seed never reached it), and a fourth, narrow panel holding the legend (10 pt, outside
    the data; the figure is 14 inches wide, so that a report showing it across its width keeps the text readable).

    Args:
        mean_curves: ``[model, step, val_loss, val_loss_min, val_loss_max]``; summary: the per-architecture table of
            :func:`bsbr.convergence.convergence_summary`; floors: ``[name, val_loss]`` of the n-gram models;
        target: nats/byte; names: the architectures in legend order; identical: pairs that trained identically.
    """
    fig, axes = plt.subplots(1, 4, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.5, 1, 1, 0.5]})
    ax = axes[0]
    handles = []
    for name in names:
        curve = mean_curves[mean_curves.model == name]
        label = name + "".join(f" (= {b})" for a, b in identical if a == name)
        (line,) = ax.plot(curve.step, curve.val_loss, color=color(name), marker=".", ms=3, lw=1.3, label=label,
                          linestyle="--" if any(a == name for a, _ in identical) else "-")
        ax.fill_between(curve.step, curve.val_loss_min, curve.val_loss_max, color=color(name), alpha=0.15)
        handles.append(line)
    floor_styles = [":", "-.", (0, (5, 2)), (0, (1, 3))]
    for i, floor in enumerate(floors.itertuples()):
        for a in axes[:2]:
            f_line = (a.axhline if a is axes[0] else a.axvline)(floor.val_loss, color="grey", lw=1,
                                                                 linestyle=floor_styles[i % len(floor_styles)],
                                                                 label=f"{floor.name} floor")
        handles.append(f_line)
    (t_line,) = axes[0].plot([], [], color="black", lw=1, label="target")
    axes[0].axhline(target, color="black", lw=1)
    handles.append(t_line)
    top = float(floors.val_loss.max()) + 0.4
    low = min(float(mean_curves.val_loss.min()), float(floors.val_loss.min()), target) - 0.1
    ax.set(xlabel="optimizer step", ylabel="validation loss, nats/byte", ylim=(low, top),
           title="validation loss (seed mean; band: min–max)")
    order = list(summary.model)
    y = np.arange(len(order))
    frame = summary.set_index("model").loc[order]
    ax = axes[1]
    ax.barh(y, frame.final_val_loss, color=[color(m) for m in order], height=0.7,
            xerr=[frame.final_val_loss - frame.final_val_loss_low, frame.final_val_loss_high - frame.final_val_loss],
            capsize=3)
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    ax.set_xlim(0, max(float(frame.final_val_loss_high.max()), float(floors.val_loss.max())) * 1.05)
    ax.set(xlabel="final validation loss, nats/byte (t-interval)", title="final loss (bars from zero)")
    ax = axes[2]
    steps = frame.steps_to_target.astype(float)
    ax.barh(y, steps.fillna(0), color=[color(m) for m in order], height=0.7,
            xerr=[(steps - frame.steps_to_target_low).fillna(0), (frame.steps_to_target_high - steps).fillna(0)],
            capsize=3)
    for i, name in enumerate(order):
        if not np.isfinite(steps[name]):
            ax.text(0, i, f" {int(frame.seeds_reaching_target[name])}/{int(frame.seeds[name])} seeds reach it",
                    va="center", fontsize=9)
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    finite = frame.steps_to_target_high.astype(float)
    ax.set_xlim(0, (float(finite[np.isfinite(finite)].max()) if np.isfinite(finite).any() else 1.0) * 1.1)
    ax.set(xlabel=f"steps to {target:.3g} nats/byte (t-interval)", title="steps to the target (bars from zero)")
    axes[3].axis("off")  # the legend's own panel, right of the data
    axes[3].legend(handles=handles, loc="center left", bbox_to_anchor=(-0.6, 0.5), fontsize=10, frameon=False,
                   borderaxespad=0)
    return fig


def plot_training_memory(memory, exponents, names, memory_seq_lens, memory_batch_size: int):
    """The peak memory of one training step (MiB) against length, log-log, labelled with each architecture's fitted
    exponent (``exponents``: model -> exponent)."""
    fig, axes = _figure(1, (8, 4.4))
    ax = axes[0]
    for name in names:
        group = memory[memory.model == name]
        ax.loglog(group.seq_len, group.peak_bytes / 2**20, marker="o", color=color(name),
                  label=f"{name} (exponent {exponents[name]:.2f})")
    ax.set(xlabel="sequence length (tokens)", ylabel="peak memory of one training step, MiB",
           title=f"training-step memory, batch {memory_batch_size}")
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.set_xticks(memory_seq_lens, [str(n) for n in memory_seq_lens])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig
