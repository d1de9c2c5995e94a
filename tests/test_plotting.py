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
                           save_figure)


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
