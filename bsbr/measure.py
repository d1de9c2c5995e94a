"""Measurement: a fresh process per measured point, timed calls, and the peak memory of a piece of work.

    result = run_isolated(measure_something, {"seq_len": 4096}, "something at 4096 tokens", timeout=600)

    # inside the measuring process:
    used = set_threads(2)
    baseline, method = memory_baseline()        # bytes resident now; the high-water mark is reset to it
    times = timed_calls(call, repeats=3, warmup=1)   # seconds per call
    peak = memory_peak()                        # bytes: the high-water mark since the baseline
    summary = time_summary(times)               # repeats, median_s (+ its 95 % interval), mean_s, min_s, max_s, times_s

Time: ``time.perf_counter`` around each call after ``warmup`` untimed calls; ``repeats`` timed calls (fewer if
``max_timed_s`` is given and their total passes it; at least one), summarised as median (the headline) with a
distribution-free 95 % interval for it (:func:`median_interval`), mean, min, max and all, in seconds.

Memory: the process's resident set size from ``/proc/self/status`` (Linux). :func:`memory_baseline` takes the
current RSS (``VmRSS``: weights, inputs, libraries already resident) and resets the kernel's high-water mark to it
(``/proc/self/clear_refs``, value 5); :func:`memory_peak` then reads the high-water mark ``VmHWM``, so
``peak - baseline`` is what the work in between added (activations, buffers, saved tensors and gradients,
allocator slack). ``getrusage(RUSAGE_SELF).ru_maxrss`` is *not* used on Linux: a child process inherits its
parent's peak there. Elsewhere ``ru_maxrss`` is the fallback. All sizes are in bytes.

Isolation (:func:`run_isolated`): each point runs in a new process forked from a *fork server*
(``multiprocessing`` start method ``forkserver``, preloading ``torch`` and ``bsbr``), so its peak memory is its
own and it shares no allocator state, thread pool or warm cache with the caller or other points. The server is a
fresh interpreter started once per calling process (not a fork of the caller: a notebook kernel's memory is not
inherited) that only imports, never runs a tensor op; forking from it saves the ~3 s ``import torch`` per point.
It keeps the ``bsbr`` code it imported: code edited afterwards reaches the points only after the caller restarts.
Where ``forkserver`` is unavailable (Windows) points are spawned.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import statistics
import sys
import threading
import time
import traceback
import types
from pathlib import Path

import torch

from bsbr._checks import check_positive_int

__all__ = ["FORKSERVER_PRELOAD", "check_threads_timeout", "memory_baseline", "memory_peak", "proc_status_bytes",
           "median_interval", "reset_peak_rss", "ru_maxrss_bytes", "run_isolated", "set_threads", "time_summary",
           "timed_calls"]

#: Modules the fork server imports before forking any point (more with :func:`run_isolated`'s ``preload``).
FORKSERVER_PRELOAD = ("torch", "bsbr", "bsbr.measure")


# ----------------------------------------------------------------------------- memory


def proc_status_bytes(field: str) -> int | None:
    """A size field of this process's ``/proc/self/status`` (Linux), e.g. ``"VmRSS"`` (resident set now) or
    ``"VmHWM"`` (its high-water mark), in bytes; None where the file or field is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (Linux reports KiB, macOS bytes); on Linux it includes the
    parent's peak at fork time, hence only a fallback."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_baseline() -> tuple[int, str]:
    """The memory baseline right before the measured work, and how it was read.

    Returns:
        ``(bytes, method)``: the current RSS with the high-water mark reset to it (``"VmRSS baseline, VmHWM peak
        after clear_refs reset"``); where no reset is possible the peak so far (``"VmHWM before and after (no
        reset)"``), or ``ru_maxrss`` (``"ru_maxrss before and after"``). Pair with :func:`memory_peak`.
    """
    current = proc_status_bytes("VmRSS")
    if current is not None and reset_peak_rss():
        return current, "VmRSS baseline, VmHWM peak after clear_refs reset"
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:  # no reset possible: the baseline is the peak so far
        return hwm, "VmHWM before and after (no reset)"
    return ru_maxrss_bytes(), "ru_maxrss before and after"


def memory_peak() -> int:
    """The RSS high-water mark in bytes (``VmHWM``, else ``ru_maxrss``): since :func:`memory_baseline`'s reset."""
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else ru_maxrss_bytes()


# ----------------------------------------------------------------------------- time


def check_threads_timeout(threads, timeout) -> None:
    """Raise ValueError unless ``threads`` is a positive int or None and ``timeout`` positive seconds or None."""
    if threads is not None:
        check_positive_int(threads=threads)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)`` unless None; returns the intra-op threads torch now uses."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def timed_calls(call, repeats: int, warmup: int, max_timed_s: float | None = None) -> list[float]:
    """Seconds of each of ``repeats`` timed ``call()`` after ``warmup`` untimed ones; stops early (after at least
    one timed call) once their total passes ``max_timed_s`` seconds (None: never)."""
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


#: Confidence of the interval of a point's median time (:func:`median_interval`).
MEDIAN_CONFIDENCE = 0.95


