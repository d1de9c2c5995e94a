"""Build reports/index.html: a one-screen dashboard of the experiment reports.

    python pipelines/build_index.py [--reports reports] [--params params.yaml]

Reports are the ``NN_name.html`` files in ``--reports`` (sorted by name). The first screen holds Figure 1 (BSBR
against the six baselines: whole-model forward time and peak memory from ``01_scaling``, validation loss after
training from scratch from ``07_training``; drawn from the metrics files, inline PNG) and one row per report: its
question (the report's ``<title>``), the headline numbers chosen in :data:`HEADLINES` with their goal and
met/missed (read from ``reports/metrics/NN_name.json``), and the revision the report was run at (the
``git revision:`` its provenance cell printed) with that commit's date. Below: the provenance of this build and each
run's machine header, and, folded in ``<details>``, every metric of every report and every params.yaml section.
The page is self-contained (inline CSS and image, no scripts, relative links) and deterministic apart from the
provenance of the build.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dvc.utils.serialize import parse_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bsbr.formatting import cell, quantity, router_words, with_interval  # noqa: E402
from bsbr.provenance import git_revision, machine_info  # noqa: E402

REPORT_NAME = re.compile(r"^\d\d_[\w-]+\.html$")
#: The revision a report's provenance cell printed: ``git revision: <sha>[+dirty]``.
REVISION = re.compile(r"git revision:\s*([0-9a-f]{7,40}(?:\+dirty)?|unknown)")
#: The params profile it printed (``params profile: quick``; reports made before profiles existed have none).
PROFILE = re.compile(r"params profile:\s*(\w+)")
#: How long the stage's notebook ran (seconds), from the report's last line (render_report.stage_run).
RUN_SECONDS = re.compile(r'data-run-seconds="([0-9.]+)"')
#: The machine header every report's provenance cell prints (bsbr.provenance.machine_info), for the reports whose
#: metrics file carries no ``machine`` record: "CPU: <name> (<n> logical CPUs), python <version>, <platform>",
#: "threads: <n>" and "load average (1, 5, 15 min): <a>, <b>, <c>".
PRINTED_CPU = re.compile(r"CPU: ([^\n<]+?) \((\d+) logical CPUs\), python ([0-9.]+)")
PRINTED_THREADS = re.compile(r"device: \w+, threads: (\d+)")
PRINTED_LOAD = re.compile(r"load average \(1, 5, 15 min\): ([0-9.]+), ([0-9.]+), ([0-9.]+)")
#: The revision the report was rendered at (render_report's ``<meta name="bsbr-rendered-at">``).
RENDERED_AT = re.compile(r'<meta (?=[^>]*\bname="bsbr-rendered-at")[^>]*\bcontent="'
                         r'([0-9a-f]{7,40}(?:\+dirty)?|unknown)"')

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 0.6em 1.2em; max-width: 1400px; color: #222;
  font-size: 14px; box-sizing: border-box; }
h1 { font-size: 1.5em; margin: 0.2em 0; }
h2 { font-size: 1.2em; margin: 1em 0 0.4em; }
p.lead { margin: 0.2em 0 0.6em; color: #444; }
figure { margin: 0 0 0.4em; display: flex; gap: 1em; align-items: center; }
figure img { max-width: 72%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #555; }
@media (max-width: 1000px) { figure { display: block; } figure img { max-width: 100%; } }
table { border-collapse: collapse; margin: 0.4em 0; width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.45em; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; }
th { background: #f3f3f3; }
td.num { font-family: ui-monospace, monospace; overflow-wrap: normal; min-width: 9em; }
td.report { width: 24%; }
td.label { min-width: 14em; }
td.goal { min-width: 7em; }
.run { font-size: 0.85em; color: #555; }
td.met, td.missed, td.other { white-space: nowrap; }
th.stage { white-space: nowrap; overflow-wrap: normal; }
.met { color: #1a7f37; font-weight: bold; }
.missed { color: #c0392b; font-weight: bold; }
.other { color: #7a6500; }
.table-scroll { max-width: 100%; overflow-x: auto; }
details { margin: 0.4em 0; }
details > summary { cursor: pointer; font-weight: bold; }
"""


@dataclass(frozen=True)
class Headline:
    """One headline number of a report, read from its metrics file.

    ``label`` and ``goal`` may name metrics as ``{dotted.path}`` (filled with their values). ``value``: a dotted path,
    or a function of the metrics dict. ``interval``: paths of the low and high ends, one path of a ``[low, high]``
    list, or a function of the metrics dict returning ``(low, high)``. ``target``: the path of a ``{value,
    comparison, threshold, status}`` record (sets value, goal and verdict).
    ``verdict``: the path of ``met``/``missed``/``pass``/``FAIL``/true/false (a dict of them: met if all are met),
    or a function of the metrics dict returning one.
    ``words``: how a ``{dotted.path}`` of the label or goal is written, where not as a number (:func:`format_value`;
    a goal's as :func:`format_goal`): path -> function of its value, e.g. ``{"best_router.method": router_words}``.
    """

    label: str
    value: str | Callable[[dict], object] | None = None
    unit: str = ""
    interval: tuple[str, str] | str | Callable[[dict], tuple] | None = None
    goal: str = ""
    verdict: str | Callable[[dict], object] | None = None
    target: str | None = None
    words: dict[str, Callable[[object], str]] = field(default_factory=dict)


