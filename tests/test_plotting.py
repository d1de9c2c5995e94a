"""bsbr.plotting: one fixed colour per architecture/variant, log axes, and the figures drawing what they are given."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import bsbr  # noqa: E402
from bsbr.plotting import (COLORS, color, log_axes, plot_decode, plot_layers, plot_memory_curves,  # noqa: E402
                           plot_passkey_accuracy, plot_training, plot_training_memory, save_figure)


def test_every_architecture_has_its_own_colour_and_variants_share_their_attention_colour():
    names = bsbr.available_models()
    assert len({color(name) for name in names}) == len(names)
    assert color("calibrated") == color("bsbr") and color("original") == color("standard")
    assert color("own_chunk") not in {color(name) for name in names}
    with pytest.raises(ValueError, match="name must be one of"):
        color("nope")
    assert all(value.startswith("#") and len(value) == 7 for value in COLORS.values())


def test_log_axes_ticks_and_labels():
    fig, ax = plt.subplots()
    ax.plot([64, 128, 256], [0.01, 0.2, 3.0])
    log_axes(ax, [64, 128, 256], ylabel="time (s)")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert list(ax.get_xticks()) == [64, 128, 256] and [t.get_text() for t in ax.get_xticklabels()] == ["64", "128", "256"]
    assert ax.get_ylabel() == "time (s)" and ax.get_xlabel() == "sequence length (tokens)"
    minor = ax.yaxis.get_minor_formatter()
    assert minor(0.2, 0) == "0.2" and minor(0.3, 0) == "" and minor(50, 0) == "50"
    plt.close(fig)


def test_figures_draw_one_line_per_name_in_its_colour_and_save(tmp_path):
    layers = pd.DataFrame({"impl": ["bsbr", "bsbr", "gau", "gau"], "seq_len": [32, 64, 32, 64],
                           "median_s": [1.0, 2.0, 1.5, 3.0], "peak_bytes": [0, 2**20, 2**20, 2**21]})
    fig = plot_layers(layers, [32, 64])
    time_ax, memory_ax = fig.axes
    assert [line.get_color() for line in time_ax.lines] == [color("bsbr"), color("gau")]
    assert list(memory_ax.lines[0].get_xdata()) == [64]  # a 0-byte point is left out of the log axis
    assert list(memory_ax.lines[1].get_ydata()) == [1.0, 2.0]  # MiB
    save_figure(fig, tmp_path / "layers.png", "header")
    assert (tmp_path / "layers.png").stat().st_size > 1000 and fig._suptitle.get_text() == "header"
    curves = {"bsbr model": (np.array([1, 2]), np.array([0, 0]), "bsbr", "-."),
              "gau forward": (np.array([1, 2]), np.array([2**20, 2**21]), "gau", "-")}
    (ax,) = plot_memory_curves(curves, [1, 2]).axes
    assert [line.get_label() for line in ax.lines] == ["gau forward"]  # nothing positive to draw for the first
    decode = pd.DataFrame({"impl": ["bsbr", "standard"], "position": [32, 32], "median_s": [1e-3, 2e-3],
                           "min_s": [1e-3, 2e-3], "max_s": [1e-3, 2e-3], "state_bytes": [2**20, 2**21]})
    latency_ax, state_ax = plot_decode(decode, [32]).axes
    assert [line.get_ydata()[0] for line in latency_ax.lines] == [1.0, 2.0]  # ms
    assert latency_ax.lines[1].get_label() == "standard (KV cache)"
    plt.close("all")


def test_passkey_and_training_figures_draw_what_they_are_given():
    by_length = pd.DataFrame({"length": [512, 512], "variant": ["original", "calibrated"], "accuracy": [1.0, 0.5],
                              "ci_low": [0.5, 0.1], "ci_high": [1.0, 0.9]})
    cells = pd.DataFrame({"length": [512] * 4, "depth": [0.1, 0.9] * 2, "variant": ["original"] * 2 + ["calibrated"] * 2,
                          "accuracy": [1.0, 1.0, 0.0, 1.0], "ci_low": [0.5, 0.5, 0.0, 0.5], "ci_high": [1.0] * 4})
    fig = plot_passkey_accuracy(by_length, cells, ["original", "calibrated"], {"original": "O", "calibrated": "C"}, 2)
    pooled, per_depth, legend_cell = fig.axes  # two panels and the legend's own cell of the grid
    assert [c.get_label() for c in pooled.containers] == ["O", "C"]
    assert pooled.get_title() == "all depths pooled (n = 4 / point)" and per_depth.get_title() == "512 tokens (n = 2 / point)"
    legend = legend_cell.get_legend()  # one legend, in a cell without data
    assert pooled.get_legend() is None and per_depth.get_legend() is None
    assert [t.get_text() for t in legend.get_texts()] == ["O", "C"] and not legend_cell.axison
    assert not legend_cell.lines and not legend_cell.containers
    wide = plot_passkey_accuracy(pd.concat([by_length, by_length.assign(length=1024)]),
                                 pd.concat([cells, cells.assign(length=1024)]), ["original", "calibrated"],
                                 {"original": "O", "calibrated": "C"}, 2, columns=2)
    assert wide.axes[0].get_gridspec().get_geometry() == (2, 2)  # 3 panels + the legend
    mixed = plot_passkey_accuracy(pd.concat([by_length, by_length.assign(length=1024)]),
                                  pd.concat([cells, cells.assign(length=1024)]), ["original", "calibrated"],
                                  {"original": "O", "calibrated": "C"}, {512: 2, 1024: 1})  # fewer trials at 1,024
    assert [ax.get_title() for ax in mixed.axes[:3]] == ["all depths pooled (n = 2–4 / point)",
                                                         "512 tokens (n = 2 / point)", "1,024 tokens (n = 1 / point)"]
    with pytest.raises(ValueError, match="columns"):
        plot_passkey_accuracy(by_length, cells, ["original"], {"original": "O"}, 2, columns=0)
    (headline,) = plot_passkey_accuracy(by_length, cells, ["original", "calibrated"],
                                        {"original": "O", "calibrated": "C"}, 2, panels="pooled").axes
    assert headline.get_title() == "all depths pooled (n = 4 / point)"
    assert [c.get_label() for c in headline.containers] == ["O", "C"]
    legend = headline.get_legend()  # outside the data: anchored right of the axes
    assert [t.get_text() for t in legend.get_texts()] == ["O", "C"] and legend.get_bbox_to_anchor().x0 > 0
    depths = plot_passkey_accuracy(pd.concat([by_length, by_length.assign(length=1024)]),
                                   pd.concat([cells, cells.assign(length=1024)]), ["original", "calibrated"],
                                   {"original": "O", "calibrated": "C"}, 2, panels="depths")
    assert [ax.get_title() for ax in depths.axes[:2]] == ["512 tokens (n = 2 / point)", "1,024 tokens (n = 2 / point)"]
    assert depths.axes[2].get_legend() is not None and not depths.axes[2].axison
    with pytest.raises(ValueError, match="panels"):
        plot_passkey_accuracy(by_length, cells, ["original"], {"original": "O"}, 2, panels="both")
    memory = pd.DataFrame({"model": ["bsbr"] * 2 + ["gau"] * 2, "seq_len": [256, 512] * 2,
                           "peak_bytes": [2**20, 2**21, 2**21, 2**22]})
    (lines,) = plot_training_memory(memory, pd.Series({"bsbr": 1.0, "gau": 1.0}), ["bsbr", "gau"], [256, 512], 1).axes
    assert [line.get_label() for line in lines.lines] == ["bsbr (exponent 1.00)", "gau (exponent 1.00)"]
    assert list(lines.lines[1].get_ydata()) == [2.0, 4.0]
    plt.close("all")


def _conversion_tables():
    variants = ["seed", "normalized", "calibrated", "own_chunk", "own_chunk_sinks", "sliding_window",
                "sliding_window_sinks"]
    head = pd.DataFrame({"variant": variants, "ppl": np.linspace(20, 80, 7), "ppl_original": 18.0,
                         "kl": np.linspace(0.1, 0.7, 7), "top1": np.linspace(0.9, 0.3, 7), "cos": 0.9}).set_index("variant")
    labels = {v: f"label {v}" for v in variants}
    per_chunk = pd.DataFrame([{"seq_len": 64, "chunk_size": 32, "variant": v, "chunk_index": i, "metric": m,
                               "value": 1.0 + i} for v in ["original", "seed"] for i in (0, 1) for m in ("nll", "kl")])
    calibration = pd.DataFrame({"layer": [0, 1], "own_chunk_rel_mse": [0.5, 0.6], "initial_rel_mse": [0.4, 0.5],
                                "final_rel_mse": [0.1, 0.2]})
    scale = pd.DataFrame({"chunk_size": [16, 16, 32, 32], "layer": [0, 1, 0, 1], "median_ratio": [1.0, 2.0, 3.0, 4.0],
                          "p90_ratio": [2.0, 3.0, 4.0, 5.0]})
    return head, labels, per_chunk, calibration, scale


def test_conversion_variants_have_distinct_fixed_colours():
    head, *_ = _conversion_tables()
    assert len({color(v) for v in [*head.index, "original"]}) == len(head) + 1


def test_plot_conversion_similarity_draws_one_bar_per_variant_in_its_colour():
    from matplotlib.colors import to_hex

    from bsbr.plotting import plot_conversion_similarity

    head, labels, *_ = _conversion_tables()
    labels = {"calibrated": "cal", "seed": "seed", "absent": "not drawn"}  # plotting order, top to bottom
    fig = plot_conversion_similarity(head, labels)
    axes = fig.axes
    assert len(axes) == 4 and axes[0].get_xscale() == "log"
    assert [to_hex(p.get_facecolor()) for p in axes[0].patches] == [color("calibrated"), color("seed")]
    assert [p.get_width() for p in axes[1].patches] == [head.kl["calibrated"], head.kl["seed"]]
    assert [line.get_xdata()[0] for line in axes[0].lines] == [18.0, 22.5]  # the original and 1.25× it
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["cal", "seed"]
    plt.close(fig)


def test_plot_calibration_and_scale_draws_the_tables():
    from matplotlib.colors import to_hex

    from bsbr.plotting import plot_calibration_and_scale

    _, labels, per_chunk, calibration, scale = _conversion_tables()
    fig = plot_calibration_and_scale(per_chunk, calibration, scale, labels, 32, "train")
    first, second, third = fig.axes
    assert [(line.get_label(), to_hex(line.get_color()), line.get_linestyle()) for line in first.lines] == [
        ("original", color("original"), "--"), ("label seed", color("seed"), "-")]
    assert list(first.lines[1].get_xdata()) == [16.0, 48.0] and list(first.lines[1].get_ydata()) == [1.0, 2.0]
    assert [to_hex(line.get_color()) for line in second.lines] == [color("own_chunk_sinks"), color("normalized"),
                                                                  color("calibrated")]
    assert list(second.lines[2].get_ydata()) == [0.1, 0.2] and "train" in second.get_title()
    assert [line.get_label() for line in third.lines] == ["chunk 16, median", "chunk 32, median"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    plt.close(fig)
    fig = plot_calibration_and_scale(per_chunk, calibration, scale, labels, 32, "train", retrieval="terraced")
    assert [(line.get_label(), to_hex(line.get_color())) for line in fig.axes[1].lines] == [
        ("exact region alone (no retrieval)", color("terraced_exact")), ("terraced, before", color("terraced")),
        ("terraced, after attention transfer", color("terraced_transfer"))]
    plt.close(fig)
    with pytest.raises(ValueError, match="retrieval must be one of"):
        plot_calibration_and_scale(per_chunk, calibration, scale, labels, 32, "train", retrieval="seed")


def test_plot_long_documents_one_style_per_variant_and_a_legend_panel():
    from bsbr.plotting import plot_long_documents

    bins = pd.DataFrame({"variant": ["blocks", "blocks", "exact_region", "exact_region", "original_fresh"],
                         "start": [0, 4, 0, 4, 4], "end": [4, 8, 4, 8, 8], "ppl": [20.0, 22.0, 20.0, 30.0, 25.0]})
    latency = pd.DataFrame({"variant": ["blocks", "blocks"], "context": [4, 8], "median_s": [0.02, 0.021],
                            "min_s": [0.019, 0.02], "max_s": [0.03, 0.022]})
    steps = pd.DataFrame({"variant": ["blocks", "exact_region", "original_fresh"], "end": [8, 8, 8],
                          "cache_bytes": [3 * 2**20, 3 * 2**20, 2**20]})
    labels = {"blocks": "blocks", "exact_region": "exact region", "original_fresh": "fresh"}
    colors = {"blocks": "blocks_mean", "exact_region": "exact_region", "original_fresh": "original"}
    fig = plot_long_documents(bins, latency, steps, colors=colors, labels=labels, flat_from=4, reference_ppl=20.0,
                              ratio=1.5, trained_context=6)
    ppl, decode, memory, legend = fig.axes
    assert ppl.get_yscale() == "linear"  # 20–30: no collapse spanning decades
    assert [line.get_color() for line in ppl.lines[:3]] == [COLORS["blocks_mean"], COLORS["exact_region"],
                                                            COLORS["original"]]
    assert ppl.lines[3].get_ydata()[0] == pytest.approx(30.0)  # the goal line, 1.5 × 20
    assert list(memory.lines[0].get_ydata()) == [3.0] and memory.lines[1].get_linestyle() != "-"
    assert not legend.axison and [t.get_text() for t in legend.get_legend().get_texts()] == [
        "blocks", "exact region", "fresh", "goal: 1.5 × blocks' median before 4", "max_position_embeddings 6"]
    assert memory.get_ylabel() == "cache in use (MiB)" and "nbytes" not in memory.get_title()  # MiB are plotted
    assert all(t.get_fontsize() >= 9 for t in legend.get_legend().get_texts())  # readable
    # the legend's row lies below the three panels, outside the data
    assert all(legend.get_position().y1 <= ax.get_position().y0 for ax in (ppl, decode, memory))
    bins.loc[1, "ppl"] = 900.0
    fig2 = plot_long_documents(bins, latency, steps, colors=colors, labels=labels, flat_from=4, reference_ppl=20.0,
                               ratio=1.5, trained_context=None)
    assert fig2.axes[0].get_yscale() == "log"
    plt.close("all")


def test_training_figure_bars_start_at_zero_and_floors_are_lines():
    summary = pd.DataFrame({"model": ["gau", "bsbr"], "final_val_loss": [2.0, 2.5], "final_val_loss_low": [1.9, 2.3],
                            "final_val_loss_high": [2.1, 2.7], "steps_to_target": [100.0, float("nan")],
                            "steps_to_target_low": [80.0, float("nan")], "steps_to_target_high": [120.0, float("nan")],
                            "seeds_reaching_target": [3, 1], "seeds": [3, 3]})
    curves = pd.DataFrame({"model": ["gau"] * 2 + ["bsbr"] * 2, "step": [0, 10] * 2, "val_loss": [5.5, 2.0, 5.5, 2.5],
                           "val_loss_min": [5.5, 1.9, 5.5, 2.4], "val_loss_max": [5.5, 2.1, 5.5, 2.6]})
    floors = pd.DataFrame({"name": ["unigram", "bigram"], "val_loss": [3.4, 2.6]})
    fig = plot_training(curves, summary, floors, 2.5, ["bsbr", "gau"])
    curve_ax, loss_ax, steps_ax, legend_ax = fig.axes
    assert [p.get_width() for p in loss_ax.patches] == [2.0, 2.5]  # in the summary's order (lowest loss first)
    assert loss_ax.get_xlim()[0] == 0 and steps_ax.get_xlim()[0] == 0  # bars start at zero
    assert [p.get_width() for p in steps_ax.patches] == [100.0, 0.0]  # no bar where a seed missed the target
    assert "1/3 seeds reach it" in [t.get_text().strip() for t in steps_ax.texts][0]
    floor_levels = sorted(line.get_ydata()[0] for line in curve_ax.lines if line.get_label().endswith("floor"))
    assert floor_levels == [2.6, 3.4]
    assert sorted(line.get_xdata()[0] for line in loss_ax.lines if line.get_label().endswith("floor")) == [2.6, 3.4]
    labels = [t.get_text() for t in legend_ax.get_legend().get_texts()]
    assert labels == ["bsbr", "gau", "unigram floor", "bigram floor", "target"]
    assert not curve_ax.get_legend()  # the legend has its own panel, outside the data
    legend = legend_ax.get_legend()
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 9  # readable where the report shows the figure
    fig.tight_layout()  # as save_figure does
    fig.canvas.draw()
    assert legend.get_window_extent().x0 > steps_ax.get_window_extent().x1  # right of the last panel's data
    assert fig.get_figwidth() <= 14  # shown near 1:1 across a 1,400-px report, not shrunk
    plt.close("all")


def test_ratio_intervals_on_a_linear_axis_put_the_far_variants_at_its_edge_with_their_value():
    from bsbr.plotting import plot_ratio_intervals

    table = pd.DataFrame({"source": "all", "variant": ["terraced", "own_chunk_sinks", "sliding_span_sinks"],
                          "ratio": [1.068, 1.598, 1.040], "ratio_low": [1.053, 1.517, 1.029],
                          "ratio_high": [1.084, 1.682, 1.052], "tokens": 21492})
    labels = {"terraced": "terraced", "own_chunk_sinks": "own chunk", "sliding_span_sinks": "sliding"}
    fig = plot_ratio_intervals(table, labels, xmax=1.15)
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlim()[1] == 1.15
    dots = ax.collections[-1 - 1]  # the dots of the two variants inside, then the triangle of the far one
    assert np.allclose(np.sort(dots.get_offsets()[:, 0]), [1.040, 1.068])
    triangle = ax.collections[-1]
    assert np.allclose(triangle.get_offsets(), [[1.15, 1]])  # at the edge, in the far variant's row
    assert [text.get_text() for text in ax.texts] == ["1.60 [1.52, 1.68] →"]
    plt.close(fig)
    log_fig = plot_ratio_intervals(table, labels)  # no xmax: a log axis holding every interval, nothing written
    assert log_fig.axes[0].get_xscale() == "log" and not log_fig.axes[0].texts
    plt.close(log_fig)
    with pytest.raises(ValueError, match="xmax must be None or > 1"):
        plot_ratio_intervals(table, labels, xmax=1.0)


def test_passkey_grid_writes_each_cells_count_and_colours_it_by_its_accuracy():
    from bsbr.plotting import plot_passkey_grid

    cells = pd.DataFrame({"length": [512] * 3 + [1024], "depth": [0.1, 0.9, 0.1, 0.1],
                          "variant": ["original", "original", "blocks_minmax", "original"],
                          "trials": [2, 2, 2, 1], "correct": [2, 1, 0, 1]})
    fig = plot_passkey_grid(cells, ["original", "blocks_minmax"], {"original": "O", "blocks_minmax": "B"}, columns=3)
    first, second = fig.axes
    assert (first.get_title(), second.get_title()) == ("512 tokens", "1,024 tokens")
    assert sorted((t.get_position(), t.get_text()) for t in first.texts) == [((0, 0), "2/2"), ((0, 1), "0/2"),
                                                                             ((1, 0), "1/2")]
    values = first.images[0].get_array()
    assert np.allclose([values[0, 0], values[0, 1], values[1, 0]], [1.0, 0.5, 0.0])
    assert np.isnan(np.ma.filled(values.astype(float), np.nan)[1, 1])  # the missing cell stays blank
    assert [t.get_text() for t in second.texts] == ["1/1"]
    assert [t.get_text() for t in first.get_yticklabels()] == ["O", "B"]
    plt.close(fig)
    with pytest.raises(ValueError, match="columns"):
        plot_passkey_grid(cells, ["original"], {"original": "O"}, columns=0)
