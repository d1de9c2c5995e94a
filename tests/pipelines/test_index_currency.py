"""pipelines/build_index.py: whether a report run at an earlier revision is current at the index's revision, as DVC
would judge it (its stage's definition, deps, params and input stages)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "pipelines"))
import build_index  # noqa: E402

DVC = {"stages": {
    "fetch": {"cmd": "python fetch.py", "deps": ["fetch.py"], "params": ["fetch.version"], "outs": ["data/model"]},
    "01_a": {"cmd": "python run.py a", "deps": ["run.py", "bsbr/a.py", "data/model/weights.bin"],
             "params": ["profile", "profiles.publication.01_a", "01_a.n"],
             "outs": ["data/01_a"], "metrics": [{"reports/metrics/01_a.json": {"cache": False}}]},
    "02_b": {"cmd": "python run.py b", "deps": ["run.py", "bsbr/b.py"], "params": ["02_b.n"], "outs": ["data/02_b"]},
    "render": {"foreach": ["01_a", "02_b"],
               "do": {"cmd": "python render.py ${item}", "deps": ["render.py", "data/${item}/${item}.ipynb"],
                      "outs": [{"reports/${item}.html": {"cache": False}}]}},
}}
PARAMS = {"profile": "publication", "fetch": {"version": 1}, "01_a": {"n": 1}, "02_b": {"n": 1},
          "profiles": {"publication": {"01_a": {"n": 2}}}}


def _git(repo, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo, files: dict) -> str:
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "change")
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    run = _commit(tmp_path, {"dvc.yaml": yaml.safe_dump(DVC), "params.yaml": yaml.safe_dump(PARAMS),
                             "run.py": "1\n", "fetch.py": "1\n", "render.py": "1\n", "bsbr/a.py": "1\n",
                             "bsbr/b.py": "1\n", "reports/01_a.html": "run\n"})
    return tmp_path, run


def test_a_report_is_current_while_nothing_its_stage_depends_on_changed(repo):
    root, run = repo
    # another stage's code and params, and the report outputs themselves: not the report's stage
    params = {**PARAMS, "02_b": {"n": 5}}
    later = _commit(root, {"bsbr/b.py": "2\n", "params.yaml": yaml.safe_dump(params), "reports/01_a.html": "x\n"})
    assert build_index.stage_changes("01_a", run, later, root) == []
    assert build_index.stage_changes("02_b", run, later, root) == ["bsbr/b.py", "params.yaml: 02_b.n"]
    row = {"name": "01_a", "revision": run}
    assert build_index.currency(row, later, root) == "current"
    assert build_index.currency({"name": "01_a", "revision": run + "+dirty"}, later, root) == "unknown"


@pytest.mark.parametrize("files, change", [
    ({"bsbr/a.py": "2\n"}, "bsbr/a.py"),  # its code
    ({"render.py": "2\n"}, "render.py"),  # its render stage's script
    ({"fetch.py": "2\n"}, "fetch.py"),  # the stage making its data/model input
    ({"params.yaml": yaml.safe_dump({**PARAMS, "profile": "quick"})}, "params.yaml: profile"),
    ({"params.yaml": yaml.safe_dump({**PARAMS, "profiles": {"publication": {"01_a": {"n": 3}}}})},
     "params.yaml: profiles.publication.01_a"),
    ({"params.yaml": yaml.safe_dump({**PARAMS, "fetch": {"version": 2}})}, "params.yaml: fetch.version"),
    ({"dvc.yaml": yaml.safe_dump({"stages": {**DVC["stages"], "01_a": {**DVC["stages"]["01_a"],
                                                                      "cmd": "python run.py a --fast"}}})},
     "dvc.yaml: stage 01_a"),
])
def test_a_changed_dependency_makes_the_report_stale_and_is_named(repo, files, change):
    root, run = repo
    later = _commit(root, files)
    assert change in build_index.stage_changes("01_a", run, later, root)
    assert build_index.currency({"name": "01_a", "revision": run}, later, root).startswith("stale: ")
    assert build_index.stage_changes("01_a", run, "0" * 40, root) is None  # an unknown revision: cannot tell


def test_a_report_rendered_again_is_judged_by_its_render_revision_for_the_renderer_only(repo):
    root, run = repo
    rendered = _commit(root, {"render.py": "2\n"})  # a new renderer: every report re-rendered from the same notebook
    later = _commit(root, {"bsbr/b.py": "2\n"})
    row = {"name": "01_a", "revision": run, "rendered_at": rendered}
    assert build_index.stage_changes("01_a", run, later, root) == ["render.py"]  # judged from the run alone
    assert build_index.stage_changes("01_a", run, later, root, rendered_since=rendered) == []
    assert build_index.currency(row, later, root) == "current"
    assert build_index.currency({**row, "rendered_at": rendered + "+dirty"}, later, root).startswith("stale: ")
    newer = _commit(root, {"render.py": "3\n"})  # the renderer changed after the render
    assert build_index.currency(row, newer, root) == "stale: render.py"
    code = _commit(root, {"bsbr/a.py": "2\n"})  # the notebook's own code changed: stale, whenever it was rendered
    assert build_index.currency({**row, "rendered_at": newer}, code, root) == "stale: bsbr/a.py"
    assert build_index.currency({"name": "01_a", "revision": code, "rendered_at": rendered}, code, root) == (
        "stale: render.py")  # run at this revision, rendered by an older renderer