# How the index and README's result blocks (pipelines/readme_results.py) both write a few of the reports' values.

def steps_text(row: dict, seeds: int) -> str:
    """Report 07: an architecture's steps to the target loss (``row``: its ``models`` record; ``seeds``: the run's
    seeds) as the report writes them: the mean with its t-interval over seeds, 3 significant digits
    (``161 [150, 172]``; ``161`` without an interval), or ``not reached by every seed (2/3)`` where a seed never got
    below the target."""
    if row["steps_to_target"] is None:
        return f"not reached by every seed ({row['seeds_reaching_target']}/{seeds})"
    if row.get("steps_to_target_low") is None or row.get("steps_to_target_high") is None:
        return quantity(row["steps_to_target"])
    return with_interval(row["steps_to_target"], row["steps_to_target_low"], row["steps_to_target_high"])


def percent_text(row: dict) -> str:
    """Report 08: an accuracy (``row``: ``accuracy``, ``ci_low``, ``ci_high`` as fractions) in percent as the report
    writes it, 3 significant digits: ``98.2% [97.7, 98.8]``, or ``50.0%`` where there is no interval (one seed)."""
    if row.get("ci_low") is None or row.get("ci_high") is None:
        return quantity(100 * row["accuracy"], "%")
    return with_interval(100 * row["accuracy"], 100 * row["ci_low"], 100 * row["ci_high"], "%")


def points_text(row: dict) -> str:
    """Report 08: a paired difference of accuracies (``row``: ``difference``, ``ci_low``, ``ci_high`` as fractions) in
    percentage points as the report writes it, 3 significant digits: ``7.35 points [-1.65, 16.3]``, or
    ``-13.2 points`` where there is no interval (one seed)."""
    if row.get("ci_low") is None or row.get("ci_high") is None:
        return quantity(100 * row["difference"], "points")
    return with_interval(100 * row["difference"], 100 * row["ci_low"], 100 * row["ci_high"], "points")


def below_floor(metrics: dict, name: str) -> bool | None:
    """Report 07: architecture ``name``'s final validation loss against the bigram floor by its t-interval: met if the
    whole interval is below the floor, missed if wholly above, undecided if it straddles it."""
    floor, row = metrics["ngram_floors"]["bigram"]["val_loss"], metrics["models"][name]
    low, high = row["final_val_loss_low"], row["final_val_loss_high"]
    if low is None or high is None:
        return None
    return True if high < floor else False if low > floor else None


def _accuracy_by_length(metrics: dict, variant: str, past_trained: bool) -> dict:
    """Report 05: a variant's accuracy (Wilson interval, correct/trials) by length, within the trained positions
    (n = the headline cell's trials) or past them (n = depths × long trials)."""
    from bsbr.passkey import accuracy_text  # torch and transformers: loaded only for report 05's headlines

    limit, ci = metrics["max_position_embeddings"], metrics["ci95"][variant]
    trials = (len(metrics["depths"]) * metrics.get("long_trials_per_cell", metrics["trials_per_cell"])
              if past_trained else metrics["trials_per_headline_cell"])
    return {f"{int(n):,}": accuracy_text(a, *ci[n], trials=trials)  # the length as a count: 8,192
            for n, a in metrics["accuracy"][variant].items() if (int(n) > limit) == past_trained}


def _trained(metrics: dict, variant: str) -> dict:
    """Report 05: a variant's accuracy by length within the trained positions (:func:`_accuracy_by_length`)."""
    return _accuracy_by_length(metrics, variant, past_trained=False)


def _past_trained(metrics: dict, variant: str) -> dict | str:
    """Report 05: a variant's accuracy by length past the trained positions, or "not measured"."""
    return _accuracy_by_length(metrics, variant, past_trained=True) or "not measured"


def _bsbr_vs(metrics: dict, other: str) -> dict:
    """Report 08: the paired difference of BSBR (state retrieval) minus architecture ``other`` at the headline (first)
    span (its goals.bsbr_vs row).

    Raises:
        KeyError: the run compared BSBR with no ``other`` (the index prints "missing: ...").
    """
    for row in metrics["goals"]["bsbr_vs"]:
        if row["other"] == other and row.get("model", "bsbr") == "bsbr" and row["span"] == metrics["spans"][0]:
            return row
    raise KeyError(f"goals.bsbr_vs[other={other}]")


def below_one(low: float, high: float) -> bool | None:
    """A ratio's goal "below 1" by its interval: met if the whole interval is below 1, missed if it is wholly at or
    above 1, undecided (None) if it straddles 1."""
    return True if high < 1 else False if low >= 1 else None


def _flat_value(m: dict):
    """06's flatness headline: the highest late bin ÷ the median before, with the number of bins past ``flat_from``
    when the run recorded it (a verdict on 2 bins says less than one on 56)."""
    blocks = m["flatness"]["blocks"]
    ratio = blocks["max_beyond_ppl"] / blocks["reference_ppl"]
    if "bins_beyond" not in blocks:
        return ratio
    return f"{format_value('', ratio)}× over {blocks['bins_beyond']:,} bin{'s' if blocks['bins_beyond'] != 1 else ''}"


