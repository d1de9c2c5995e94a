"""Time the README's first command on a fresh clone: clone this repository at a revision into an empty folder, run
``make setup`` and ``make repro`` there (the default profile), and record how long each part and each report's
notebook took, the machine's load average before and after, whether every report was stamped with that one clean
revision and whether ``dvc status`` was clean afterwards.

    python pipelines/time_fresh_clone.py                  # HEAD, into a temporary folder; writes reports/fresh_clone_repro.json
    python pipelines/time_fresh_clone.py --into /tmp/fc --revision 0a3fdd9

The record (``reports/fresh_clone_repro.json``, written whole, then renamed) is what README's "fresh clone" paragraph
is made from (``pipelines/readme_results.py``). Run it on a quiet machine: nothing else may use the cores while it
times, and the record says the load average so that a reader can judge. ``make setup`` uses pip's cache when it is
warm (the record says the setup minutes; a cold cache adds the download of torch and the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bsbr.provenance import cpu_model, load_average
from build_index import collect  # how the index reads each report (its revision and run time among them)

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD = REPO_ROOT / "reports" / "fresh_clone_repro.json"
#: The README's promise for the default profile on a 2-core machine, setup included (minutes)
BUDGET_MINUTES = 45.0


def _timed(command: list[str], cwd: Path, env: dict) -> float:
    """Run ``command`` in ``cwd`` (its output goes to this process's stdout/stderr); seconds it took.

    Raises:
        subprocess.CalledProcessError: the command failed (the record is not written).
    """
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True)
    return time.perf_counter() - start


def time_fresh_clone(into: Path, revision: str = "HEAD", source: Path = REPO_ROOT) -> dict:
    """Clone ``source`` at ``revision`` into ``into`` (which must not exist or be empty), run ``make setup`` and
    ``make repro`` there, and return the record: revision (full hash), date (UTC, ISO 8601), machine (CPU, cores,
    Python), load_average_before / _after ((1, 5, 15)-minute; None where the platform has none), setup_seconds, repro_seconds, total_seconds,
    budget_minutes, notebooks ({report name: seconds its notebook ran}), other_seconds (repro minus the notebooks: the
    data stages, renders, index and README blocks), report_revisions (the revisions the reports were stamped with),
    dvc_status_clean (bool).

    Raises:
        ValueError: ``into`` exists and is not an empty folder.
        subprocess.CalledProcessError: the clone, the setup or the pipeline failed.
    """
    into = Path(into)
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise ValueError(f"into must be a new or empty folder, got {into}")
    full = subprocess.run(["git", "rev-parse", revision], cwd=source, check=True, capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(source), str(into)], check=True)
    subprocess.run(["git", "checkout", "--quiet", full], cwd=into, check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    load_before = load_average()
    setup = _timed(["make", "setup"], into, env)
    repro = _timed(["make", "repro"], into, env)
    load_after = load_average()
    status = subprocess.run([str(into / ".venv" / "bin" / "dvc"), "status", "--quiet"], cwd=into, env=env)
    reports = collect(into / "reports")
    notebooks = {row["name"]: row["run_seconds"] for row in reports if row["run_seconds"] is not None}
    return {
        "revision": full,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}",
        "load_average_before": None if load_before is None else [round(x, 2) for x in load_before],
        "load_average_after": None if load_after is None else [round(x, 2) for x in load_after],
        "setup_seconds": round(setup, 1),
        "repro_seconds": round(repro, 1),
        "total_seconds": round(setup + repro, 1),
        "budget_minutes": BUDGET_MINUTES,
        "notebooks": notebooks,
        "other_seconds": round(repro - sum(notebooks.values()), 1),
        "report_revisions": sorted({row["revision"] for row in reports}),
        "dvc_status_clean": status.returncode == 0,
    }


def write_record(record: dict, path: Path = RECORD) -> None:
    """Write ``record`` as JSON to ``path``: to a temporary file first, then renamed, so no half-written record."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=None, help="folder for the clone (default: a new temporary one)")
    parser.add_argument("--revision", default="HEAD", help="the revision to clone (default: HEAD)")
    args = parser.parse_args(argv)
    into = args.into if args.into is not None else Path(tempfile.mkdtemp(prefix="bsbr-fresh-clone-"))
    record = time_fresh_clone(into, args.revision)
    write_record(record)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
