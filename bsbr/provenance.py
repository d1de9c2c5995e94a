"""Provenance: which machine, which code, and how busy the machine was, for the header of every result.

    machine_info(threads=2)   # {"cpu", "cores", "torch", "threads", "python", "platform", "load_average"}
    git_revision()            # "3f2c...e1" or "3f2c...e1+dirty" or "unknown": the sources' revision
    load_average()            # (1 min, 5 min, 15 min) runnable processes, or None
    other_cpu_load()          # cores that *other* processes used over the last 2 s, or None
    machine_busy([0.02, 0.7], [(0.3, 1.2, 1.6)], cores=2)   # True: a timing's "the machine was busy" verdict

``+dirty`` means a *source* differs from the revision: a tracked file outside the pipeline's own outputs
(:data:`OUTPUT_PATHS`: ``data/``, ``reports/``, ``dvc.lock``) has uncommitted changes. A pipeline run rewrites its
outputs and the lock file; that does not make the code it ran any different from the revision, so it is not dirty.
Untracked files are not looked at.

For the same reason the revision is the newest commit that changed a source, not ``HEAD``: a commit that records
only pipeline outputs (a stage's reports and metrics, ``dvc.lock``) leaves it as it was. So a long run done in
parts, each part's outputs committed before the next starts, stamps every report with one revision as long as no
source changed in between.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

__all__ = ["BUSY_CORES", "OUTPUT_PATHS", "cpu_model", "git_revision", "load_average", "machine_busy", "machine_info",
           "other_cpu_load", "source_dirty"]

#: Other processes using more than this many cores (on average over :func:`other_cpu_load`'s seconds) make the
#: machine busy: the timings taken then are not a quiet-machine result (reports 01, 05 and 06 warn).
BUSY_CORES = 0.5

_REPO_ROOT = Path(__file__).resolve().parents[1]

#: Paths (relative to the repository root) that the pipeline writes: changes under them are outputs, not sources.
OUTPUT_PATHS = ("data", "reports", "dvc.lock")


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> tuple[float, float, float] | None:
    """The system load average (``os.getloadavg()``): runnable (and, on Linux, uninterruptible) processes averaged
    over the last 1, 5 and 15 minutes, or None where the platform has none (Windows).

    Recorded beside a timing, it tells whether the machine was shared while the timing was taken: a load above the
    cores the timing did not use means other work competed for them.
    """
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):  # AttributeError: no getloadavg (Windows); OSError: unobtainable
        return None
    return float(one), float(five), float(fifteen)


def _cpu_ticks() -> tuple[int, int] | None:
    """``(busy ticks of the whole machine, ticks of this process)`` from ``/proc`` (Linux), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in (fields + ["0"] * 8)[:8])
    return user + nice + system + irq + softirq + steal, int(mine[11]) + int(mine[12])  # utime + stime


