"""bsbr.provenance: the machine header (with the load average) and the git revision's source-only dirty rule."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from bsbr import provenance
from bsbr.provenance import OUTPUT_PATHS, git_revision, load_average, machine_info, other_cpu_load, source_dirty


def test_machine_info_header():
    info = machine_info(threads=3)
    assert set(info) == {"cpu", "cores", "torch", "threads", "python", "platform", "load_average"}
    assert info["threads"] == 3 and info["cores"] >= 1 and info["cpu"]
    assert info["torch"] == torch.__version__
    assert machine_info()["threads"] == torch.get_num_threads()
    revision = git_revision()
    assert revision == "unknown" or len(revision.removesuffix("+dirty")) == 40


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="no load average on this platform")
def test_load_average_is_the_systems_and_is_in_the_machine_header():
    load = load_average()
    assert isinstance(load, tuple) and len(load) == 3
    assert all(isinstance(value, float) and value >= 0 for value in load)
    header = machine_info()["load_average"]
    assert isinstance(header, list) and len(header) == 3 and all(value >= 0 for value in header)
    # the 15-minute average barely moves between two reads a moment apart
    assert header[2] == pytest.approx(os.getloadavg()[2], abs=1.0)


def test_load_average_is_none_where_the_platform_has_none(monkeypatch):
    def unavailable():
        raise OSError("load average unobtainable")

    monkeypatch.setattr(provenance.os, "getloadavg", unavailable)
    assert load_average() is None
    assert machine_info()["load_average"] is None


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    """A git repository with a source, a notebook, params, pipeline outputs and a lock file, all committed."""
    files = {"bsbr/core.py": "x = 1\n", "notebooks/01 scaling.ipynb": "{}\n", "params.yaml": "a: 1\n",
             "data/scaling/result.csv": "n,t\n1,2\n", "reports/01_scaling.html": "<p>1</p>\n",
             "dvc.lock": "stages: {}\n", "data_notes.md": "not an output\n"}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_git_revision_is_head_and_clean_after_commit(repo):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_revision(repo) == head and len(head) == 40
    assert source_dirty(repo) is False


def test_pipeline_outputs_do_not_make_the_revision_dirty(repo):
    assert OUTPUT_PATHS == ("data", "reports", "dvc.lock")
    (repo / "data/scaling/result.csv").write_text("n,t\n1,3\n")  # a stage rewrote its output
    (repo / "reports/01_scaling.html").write_text("<p>2</p>\n")
    (repo / "dvc.lock").write_text("stages: {scaling: {}}\n")
    _git(repo, "add", "reports/01_scaling.html")  # staged or not
    (repo / "data/scaling/new.csv").write_text("untracked\n")
    (repo / "scratch.py").write_text("untracked source: not looked at\n")
    assert source_dirty(repo) is False
    assert not git_revision(repo).endswith("+dirty")


def _head(repo):
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_a_commit_of_outputs_only_keeps_the_revision(repo):
    sources = _head(repo)
    (repo / "reports/01_scaling.html").write_text("<p>part 1</p>\n")  # one part of a long run, committed
    (repo / "dvc.lock").write_text("stages: {scaling: {}}\n")
    _git(repo, "commit", "-q", "-am", "outputs of part 1")
    assert _head(repo) != sources and git_revision(repo) == sources
    (repo / "data_notes.md").write_text("a source changed\n")  # then a source commit moves it
    _git(repo, "commit", "-q", "-am", "source")
    assert git_revision(repo) == _head(repo) != sources
    (repo / "bsbr/core.py").write_text("x = 5\n")  # and an uncommitted source marks it
    assert git_revision(repo) == _head(repo) + "+dirty"


@pytest.mark.parametrize("change", [
    lambda repo: (repo / "bsbr/core.py").write_text("x = 2\n"),  # code
    lambda repo: (repo / "notebooks/01 scaling.ipynb").write_text('{"cells": []}\n'),  # a notebook (space in name)
    lambda repo: (repo / "params.yaml").write_text("a: 2\n"),  # params
    lambda repo: (repo / "data_notes.md").write_text("changed\n"),  # starts with "data" but is not under data/
    lambda repo: (repo / "bsbr/core.py").unlink(),  # a deleted source
    lambda repo: _git(repo, "mv", "data/scaling/result.csv", "bsbr/result.csv"),  # renamed out of data/
    lambda repo: _git(repo, "mv", "bsbr/core.py", "data/core.py"),  # a source renamed into data/
])
def test_a_changed_source_makes_the_revision_dirty(repo, change):
    (repo / "dvc.lock").write_text("changed too\n")
    change(repo)
    assert source_dirty(repo) is True
    assert git_revision(repo).endswith("+dirty") and len(git_revision(repo)) == 40 + len("+dirty")


def test_staged_source_change_is_dirty(repo):
    (repo / "bsbr/core.py").write_text("x = 3\n")
    _git(repo, "add", "bsbr/core.py")
    assert git_revision(repo).endswith("+dirty")


def test_outside_a_checkout_the_revision_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # even if /tmp were in a checkout
    assert git_revision(tmp_path) == "unknown" and source_dirty(tmp_path) is None
    _git(tmp_path, "init", "-q")  # before the first commit
    assert git_revision(tmp_path) == "unknown"


def test_other_cpu_load_counts_other_processes_and_not_this_one():
    """A child process spinning one core is counted (about 1 core); this process spinning a thread is not."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 4\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # the child is running
        others = other_cpu_load(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert others is not None and 0.7 <= others <= 2.5

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        mine = other_cpu_load(1.5)
    finally:
        stop.set()
        thread.join()
    assert mine < others - 0.5  # its own busy thread is subtracted
    for bad in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="seconds"):
            other_cpu_load(bad)


def test_other_cpu_load_is_none_without_proc(monkeypatch):
    monkeypatch.setattr(provenance, "_cpu_ticks", lambda: None)
    assert other_cpu_load(0.01) is None


def test_machine_busy_reads_other_processes_first_and_the_load_average_only_without_them():
    from bsbr.provenance import BUSY_CORES, machine_busy

    assert BUSY_CORES == 0.5
    assert machine_busy([0.01, 0.005], [(1.9, 1.9, 1.9)], cores=2) is False  # the lagging load average is ignored
    assert machine_busy([0.01, 0.51], cores=2) is True  # after the timings counts too
    assert machine_busy([None, 0.5], cores=2) is False  # not more than half a core
    assert machine_busy([None, None], [(1.01, 0.2, 0.1)], cores=2) is True  # no /proc: the 1-min load average
    assert machine_busy([], [None, (0.99, 3.0, 3.0)], cores=2) is False
    assert machine_busy([], [], cores=2) is False
    for bad in ([-0.1], ["0.3"], [True]):
        with pytest.raises(ValueError, match="other_cores"):
            machine_busy(bad, cores=2)
    with pytest.raises(ValueError, match="load_averages"):
        machine_busy([], [(1.0, 2.0)], cores=2)
    with pytest.raises(ValueError, match="cores"):
        machine_busy([0.1], cores=0)