def _layer_goals(m: dict) -> str:
    """Report 03: its two one-layer timing goals by chunk size, smallest first, each met, missed or undecided (its
    timing interval straddles the original's): ``chunk 128: met, met; chunk 256: met, undecided``."""
    no_slower, faster = m["layer_goal_no_slower"]["met"], m["layer_goal_faster"]["met"]
    return "; ".join(f"chunk {int(c):,}: {verdict_word(no_slower.get(c))}, {verdict_word(faster.get(c))}"
                     for c in sorted(set(no_slower) | set(faster), key=int))


#: Which numbers each report leads with (2-3 per report): the questions' decisive numbers and their goals.
HEADLINES: dict[str, list[Headline]] = {
    "01_scaling": [
        Headline("BSBR attention module forward speed-up over full attention at 16,384 tokens (range: the medians' "
                 "sign-test intervals; under 6 timed calls, the fastest to the slowest call)", unit="×",
                 target="attention.targets.module_forward_speedup_16384"),
        Headline("the same at 65,536 tokens", unit="×", target="attention.targets.module_forward_speedup_65536"),
        Headline("BSBR decode latency per token at position 32,768 ÷ at 1,024", unit="×",
                 target="attention.targets.bsbr_decode_latency_32768_vs_1024"),
    ],
    "02_conversion_similarity": [
        Headline("perplexity of terraced + transfer + LoRA ÷ the original's", "perplexity.all.terraced_lora.ratio",
                 "×", ("perplexity.all.terraced_lora.ratio_low", "perplexity.all.terraced_lora.ratio_high"),
                 "≤ 1.05×", "goals.within_1_05x"),
        Headline("÷ sliding window + sinks with the same LoRA budget (paired)",
                 "paired.terraced_lora/sliding_span_sinks_lora.all.ratio", "×",
                 ("paired.terraced_lora/sliding_span_sinks_lora.all.ratio_low",
                  "paired.terraced_lora/sliding_span_sinks_lora.all.ratio_high"),
                 "below 1×", "goals.beats_sliding_window_same_lora"),
        Headline("decoder state ÷ the KV cache after 40,960 tokens", "state.40960.ratio", "×", None, "≤ 0.3×",
                 "goals.state_40960_within_0_3x"),
    ],
    "03_chunk_size_ablation": [
        Headline("best calibrated configuration (chunk {best_calibrated.chunk_size}, state compression "
                 "{best_calibrated.compression_factor}×): perplexity ÷ the original's", "best_calibrated.vs_original",
                 "×"),  # the state-size goal is 02's headline already
        Headline("best calibrated configuration's perplexity ÷ its exact region's", "best_calibrated.vs_exact_region",
                 "×", "best_calibrated.vs_exact_region_interval", "below 1× (retrieval helps)",
                 lambda m: below_one(*m["best_calibrated"]["vs_exact_region_interval"])),
        Headline("one layer against the original's (fused SDPA), by chunk size: no slower at "
                 "{layer_goal_no_slower.seq_len} tokens, faster at {layer_goal_faster.seq_len}", _layer_goals,
                 goal="both, in every chunk size",
                 verdict=lambda m: {"no_slower": m["layer_goal_no_slower"]["met"],
                                    "faster": m["layer_goal_faster"]["met"]}),
    ],
    "04_attention_analysis": [
        Headline("recall of the best router ({best_router.method}; blocks of {best_router.block_size}) at a "
                 "{headline_budget}-token budget", "best_router.recall", words={"best_router.method": router_words}),
        Headline("recall of the recency baseline, same budget", "best_router.recency"),
        Headline("layers (of {layers}) where the best router beats recency", "best_router.layers_beats_recency",
                 goal="≥ {goal_layers} layers", verdict="goal_met"),
        Headline("BSBR's own router (meta-query · meta-key per chunk of 256): recall at the same budget, and layers "
                 "where it beats recency", lambda m: f"{format_value('', m['recall']['meta_b256'])}; "
                 f"{m['layers_beating_recency']['meta_b256']} of {m['layers']} layers"),
    ],
    "05_long_range": [
        Headline("passkey accuracy of block retrieval (mean keys, compact positions) by length, n = "
                 "{trials_per_headline_cell} each", lambda m: _trained(m, "blocks_mean_compact"),
                 goal="≥ 95% in every cell to 8,192 tokens (point estimate), never below the original's",
                 verdict=lambda m: {goal: m["goals"]["blocks_mean_compact"][goal]
                                    for goal in ("accuracy_to_8k", "not_below_original")}),
        Headline("the same past the trained 8,192 positions (the original cannot go there)",
                 lambda m: _past_trained(m, "blocks_mean_compact"), goal="≥ 90% at 16,384 and 32,768 (point estimate)",
                 verdict="goals.blocks_mean_compact.accuracy_past_8k"),
        Headline("passkey accuracy with BSBR's own router (meta-query · meta-key) choosing the blocks, by length",
                 lambda m: _trained(m, "blocks_meta"), goal="≥ 95% in every cell to 8,192 tokens (point estimate)",
                 verdict="goals.blocks_meta.accuracy_to_8k"),
        Headline("answer log-prob minus the original's, fact out of reach (nats)",
                 "out_of_reach_answer_logprob.blocks_mean_compact.minus_original", "",
                 "out_of_reach_answer_logprob.blocks_mean_compact.ci95"),  # a diagnostic, no goal of its own
    ],
    "06_long_documents": [
        Headline("highest perplexity bin beyond {flat_from} tokens ÷ the median before (block retrieval), and how "
                 "many bins beyond that the verdict rests on", _flat_value, "×",
                 goal="≤ {flat_ratio}×", verdict="flatness.blocks.met"),
        Headline("the same with the text held fixed: perplexity ÷ the original's on the same tokens, highest late bin "
                 "÷ the median before",
                 lambda m: (m["flatness_against_original"]["blocks"]["max_over_reference"]
                            if "flatness_against_original" in m else "not measured"), "×",
                 goal="≤ {flat_ratio}×",
                 verdict=lambda m: (m["flatness_against_original"]["blocks"]["met"]
                                    if "flatness_against_original" in m else "not measured")),
        Headline("slowest decode step ÷ median at {decode.context} tokens of context", "decode.max_over_median", "×",
                 goal="≤ {decode_ratio}×", verdict="decode.met"),
    ],  # memory per token (3 rows per token and layer: 3× the KV cache) is in the report's box
    "08_associative_recall": [
        Headline("full attention's recall accuracy (MQAR, {architectures.standard.n_seeds} seeds; t-interval)",
                 lambda m: percent_text(lookup(m, "architectures.standard")),
                 goal="≥ {goals.attention_accuracy.goal}", verdict="goals.attention_accuracy.met",
                 words={"goals.attention_accuracy.goal": "{:.0%}".format}),  # 95%, as the report says it
        Headline("BSBR's accuracy, state {architectures.bsbr.state_values} values",
                 lambda m: percent_text(lookup(m, "architectures.bsbr"))),
        Headline("BSBR minus the sliding window (state {architectures.sliding_window.state_values} values), paired "
                 "over seeds (t-interval)", lambda m: points_text(_bsbr_vs(m, "sliding_window"))),
    ],
    "07_training": [
        Headline("BSBR's final validation loss, nats/byte (t over seeds); bigram floor {ngram_floors.bigram.val_loss}",
                 "models.bsbr.final_val_loss", interval=("models.bsbr.final_val_loss_low", "models.bsbr.final_val_loss_high"),
                 goal="below the bigram floor", verdict=lambda m: below_floor(m, "bsbr")),
        Headline("lowest final validation loss ({best_final}), nats/byte", "best_final_val_loss",
                 goal="below the bigram floor", verdict=lambda m: below_floor(m, m["best_final"])),
        Headline("steps to {target_val_loss} nats/byte: fastest ({fastest}, t over seeds)", "fastest_steps_to_target",
                 interval=lambda m: (m["models"][m["fastest"]]["steps_to_target_low"],
                                     m["models"][m["fastest"]]["steps_to_target_high"])),
        Headline("BSBR's steps to the same loss (t over seeds)",
                 lambda m: steps_text(lookup(m, "models.bsbr"), lookup(m, "setup.seeds"))),
    ],
}

