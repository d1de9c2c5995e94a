"""Benchmarking: one fresh process per measured point, FLOP counts, power-law fits, a machine header.

Three kinds of point, each measured in its own process (see *Isolation*):

* :func:`measure_forward`: a whole model from ``bsbr.build_model`` (token ids in, hidden states out), forward only.
* :func:`measure_attention`: one attention module or core against full attention of the same width:

  ========== =====================================================================================================
  impl       what is called (``hidden_states``: ``[batch, seq_len, hidden_dim]``; per-head tensors ``q, k, v``:
             ``[batch, heads, seq_len, head_dim]``; ``meta_query, meta_key``: ``[batch, heads, num_chunks, head_dim]``)
  ========== =====================================================================================================
  bsbr       ``bsbr.BSBRAttention(hidden_dim, num_heads, chunk_size)(hidden_states)`` (projections included)
  standard   ``bsbr.StandardAttention(hidden_dim, num_heads)(hidden_states)``: torch's causal
             ``scaled_dot_product_attention`` with ``q_proj, k_proj, v_proj, out_proj``
  linear,    the baselines' attention layers, ``bsbr.registry.build_attention(impl, hidden_dim, num_heads)`` with
  delta_net, their architecture defaults (``linear``/``delta_net``: chunk 64, ``sliding_window``: window 128,
  sliding_   ``hopfield``: one update, ``gau``: chunk 128, ``qk_dim`` 128, expansion 2; ``chunk_size`` is BSBR's only)
  window,
  hopfield,
  gau
  bsbr_core  ``bsbr.attention.bsbr_attention(query, key, value, meta_query, meta_key, chunk_size)``
  sdpa_core  ``torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)``
  delta_     DeltaNet's delta rule, ``delta_rule_chunkwise(q, k, v, beta, 64)`` / ``delta_rule_recurrent(q, k, v,
  chunkwise, beta)`` (the token loop), on unit-norm ``q, k`` and ``beta`` in (0, 1): the issue-4 operator pair
  delta_
  recurrent
  linear_    linear attention, ``linear_attention_chunkwise(φq, φk, v, 64)`` / ``linear_attention_recurrent(φq,
  chunkwise, φk, v)`` with ``φ = elu + 1``
  linear_
  recurrent
  ========== =====================================================================================================

  The cores get random per-head tensors laid out as the modules produce them (views
  ``[batch, seq_len, heads, head_dim] -> [batch, heads, seq_len, head_dim]`` of token-major projections), so a
  core point is the module point minus its projections. Modes:

  - ``forward``: ``fn()`` under ``torch.inference_mode()``.
  - ``backward``: forward + backward as in training, timed together: ``fn().sum().backward()`` with gradients
    to the input(s) and every parameter (grads reset to None before each call, not timed apart).
  - ``decode`` (modules only): streaming generation. ``module(hidden_states, state=None, return_state=True)``
    prefills the ``seq_len`` tokens (timed apart as ``prefill_s``, not in the headline), then
    every timed call is one token, ``module(token, state=state, return_state=True)`` with ``token
    [batch, 1, hidden_dim]``: the per-token latency at position ``seq_len`` (+ warmup tokens). BSBR's state is
    ``O(num_chunks · head_dim²)`` per head and a token costs the same at any position; standard attention's state
    is a KV cache and a token costs ``O(position)``. ``state_bytes`` (``state.nbytes()``) is reported at the end.

* :func:`matmul_throughput`: the machine's fp32 GEMM rate (best of a few large ``torch.mm``), the yardstick for
  the achieved GFLOP/s of the attention points.

Per point:

* time: ``time.perf_counter`` around each call after ``warmup`` untimed calls; ``repeats`` timed calls (fewer if
  ``max_timed_s`` is given and their total passes it; at least one), reported as median (the headline), mean,
  min, max and all, in seconds.
* memory: the process's resident set size from ``/proc/self/status`` (Linux). After imports, model/input creation
  (and, for ``decode``, the prefill) the current RSS is the baseline (``baseline_rss_bytes``: weights, inputs,
  libraries, the prefilled state) and the kernel's high-water mark is reset to it (``/proc/self/clear_refs``,
  value 5); after all calls the high-water mark ``VmHWM`` is the peak (``peak_rss_bytes``).
  ``peak_bytes = peak_rss_bytes - baseline_rss_bytes`` is what the calls added (activations, attention buffers,
  saved tensors and gradients, allocator slack). ``getrusage(RUSAGE_SELF).ru_maxrss`` is *not* used on Linux:
  a child process inherits its parent's peak there. Elsewhere ``ru_maxrss`` is the fallback.

Isolation: each point runs in a new process forked from a *fork server* (``multiprocessing`` start method
``forkserver``, preloading ``torch`` and ``bsbr``), so its peak memory is its own and it shares no allocator
state, thread pool or warm cache with the caller or other points. The server is a fresh interpreter started once
per calling process (not a fork of the caller: a notebook kernel's memory is not inherited) that only imports,
never runs a tensor op; forking from it saves the ~3 s ``import torch`` per point. It keeps the ``bsbr`` code it
imported: code edited afterwards reaches the points only after the caller restarts. Where ``forkserver`` is
unavailable (Windows) points are spawned.

FLOPs (:func:`attention_flop_terms`, forward; matrix products only, a multiply-add = 2 FLOPs; softmax, chunk
means, bias adds and other elementwise work are not counted). ``n`` = seq_len, ``D`` = hidden_dim,
``H`` = num_heads, ``d = D / H``, ``B`` = chunk_size, ``C = ceil(n / B)`` chunks of sizes ``s_i`` (all ``B``
but a partial last one); everything is multiplied by batch_size. Causal products count only the causal half
(the pairs ``j <= i``, diagonal included), i.e. the work that a kernel skipping masked blocks must do:

* ``projections = 4 · 2·n·D²`` (q, k, v, out; modules only)
* ``meta_projections = 2 · 2·C·D²`` (meta-query and meta-key of the chunk means; ``bsbr`` only)
* BSBR core:
  ``local_attention = 2·D · Σ_i s_i(s_i+1)`` (Q·Kᵀ and P·V inside each chunk: ``2 · 2·d · s(s+1)/2`` per chunk
  and head; ≈ ``2·n·(B+1)·D``),
  ``chunk_states = 2·(C-1)·B·D·d`` (``F_j = K_jᵀ V_j`` for the ``C-1`` chunks that are ever retrieved),
  ``meta_scores = D·C·(C-1)`` (``r_i·h_j`` for ``j < i``), ``state_mixing = H·d²·C·(C-1)``
  (``Σ_{j<i} w_ij F_j``), ``readout = 2·n·D·d`` (``q_t · R_i`` for every token);
* full attention core: ``attention = 2·D · n(n+1)`` (causal Q·Kᵀ and P·V, ``2 · 2·d · n(n+1)/2`` per head).

``backward`` mode counts ``3 ×`` the forward FLOPs (the backward of a product is two products of its size;
recomputation inside fused attention kernels is not counted). Achieved GFLOP/s = FLOPs / median seconds / 1e9.

CLI (each command measures one point in its own process and prints a summary, or one JSON line with ``--json``)::

    python -m bsbr.bench attention --impl bsbr --mode forward --seq-len 16384 --threads 2 --json
        [--hidden-dim 512 --num-heads 8 --chunk-size 128 --batch-size 1 --repeats 3 --warmup 1 --seed 0
         --max-timed-s 5]     (--impl bsbr|standard|bsbr_core|sdpa_core, --mode forward|backward|decode)
    python -m bsbr.bench matmul --threads 2 --json [--repeats 5]
    python -m bsbr.bench model --model bsbr --seq-len 4096 --config '{"vocab_size": 1024, ...}' --json
    python -m bsbr.bench --model bsbr --seq-len 4096 ...      (the original form of ``model``)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

from bsbr._checks import check_heads, check_int_at_least, check_positive_int

__all__ = [
    "ATTENTION_IMPLS",
    "ATTENTION_MODES",
    "CORE_IMPLS",
    "FLOP_IMPLS",
    "MODULE_IMPLS",
    "attention_flop_terms",
    "attention_flops",
    "fit_power_law",
    "git_revision",
    "machine_info",
    "matmul_throughput",
    "measure_attention",
    "measure_forward",
]

_REPO_ROOT = Path(__file__).resolve().parents[1]

#: ``impl`` values of :func:`measure_attention` that are attention layers (projections included): every registered
#: architecture (``bsbr.available_models()``).
MODULE_IMPLS = ("bsbr", "standard", "linear", "delta_net", "sliding_window", "hopfield", "gau")
#: ``impl`` values that are operators on per-head tensors (no projections).
CORE_IMPLS = ("bsbr_core", "sdpa_core", "delta_chunkwise", "delta_recurrent", "linear_chunkwise", "linear_recurrent")
#: ``impl`` values of :func:`measure_attention`: the modules, then the cores.
ATTENTION_IMPLS = MODULE_IMPLS + CORE_IMPLS
#: ``impl`` values with a FLOP count (:func:`attention_flop_terms`); the others report ``flops=None``.
FLOP_IMPLS = ("bsbr", "standard", "bsbr_core", "sdpa_core")
#: ``mode`` values of :func:`measure_attention`; ``decode`` needs a module (one of :data:`MODULE_IMPLS`).
ATTENTION_MODES = ("forward", "backward", "decode")
#: Default GEMM shapes ``(m, k, n)`` of :func:`matmul_throughput`: a projection-sized product and a square one.
MATMUL_SHAPES = ((16384, 512, 512), (2048, 2048, 2048))


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


# ----------------------------------------------------------------------------- isolation


_CONTEXT = None


def _context():
    """The multiprocessing context every point runs in (a fork server preloading torch and bsbr; see above)."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["torch", "bsbr", "bsbr.bench"])
        else:
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _isolated_entry(conn, function, kwargs: dict) -> None:
    """Child side of :func:`_run_isolated`: send ``("ok", result)`` or ``("error", traceback text)``."""
    try:
        result = function(**kwargs)
    except BaseException:  # noqa: BLE001 - everything, as text, to the caller
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("ok", result))
    finally:
        conn.close()


