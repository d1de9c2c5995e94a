"""bsbr.measure: /proc memory fields, the baseline/peak pair, timed calls and their summary, threads and timeout
checks, and running a function in a fresh process. No timing is asserted."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from bsbr.measure import (check_threads_timeout, memory_baseline, memory_peak, proc_status_bytes, run_isolated,
                          set_threads, time_summary, timed_calls)

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
    assert time_summary([3.0, 1.0, 2.0, 10.0]) == {"repeats": 4, "median_s": 2.5, "mean_s": 4.0, "min_s": 1.0,
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