#: The architectures of Figure 1, in the order of bsbr.available_models() as the notebooks plot them.
FIGURE_MODELS = ("bsbr", "standard", "linear", "delta_net", "sliding_window", "hopfield", "gau")


def lookup(metrics: dict, path: str):
    """``lookup({"a": {"b": 1}}, "a.b") == 1``; KeyError naming the path if it is absent."""
    value = metrics
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"metrics have no {path!r} (no {key!r})")
        value = value[key]
    return value


def flatten(metrics: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, ``{"a": [{"b": 1}]}`` -> ``{"a[0].b": 1}``; the ``machine`` header
    at the top level is left out (:func:`format_machine` prints it)."""
    flat = {}
    for key, value in metrics.items():
        if not prefix and key == "machine":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):  # a list of records: one row per field, numbered
                flat.update(flatten(item, f"{name}[{i}]."))
        else:
            flat[name] = value
    return flat


def format_value(name: str, value) -> str:
    """Human-readable number, as the reports' tables print one (:func:`bsbr.formatting.cell`: floats with 3
    significant digits, trailing zeros kept, so a range's 1.003 reads 1.00, not 1; integers in full with thousands
    separators; booleans as yes / no), bytes (a name ending ``_bytes``) as MiB, None and NaN as n/a, a dict as
    ``key: value`` pairs and a list item by item."""
    if isinstance(value, dict):
        return ", ".join(f"{key}: {format_value(key, item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(name, item) for item in value)
    if name.endswith("_bytes") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value / 2**20:,.1f} MiB"
    return cell(value, missing="n/a")


def format_cpu(machine: dict | None) -> str:
    """The CPU of a metrics file's ``machine`` header: ``AMD EPYC, 2 logical CPUs``; ``an unrecorded CPU`` (with the
    count when there is one) where the header names none. The index and README's timing blocks both say it this way."""
    machine = machine or {}
    cpu, cores = machine.get("cpu") or "an unrecorded CPU", machine.get("cores")
    return f"{cpu}, {cores} logical CPUs" if cores else cpu


