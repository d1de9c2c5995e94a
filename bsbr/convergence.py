"""The training experiment's tables (notebook ``07_training``): the learning rate chosen per architecture, steps and
seconds to a target validation loss per run, each architecture's final loss and steps with a Student-t interval over
seeds, which pairs of architectures those intervals separate, architectures that trained identically, and the power
laws of training-step memory.

Runs come from :func:`bsbr.training.train_lm`; losses are in nats per byte (the byte tokenizer), times in seconds,
memory in bytes, lengths in tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bsbr._checks import check_heads, check_positive_number
from bsbr.fitting import fit_power_law
from bsbr.experiment import check_ints
from bsbr.registry import available_models
from bsbr.router_recall import t_interval
from bsbr.training import steps_to_reach

__all__ = ["SAME_CURVE_TOLERANCE", "check_training_parameters", "choose_learning_rates", "convergence_summary",
           "crossing", "format_steps", "identical_pairs", "memory_fit_lens", "memory_fits", "memory_table",
           "grid_edge_sentence", "grid_edge_summary", "rates_at_grid_edge", "run_row", "separations"]

#: nats: two architectures whose validation curves agree this closely for every seed trained identically.
SAME_CURVE_TOLERANCE = 1e-4


def _number(value, low: float, name: str, high: float | None = None, open_low: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + ("" if high is None else f" and < {high}")
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def check_training_parameters(models, seeds, *, tune_seed, learning_rates, target_loss, target_margin, confidence,
                              ngram_orders, memory_seq_lens, warmup_steps, steps, **positive) -> list[str]:
    """Check the training notebook's parameters before anything runs; return the architectures, sorted.

    Args:
        models: None (every registered architecture) or distinct names of ``bsbr.available_models()``.
        seeds: list of >= 2 distinct integers >= 0 holding ``tune_seed`` (the interval needs two).
        learning_rates: non-empty list of distinct numbers > 0 (the sweep).
        target_loss: None (the bigram floor minus ``target_margin``) or a number > 0 (nats/byte).
        target_margin: a number >= 0 (nats/byte); confidence: in (0, 1).
        ngram_orders: distinct integers in [1, 7] holding 2 (the bigram floor sets the default target).
        memory_seq_lens: two or more distinct increasing integers >= 2.
        warmup_steps: an integer in ``[0, steps)``.
        steps, **positive: integers >= 1 (``seq_len`` >= 2 and ``hidden_dim`` divisible by ``num_heads`` when given).
    Raises:
        ValueError: naming the first bad parameter.
    """
    names = available_models() if models is None else list(models)
    if sorted(set(names) - set(available_models())) or not names or len(set(names)) != len(names):
        raise ValueError(f"models must be None or distinct names from {available_models()}, got {models!r}")
    if not isinstance(seeds, list) or len(seeds) < 2 or len(set(seeds)) != len(seeds) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a list of two or more distinct integers >= 0, got {seeds!r}")
    if tune_seed not in seeds:
        raise ValueError(f"tune_seed must be one of seeds {seeds}, got {tune_seed!r}")
    if not isinstance(learning_rates, list) or not learning_rates or len(set(learning_rates)) != len(learning_rates):
        raise ValueError(f"learning_rates must be a non-empty list of distinct numbers > 0, got {learning_rates!r}")
    check_positive_number(**{f"learning_rates[{i}]": rate for i, rate in enumerate(learning_rates)})
    check_ints(1, steps=steps, **positive)
    if positive.get("seq_len", 2) < 2:
        raise ValueError(f"seq_len must be >= 2 (one predicted token per window), got {positive['seq_len']}")
    if "hidden_dim" in positive:
        check_heads(positive["hidden_dim"], positive["num_heads"])
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps must be an integer in [0, steps={steps}), got {warmup_steps!r}")
    if target_loss is not None:
        check_positive_number(target_loss=target_loss)
    _number(target_margin, 0.0, "target_margin", open_low=False)
    _number(confidence, 0.0, "confidence", high=1.0)
    if (not isinstance(ngram_orders, list) or 2 not in ngram_orders or len(set(ngram_orders)) != len(ngram_orders)
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 7 for n in ngram_orders)):
        raise ValueError(f"ngram_orders must be distinct integers in [1, 7] including 2, got {ngram_orders!r}")
    if (not isinstance(memory_seq_lens, list) or len(memory_seq_lens) < 2
            or sorted(set(memory_seq_lens)) != memory_seq_lens
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in memory_seq_lens)):
        raise ValueError(f"memory_seq_lens must be >= 2 distinct increasing integers >= 2, got {memory_seq_lens!r}")
    return sorted(names)


def choose_learning_rates(sweep: pd.DataFrame) -> dict[str, float]:
    """The learning rate of each architecture with the lowest final validation loss in the sweep.

    Args:
        sweep: one row per (``model``, ``learning_rate``) with ``final_val_loss`` (nats/byte; NaN or inf for a run
            that diverged, which is never chosen).
    Returns:
        ``{model: learning_rate}``; a tie goes to the smaller rate.
    Raises:
        ValueError: missing columns, or an architecture none of whose runs has a finite loss (named).
    """
    missing = {"model", "learning_rate", "final_val_loss"} - set(sweep.columns)
    if missing:
        raise ValueError(f"sweep must have the columns model, learning_rate, final_val_loss; missing {sorted(missing)}")
    chosen = {}
    for name, group in sweep.groupby("model", sort=True):
        finite = group[np.isfinite(group.final_val_loss.astype(float))]
        if finite.empty:
            raise ValueError(f"sweep: every learning rate of {name} diverged ({sorted(group.learning_rate)})")
        chosen[name] = float(finite.sort_values(["final_val_loss", "learning_rate"]).learning_rate.iloc[0])
    return chosen


def rates_at_grid_edge(chosen: dict, learning_rates) -> dict[str, str]:
    """The architectures whose chosen learning rate is the lowest or the highest of the swept grid: their best rate
    may lie outside it (the sweep does not bracket them).

    Args:
        chosen: ``{model: learning_rate}`` (e.g. from :func:`choose_learning_rates`).
        learning_rates: the swept rates (numbers > 0).
    Returns:
        ``{model: "lowest" | "highest"}`` in ``chosen``'s order, only for models at an edge; ``{}`` for a single
        rate (no sweep, so nothing to bracket).
    Raises:
        ValueError: no rates, or a chosen rate that is not in ``learning_rates`` (named).
    """
    grid = sorted(set(float(rate) for rate in learning_rates))
    if not grid:
        raise ValueError(f"learning_rates must hold at least one rate, got {learning_rates!r}")
    edges = {}
    for name, rate in chosen.items():
        if float(rate) not in grid:
            raise ValueError(f"chosen: the rate {rate!r} of {name} is not one of learning_rates {grid}")
        if len(grid) == 1:
            continue
        if float(rate) == grid[0]:
            edges[name] = "lowest"
        elif float(rate) == grid[-1]:
            edges[name] = "highest"
    return edges


def grid_edge_sentence(chosen: dict, learning_rates) -> str:
    """The sentence reports 07 and 08 and README print about :func:`rates_at_grid_edge`: ``"**Learning-rate sweep
    edges.** a chose the lowest rate (0.001); b chose the highest rate (0.1) of [0.001, 0.01, 0.1]: the sweep does
    not bracket them, so their best rate may lie outside it."``, or ``""`` when no rate is at an edge.

    Args, Raises: as :func:`rates_at_grid_edge`.
    """
    edges = rates_at_grid_edge(chosen, learning_rates)
    if not edges:
        return ""
    return ("**Learning-rate sweep edges.** "
            + "; ".join(f"{name} chose the {edge} rate ({float(chosen[name]):g})" for name, edge in edges.items())
            + f" of {sorted(float(rate) for rate in learning_rates)}: the sweep does not bracket them, so their best "
              "rate may lie outside it.")


def grid_edge_summary(chosen: dict, learning_rates) -> str:
    """The compact sentence reports 07 and 08 print in their findings about :func:`rates_at_grid_edge`: how many
    models chose an edge rate of the sweep and which, and what a sweep of that many rates can tell, once (not a
    warning per model; :func:`grid_edge_sentence` lists them one by one), e.g. for the rates [0.003, 0.01]::

        **Learning-rate sweep edges.** 3 of 3 models chose an edge of the 2 swept rates [0.003, 0.01] (the lowest,
        0.003: a; the highest, 0.01: b, c). A sweep of 2 rates brackets no model (every choice is an edge), so it
        cannot tell whether a model's best rate lies beyond it.

    With three or more rates the second part reads ``A sweep of 3 rates brackets only a choice inside it (1 model
    here): for the 2 at an edge it cannot tell whether the best rate lies beyond it.``; ``""`` when no chosen rate is
    at an edge (or there is a single rate, no sweep).

    Args, Raises: as :func:`rates_at_grid_edge`.
    """
    edges = rates_at_grid_edge(chosen, learning_rates)
    if not edges:
        return ""
    grid = sorted(set(float(rate) for rate in learning_rates))
    n = len(grid)
    at = {"lowest": grid[0], "highest": grid[-1]}
    groups = "; ".join(f"the {edge}, {at[edge]:g}: " + ", ".join(str(name) for name, e in edges.items() if e == edge)
                       for edge in ("lowest", "highest") if edge in edges.values())
    plural = lambda count, word: f"{count} {word}" + ("" if count == 1 else "s")
    head = (f"**Learning-rate sweep edges.** {len(edges)} of {plural(len(chosen), 'model')} chose an edge of the "
            f"{n} swept rates [{', '.join(f'{rate:g}' for rate in grid)}] ({groups}). ")
    if n == 2:
        return head + ("A sweep of 2 rates brackets no model (every choice is an edge), so it cannot tell whether a "
                       "model's best rate lies beyond it.")
    inside = len(chosen) - len(edges)
    return head + (f"A sweep of {n} rates brackets only a choice inside it ({plural(inside, 'model')} here): for the "
                   f"{len(edges)} at an edge it cannot tell whether the best rate lies beyond it.")


def memory_fit_lens(memory_seq_lens: list) -> list:
    """The upper half of the memory lengths (at least the last two): where the memory exponent is fitted."""
    lens = memory_seq_lens[len(memory_seq_lens) // 2:]
    return lens if len(lens) >= 2 else memory_seq_lens[-2:]


def run_row(name: str, seed: int, run, steps: int, tokens: int, learning_rate: float) -> dict:
    """One row of the runs table from a :func:`bsbr.training.train_lm` result: rate, parameters, budget, seconds,
    tokens/s, initial and final losses, final validation perplexity and bits per byte."""
    final = run.evals[-1]
    return {"model": name, "seed": seed, "learning_rate": learning_rate, "params": run.params, "steps": steps,
            "tokens": tokens, "train_seconds": run.train_seconds, "tokens_per_s": run.tokens_per_s,
            "initial_val_loss": run.evals[0]["val_loss"], "final_train_loss": run.history[-1]["train_loss"],
            "final_val_loss": final["val_loss"], "final_val_ppl": final["val_ppl"], "final_val_bpb": final["val_bpb"]}


def crossing(frame: pd.DataFrame, target: float):
    """``(step, seconds)`` at which a validation curve (``[step, val_loss, elapsed_s]``) first reaches ``target``,
    linearly interpolated between evaluations (:func:`bsbr.training.steps_to_reach`), or ``(None, None)``."""
    frame = frame.sort_values("step")
    step = steps_to_reach(frame.step, frame.val_loss, target)
    if step is None:
        return None, None
    return step, float(np.interp(step, frame.step, frame.elapsed_s))


def convergence_summary(runs: pd.DataFrame, evals: pd.DataFrame, target: float, confidence: float = 0.95):
    """Per run: steps and seconds to ``target``; per architecture: the final validation loss and the steps to the
    target as a mean over seeds with its Student-t interval (:func:`bsbr.router_recall.t_interval`).

    Args:
        runs: :func:`run_row` rows (one per model and seed, at the chosen rate); evals: ``[model, seed, step,
            val_loss, elapsed_s]`` of the same runs.
        target: validation loss (nats/byte) of the criterion.
        confidence: of the t-intervals.
    Returns:
        (``runs`` with ``steps_to_target``/``seconds_to_target`` per seed (None: not reached), the summary sorted by
        final loss: ``model, learning_rate, params, seeds, final_val_loss`` (mean) ``, final_val_loss_low/_high``, the
        same as perplexity (``final_val_ppl``, ``_low``, ``_high`` = exp of the loss bounds) and bits per byte,
        ``final_val_ppl_min/_max`` over seeds, ``steps_to_target`` (mean over seeds, NaN unless every seed reaches
        it) ``, steps_to_target_low/_high`` (its interval), ``_min/_max`` (over the seeds that reach it),
        ``seeds_reaching_target``, ``seconds_to_target`` (mean), ``tokens_per_s_mean``, ``train_seconds_mean``).
    Raises:
        ValueError: a target that is not a number > 0, or a model with fewer than two seeds.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise ValueError(f"target must be a number > 0 (nats/byte), got {target!r}")
    per_seed = {(name, seed): crossing(frame, target) for (name, seed), frame in evals.groupby(["model", "seed"])}
    runs = runs.copy()
    nan = float("nan")
    for i, column in enumerate(("steps_to_target", "seconds_to_target")):
        runs[column] = np.array([nan if per_seed[(m, s)][i] is None else per_seed[(m, s)][i]
                                 for m, s in zip(runs.model, runs.seed)], dtype=np.float64)
    rows = []
    for name, group in runs.groupby("model"):
        if len(group) < 2:
            raise ValueError(f"runs: {name} has {len(group)} seed(s); the interval needs two or more")
        loss, loss_low, loss_high = t_interval(group.final_val_loss.to_numpy(), confidence)
        reached = group.steps_to_target.dropna().astype(float)
        if len(reached) == len(group):
            steps, steps_low, steps_high = t_interval(reached.to_numpy(), confidence)
            seconds = float(group.seconds_to_target.astype(float).mean())
        else:
            steps = steps_low = steps_high = seconds = nan
        rows.append({
            "model": name, "learning_rate": float(group.learning_rate.iloc[0]), "params": int(group.params.iloc[0]),
            "seeds": len(group),
            "final_val_loss": loss, "final_val_loss_low": loss_low, "final_val_loss_high": loss_high,
            "final_val_ppl": math.exp(loss), "final_val_ppl_low": math.exp(loss_low),
            "final_val_ppl_high": math.exp(loss_high),
            "final_val_ppl_min": float(group.final_val_ppl.min()), "final_val_ppl_max": float(group.final_val_ppl.max()),
            "final_val_bpb": loss / math.log(2),
            "steps_to_target": steps, "steps_to_target_low": steps_low, "steps_to_target_high": steps_high,
            "steps_to_target_min": float(reached.min()) if len(reached) else nan,
            "steps_to_target_max": float(reached.max()) if len(reached) else nan,
            "seeds_reaching_target": int(len(reached)), "seconds_to_target": seconds,
            "tokens_per_s_mean": float(group.tokens_per_s.mean()), "train_seconds_mean": float(group.train_seconds.mean()),
        })
    summary = pd.DataFrame(rows).sort_values(["final_val_loss", "model"]).reset_index(drop=True)
    return runs, summary