def median_interval(times, confidence: float = MEDIAN_CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval for the median time of a point from its timed calls.

    The order statistics ``(x₍ⱼ₎, x₍ₙ₋ⱼ₊₁₎)`` of the ``n`` sorted calls with the largest ``j`` whose coverage
    ``1 − 2·P(Binomial(n, ½) ≤ j − 1)`` is at least ``confidence`` (the sign-test interval for a median; Hollander,
    Wolfe & Chicken, *Nonparametric Statistical Methods*, 3rd ed., §3.6). It needs no assumption on the shape of the
    timing noise, and one slow outlier among many calls does not widen it. With too few calls for ``confidence``
    (fewer than 6 at 95 %) it is the fastest and slowest call, which cover the median with probability ``1 − 2¹⁻ⁿ``
    only (75 % for 3 calls).

    Args:
        times: the timed calls, seconds, ``[n]`` with ``n ≥ 1``, each finite and ≥ 0.
        confidence: the wanted coverage, in (0, 1).
    Returns:
        ``(low, high)`` seconds.
    Raises:
        ValueError: ``times`` empty or holding a negative or non-finite value; ``confidence`` not in (0, 1).
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    try:
        x = sorted(float(t) for t in (times.ravel().tolist() if hasattr(times, "ravel") else times))
    except (TypeError, ValueError):
        raise ValueError(f"times must be a non-empty sequence of finite seconds >= 0, got {times!r}") from None
    if not x or not all(math.isfinite(t) and t >= 0 for t in x):
        raise ValueError(f"times must be a non-empty sequence of finite seconds >= 0, got {times!r}")
    n, j = len(x), 1

    def below(k):  # P(Binomial(n, ½) ≤ k), exact
        return sum(math.comb(n, i) for i in range(k + 1)) / 2**n

    while j + 1 <= (n + 1) // 2 and 1 - 2 * below(j) >= confidence:  # coverage of (x₍ⱼ₊₁₎, x₍ₙ₋ⱼ₎)
        j += 1
    return x[j - 1], x[n - j]


def time_summary(times: list[float]) -> dict:
    """``{"repeats", "median_s", "median_low_s", "median_high_s", "mean_s", "min_s", "max_s", "times_s"}`` of a
    non-empty list of seconds; ``median_low_s``/``median_high_s``: :func:`median_interval` at 95 %.

    Raises:
        ValueError: as :func:`median_interval`.
    """
    low, high = median_interval(times)
    return {"repeats": len(times), "median_s": statistics.median(times), "median_low_s": low, "median_high_s": high,
            "mean_s": statistics.fmean(times), "min_s": min(times), "max_s": max(times), "times_s": times}


# ----------------------------------------------------------------------------- isolation


_CONTEXT = None
_START_LOCK = threading.Lock()
_PRELOAD: list[str] = list(FORKSERVER_PRELOAD)


def _context(preload=()):
    """The multiprocessing context every point runs in (a fork server preloading :data:`FORKSERVER_PRELOAD` and
    ``preload``; a preload takes effect if the server is not running yet)."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(list(_PRELOAD))
        else:
            _CONTEXT = multiprocessing.get_context("spawn")
    added = [module for module in preload if module not in _PRELOAD]
    if added and _CONTEXT.get_start_method() == "forkserver":
        _PRELOAD.extend(added)
        _CONTEXT.set_forkserver_preload(list(_PRELOAD))
    return _CONTEXT


def _isolated_entry(conn, function, kwargs: dict) -> None:
    """Child side of :func:`run_isolated`: send ``("ok", result)`` or ``("error", traceback text)``."""
    try:
        result = function(**kwargs)
    except BaseException:  # noqa: BLE001 - everything, as text, to the caller
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("ok", result))
    finally:
        conn.close()


def run_isolated(function, kwargs: dict, what: str, timeout: float | None = None, preload=()):
    """``function(**kwargs)`` in a new process (module docstring, *Isolation*) and its return value.

    Args:
        function: a module-level function (it is pickled by reference); it and its result must be picklable.
        kwargs: its keyword arguments (picklable).
        what: the point, for error messages (``"'bsbr' forward at seq_len=4096"``).
        timeout: seconds to wait for the result before the process is killed (None: no limit).
        preload: extra modules for the fork server to import (e.g. ``"torch._dynamo"``); effective only if the
            server has not started yet in this process.
    Returns:
        what ``function`` returned.
    Raises:
        RuntimeError: the function raised (its traceback tail is in the message), the process died (e.g. killed
        when out of memory) or it took longer than ``timeout``.
    """
    context = _context(preload)
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_entry, args=(send, function, kwargs), daemon=True)
    # The child needs nothing from the caller's __main__ (the target lives in this module), so hide it while the
    # process starts: multiprocessing would otherwise re-run the caller's script in the child, which recurses in a
    # script without an `if __name__ == "__main__":` guard.
    with _START_LOCK:  # one start at a time: callers on several threads (bsbr.mqar.train_mqar_runs) share __main__
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