def format_machine(machine: dict | None) -> str:
    """A metrics file's ``machine`` header as a sentence: CPU, cores, threads, the load average (1 / 5 / 15 min,
    2 decimals), Python, torch and the platform; keys it does not know follow as ``key value``."""
    if not machine:
        return "none recorded"
    machine = dict(machine)
    parts = []
    if "cpu" in machine or "cores" in machine:
        parts.append(format_cpu(machine))
        for key in ("cpu", "cores"):
            machine.pop(key, None)
    if "threads" in machine:
        parts.append(f"{machine.pop('threads')} torch threads")
    load = machine.pop("load_average", None)
    if isinstance(load, (list, tuple)) and len(load) == 3:
        parts.append("load average " + " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min, when the run started)")
    for key, label in (("python", "Python"), ("torch", "torch"), ("platform", "")):
        if key in machine:
            parts.append(f"{label} {machine.pop(key)}".strip())
    parts += [f"{key} {format_value(key, value)}" for key, value in sorted(machine.items())]
    return "; ".join(parts)


def verdict_word(value) -> str:
    """met / missed / the recorded word (undecided, not measured, ...); a dict of verdicts is met if all are."""
    if isinstance(value, dict):
        words = {verdict_word(item) for item in value.values()}
        return words.pop() if len(words) == 1 else "missed" if "missed" in words else "undecided"
    if value is True or str(value).lower() in ("met", "pass"):
        return "met"
    if value is False or str(value).lower() in ("missed", "fail"):
        return "missed"
    if str(value).startswith("not measured"):  # e.g. "not measured at 8192 (holds at 1024, 2048, 4096)"
        return "not measured"
    return "undecided" if value is None else str(value)


def format_goal(value) -> str:
    """A goal's threshold as it was set (5.0 reads 5, 1.5 reads 1.5): it is a chosen number, not a measured one."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:,g}"
    return format_value("", value)


def _fill(text: str, metrics: dict, number: Callable = format_value, words: dict | None = None) -> str:
    """``text`` with each ``{dotted.path}`` replaced by its metric: through ``words[path]`` where given, else
    ``number(path, value)``."""
    def value(match: re.Match) -> str:
        path = match.group(1)
        write = (words or {}).get(path)
        return write(lookup(metrics, path)) if write else number(path, lookup(metrics, path))
    return re.sub(r"\{([\w./]+)\}", value, text)


def headline_rows(name: str, metrics: dict) -> list[dict]:
    """The report's :data:`HEADLINES` read from its metrics: ``{label, value, goal, verdict}`` strings (verdict ""
    where the headline has no goal). KeyError if the metrics lack a named key."""
    rows = []
    for spec in HEADLINES.get(name, []):
        try:
            rows.append(_headline_row(spec, metrics))
        except KeyError as error:  # the notebook no longer writes a key this table names: say so in the page
            rows.append({"label": spec.label, "value": "", "goal": spec.goal, "verdict": f"missing: {error.args[0]}"})
    return rows


def _headline_row(spec: Headline, metrics: dict) -> dict:
    goal, verdict = _fill(spec.goal, metrics, lambda name, value: format_goal(value), spec.words), None
    if spec.target:
        target = lookup(metrics, spec.target)
        value, goal = target["value"], f"{target['comparison']} {format_goal(target['threshold'])}{spec.unit}"
        verdict = target["status"]  # pass / FAIL / undecided (its range straddles the goal)
    else:
        value = spec.value(metrics) if callable(spec.value) else lookup(metrics, spec.value)
        verdict = (spec.verdict(metrics) if callable(spec.verdict) else
                   lookup(metrics, spec.verdict) if spec.verdict else None)
    # a value the run did not measure (e.g. a length the quick profile does not reach) is a dash, not "n/a×"
    if value is None:
        text = "—"
    else:
        text = format_value("", value) + (spec.unit if not isinstance(value, (dict, str)) else "")
    if spec.target and value is not None and target.get("low") is not None:  # the range the medians' intervals allow
        text += f" [{format_value('', target['low'])}, {format_value('', target['high'])}]"
    if spec.interval and value is not None:
        low, high = (spec.interval(metrics) if callable(spec.interval) else
                     lookup(metrics, spec.interval) if isinstance(spec.interval, str)
                     else [lookup(metrics, path) for path in spec.interval])
        text += f" [{format_value('', low)}, {format_value('', high)}]"
    return {"label": _fill(spec.label, metrics, words=spec.words), "value": text, "goal": goal,
            "verdict": verdict_word(verdict) if (spec.verdict or spec.target) else ""}


def report_title(text: str, fallback: str) -> str:
    match = re.search(r"<title>(.*?)</title>", text, re.DOTALL)
    return html.unescape(match.group(1).strip()) if match else fallback


_ABSENT = object()  # a params key or dvc.yaml stage one revision lacks


def _git_show(root: Path, revision: str, path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _dvc_stages(dvc: dict) -> dict:
    """dvc.yaml's stages by name, ``foreach`` stages expanded (``render@01_scaling``: ``${item}`` filled in)."""
    stages = {}
    for name, spec in ((dvc or {}).get("stages") or {}).items():
        if "foreach" in spec:
            for item in spec["foreach"]:
                stages[f"{name}@{item}"] = json.loads(json.dumps(spec["do"]).replace("${item}", str(item)))
        else:
            stages[name] = spec
    return stages


