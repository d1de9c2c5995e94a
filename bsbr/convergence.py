"""The training experiment's tables (notebook ``07_training``): steps and seconds to a target validation loss per run
and per architecture, the ranking with its margins and whether they exceed the seed spread, architectures that trained
identically, and the power laws of training-step memory.

Runs come from :func:`bsbr.training.train_lm`; losses are in nats per byte (the byte tokenizer), times in seconds,
memory in bytes, lengths in tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from bsbr.fitting import fit_power_law
from bsbr.experiment import check_ints
from bsbr.registry import available_models
from bsbr.training import steps_to_reach

__all__ = ["SAME_CURVE_TOLERANCE", "check_training_parameters", "convergence_summary", "crossing", "format_steps",
           "identical_pairs", "memory_fit_lens", "memory_fits", "memory_table", "ranking", "run_row"]

#: nats: two architectures whose validation curves agree this closely for every seed trained identically.
SAME_CURVE_TOLERANCE = 1e-4


def check_training_parameters(models, seeds, *, target_loss, memory_seq_lens, warmup_steps, steps,
                              **positive) -> list[str]:
    """Check the training notebook's parameters before anything runs; return the architectures, sorted.

    Args:
        models: None (every registered architecture) or distinct names of ``bsbr.available_models()``.
        seeds: non-empty list of distinct integers >= 0.
        target_loss: None or a number > 0 (nats/byte).
        memory_seq_lens: two or more distinct increasing integers >= 2.
        warmup_steps: an integer in ``[0, steps)``.
        steps, **positive: integers >= 1 (``seq_len`` >= 2 and ``hidden_dim`` divisible by ``num_heads`` when given).
    Raises:
        ValueError: naming the first bad parameter.
    """
    names = available_models() if models is None else list(models)
    if sorted(set(names) - set(available_models())) or not names or len(set(names)) != len(names):
        raise ValueError(f"models must be None or distinct names from {available_models()}, got {models!r}")
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    check_ints(1, steps=steps, **positive)
    if positive.get("seq_len", 2) < 2:
        raise ValueError(f"seq_len must be >= 2 (one predicted token per window), got {positive['seq_len']}")
    if "hidden_dim" in positive and positive["hidden_dim"] % positive["num_heads"]:
        raise ValueError(f"hidden_dim ({positive['hidden_dim']}) must be divisible by num_heads "
                         f"({positive['num_heads']})")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps must be an integer in [0, steps={steps}), got {warmup_steps!r}")
    if target_loss is not None and (isinstance(target_loss, bool) or not isinstance(target_loss, (int, float))
                                    or not target_loss > 0):
        raise ValueError(f"target_loss must be None or a number > 0 (nats/byte), got {target_loss!r}")
    if (not isinstance(memory_seq_lens, list) or len(memory_seq_lens) < 2
            or sorted(set(memory_seq_lens)) != memory_seq_lens
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in memory_seq_lens)):
        raise ValueError(f"memory_seq_lens must be >= 2 distinct increasing integers >= 2, got {memory_seq_lens!r}")
    return sorted(names)


def memory_fit_lens(memory_seq_lens: list) -> list:
    """The upper half of the memory lengths (at least the last two): where the memory exponent is fitted."""
    lens = memory_seq_lens[len(memory_seq_lens) // 2:]
    return lens if len(lens) >= 2 else memory_seq_lens[-2:]


def run_row(name: str, seed: int, run, steps: int, tokens: int) -> dict:
    """One row of the runs table from a :func:`bsbr.training.train_lm` result: parameters, budget, seconds,
    tokens/s, initial and final losses, final validation perplexity and bits per byte."""
    final = run.evals[-1]
    return {"model": name, "seed": seed, "params": run.params, "steps": steps, "tokens": tokens,
            "train_seconds": run.train_seconds, "tokens_per_s": run.tokens_per_s,
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


def convergence_summary(runs: pd.DataFrame, evals: pd.DataFrame, target_loss=None):
    """Steps and seconds to the target loss, per run and per architecture (its seed-mean curve).

    Args:
        runs: :func:`run_row` rows; evals: ``[model, seed, step, val_loss, elapsed_s, ...]``.
        target_loss: nats/byte, or None for the worst architecture's seed-mean final validation loss.
    Returns:
        (``runs`` with ``steps_to_target``/``seconds_to_target`` per seed, the per-architecture summary sorted by model
        — final perplexity mean/std/min/max, steps to target of the mean curve and its seed range, seeds reaching it,
        seconds to target, throughput —, the target, a phrase saying where it came from, the seed-mean curves).
    """
    mean_curves = evals.groupby(["model", "step"], as_index=False)[["val_loss", "elapsed_s"]].mean()
    final_mean = runs.groupby("model").final_val_loss.mean()
    target = float(final_mean.max()) if target_loss is None else float(target_loss)
    source = (f"the worst final seed-mean validation loss ({final_mean.idxmax()})" if target_loss is None
              else "the target_loss parameter")
    per_seed = {(name, seed): crossing(frame, target) for (name, seed), frame in evals.groupby(["model", "seed"])}
    runs = runs.copy()
    runs["steps_to_target"] = [per_seed[(m, s)][0] for m, s in zip(runs.model, runs.seed)]
    runs["seconds_to_target"] = [per_seed[(m, s)][1] for m, s in zip(runs.model, runs.seed)]
    rows = []
    for name, group in runs.groupby("model"):
        mean_step, mean_seconds = crossing(mean_curves[mean_curves.model == name], target)
        seed_steps = group.steps_to_target.dropna()
        rows.append({
            "model": name, "params": int(group.params.iloc[0]), "seeds": len(group),
            "final_val_loss_mean": group.final_val_loss.mean(),
            "final_val_ppl_mean": group.final_val_ppl.mean(), "final_val_ppl_std": group.final_val_ppl.std(ddof=1),
            "final_val_ppl_min": group.final_val_ppl.min(), "final_val_ppl_max": group.final_val_ppl.max(),
            "final_val_bpb_mean": group.final_val_bpb.mean(),
            "steps_to_target": mean_step, "steps_to_target_min": seed_steps.min() if len(seed_steps) else None,
            "steps_to_target_max": seed_steps.max() if len(seed_steps) else None,
            "seeds_reaching_target": int(len(seed_steps)), "seconds_to_target": mean_seconds,
            "tokens_per_s_mean": group.tokens_per_s.mean(), "train_seconds_mean": group.train_seconds.mean(),
        })
    summary = pd.DataFrame(rows).sort_values("model").reset_index(drop=True)
    return runs, summary, target, source, mean_curves


def identical_pairs(evals: pd.DataFrame, names, tolerance: float = SAME_CURVE_TOLERANCE) -> list[tuple]:
    """Pairs of architectures (in ``names`` order) whose validation losses agree within ``tolerance`` nats at every
    seed and step: the same computation from the same initial weights."""
    pivot = evals.pivot_table(index=["seed", "step"], columns="model", values="val_loss")
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if float((pivot[a] - pivot[b]).abs().max()) <= tolerance]


def ranking(summary: pd.DataFrame, seeds) -> SimpleNamespace:
    """Who converges first and who ends lowest, with margins.

    Returns:
        namespace ``ranked`` (by steps to target, then final loss; unreached last), ``fastest``, ``runner_up`` (or
        None), ``step_margin`` (steps), ``step_ratio`` (runner-up / fastest), ``step_separated`` (the fastest's slowest
        seed, every seed reaching the target, still beats the runner-up's fastest seed), ``by_final`` (by final loss),
        ``best_final``, ``second_final``, ``final_margin`` (perplexity), ``final_separated`` (min–max ranges apart).
    """
    r = SimpleNamespace()
    r.ranked = summary.sort_values(["steps_to_target", "final_val_loss_mean"], na_position="last").reset_index(drop=True)
    r.fastest, r.runner_up = r.ranked.iloc[0], r.ranked.iloc[1] if len(r.ranked) > 1 else None
    r.by_final = summary.sort_values("final_val_loss_mean").reset_index(drop=True)
    r.best_final, r.second_final = r.by_final.iloc[0], r.by_final.iloc[1] if len(r.by_final) > 1 else None
    fastest, runner_up = r.fastest, r.runner_up
    if runner_up is not None and pd.notna(fastest.steps_to_target) and pd.notna(runner_up.steps_to_target):
        r.step_margin = float(runner_up.steps_to_target - fastest.steps_to_target)
        r.step_ratio = (float(runner_up.steps_to_target / fastest.steps_to_target) if fastest.steps_to_target > 0
                        else None)
        r.step_separated = bool(pd.notna(fastest.steps_to_target_max) and pd.notna(runner_up.steps_to_target_min)
                                and fastest.seeds_reaching_target == len(seeds)
                                and fastest.steps_to_target_max < runner_up.steps_to_target_min)
    else:
        r.step_margin, r.step_ratio, r.step_separated = None, None, False
    r.final_margin = (None if r.second_final is None
                      else float(r.second_final.final_val_ppl_mean - r.best_final.final_val_ppl_mean))
    r.final_separated = bool(r.second_final is not None
                             and r.best_final.final_val_ppl_max < r.second_final.final_val_ppl_min)
    return r


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