def separations(summary: pd.DataFrame, runs: pd.DataFrame, column: str, confidence: float = 0.95) -> pd.DataFrame:
    """Every pair of architectures compared on ``column``: a quantity with one value per architecture and seed in
    ``runs`` whose mean over seeds and t-interval ``summary`` holds as ``<column>``, ``<column>_low`` and
    ``<column>_high`` (report 07: ``"final_val_loss"``, ``"steps_to_target"``; report 08: ``"test_accuracy"``).

    Two verdicts per pair: ``separated`` — the two t-intervals over seeds (``<column>_low/_high`` of ``summary``) do
    not overlap (conservative); and ``paired_separated`` — the t-interval of the per-seed difference ``a − b`` excludes
    0 (every architecture trains on the same batches for a seed, so seeds pair). Pairs where either architecture
    has no interval (a seed that misses the target) are ``separated = False`` with NaN bounds.

    Args:
        summary: one row per architecture (``model``, ``column``, ``<column>_low``, ``<column>_high``), e.g.
            :func:`convergence_summary`'s summary (its row order is kept: ``a`` is the earlier row);
        runs: per-seed rows (``model, seed, column``), one per architecture and seed; confidence: of the
            difference's interval.
    Returns:
        ``a, b, a_mean, b_mean, difference, difference_low, difference_high, separated, paired_separated``.
    Raises:
        ValueError: ``summary`` lacks ``column`` or its ``_low``/``_high`` bounds, or ``runs`` lacks ``column``.
    """
    missing = [name for name in (column, f"{column}_low", f"{column}_high") if name not in summary.columns]
    if missing or column not in runs.columns:
        raise ValueError(f"column must name a quantity of runs whose mean and t-interval summary holds as "
                         f"<column>, <column>_low and <column>_high, got {column!r} (missing: "
                         f"{', '.join(missing) if missing else 'runs.' + column})")
    values = runs.pivot(index="seed", columns="model", values=column)  # [seeds, models]
    rows = []
    order = list(summary.model)
    by = summary.set_index("model")
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            low_a, high_a, low_b, high_b = (by.loc[a, f"{column}_low"], by.loc[a, f"{column}_high"],
                                            by.loc[b, f"{column}_low"], by.loc[b, f"{column}_high"])
            bounds = np.array([low_a, high_a, low_b, high_b], dtype=float)
            separated = bool(np.isfinite(bounds).all() and (high_a < low_b or high_b < low_a))
            diff = (values[a].astype(float) - values[b].astype(float)).to_numpy()
            if np.isfinite(diff).all() and diff.size >= 2:
                mean, low, high = t_interval(diff, confidence)
            else:
                mean = low = high = float("nan")
            rows.append({"a": a, "b": b, "a_mean": float(by.loc[a, column]), "b_mean": float(by.loc[b, column]),
                         "difference": mean, "difference_low": low, "difference_high": high,
                         "separated": separated,
                         "paired_separated": bool(np.isfinite(low) and (low > 0 or high < 0))})
    return pd.DataFrame(rows, columns=["a", "b", "a_mean", "b_mean", "difference", "difference_low",
                                       "difference_high", "separated", "paired_separated"])