def _entry_path(entry) -> str:
    """A deps/outs entry: ``path`` or ``{path: options}``."""
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def _param_value(params: dict, key: str):
    value = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def stage_changes(stage: str, since: str, until: str, root: Path = REPO_ROOT,
                  rendered_since: str | None = None) -> list[str] | None:
    """What report stage ``stage`` depends on that differs between revisions ``since`` and ``until``, as DVC sees
    it: the stage's entry in dvc.yaml and its ``render@`` stage's, their tracked file and folder deps, the values of
    their params keys, and the same for every stage producing one of their ``data/`` deps (the model, the corpus,
    02's conversion files). ``[]``: a report run at ``since`` is what a run at ``until`` would give (DVC would not
    rerun it). None if either revision's dvc.yaml or params.yaml cannot be read.

    ``rendered_since``: the revision the report was rendered at, when it was rendered again later than its notebook
    ran (a change to the renderer re-renders every report from the same executed notebook); the ``render@`` stage's
    own deps are then compared from there. None: from ``since``.

    Returns:
        sorted descriptions: ``"dvc.yaml: stage 01_scaling"``, ``"params.yaml: 01_scaling.seq_lens"``, file paths.
    """
    ran = _changes(stage, since, until, root)
    rendered = _changes(f"render@{stage}", rendered_since or since, until, root, skip=stage)  # the notebook: above
    return None if ran is None or rendered is None else sorted(set(ran) | set(rendered))


def _changes(stage: str, since: str, until: str, root: Path, skip: str | None = None) -> list[str] | None:
    """:func:`stage_changes` for one stage of dvc.yaml and the stages making its ``data/`` deps, except ``skip``."""
    texts = {(rev, name): _git_show(root, rev, name) for rev in (since, until) for name in ("dvc.yaml", "params.yaml")}
    if any(text is None for text in texts.values()):
        return None
    stages = {rev: _dvc_stages(parse_yaml(texts[(rev, "dvc.yaml")], "dvc.yaml")) for rev in (since, until)}
    params = {rev: parse_yaml(texts[(rev, "params.yaml")], "params.yaml") or {} for rev in (since, until)}
    producers = {_entry_path(out): name for name, spec in stages[until].items() for out in spec.get("outs") or []}
    changes, files, seen = set(), set(), {skip}

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        spec = stages[until].get(name, _ABSENT)
        if spec != stages[since].get(name, _ABSENT):
            changes.add(f"dvc.yaml: stage {name}")
        if spec is _ABSENT:
            return
        for dep in map(_entry_path, spec.get("deps") or []):
            producer = next((producers[out] for out in producers if dep == out or dep.startswith(out + "/")), None)
            if producer is not None:
                visit(producer)  # a pipeline output: current if the stage making it is
            else:
                files.add(dep)
        for entry in spec.get("params") or []:
            # "section.key", or {file: [keys]} / {file: None} (every key of the file)
            groups = entry.items() if isinstance(entry, dict) else [("params.yaml", [entry])]
            for file, keys in groups:
                file_params = {rev: (params[rev] if file == "params.yaml" else
                                     parse_yaml(_git_show(root, rev, file) or "", file) or {}) for rev in params}
                for key in keys if keys is not None else sorted(set(file_params[since]) | set(file_params[until])):
                    if _param_value(file_params[since], key) != _param_value(file_params[until], key):
                        changes.add(f"{file}: {key}")

    visit(stage)
    if files:
        diff = subprocess.run(["git", "diff", "--name-only", since, until, "--", *sorted(files)], cwd=root,
                              capture_output=True, text=True)
        if diff.returncode != 0:
            return None
        changes.update(line for line in diff.stdout.splitlines() if line)
    return sorted(changes)


def currency(row: dict, revision: str, root: Path = REPO_ROOT) -> str:
    """Whether report ``row`` (:func:`collect`) is current at ``revision`` (this build's): ``"current"`` (run at it,
    or nothing its stage depends on changed since its run: :func:`stage_changes`; its render stage's own deps since
    the revision it was rendered at, ``row["rendered_at"]``, where that is a clean one), ``"stale: <what
    changed>"``, or ``"unknown"`` (a +dirty or unknown run revision, or this build's)."""
    run, rendered = row["revision"], row.get("rendered_at")
    if not re.fullmatch(r"[0-9a-f]{40}", run) or not re.fullmatch(r"[0-9a-f]{40}", revision):
        return "unknown"
    rendered = rendered if rendered and re.fullmatch(r"[0-9a-f]{40}", rendered) else None  # +dirty: from the run
    if run == revision and rendered in (None, revision):
        return "current"
    changes = stage_changes(row["name"], run, revision, root, rendered_since=rendered)
    if changes is None:
        return "unknown"
    return "current" if not changes else "stale: " + ", ".join(changes[:4]) + (
        f" and {len(changes) - 4} more" if len(changes) > 4 else "")


