"""Forward-pass benchmarking: one fresh subprocess per measured point, power-law fits, a machine header.

Each ``(model, seq_len)`` point runs in its own Python process (``python -m bsbr.bench ... --json``) so its
peak memory is that point's own, not the high-water mark of everything measured before it:

* time: ``time.perf_counter`` around ``model(input_ids)`` under ``torch.inference_mode()``, after ``warmup``
  untimed calls; ``repeats`` timed calls, reported as median / min / max / all, in seconds.
* memory: the process's resident set size from ``/proc/self/status`` (Linux). After imports, model build and
  input creation the current RSS is the baseline (``baseline_rss_bytes``: weights + libraries) and the kernel's
  high-water mark is reset to it (``/proc/self/clear_refs``, value 5); after all forward calls the high-water
  mark ``VmHWM`` is the peak (``peak_rss_bytes``). ``peak_bytes = peak_rss_bytes - baseline_rss_bytes`` is what
  the forward passes added (activations, attention buffers, allocator slack).
  ``getrusage(RUSAGE_SELF).ru_maxrss`` is *not* used on Linux: a child started by ``subprocess`` inherits its
  parent's peak there (the kernel carries the pre-``exec`` peak into ``ru_maxrss``), so a point measured from
  a 600 MB notebook kernel would report >= 600 MB whatever it did. Elsewhere ``ru_maxrss`` is the fallback.

CLI (what :func:`measure_forward` runs)::

    python -m bsbr.bench --model bsbr --seq-len 4096 --config '{"vocab_size": 1024, ...}' --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bsbr._checks import check_int_at_least, check_positive_int

__all__ = ["fit_power_law", "git_revision", "machine_info", "measure_forward"]

_REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int | None = None) -> dict:
    """Machine header for timing results.

    Args:
        threads: torch intra-op threads the measurements use; None reports ``torch.get_num_threads()`` here.
    Returns:
        dict with ``cpu`` (model name), ``cores`` (logical CPUs usable by this process), ``torch`` (version),
        ``threads``, ``python`` (version) and ``platform``.
    """
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 0
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_revision(repo: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` of ``repo`` (default: this checkout), with ``+dirty`` if tracked files changed.

    Returns ``"unknown"`` outside a git checkout or before the first commit.
    """
    cwd = Path(repo) if repo is not None else _REPO_ROOT
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def fit_power_law(seq_lens, times) -> tuple[float, float, float]:
    """Least-squares fit of ``time = prefactor * seq_len ** exponent`` in log-log space.

    Args:
        seq_lens: at least two distinct positive lengths (tokens).
        times: positive values (any unit, e.g. seconds or bytes), one per length.
    Returns:
        ``(exponent, prefactor, r2)``; ``prefactor`` is in the unit of ``times``, ``r2`` is the coefficient of
        determination of the log-log fit (1.0 for an exact power law).
    Raises:
        ValueError: different lengths, fewer than two distinct lengths, or non-positive/non-finite values.
    """
    import numpy as np

    x = np.asarray(seq_lens, dtype=float)
    y = np.asarray(times, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"seq_lens and times must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("seq_lens and times must be finite and positive")
    if np.unique(x).size < 2:
        raise ValueError("fit_power_law needs at least two distinct seq_lens")
    log_x, log_y = np.log(x), np.log(y)
    exponent, intercept = np.polyfit(log_x, log_y, 1)
    residual = log_y - (exponent * log_x + intercept)
    total = np.sum((log_y - log_y.mean()) ** 2)
    r2 = 1.0 - float(np.sum(residual**2)) / float(total) if total > 0 else 1.0
    return float(exponent), float(math.exp(intercept)), float(r2)


def _proc_status_bytes(field: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process in bytes from /proc/self/status, or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _memory_baseline() -> tuple[int, str]:
    """(baseline bytes, method) right before the forward calls; see the module docstring."""
    current = _proc_status_bytes("VmRSS")
    if current is not None and _reset_peak_rss():
        return current, "VmRSS baseline, VmHWM peak after clear_refs reset"
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:  # no reset possible: the baseline is the peak so far
        return hwm, "VmHWM before and after (no reset)"
    return _ru_maxrss_bytes(), "ru_maxrss before and after"


def _memory_peak() -> int:
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else _ru_maxrss_bytes()


def _measure_here(name: str, config: dict, seq_len: int, batch_size: int, repeats: int, warmup: int,
                  threads: int | None, seed: int) -> dict:
    """Measure in *this* process (the subprocess side of :func:`measure_forward`)."""
    import torch

    import bsbr

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = bsbr.build_model(name, **config).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator)
    baseline, memory_method = _memory_baseline()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(input_ids)
        for _ in range(repeats):
            start = time.perf_counter()
            output = model(input_ids)
            times.append(time.perf_counter() - start)
            del output
    peak = _memory_peak()
    return {
        "model": name,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_bytes": peak - baseline,
        "memory_method": memory_method,
    }


def measure_forward(name: str, config: dict, seq_len: int, batch_size: int = 1, repeats: int = 3,
                    warmup: int = 1, threads: int | None = None, seed: int = 0,
                    timeout: float | None = None) -> dict:
    """Time one forward pass of ``bsbr.build_model(name, **config)`` on random tokens, in a fresh subprocess.

    Args:
        name: a name from ``bsbr.available_models()``.
        config: keyword arguments for ``bsbr.build_model`` (must include ``vocab_size``).
        seq_len, batch_size: input shape ``[batch_size, seq_len]`` (tokens).
        repeats: timed forward calls (>= 1); warmup: untimed calls before them (>= 0).
        threads: ``torch.set_num_threads`` in the subprocess (also sets ``OMP_NUM_THREADS``); None = torch default.
        seed: seeds the weights and the input tokens.
        timeout: seconds before the subprocess is killed (None = no limit).
    Returns:
        dict with ``median_s, min_s, max_s`` (seconds), ``times_s`` (all timed calls), ``baseline_rss_bytes``
        (RSS after imports, model build and input creation), ``peak_rss_bytes`` (RSS high-water mark over the
        forward calls), ``peak_bytes`` (their difference), all in bytes, ``memory_method`` (how they were read,
        see the module docstring), and the inputs ``model, seq_len, batch_size, repeats, warmup, threads``.
    Raises:
        ValueError: unknown ``name`` or invalid sizes (before anything runs); RuntimeError: the subprocess failed
        (its stderr tail is in the message), e.g. a config the model does not take, or out of memory.
    """
    import bsbr

    if name not in bsbr.available_models():
        raise ValueError(f"name must be one of {bsbr.available_models()}, got {name!r}")
    if not isinstance(config, dict) or "vocab_size" not in config:
        raise ValueError(f"config must be a dict of build_model kwargs including vocab_size, got {config!r}")
    check_positive_int(seq_len=seq_len, batch_size=batch_size, repeats=repeats)
    check_int_at_least(0, warmup=warmup)
    if threads is not None:
        check_positive_int(threads=threads)
    cmd = [sys.executable, "-m", "bsbr.bench", "--model", name, "--seq-len", str(seq_len),
           "--batch-size", str(batch_size), "--repeats", str(repeats), "--warmup", str(warmup),
           "--seed", str(seed), "--config", json.dumps(config), "--json"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    if threads is not None:
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"measuring {name!r} at seq_len={seq_len} took longer than {timeout} s") from error
    if proc.returncode != 0:
        reason = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(
            f"measuring {name!r} at seq_len={seq_len} failed ({reason}):\n{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="name from bsbr.available_models()")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help="JSON dict of bsbr.build_model kwargs")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a summary")
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    config.setdefault("vocab_size", 1024)
    for key, value in (("hidden_dim", 512), ("num_layers", 2), ("num_heads", 8), ("ff_dim", 2048)):
        config.setdefault(key, value)
    result = _measure_here(args.model, config, args.seq_len, args.batch_size, args.repeats, args.warmup,
                           args.threads, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} seq_len={result['seq_len']}: median {result['median_s']:.4f} s "
              f"(min {result['min_s']:.4f}, max {result['max_s']:.4f}); forward peak "
              f"{result['peak_bytes'] / 2**20:.1f} MiB over baseline {result['baseline_rss_bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
