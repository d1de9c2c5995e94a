"""pipelines/build_index.py: whether a report run at an earlier revision is current at the index's revision, as DVC
would judge it (its stage's definition, deps, params and input stages); and the headline values the index writes as
the reports and README write them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "pipelines"))
import build_index  # noqa: E402
import readme_results  # noqa: E402

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


def test_the_index_names_report_04s_best_router_in_words_as_readme_does():
    metrics = {"best_router": {"method": "minmax_p8_head", "block_size": 64, "recall": 0.6166}, "headline_budget": 256}
    best = build_index.headline_rows("04_attention_analysis", metrics)[0]
    assert best["label"] == ("recall of the best router (min/max keys (Quest), 8-token pages, per head; blocks of 64) "
                             "at a 256-token budget")
    assert best["value"] == "0.617"


def test_the_index_says_bsbr_did_not_reach_report_07s_target_as_the_report_and_readme_do():
    metrics = json.loads((ROOT / "reports" / "metrics" / "07_training.json").read_text())
    metrics["setup"]["seeds"] = 2
    metrics["models"]["bsbr"].update(steps_to_target=None, steps_to_target_low=None, steps_to_target_high=None,
                                     seeds_reaching_target=0)
    fastest, bsbr = build_index.headline_rows("07_training", metrics)[2:]
    assert fastest["label"] == f"steps to {build_index.format_value('', metrics['target_val_loss'])} nats/byte: " \
                               f"fastest ({metrics['fastest']}, t over seeds)"
    assert bsbr == {"label": "BSBR's steps to the same loss (t over seeds)", "value": "not reached by every seed (0/2)",
                    "goal": "", "verdict": ""}
    assert "bsbr not reached by every seed (0/2)" in readme_results.training(metrics)
    metrics["models"]["bsbr"].update(steps_to_target=1234.5, steps_to_target_low=1100.2, steps_to_target_high=1368.8,
                                     seeds_reaching_target=2)
    assert build_index.headline_rows("07_training", metrics)[3]["value"] == "1,230 [1,100, 1,370]"  # 3 digits
    assert "bsbr 1,230 [1,100, 1,370]" in readme_results.training(metrics)


def test_the_index_gives_report_08s_accuracies_in_percent_as_the_report_does():
    metrics = {"architectures": {"standard": {"accuracy": 0.241, "ci_low": 0.2, "ci_high": 0.3, "n_seeds": 3},
                                 "bsbr": {"accuracy": 0.5, "ci_low": None, "ci_high": None, "state_values": 19712},
                                 "sliding_window": {"state_values": 1920}},
               "goals": {"attention_accuracy": {"goal": 0.95, "value": 0.241, "met": False},
                         "bsbr_vs": [{"model": "bsbr", "other": "sliding_window", "span": 8, "difference": 0.073512,
                                      "ci_low": -0.016512, "ci_high": 0.163}]},
               "spans": [8]}
    standard, bsbr, difference = build_index.headline_rows("08_associative_recall", metrics)
    assert standard == {"label": "full attention's recall accuracy (MQAR, 3 seeds; t-interval)",
                        "value": "24.1% [20.0, 30.0]", "goal": "≥ 95%", "verdict": "missed"}
    assert bsbr["label"] == "BSBR's accuracy, state 19,712 values" and bsbr["value"] == "50.0%"  # one seed
    assert difference["value"] == "7.35 points [-1.65, 16.3]"


def test_the_index_says_on_how_many_bins_report_06s_flatness_verdict_rests():
    flat = {"met": True, "max_beyond_ppl": 30.0, "reference_ppl": 24.0}
    metrics = {"flatness": {"blocks": dict(flat)}, "flat_from": 8192, "flat_ratio": 1.5, "decode": {}}
    row = build_index.headline_rows("06_long_documents", metrics)[0]
    assert row["value"] == "1.25×" and row["verdict"] == "met"  # a run from before the count was recorded
    metrics["flatness"]["blocks"].update(bins_beyond=2)
    row = build_index.headline_rows("06_long_documents", metrics)[0]
    assert row["value"] == "1.25× over 2 bins" and row["goal"] == "≤ 1.5×"
    metrics["flatness"]["blocks"].update(bins_beyond=1, max_beyond_ppl=48.0)
    assert build_index.headline_rows("06_long_documents", metrics)[0]["value"] == "2.00× over 1 bin"