def _run_isolated(function, kwargs: dict, what: str, timeout: float | None):
    """``function(**kwargs)`` in a new process (see *Isolation*); its return value, or RuntimeError naming ``what``."""
    context = _context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_entry, args=(send, function, kwargs), daemon=True)
    # The child needs nothing from the caller's __main__ (the target lives in this module), so hide it while the
    # process starts: multiprocessing would otherwise re-run the caller's script in the child, which recurses in a
    # script without an `if __name__ == "__main__":` guard.
    caller_main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        process.start()
    finally:
        sys.modules["__main__"] = caller_main
    send.close()  # the child holds the only write end: EOF on `receive` when it dies
    try:
        if not receive.poll(timeout):
            raise RuntimeError(f"measuring {what} took longer than {timeout} s")
        try:
            status, payload = receive.recv()
        except EOFError:
            process.join()
            code = process.exitcode
            reason = f"killed by signal {-code} (out of memory?)" if code is not None and code < 0 else f"exit {code}"
            raise RuntimeError(f"measuring {what} failed ({reason}) before reporting a result") from None
    finally:
        receive.close()
        if process.is_alive():
            process.kill()
        process.join()
    if status != "ok":
        raise RuntimeError(f"measuring {what} failed:\n{payload[-2000:]}")
    return payload