def other_cpu_load(seconds: float = 2.0) -> float | None:
    """Cores that processes *other than this one* kept busy over the next ``seconds`` (this process's own CPU time,
    all its threads, subtracted), from ``/proc/stat`` and ``/proc/self/stat``; None where ``/proc`` is not there.

    Taken right before a timing, it says whether other work competes for the cores *now*. The 1-min load average
    cannot: it still carries a pipeline stage that finished a minute ago (in ``make repro`` report 05 starts right
    after report 04's forwards, at a load average near 2 on a quiet 2-core machine).

    Raises:
        ValueError: ``seconds`` not a number > 0.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"seconds must be a number > 0, got {seconds!r}")
    first = _cpu_ticks()
    started = time.monotonic()
    time.sleep(seconds)
    second = _cpu_ticks()
    elapsed = time.monotonic() - started
    if first is None or second is None:
        return None
    others = (second[0] - first[0]) - (second[1] - first[1])
    return max(0.0, others / os.sysconf("SC_CLK_TCK") / elapsed)


def machine_busy(other_cores, load_averages=(), cores: int | None = None) -> bool:
    """Whether timings ran on a busy machine, the one rule of reports 01, 05 and 06.

    Busy when other processes kept more than :data:`BUSY_CORES` cores busy in any of the ``other_cores`` readings
    (:func:`other_cpu_load`, taken right before and after the timings). Only when none of them was measured (no
    ``/proc``) does the 1-min load average decide: busy when any of ``load_averages`` is above half the ``cores``
    (it lags: a stage that finished a minute ago still counts in it).

    Args:
        other_cores: iterable of :func:`other_cpu_load` readings (cores, >= 0), None where not measured.
        load_averages: iterable of :func:`load_average` readings ``(1 min, 5 min, 15 min)`` or None.
        cores: logical CPUs; None means ``os.cpu_count()``.
    Raises:
        ValueError: a reading below 0 or not a number; ``cores`` not an integer >= 1.
    """
    if cores is None:
        cores = os.cpu_count() or 1
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores must be an integer >= 1, got {cores!r}")
    measured = [x for x in other_cores if x is not None]
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 for x in measured):
        raise ValueError(f"other_cores must be numbers >= 0 or None, got {list(other_cores)!r}")
    if measured:
        return max(measured) > BUSY_CORES
    loads = [load for load in load_averages if load is not None]
    if any(len(load) != 3 or not all(isinstance(x, (int, float)) and x >= 0 for x in load) for load in loads):
        raise ValueError(f"load_averages must be (1 min, 5 min, 15 min) readings >= 0 or None, got {loads!r}")
    return any(load[0] > cores * 0.5 for load in loads)


def machine_info(threads: int | None = None) -> dict:
    """Machine header for timing results.

    Args:
        threads: torch intra-op threads the measurements use; None reports ``torch.get_num_threads()`` here.
    Returns:
        dict with ``cpu`` (model name), ``cores`` (logical CPUs usable by this process), ``torch`` (version),
        ``threads``, ``python`` (version), ``platform`` and ``load_average`` (``[1 min, 5 min, 15 min]`` of
        :func:`load_average`, read now, or None).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 0
    load = load_average()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": None if load is None else list(load),
    }


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _is_output(path: str) -> bool:
    return any(path == output or path.startswith(output + "/") for output in OUTPUT_PATHS)


def source_dirty(repo: str | os.PathLike | None = None) -> bool | None:
    """Whether a tracked file outside :data:`OUTPUT_PATHS` differs from ``HEAD`` (staged or not) in ``repo``
    (default: this checkout); None outside a git checkout."""
    cwd = Path(repo) if repo is not None else _REPO_ROOT
    try:
        # -z: NUL-separated, paths relative to the repository root and unquoted; a rename or copy ("R"/"C" in
        # the two status letters) is followed by its source path, which counts too.
        entries = _git(cwd, "status", "--porcelain=v1", "-z", "--untracked-files=no").split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        paths.append(path)
        if "R" in status or "C" in status:
            paths.append(entries[i])
            i += 1
    return any(not _is_output(path) for path in paths)


def git_revision(repo: str | os.PathLike | None = None) -> str:
    """The newest commit of ``repo`` (default: this checkout) that changed a source: ``HEAD`` unless the commits
    after it touch only :data:`OUTPUT_PATHS`, with ``+dirty`` if a source has uncommitted changes
    (:func:`source_dirty`: a tracked file outside ``data/``, ``reports/`` and ``dvc.lock``).

    Returns ``"unknown"`` outside a git checkout or before the first commit.
    """
    cwd = Path(repo) if repo is not None else _REPO_ROOT
    excluded = [f":(exclude){path}" for path in OUTPUT_PATHS]
    try:
        revision = _git(cwd, "rev-parse", "HEAD").strip()
        # the newest commit whose diff touches a path outside the outputs (in a shallow clone: at most HEAD)
        revision = _git(cwd, "log", "-1", "--format=%H", revision, "--", ".", *excluded).strip() or revision
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("+dirty" if source_dirty(cwd) else "")
