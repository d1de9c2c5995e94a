"""bsbr.experiment: the shared notebook opening and the atomic metrics writer."""

import json
from pathlib import Path

import pytest
import torch

from bsbr.experiment import check_ints, model_description, start_experiment, write_json, write_metrics


def test_write_metrics_is_sorted_json_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "metrics" / "00_x.json"
    write_metrics(path, {"b": 1.5, "a": {"d": [1, 2], "c": None}})
    assert path.read_text() == json.dumps({"a": {"c": None, "d": [1, 2]}, "b": 1.5}, indent=2, sort_keys=True) + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["00_x.json"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), [1.0, float("-inf")]])
def test_write_metrics_rejects_non_finite_numbers_and_keeps_the_old_file(tmp_path, bad):
    path = tmp_path / "m.json"
    write_metrics(path, {"old": 1})
    with pytest.raises(ValueError, match="nested"):
        write_metrics(path, {"nested": {"x": bad}})
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_write_json_failure_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"old": 1})
    with pytest.raises(TypeError):
        write_json(path, {"new": object()})
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_check_ints_names_the_argument():
    check_ints(0, a=0, b=3)
    check_ints(1, allow_none=True, a=None)
    for kwargs in ({"seq_len": 0}, {"seq_len": True}, {"seq_len": 1.0}, {"seq_len": None}):
        with pytest.raises(ValueError, match="seq_len"):
            check_ints(1, **kwargs)


def test_start_experiment_changes_to_the_root_creates_folders_and_prints_provenance(tmp_path, capsys, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root / "notebooks")
    threads = torch.get_num_threads()
    out_dir = tmp_path / "out"
    metrics = tmp_path / "metrics" / "00_x.json"
    try:
        exp = start_experiment({"n": 3, "out_dir": str(out_dir), "metrics_path": str(metrics)}, threads=1, seed=7)
        assert torch.get_num_threads() == 1
        first = torch.rand(1)
        torch.manual_seed(7)
        assert torch.equal(first, torch.rand(1))
    finally:
        torch.set_num_threads(threads)
    assert Path.cwd() == root
    assert out_dir.is_dir() and metrics.parent.is_dir()
    printed = capsys.readouterr().out
    assert "  n = 3" in printed and "git revision: " in printed and "load average" in printed
    assert exp.out_dir == out_dir and exp.metrics_path == metrics and exp.machine["threads"] == 1
    assert exp.revision == printed.split("git revision: ")[1].split()[0]


def test_start_experiment_rejects_bad_arguments_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="metrics_path"):
        start_experiment({"out_dir": "x"})
    with pytest.raises(ValueError, match="threads"):
        start_experiment({"out_dir": "x", "metrics_path": "m.json"}, threads=-1)
    assert Path.cwd() == tmp_path and not (tmp_path / "x").exists()


def test_model_description_names_a_hub_id_as_given():
    assert model_description("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