def _check_threads_timeout(threads, timeout) -> None:
    if threads is not None:
        check_positive_int(threads=threads)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


def _set_threads(threads: int | None):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _timed_calls(call, repeats: int, warmup: int, max_timed_s: float | None = None) -> list[float]:
    """Seconds of ``repeats`` timed calls after ``warmup`` untimed ones (fewer once their total > ``max_timed_s``)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if max_timed_s is not None and sum(times) > max_timed_s:
            break
    return times


def _time_summary(times: list[float]) -> dict:
    return {"repeats": len(times), "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "times_s": times}


# ----------------------------------------------------------------------------- whole models


def _measure_here(name: str, config: dict, seq_len: int, batch_size: int, repeats: int, warmup: int,
                  threads: int | None, seed: int) -> dict:
    """Measure one model point in *this* process (the child side of :func:`measure_forward`, and the CLI)."""
    import torch

    import bsbr

    used_threads = _set_threads(threads)
    torch.manual_seed(seed)
    model = bsbr.build_model(name, **config).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator)
    baseline, memory_method = _memory_baseline()

    def call():
        output = model(input_ids)
        del output

    with torch.inference_mode():
        times = _timed_calls(call, repeats, warmup)
    peak = _memory_peak()
    summary = _time_summary(times)
    return {
        "model": name,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "threads": used_threads,
        "median_s": summary["median_s"],
        "min_s": summary["min_s"],
        "max_s": summary["max_s"],
        "times_s": times,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_bytes": peak - baseline,
        "memory_method": memory_method,
    }


def measure_forward(name: str, config: dict, seq_len: int, batch_size: int = 1, repeats: int = 3,
                    warmup: int = 1, threads: int | None = None, seed: int = 0,
                    timeout: float | None = None) -> dict:
    """Time one forward pass of ``bsbr.build_model(name, **config)`` on random tokens, in a fresh process.

    Args:
        name: a name from ``bsbr.available_models()``.
        config: keyword arguments for ``bsbr.build_model`` (must include ``vocab_size``).
        seq_len, batch_size: input shape ``[batch_size, seq_len]`` (tokens).
        repeats: timed forward calls (>= 1); warmup: untimed calls before them (>= 0).
        threads: ``torch.set_num_threads`` in the measuring process; None = torch default.
        seed: seeds the weights and the input tokens.
        timeout: seconds before the measuring process is killed (None = no limit).
    Returns:
        dict with ``median_s, min_s, max_s`` (seconds), ``times_s`` (all timed calls), ``baseline_rss_bytes``
        (RSS after imports, model build and input creation), ``peak_rss_bytes`` (RSS high-water mark over the
        forward calls), ``peak_bytes`` (their difference), all in bytes, ``memory_method`` (how they were read,
        see the module docstring), and the inputs ``model, seq_len, batch_size, repeats, warmup, threads``.
    Raises:
        ValueError: unknown ``name`` or invalid sizes (before anything runs); RuntimeError: the measuring process
        failed (its traceback tail is in the message), e.g. a config the model does not take, or out of memory.
    """
    import bsbr

    if name not in bsbr.available_models():
        raise ValueError(f"name must be one of {bsbr.available_models()}, got {name!r}")
    if not isinstance(config, dict) or "vocab_size" not in config:
        raise ValueError(f"config must be a dict of build_model kwargs including vocab_size, got {config!r}")
    check_positive_int(seq_len=seq_len, batch_size=batch_size, repeats=repeats)
    check_int_at_least(0, warmup=warmup)
    _check_threads_timeout(threads, timeout)
    kwargs = dict(name=name, config=dict(config), seq_len=seq_len, batch_size=batch_size, repeats=repeats,
                  warmup=warmup, threads=threads, seed=seed)
    return _run_isolated(_measure_here, kwargs, f"{name!r} at seq_len={seq_len}", timeout)


# ----------------------------------------------------------------------------- attention modules and cores


def _check_attention_args(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {list(ATTENTION_IMPLS)}, got {impl!r}")
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode must be one of {list(ATTENTION_MODES)}, got {mode!r}")
    if mode == "decode" and impl not in MODULE_IMPLS:
        raise ValueError(f"mode 'decode' streams through a module: impl must be one of {list(MODULE_IMPLS)}, "
                         f"got {impl!r}")
    check_positive_int(seq_len=seq_len, chunk_size=chunk_size, batch_size=batch_size)
    check_heads(hidden_dim, num_heads)


def attention_flop_terms(impl: str, seq_len: int, hidden_dim: int = 512, num_heads: int = 8,
                         chunk_size: int = 128, batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of one attention point, term by term (formulas in the module docstring).

    Args:
        impl: one of :data:`FLOP_IMPLS`.
        seq_len, hidden_dim, num_heads, chunk_size, batch_size: the point's sizes (``chunk_size`` is ignored by
            ``standard`` and ``sdpa_core``).
    Returns:
        ``{term: FLOPs}``: ``projections`` (modules), ``meta_projections`` (``bsbr``), then ``local_attention,
        chunk_states, meta_scores, state_mixing, readout`` (BSBR) or ``attention`` (full attention).
    Raises:
        ValueError: ``impl`` not in :data:`FLOP_IMPLS` or invalid sizes.
    """
    _check_attention_args(impl, "forward", seq_len, hidden_dim, num_heads, chunk_size, batch_size)
    if impl not in FLOP_IMPLS:
        raise ValueError(f"impl must be one of {list(FLOP_IMPLS)} for a FLOP count, got {impl!r}")
    n, D, H, B = seq_len, hidden_dim, num_heads, chunk_size
    d = D // H
    terms = {}
    if impl in ("bsbr", "standard"):
        terms["projections"] = 4 * 2 * n * D * D
    if impl in ("bsbr", "bsbr_core"):
        C = -(-n // B)
        sizes_term = (n // B) * B * (B + 1) + (n % B) * (n % B + 1)  # Σ_i s_i (s_i + 1)
        if impl == "bsbr":
            terms["meta_projections"] = 2 * 2 * C * D * D
        terms["local_attention"] = 2 * D * sizes_term
        terms["chunk_states"] = 2 * (C - 1) * B * D * d
        terms["meta_scores"] = D * C * (C - 1)
        terms["state_mixing"] = H * d * d * C * (C - 1)
        terms["readout"] = 2 * n * D * d
    else:
        terms["attention"] = 2 * D * n * (n + 1)
    return {key: batch_size * value for key, value in terms.items()}


def attention_flops(impl: str, seq_len: int, hidden_dim: int = 512, num_heads: int = 8, chunk_size: int = 128,
                    batch_size: int = 1, mode: str = "forward") -> int:
    """FLOPs of one call of an attention point: the sum of :func:`attention_flop_terms`, ``3 ×`` for ``backward``.

    Raises:
        ValueError: unknown ``impl``, invalid sizes, or ``mode`` not ``"forward"``/``"backward"`` (a decode step
            has no FLOP count here).
    """
    if mode not in ("forward", "backward"):
        raise ValueError(f"mode must be 'forward' or 'backward' for a FLOP count, got {mode!r}")
    forward = sum(attention_flop_terms(impl, seq_len, hidden_dim, num_heads, chunk_size, batch_size).values())
    return forward * (3 if mode == "backward" else 1)


def _attention_call(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size, generator):
    """Build what ``impl`` runs and return ``(call, leaves, module)``: ``call()`` -> output tensor."""
    import torch
    import torch.nn.functional as F

    from bsbr.attention import bsbr_attention
    from bsbr.baselines.delta_net import delta_rule_chunkwise, delta_rule_recurrent
    from bsbr.baselines.linear import elu_feature_map, linear_attention_chunkwise, linear_attention_recurrent
    from bsbr.registry import build_attention

    grad = mode == "backward"
    head_dim = hidden_dim // num_heads
    if impl in MODULE_IMPLS:
        module = build_attention(impl, hidden_dim, num_heads, **({"chunk_size": chunk_size} if impl == "bsbr" else {}))
        module.eval()  # dropout is 0 anyway; eval keeps the modules on their inference branches
        hidden_states = torch.randn(batch_size, seq_len, hidden_dim, generator=generator, requires_grad=grad)
        return (lambda: module(hidden_states)), [hidden_states], module

    def per_head(length):
        # token-major [batch, length, heads, head_dim] viewed as [batch, heads, length, head_dim], like a projection
        base = torch.randn(batch_size, length, num_heads, head_dim, generator=generator, requires_grad=grad)
        return base, base.transpose(1, 2)

    (q0, q), (k0, k), (v0, v) = per_head(seq_len), per_head(seq_len), per_head(seq_len)
    if impl == "sdpa_core":
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q0, k0, v0], None
    if impl.startswith("delta_"):
        beta0 = torch.rand(batch_size, num_heads, seq_len, generator=generator, requires_grad=grad)
        form = delta_rule_chunkwise if impl == "delta_chunkwise" else delta_rule_recurrent
        return (lambda: form(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta0)[0]), [q0, k0, v0, beta0], None
    if impl.startswith("linear_"):
        form = linear_attention_chunkwise if impl == "linear_chunkwise" else linear_attention_recurrent
        return (lambda: form(elu_feature_map(q), elu_feature_map(k), v)[0]), [q0, k0, v0], None
    num_chunks = -(-seq_len // chunk_size)
    (mq0, mq), (mk0, mk) = per_head(num_chunks), per_head(num_chunks)
    return (lambda: bsbr_attention(q, k, v, mq, mk, chunk_size)), [q0, k0, v0, mq0, mk0], None


def _measure_attention_here(impl: str, mode: str, seq_len: int, hidden_dim: int = 512, num_heads: int = 8,
                            chunk_size: int = 128, batch_size: int = 1, repeats: int = 3, warmup: int = 1,
                            threads: int | None = None, seed: int = 0, max_timed_s: float | None = None) -> dict:
    """Measure one attention point in *this* process (the child side of :func:`measure_attention`, and the CLI)."""
    import torch

    used_threads = _set_threads(threads)
    torch.manual_seed(seed)  # the module's weights
    generator = torch.Generator().manual_seed(seed)  # the inputs
    call, leaves, module = _attention_call(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size,
                                           generator)
    extra = {}
    if mode == "forward":
        baseline, memory_method = _memory_baseline()
        with torch.inference_mode():
            times = _timed_calls(call, repeats, warmup, max_timed_s)
    elif mode == "backward":
        parameters = list(module.parameters()) if module is not None else []

        def step():
            for tensor in leaves + parameters:
                tensor.grad = None
            call().sum().backward()

        baseline, memory_method = _memory_baseline()
        times = _timed_calls(step, repeats, warmup, max_timed_s)
    else:  # decode: prefill seq_len tokens, then one token per call
        steps = warmup + repeats
        tokens = torch.randn(batch_size, steps, hidden_dim, generator=generator)  # [batch, steps, hidden_dim]
        with torch.inference_mode():
            start = time.perf_counter()
            _, state = module(leaves[0], state=None, return_state=True)  # prefill: the seq_len-token prompt
            extra["prefill_s"] = time.perf_counter() - start
            holder = {"state": state, "next": 0}

            def decode_one():
                i = holder["next"]
                _, holder["state"] = module(tokens[:, i : i + 1], state=holder["state"], return_state=True)
                holder["next"] = i + 1

            baseline, memory_method = _memory_baseline()
            times = _timed_calls(decode_one, repeats, warmup, max_timed_s)
        final = holder["state"]
        extra.update(position=seq_len, state_bytes=int(final.nbytes()), state_tokens=int(final.num_tokens))
    peak = _memory_peak()
    result = {
        "impl": impl,
        "mode": mode,
        "seq_len": seq_len,
        "hidden_dim": hidden_dim,
        "num_heads": num_heads,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "warmup": warmup,
        "threads": used_threads,
        **_time_summary(times),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_bytes": peak - baseline,
        "memory_method": memory_method,
        "flops": None,
        "gflops_per_s": None,
        **extra,
    }
    if mode != "decode" and impl in FLOP_IMPLS:
        result["flops"] = attention_flops(impl, seq_len, hidden_dim, num_heads, chunk_size, batch_size, mode)
        result["gflops_per_s"] = result["flops"] / result["median_s"] / 1e9
    return result


def measure_attention(impl: str, seq_len: int, mode: str = "forward", hidden_dim: int = 512, num_heads: int = 8,
                      chunk_size: int = 128, batch_size: int = 1, repeats: int = 3, warmup: int = 1,
                      threads: int | None = None, seed: int = 0, max_timed_s: float | None = None,
                      timeout: float | None = None) -> dict:
    """Time and memory of one attention module or core at one length, in a fresh process (module docstring).

    Args:
        impl: ``"bsbr"`` / ``"standard"`` (modules with their projections, input ``[batch, seq_len, hidden_dim]``)
            or ``"bsbr_core"`` / ``"sdpa_core"`` (the attention alone on ``[batch, heads, seq_len, head_dim]``).
        seq_len: tokens per sequence; in ``decode`` mode the prefilled position the timed tokens follow.
        mode: ``"forward"`` (inference), ``"backward"`` (forward + backward, timed together) or ``"decode"`` (one
            token per timed call after a prefill of ``seq_len`` tokens; modules only).
        hidden_dim, num_heads, chunk_size, batch_size: sizes (``head_dim = hidden_dim // num_heads``; full
            attention ignores ``chunk_size``).
        repeats: timed calls (``decode``: timed tokens), >= 1; warmup: untimed calls before them, >= 0.
        threads: ``torch.set_num_threads`` in the measuring process; None = torch default.
        seed: seeds the weights and the inputs.
        max_timed_s: stop timing once the timed calls total more than this many seconds (at least one call is
            timed; ``repeats`` in the result is the number done); None = always ``repeats``.
        timeout: seconds before the measuring process is killed (None = no limit).
    Returns:
        dict with the inputs (``impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size, warmup,
        threads``), ``repeats`` (timed calls done), ``median_s, mean_s, min_s, max_s, times_s`` (seconds per
        call; per token in ``decode``), ``baseline_rss_bytes, peak_rss_bytes, peak_bytes, memory_method``,
        ``flops`` and ``gflops_per_s`` (None in ``decode``); ``decode`` adds ``position`` (= ``seq_len``),
        ``prefill_s``, ``state_bytes`` and ``state_tokens`` (of the final state).
    Raises:
        ValueError: an argument above out of range, naming it (before anything runs). RuntimeError: the
        measuring process failed or timed out (its traceback tail is in the message), e.g. out of memory.
    """
    _check_attention_args(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size)
    check_positive_int(repeats=repeats)
    check_int_at_least(0, warmup=warmup)
    _check_threads_timeout(threads, timeout)
    if max_timed_s is not None and (isinstance(max_timed_s, bool) or not isinstance(max_timed_s, (int, float))
                                    or not max_timed_s > 0):
        raise ValueError(f"max_timed_s must be a positive number of seconds or None, got {max_timed_s!r}")
    kwargs = dict(impl=impl, mode=mode, seq_len=seq_len, hidden_dim=hidden_dim, num_heads=num_heads,
                  chunk_size=chunk_size, batch_size=batch_size, repeats=repeats, warmup=warmup, threads=threads,
                  seed=seed, max_timed_s=max_timed_s)
    return _run_isolated(_measure_attention_here, kwargs, f"{impl!r} {mode} at seq_len={seq_len}", timeout)


# ----------------------------------------------------------------------------- the machine's matmul rate


def _matmul_here(shapes, repeats: int, threads: int | None, seed: int) -> dict:
    """Best-of-``repeats`` fp32 ``torch.mm`` rate per shape, in *this* process."""
    import torch

    used_threads = _set_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=generator)
        b = torch.randn(k, n, generator=generator)
        out = torch.empty(m, n)
        best = min(_timed_calls(lambda: torch.mm(a, b, out=out), repeats, warmup=1))
        rows.append({"m": m, "k": k, "n": n, "best_s": best, "gflops_per_s": 2 * m * k * n / best / 1e9})
        del a, b, out
    return {"gflops_per_s": max(row["gflops_per_s"] for row in rows), "threads": used_threads, "dtype": "float32",
            "repeats": repeats, "shapes": rows}


def matmul_throughput(threads: int | None = None, shapes=MATMUL_SHAPES, repeats: int = 5, seed: int = 0,
                      timeout: float | None = None) -> dict:
    """The machine's measured fp32 matrix-multiply rate, in a fresh process: the yardstick for achieved GFLOP/s.

    Each shape ``(m, k, n)`` is ``torch.mm([m, k], [k, n])`` into a preallocated output, one warmup call then
    ``repeats`` timed calls; a shape's rate is ``2·m·k·n / best seconds``.

    Args:
        threads: ``torch.set_num_threads`` in the measuring process; None = torch default.
        shapes: iterable of ``(m, k, n)`` positive integers (default :data:`MATMUL_SHAPES`).
        repeats: timed calls per shape (>= 1). seed: seeds the random matrices. timeout: seconds, or None.
    Returns:
        ``{"gflops_per_s": best rate over the shapes, "threads", "dtype": "float32", "repeats",
        "shapes": [{"m", "k", "n", "best_s", "gflops_per_s"}, ...]}``.
    Raises:
        ValueError: malformed ``shapes`` or invalid ``repeats``/``threads``/``timeout``; RuntimeError: the
        measuring process failed.
    """
    try:
        shapes = [tuple(shape) for shape in shapes]
    except TypeError:
        raise ValueError(f"shapes must be an iterable of (m, k, n) triples, got {shapes!r}") from None
    if not shapes or any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"shapes must be a non-empty iterable of (m, k, n) triples, got {shapes!r}")
    for m, k, n in shapes:
        check_positive_int(m=m, k=k, n=n)
    check_positive_int(repeats=repeats)
    _check_threads_timeout(threads, timeout)
    kwargs = dict(shapes=[list(shape) for shape in shapes], repeats=repeats, threads=threads, seed=seed)
    return _run_isolated(_matmul_here, kwargs, "matmul throughput", timeout)