def identical_pairs(evals: pd.DataFrame, names, tolerance: float = SAME_CURVE_TOLERANCE) -> list[tuple]:
    """Pairs of architectures (in ``names`` order) whose validation losses agree within ``tolerance`` nats at every
    seed and step: the same computation from the same initial weights."""
    pivot = evals.pivot_table(index=["seed", "step"], columns="model", values="val_loss")
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if float((pivot[a] - pivot[b]).abs().max()) <= tolerance]


def memory_fits(memory: pd.DataFrame, fit_lens, all_lens) -> pd.DataFrame:
    """Power law of training-step peak bytes against length per architecture, on ``fit_lens`` ("upper half") and
    ``all_lens`` ("all"): ``[model, lengths, seq_lens, exponent, prefactor_bytes, r2]`` (:func:`fit_power_law`)."""
    rows = []
    for name, group in memory.groupby("model"):
        for label, lens in (("upper half", fit_lens), ("all", all_lens)):
            part = group[group.seq_len.isin(lens)]
            exponent, prefactor, r2 = fit_power_law(part.seq_len, part.peak_bytes)
            rows.append({"model": name, "lengths": label, "seq_lens": " ".join(map(str, lens)),
                         "exponent": exponent, "prefactor_bytes": prefactor, "r2": r2})
    return pd.DataFrame(rows).sort_values(["model", "lengths"]).reset_index(drop=True)


def memory_table(memory: pd.DataFrame, fits: pd.DataFrame, seq_len: int, batch_size: int) -> pd.DataFrame:
    """Per architecture at ``seq_len``: peak MiB, the upper-half exponent and R², gradients + AdamW state MiB, and KiB
    per token (``batch_size`` windows)."""
    upper = fits[fits.lengths == "upper half"].set_index("model")
    longest = memory[memory.seq_len == seq_len].set_index("model")
    return pd.DataFrame({
        f"peak MiB at {seq_len}": longest.peak_bytes / 2**20,
        "exponent (upper half)": upper.exponent, "r2": upper.r2,
        "grads + AdamW state MiB": (longest.grad_bytes + longest.optimizer_state_bytes) / 2**20,
        f"KiB per token at {seq_len}": longest.peak_bytes / 1024 / (seq_len * batch_size),
    })


def format_steps(value) -> str:
    """``"12.3"``, or ``"not reached"`` for None/NaN."""
    return "not reached" if value is None or pd.isna(value) else f"{value:.1f}"
