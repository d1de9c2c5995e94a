"""bsbr.measure: /proc memory fields, the baseline/peak pair, timed calls and their summary, threads and timeout
checks, and running a function in a fresh process. No timing is asserted."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from bsbr.measure import (check_threads_timeout, median_interval, memory_baseline, memory_peak, proc_status_bytes,
                          run_isolated, set_threads, time_summary, timed_calls)

LINUX = sys.platform.startswith("linux")


@pytest.mark.skipif(not LINUX, reason="/proc/self/status is Linux's")
def test_proc_status_bytes_reads_kib_fields_as_bytes():
    rss, hwm = proc_status_bytes("VmRSS"), proc_status_bytes("VmHWM")
    assert rss > 10 * 2**20 and rss % 1024 == 0  # Python + torch are resident; the file reports kB
    assert hwm >= rss
    assert proc_status_bytes("NoSuchField") is None


def _allocate_and_measure(megabytes: int) -> dict:
    """In a fresh process: the baseline, then a touched buffer of ``megabytes``, then the peak."""
    baseline, method = memory_baseline()
    buffer = bytearray(megabytes * 2**20)  # zero-filled: every page is written, so it is resident
    peak = memory_peak()
    del buffer
    return {"baseline": baseline, "method": method, "peak": peak, "pid": os.getpid()}


def test_memory_peak_minus_baseline_is_what_the_work_added_in_a_fresh_process():
    small = run_isolated(_allocate_and_measure, {"megabytes": 1}, "1 MiB", timeout=120)
    large = run_isolated(_allocate_and_measure, {"megabytes": 64}, "64 MiB", timeout=120)
    assert small["pid"] != os.getpid() != large["pid"]
    if LINUX and small["method"].startswith("VmRSS"):
        assert large["peak"] - large["baseline"] >= 60 * 2**20
        assert small["peak"] - small["baseline"] < 16 * 2**20  # the reset left out everything before the baseline
    assert large["peak"] >= large["baseline"]


def test_timed_calls_warmup_repeats_and_early_stop():
    calls = []
    times = timed_calls(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    calls.clear()
    times = timed_calls(lambda: calls.append(1), repeats=10, warmup=0, max_timed_s=0.0)
    assert len(calls) == 1 and len(times) == 1  # at least one timed call, then the total passes 0 s


def test_time_summary_of_known_seconds():
    assert time_summary([3.0, 1.0, 2.0, 10.0]) == {"repeats": 4, "median_s": 2.5, "median_low_s": 1.0,
                                                   "median_high_s": 10.0, "mean_s": 4.0, "min_s": 1.0,
                                                   "max_s": 10.0, "times_s": [3.0, 1.0, 2.0, 10.0]}


def test_set_threads_sets_and_reports_torchs_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1  # None leaves it as it is
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads, timeout, match", [(0, None, "threads"), (1.5, None, "threads"),
                                                      (None, 0, "timeout"), (None, True, "timeout"),
                                                      (None, "5", "timeout")])
def test_check_threads_timeout_rejects_bad_values(threads, timeout, match):
    with pytest.raises(ValueError, match=match):
        check_threads_timeout(threads, timeout)
    check_threads_timeout(None, None)
    check_threads_timeout(2, 0.5)


def _fail(message: str):
    raise KeyError(message)


def _sleep(seconds: float):
    import time

    time.sleep(seconds)


def _die():
    os._exit(3)


def test_run_isolated_reports_the_childs_error_its_death_and_a_timeout():
    with pytest.raises(RuntimeError, match=r"(?s)measuring the thing failed:\n.*KeyError: 'boom'"):
        run_isolated(_fail, {"message": "boom"}, "the thing", timeout=120)
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\) before reporting a result"):
        run_isolated(_die, {}, "a dying thing", timeout=120)
    with pytest.raises(RuntimeError, match="took longer than 0.2 s"):
        run_isolated(_sleep, {"seconds": 30}, "a slow thing", timeout=0.2)


def test_median_interval_is_the_sign_test_interval_of_the_median():
    """[x₍ⱼ₎, x₍ₙ₋ⱼ₊₁₎], the largest j with coverage 1 − 2·P(Bin(n, ½) ≤ j − 1) ≥ the confidence, by counting."""
    def coverage(n, j):  # P(j ≤ Bin(n, ½) ≤ n − j), summed from the binomial coefficients
        return sum(math.comb(n, k) for k in range(j, n - j + 1)) / 2**n

    for n in (1, 2, 3, 5, 6, 7, 20, 128, 129):
        times = np.random.default_rng(n).permutation(np.arange(1, n + 1) * 1e-3)  # unsorted on purpose
        j = max([j for j in range(1, (n + 1) // 2 + 1) if coverage(n, j) >= 0.95], default=1)
        assert median_interval(times) == pytest.approx(((j) * 1e-3, (n - j + 1) * 1e-3))
        low, high = median_interval(times, confidence=0.5)
        assert j * 1e-3 <= low <= high <= (n - j + 1) * 1e-3  # a lower confidence gives an interval inside it
    assert median_interval(np.arange(1, 129)) == (53.0, 76.0)  # the sign-test 95 % interval for n = 128
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # 3 calls: the fastest and slowest (coverage 75 %)
    assert median_interval([1.0] * 10 + [500.0]) == (1.0, 1.0)  # one slow outlier among many calls does not widen it
    for bad in ([], [1.0, float("nan")], [-1.0], ["x"]):
        with pytest.raises(ValueError, match="times must be"):
            median_interval(bad)
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence must be in"):
            median_interval([1.0, 2.0], confidence)



def test_scaling_names_the_same_median_interval():
    from bsbr import scaling

    assert scaling.median_interval is median_interval and scaling.MEDIAN_CONFIDENCE == 0.95