# ----------------------------------------------------------------------------- CLI


def _print_result(result: dict, as_json: bool, summary: str) -> None:
    print(json.dumps(result) if as_json else summary)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("attention", "matmul", "model", "-h", "--help"):
        argv = ["model", *argv]  # the original form: python -m bsbr.bench --model NAME ...
    parser = argparse.ArgumentParser(prog="python -m bsbr.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="one whole-model forward point (measure_forward)")
    model.add_argument("--model", required=True, help="name from bsbr.available_models()")
    model.add_argument("--config", default="{}", help="JSON dict of bsbr.build_model kwargs")

    attention = commands.add_parser("attention", help="one attention module/core point (measure_attention)")
    attention.add_argument("--impl", required=True, choices=ATTENTION_IMPLS)
    attention.add_argument("--mode", default="forward", choices=ATTENTION_MODES)
    attention.add_argument("--hidden-dim", type=int, default=512)
    attention.add_argument("--num-heads", type=int, default=8)
    attention.add_argument("--chunk-size", type=int, default=128)
    attention.add_argument("--max-timed-s", type=float, default=None)

    matmul = commands.add_parser("matmul", help="the machine's fp32 matmul rate (matmul_throughput)")
    for sub in (model, attention, matmul):
        sub.add_argument("--threads", type=int, default=None)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--json", action="store_true", help="print one JSON line instead of a summary")
    for sub in (model, attention):
        sub.add_argument("--seq-len", type=int, required=True)
        sub.add_argument("--batch-size", type=int, default=1)
        sub.add_argument("--repeats", type=int, default=3)
        sub.add_argument("--warmup", type=int, default=1)
    matmul.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    if args.command == "model":
        config = json.loads(args.config)
        config.setdefault("vocab_size", 1024)
        for key, value in (("hidden_dim", 512), ("num_layers", 2), ("num_heads", 8), ("ff_dim", 2048)):
            config.setdefault(key, value)
        result = _measure_here(args.model, config, args.seq_len, args.batch_size, args.repeats, args.warmup,
                               args.threads, args.seed)
        _print_result(result, args.json,
                      f"{result['model']} seq_len={result['seq_len']}: median {result['median_s']:.4f} s "
                      f"(min {result['min_s']:.4f}, max {result['max_s']:.4f}); forward peak "
                      f"{result['peak_bytes'] / 2**20:.1f} MiB over baseline "
                      f"{result['baseline_rss_bytes'] / 2**20:.1f} MiB")
    elif args.command == "attention":
        _check_attention_args(args.impl, args.mode, args.seq_len, args.hidden_dim, args.num_heads, args.chunk_size,
                              args.batch_size)
        result = _measure_attention_here(args.impl, args.mode, args.seq_len, args.hidden_dim, args.num_heads,
                                         args.chunk_size, args.batch_size, args.repeats, args.warmup, args.threads,
                                         args.seed, args.max_timed_s)
        unit = "per token" if args.mode == "decode" else "per call"
        text = (f"{result['impl']} {result['mode']} seq_len={result['seq_len']}: median {result['median_s']:.4g} s "
                f"{unit} (mean {result['mean_s']:.4g}, min {result['min_s']:.4g}, max {result['max_s']:.4g}, "
                f"{result['repeats']} timed); peak {result['peak_bytes'] / 2**20:.1f} MiB over baseline "
                f"{result['baseline_rss_bytes'] / 2**20:.1f} MiB")
        if result["gflops_per_s"] is not None:
            text += f"; {result['flops'] / 1e9:.2f} GFLOP, {result['gflops_per_s']:.1f} GFLOP/s"
        if args.mode == "decode":
            text += f"; state {result['state_bytes'] / 2**20:.2f} MiB for {result['state_tokens']} tokens"
        _print_result(result, args.json, text)
    else:
        result = _matmul_here(MATMUL_SHAPES, args.repeats, args.threads, args.seed)
        _print_result(result, args.json, f"fp32 matmul: {result['gflops_per_s']:.1f} GFLOP/s best on "
                      f"{result['threads']} threads; " + ", ".join(
                          f"{r['m']}x{r['k']}x{r['n']}: {r['gflops_per_s']:.1f}" for r in result["shapes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
