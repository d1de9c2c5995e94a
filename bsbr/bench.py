"""Benchmark CLI: one measured point in this process, printed as a summary or one JSON line (``--json``).

Each command measures one point (see :mod:`bsbr.benchmarks`; the helpers are :mod:`bsbr.measure`,
:mod:`bsbr.provenance` and :mod:`bsbr.fitting`); run it as its own process so the point's memory is its own::

    python -m bsbr.bench attention --impl bsbr --mode forward --seq-len 16384 --threads 2 --json
        [--hidden-dim 512 --num-heads 8 --chunk-size 128 --batch-size 1 --repeats 3 --warmup 1 --seed 0
         --max-timed-s 5]     (--impl: bsbr.benchmarks.ATTENTION_IMPLS, --mode forward|backward|decode)
    python -m bsbr.bench attention --impl llama_normalized --seq-len 8192 --hidden-dim 576 --num-heads 9
        --num-kv-heads 3 --chunk-size 256 --sink-size 4 --threads 2 --json
                              (one SmolLM2-shaped layer, converted; --impl llama_original: the original)
    python -m bsbr.bench matmul --threads 2 --json [--repeats 5]
    python -m bsbr.bench model --model bsbr --seq-len 4096 --config '{"vocab_size": 1024, ...}' --json
    python -m bsbr.bench --model bsbr --seq-len 4096 ...      (the original form of ``model``)

A bad value (``--threads 0``, ``--seq-len -1``, a ``--config`` that is not a JSON object of keys and values the model
takes, e.g. ``{"num_heads": 3}`` with ``hidden_dim`` 512, an unknown ``--model``) is a usage error naming the option,
exit status 2, before anything is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bsbr.benchmarks import (ATTENTION_IMPLS, ATTENTION_MODES, MATMUL_SHAPES, check_attention_args,
                             matmul_throughput_in_process, measure_attention_in_process, measure_forward_in_process)
from bsbr.provenance import load_average
from bsbr.registry import available_models, build_model

__all__ = ["main"]

MODEL_DEFAULTS = {"vocab_size": 1024, "hidden_dim": 512, "num_layers": 2, "num_heads": 8, "ff_dim": 2048}
"""``model``'s ``bsbr.build_model`` kwargs where ``--config`` does not give them."""