def commit_date(revision: str) -> str:
    """The commit date (YYYY-MM-DD) of ``revision`` in this repository, or "" if git does not know it."""
    sha = revision.removesuffix("+dirty")
    if not re.fullmatch(r"[0-9a-f]{7,40}", sha):
        return ""
    proc = subprocess.run(["git", "show", "-s", "--format=%cs", sha], cwd=REPO_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def printed_machine(text: str) -> dict | None:
    """The machine header a report printed in its provenance cell (CPU, cores, torch threads, load average when the
    run started, Python), as a metrics file's ``machine`` record; None if the report printed no CPU line."""
    cpu = PRINTED_CPU.search(text)
    if not cpu:
        return None
    machine = {"cpu": cpu.group(1), "cores": int(cpu.group(2))}
    threads, load = PRINTED_THREADS.search(text), PRINTED_LOAD.search(text)
    if threads:
        machine["threads"] = int(threads.group(1))
    if load:
        machine["load_average"] = [float(x) for x in load.groups()]
    machine["python"] = cpu.group(3)
    return machine


def collect(reports_dir: Path) -> list[dict]:
    """One dict per report: name, file, title, metrics (nested; empty if no metrics file), machine (the metrics file's
    record, else the header the report printed: :func:`printed_machine`), revision, date,
    profile (the params profile its provenance printed, or "not recorded"), run_seconds (how long its notebook ran,
    or None where the report does not say), rendered_at (the revision it was rendered at, or None)."""
    rows = []
    for path in sorted(p for p in reports_dir.glob("*.html") if REPORT_NAME.match(p.name)):
        text = path.read_text(encoding="utf-8")
        metrics_path = reports_dir / "metrics" / f"{path.stem}.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        revision = REVISION.search(text)
        revision = revision.group(1) if revision else "unknown"
        profile = PROFILE.search(text)
        seconds, rendered = RUN_SECONDS.search(text), RENDERED_AT.search(text)
        rows.append({"name": path.stem, "file": path.name, "title": report_title(text, path.stem),
                     "metrics": metrics, "machine": metrics.get("machine") or printed_machine(text),
                     "revision": revision,
                     "date": commit_date(revision), "profile": profile.group(1) if profile else "not recorded",
                     "run_seconds": float(seconds.group(1)) if seconds else None,
                     "rendered_at": rendered.group(1) if rendered else None})
    return rows


def _loss_bar(model: dict) -> tuple[float, float, float]:
    """Figure 1's quality bar for one 07_training model record: final validation loss with its t-interval over seeds,
    or the loss alone (no whiskers) where one seed gave no interval."""
    loss, low, high = model["final_val_loss"], model.get("final_val_loss_low"), model.get("final_val_loss_high")
    return (loss, low, high) if low is not None and high is not None else (loss, loss, loss)


def figure_panels(metrics_by_name: dict[str, dict]) -> list[tuple[str, dict[str, tuple[float, float, float]]]]:
    """Figure 1's panels: (title, {model: (bar, whisker low, whisker high)}): whole-model forward time (s; median,
    min-max of the repeats) and peak memory (MiB) from 01_scaling at its ``seq_len``, and validation loss (nats/byte;
    mean, t-interval over seeds, as 07's headline; the bar alone where one seed gave no interval) from 07_training.
    A panel is left out where its metrics file is missing."""
    scaling, training = metrics_by_name.get("01_scaling", {}), metrics_by_name.get("07_training", {})
    panels = []
    if scaling.get("models"):
        n = format_value("", scaling["seq_len"])
        panels.append((f"speed: forward time, {n} tokens (s)",
                       {m: (v["median_s"], v["min_s"], v["max_s"]) for m, v in scaling["models"].items()}))
        panels.append((f"memory: peak, {n} tokens (MiB)",
                       {m: (v["peak_bytes"] / 2**20,) * 3 for m, v in scaling["models"].items()}))
    if training.get("models"):
        steps = training.get("setup", {}).get("steps")
        panels.append((f"quality: val. loss after {steps} steps (nats/byte)" if steps
                       else "quality: val. loss (nats/byte)",
                       {m: _loss_bar(v) for m, v in training["models"].items()}))
    return panels


def summary_figure(metrics_by_name: dict[str, dict]) -> bytes | None:
    """Figure 1 as PNG bytes: BSBR and the six baselines (one colour each, bsbr.plotting.COLORS) on the panels of
    :func:`figure_panels`. None if neither 01_scaling's nor 07_training's metrics are there."""
    panels = figure_panels(metrics_by_name)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bsbr.plotting import COLORS

    models = [m for m in FIGURE_MODELS if any(m in values for _, values in panels)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.2), sharey=True, squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        for y, model in enumerate(models):
            if model not in values:
                continue
            mid, low, high = values[model]
            ax.barh(y, mid, color=COLORS[model], height=0.7)
            if high > low:
                ax.errorbar(mid, y, xerr=[[mid - low], [high - mid]], color="black", capsize=2, linewidth=0.8)
        ax.set_title(title, fontsize=8.5)
        ax.tick_params(labelsize=7.5)
        ax.grid(axis="x", linewidth=0.4, alpha=0.5)
    axes[0][0].set_yticks(range(len(models)), models)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def build_index(reports_dir: Path, params_file: Path) -> str:
    """The index page as an HTML string."""
    esc = html.escape
    rows = collect(reports_dir)
    built_at = git_revision(REPO_ROOT)
    for row in rows:
        row["currency"] = currency(row, built_at)
    body = ["<h1>BSBR experiment reports</h1>",
            "<p class='lead'>Each report is a notebook run by <code>dvc repro</code> and rendered without code; the "
            "numbers below are read from <code>reports/metrics/</code>. Open a report for its question, what it "
            "found, and the method.</p>"]
    table = ["<div class='table-scroll'><table>",
             "<tr><th>report and its question</th><th>headline number</th><th>value</th><th>goal</th>"
             "<th>verdict</th></tr>"]
    for row in rows:
        numbers = headline_rows(row["name"], row["metrics"]) if row["metrics"] else []
        numbers = numbers or [{"label": "no headline numbers" if row["metrics"] else "no metrics file",
                               "value": "", "goal": "", "verdict": ""}]
        run = f"run at {row['revision'][:10]}{'+dirty' if row['revision'].endswith('+dirty') else ''}"
        run += f", {row['date']}" if row["date"] else ""
        run += f", {row['profile']} profile" if row["profile"] != "not recorded" else ""
        run += f", ran {row['run_seconds'] / 60:.1f} min" if row["run_seconds"] is not None else ""
        if row["revision"] != built_at and row["currency"] == "current":  # a part of the run made earlier
            run += f"; current at {built_at[:10]} (its code, notebook and params unchanged)"
        elif row["currency"].startswith("stale"):
            run += f"; {row['currency']} since"
        first = (f"<td class='report' rowspan='{len(numbers)}'><a href='{esc(row['file'])}'>{esc(row['title'])}</a>"
                 f"<br><span class='run'>{esc(row['name'])}, {esc(run)}</span></td>")
        for i, number in enumerate(numbers):
            verdict = number["verdict"]
            css = "met" if verdict == "met" else "missed" if verdict == "missed" else "other"
            # a value of several parts (accuracy per length) wraps between words; the label and goal keep a width
            table.append(f"<tr>{first if i == 0 else ''}<td class='label'>{esc(number['label'])}</td>"
                         f"<td class='num'>{esc(number['value'])}</td><td class='goal'>{esc(number['goal'])}</td>"
                         f"<td class='{css}'>{esc(verdict)}</td></tr>")
    table.append("</table></div>")
    figure = summary_figure({row["name"]: row["metrics"] for row in rows})
    if figure is not None:
        body += ["<figure><img alt='Figure 1: BSBR against the six baselines' src='data:image/png;base64,"
                 f"{base64.b64encode(figure).decode()}'>",
                 "<figcaption><b>Figure 1.</b> BSBR against the six baselines, one colour each: whole-model forward "
                 "time (bar: median, whiskers: min-max of the repeats) and peak memory from 01_scaling; validation "
                 "loss after training from scratch (nats per byte; bar: mean, whiskers: 95% t-interval over seeds) "
                 "from 07_training. Timings are this project's CPU runs (machine headers below).</figcaption></figure>"]
    else:
        body.append("<p>Figure 1 needs reports/metrics/01_scaling.json or 07_training.json.</p>")
    body += table

    here = machine_info()
    current = sum(row["currency"] == "current" for row in rows)
    revisions = sorted({row["revision"] for row in rows})
    provenance = [("index built at", built_at),
                  ("reports current at that revision", f"{current} of {len(rows)} (run at "
                   f"{', '.join(r[:10] for r in revisions)}; current: nothing the report's stage depends on, its code, "
                   "notebook, parameters and input stages, changed since its run, as DVC sees it)"),
                  ("torch", here["torch"]),
                  ("CPU", f"{here['cpu']} ({here['cores']} logical CPUs)"), ("python", here["python"])]
    body += ["<h2>Provenance</h2>", "<div class='table-scroll'><table>",
             "<tr><th>what</th><th>value</th></tr>"]
    body += [f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>" for key, value in provenance]
    for row in rows:
        header = format_machine(row["machine"])
        body.append(f"<tr><th class='stage'>{esc(row['name'])}</th><td>revision {esc(row['revision'])}"
                    f"{', ' + esc(row['date']) if row['date'] else ''}; params profile: {esc(row['profile'])}; "
                    f"machine: {esc(header)}</td></tr>")
    body.append("</table></div>")

    body.append("<h2>All metrics</h2>")
    for row in rows:
        flat = flatten(row["metrics"])
        cells = "".join(f"<tr><td>{esc(key)}</td><td class='num'>{esc(format_value(key, value))}</td></tr>"
                        for key, value in sorted(flat.items()))
        body.append(f"<details><summary>{esc(row['name'])}: {len(flat)} metrics</summary>"
                    f"<div class='table-scroll'><table>{cells}</table></div></details>")
    # read as DVC reads it (YAML 1.2): the values dvc.lock records, e.g. 1e-3 is 0.001
    params = parse_yaml(params_file.read_text(), str(params_file)) if params_file.is_file() else {}
    cells, sections = [], []
    for section, values in (params or {}).items():  # a profile's overrides as sections of their own, not one blob
        if section == "profiles" and isinstance(values, dict):
            sections += [(f"profiles.{name}.{stage}", keys) for name, stages in values.items()
                         for stage, keys in (stages or {}).items()]
        else:
            sections.append((section, values))
    for section, values in sections:
        items = values.items() if isinstance(values, dict) else [("", values)]
        cells += [f"<tr><td>{esc(str(section))}</td><td>{esc(str(key))}</td>"
                  f"<td class='num'>{esc(json.dumps(value))}</td></tr>" for key, value in items]
    body.append(f"<details><summary>{esc(params_file.name)}</summary><div class='table-scroll'><table>"
                "<tr><th>section</th><th>key</th><th>value</th></tr>" + "".join(cells) + "</table></div></details>")
    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            "<title>BSBR experiment reports</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=Path, default=REPO_ROOT / "reports")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=None, help="default: REPORTS/index.html")
    args = parser.parse_args(argv)
    out = args.out or args.reports / "index.html"
    page = build_index(args.reports, args.params)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
