"""pipelines/time_fresh_clone.py and README's fresh-clone paragraph made from its record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "pipelines"))  # the stage scripts are top-level modules
import readme_results  # noqa: E402
import time_fresh_clone  # noqa: E402

# A stand-in for the project: `make setup` makes .venv/bin/dvc (exit status from DVC_STATUS_EXIT), `make repro` writes
# two reports stamped with the clone's revision, each with its notebook's run time.
MAKEFILE = """\
setup:
\tmkdir -p .venv/bin && printf '#!/bin/sh\\nexit %s\\n' "$$(cat status_exit)" > .venv/bin/dvc && chmod +x .venv/bin/dvc
repro:
\tmkdir -p reports
\tprintf '<pre>git revision: %s</pre><p data-run-seconds="120.0">ran</p>' "$$(git rev-parse HEAD)" > reports/01_a.html
\tprintf '<pre>git revision: %s</pre><p data-run-seconds="30.0">ran</p>' "$$(git rev-parse HEAD)" > reports/02_b.html
"""


def _project(path, status_exit: int) -> str:
    path.mkdir()
    (path / "Makefile").write_text(MAKEFILE)
    (path / "status_exit").write_text(str(status_exit))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q"], cwd=path, check=True)
    subprocess.run(git + ["add", "."], cwd=path, check=True)
    subprocess.run(git + ["commit", "-qm", "project"], cwd=path, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.parametrize("status_exit", [0, 1])
def test_a_fresh_clone_is_timed_per_part_and_notebook_and_its_stamps_and_dvc_status_recorded(tmp_path, status_exit):
    revision = _project(tmp_path / "project", status_exit)
    record = time_fresh_clone.time_fresh_clone(tmp_path / "clone", source=tmp_path / "project")
    assert record["revision"] == revision
    assert record["notebooks"] == {"01_a": 120.0, "02_b": 30.0}  # the reports' own run times, not the wall clock
    assert record["report_revisions"] == [revision]
    assert record["dvc_status_clean"] is (status_exit == 0)
    assert record["total_seconds"] == pytest.approx(record["setup_seconds"] + record["repro_seconds"], abs=0.11)
    assert record["other_seconds"] == pytest.approx(record["repro_seconds"] - 150.0, abs=0.11)
    assert len(record["load_average_before"]) == len(record["load_average_after"]) == 3
    assert (tmp_path / "clone" / "reports" / "01_a.html").is_file()  # it ran in the clone, not in the project
    assert not (tmp_path / "project" / "reports").exists()


def test_the_clone_folder_must_be_new_or_empty(tmp_path):
    (tmp_path / "clone").mkdir()
    (tmp_path / "clone" / "left.txt").write_text("x")
    with pytest.raises(ValueError, match="into must be a new or empty folder"):
        time_fresh_clone.time_fresh_clone(tmp_path / "clone", source=ROOT)


def test_the_record_is_written_whole(tmp_path):
    path = tmp_path / "fresh_clone_repro.json"
    time_fresh_clone.write_record({"total_seconds": 1.5}, path)
    assert json.loads(path.read_text()) == {"total_seconds": 1.5}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


RECORD = {"revision": "0123456789abcdef", "date": "2026-12-03T17:40:00+00:00", "machine": "x86_64, 2 logical CPUs",
          "load_average_before": [0.1, 0.25, 0.5], "load_average_after": [1.9, 1.8, 1.7], "setup_seconds": 84.0,
          "repro_seconds": 2400.0, "total_seconds": 2484.0, "budget_minutes": 45.0,
          "notebooks": {"02_b": 600.0, "01_a": 180.0}, "other_seconds": 1620.0,
          "report_revisions": ["0123456789abcdef"], "dvc_status_clean": True}


def test_readme_paragraph_gives_the_record_against_the_budget(tmp_path):
    assert readme_results.fresh_clone(tmp_path) is None  # no record: the block is left alone
    (tmp_path / "fresh_clone_repro.json").write_text(json.dumps(RECORD))
    text = readme_results.fresh_clone(tmp_path)
    assert "Measured on a fresh clone at 0123456 on 2026-12-03" in text
    assert "**41.4 min in all** (budget 45: met): setup 1.4, the notebooks 01 3.0, 02 10.0, and 27.0 min" in text
    assert "load average 0.10/0.25/0.50 before and 1.90/1.80/1.70 after" in text
    assert "Every report was stamped with that one revision (0123456789), and `dvc status` was clean" in text
    missed = {**RECORD, "total_seconds": 2760.0, "report_revisions": ["0123456789abcdef", "fedcba9876543210"],
              "dvc_status_clean": False}
    (tmp_path / "fresh_clone_repro.json").write_text(json.dumps(missed))
    text = readme_results.fresh_clone(tmp_path)
    assert "**46.0 min in all** (budget 45: missed)" in text
    assert "The reports were stamped with 0123456789, fedcba9876, and `dvc status` was not clean" in text
    (tmp_path / "fresh_clone_repro.json").write_text(json.dumps({**RECORD, "load_average_before": None}))
    assert "load average not recorded before and 1.90/1.80/1.70 after" in readme_results.fresh_clone(tmp_path)