def _int_at_least(minimum: int):
    """argparse ``type``: an integer >= ``minimum`` (argparse names the option in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _json_object(text: str) -> dict:
    """argparse ``type`` of ``--config``: a JSON object (``{"hidden_dim": 64, ...}``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object of bsbr.build_model kwargs, got {text!r} ({error})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of bsbr.build_model kwargs, got {text!r}")
    return value


def model_config_error(name: str, config: dict) -> str | None:
    """The model's own complaint about ``bsbr.build_model(name, **config)`` (the message of the ValueError or
    TypeError it raises), or None when it builds. It is built on the meta device: no weights are allocated, so the
    check costs no memory before a measurement."""
    try:
        with torch.device("meta"):
            build_model(name, **config)
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def _print_result(result: dict, as_json: bool, summary: str, load_before) -> None:
    """Print ``result`` (one JSON line) or ``summary``, with the load average before and after the measurement: a
    load above the cores the timing left free means other work competed with it (not a quiet-machine result)."""
    load_after = load_average()
    result["load_average"] = {"before": None if load_before is None else list(load_before),
                              "after": None if load_after is None else list(load_after), "cores": os.cpu_count()}
    if load_before is not None and load_after is not None:
        summary += (f" [load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on "
                    f"{os.cpu_count()} cores]")
    print(json.dumps(result) if as_json else summary)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("attention", "matmul", "model", "-h", "--help"):
        argv = ["model", *argv]  # the original form: python -m bsbr.bench --model NAME ...
    parser = argparse.ArgumentParser(prog="python -m bsbr.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="one whole-model forward point (measure_forward)")
    model.add_argument("--model", required=True, choices=available_models())
    model.add_argument("--config", type=_json_object, default={}, help="JSON dict of bsbr.build_model kwargs")

    attention = commands.add_parser("attention", help="one attention module/core point (measure_attention)")
    attention.add_argument("--impl", required=True, choices=ATTENTION_IMPLS)
    attention.add_argument("--mode", default="forward", choices=ATTENTION_MODES)
    positive, non_negative = _int_at_least(1), _int_at_least(0)
    attention.add_argument("--hidden-dim", type=positive, default=512)
    attention.add_argument("--num-heads", type=positive, default=8)
    attention.add_argument("--chunk-size", type=positive, default=128)
    attention.add_argument("--max-timed-s", type=float, default=None)
    attention.add_argument("--num-kv-heads", type=positive, default=None, help="llama_* impls: key/value heads")
    attention.add_argument("--sink-size", type=non_negative, default=4, help="llama_normalized: attention-sink tokens")

    matmul = commands.add_parser("matmul", help="the machine's fp32 matmul rate (matmul_throughput)")
    for sub in (model, attention, matmul):
        sub.add_argument("--threads", type=positive, default=None, help="torch threads (default: torch's)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--json", action="store_true", help="print one JSON line instead of a summary")
    for sub in (model, attention):
        sub.add_argument("--seq-len", type=positive, required=True)
        sub.add_argument("--batch-size", type=positive, default=1)
        sub.add_argument("--repeats", type=positive, default=3)
        sub.add_argument("--warmup", type=non_negative, default=1)
    matmul.add_argument("--repeats", type=positive, default=5)
    args = parser.parse_args(argv)
    if args.command == "model":
        config = {**MODEL_DEFAULTS, **args.config}
        error = model_config_error(args.model, config)
        if error is not None:
            model.error(f"argument --config: {error}")
    if args.command == "attention":  # a combination the measurement refuses is a usage error, not a traceback
        try:
            check_attention_args(args.impl, args.mode, args.seq_len, args.hidden_dim, args.num_heads,
                                 args.chunk_size, args.batch_size, args.num_kv_heads, args.sink_size)
        except ValueError as error:
            attention.error(str(error))
    load_before = load_average()

    if args.command == "model":
        result = measure_forward_in_process(args.model, config, args.seq_len, args.batch_size, args.repeats,
                                            args.warmup, args.threads, args.seed)
        _print_result(result, args.json,
                      f"{result['model']} seq_len={result['seq_len']}: median {result['median_s']:.4f} s "
                      f"(min {result['min_s']:.4f}, max {result['max_s']:.4f}); forward peak "
                      f"{result['peak_bytes'] / 2**20:.1f} MiB over baseline "
                      f"{result['baseline_rss_bytes'] / 2**20:.1f} MiB", load_before)
    elif args.command == "attention":
        result = measure_attention_in_process(args.impl, args.mode, args.seq_len, args.hidden_dim, args.num_heads,
                                              args.chunk_size, args.batch_size, args.repeats, args.warmup,
                                              args.threads, args.seed, args.max_timed_s, args.num_kv_heads,
                                              args.sink_size)
        unit = "per token" if args.mode == "decode" else "per call"
        text = (f"{result['impl']} {result['mode']} seq_len={result['seq_len']}: median {result['median_s']:.4g} s "
                f"{unit} (mean {result['mean_s']:.4g}, min {result['min_s']:.4g}, max {result['max_s']:.4g}, "
                f"{result['repeats']} timed); peak {result['peak_bytes'] / 2**20:.1f} MiB over baseline "
                f"{result['baseline_rss_bytes'] / 2**20:.1f} MiB")
        if result["gflops_per_s"] is not None:
            text += f"; {result['flops'] / 1e9:.2f} GFLOP, {result['gflops_per_s']:.1f} GFLOP/s"
        if args.mode == "decode":
            text += f"; state {result['state_bytes'] / 2**20:.2f} MiB for {result['state_tokens']} tokens"
        _print_result(result, args.json, text, load_before)
    else:
        result = matmul_throughput_in_process(MATMUL_SHAPES, args.repeats, args.threads, args.seed)
        _print_result(result, args.json, f"fp32 matmul: {result['gflops_per_s']:.1f} GFLOP/s best on "
                      f"{result['threads']} threads; " + ", ".join(
                          f"{r['m']}x{r['k']}x{r['n']}: {r['gflops_per_s']:.1f}" for r in result["shapes"]), load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
