"""bsbr.experiment: the shared notebook opening and the atomic metrics writer."""

import json
import platform
from pathlib import Path

import pytest
import torch

from bsbr.experiment import (ResumeLog, check_ints, fingerprint, keep_freed_memory, model_description,
                             source_fingerprint, start_experiment, write_json, write_metrics)


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
    monkeypatch.setenv("BSBR_PROFILE", "quick")  # what pipelines/run_notebook.py sets for the kernel
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
    assert "params profile: quick\n" in printed


def test_profile_of_run_is_none_outside_the_pipeline(monkeypatch):
    from bsbr.experiment import profile_of_run

    monkeypatch.delenv("BSBR_PROFILE", raising=False)
    assert profile_of_run() == "none"
    monkeypatch.setenv("BSBR_PROFILE", "publication")
    assert profile_of_run() == "publication"


def test_start_experiment_rejects_bad_arguments_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="metrics_path"):
        start_experiment({"out_dir": "x"})
    with pytest.raises(ValueError, match="threads"):
        start_experiment({"out_dir": "x", "metrics_path": "m.json"}, threads=-1)
    assert Path.cwd() == tmp_path and not (tmp_path / "x").exists()


def test_model_description_names_a_hub_id_as_given():
    assert model_description("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"


def test_load_base_and_conversion_names_a_missing_file_before_loading(tmp_path):
    from bsbr.experiment import load_base_and_conversion

    with pytest.raises(ValueError, match=r"calibrated_path: no file .*missing\.safetensors"):
        load_base_and_conversion(tmp_path / "missing.safetensors")


def test_load_base_and_conversion_loads_the_original_and_the_file(normalized_checkpoint, capsys):
    from bsbr.convert import BSBRLlamaAttention
    from bsbr.experiment import load_base_and_conversion

    base, tokenizer, converted, settings, seconds = load_base_and_conversion(normalized_checkpoint)
    assert settings["retrieval"] == "normalized" and settings["chunk_size"] == 128
    assert settings["normalized_options"]["sink_size"] == 4 and seconds > 0
    assert not any(isinstance(m, BSBRLlamaAttention) for m in base.modules())  # the original stays unconverted
    assert sum(isinstance(m, BSBRLlamaAttention) for m in converted.modules()) == base.config.num_hidden_layers
    assert not converted.training and tokenizer.encode("a", add_special_tokens=False)
    printed = capsys.readouterr().out
    assert "model: " in printed and f"loaded the model and {normalized_checkpoint} (" in printed
    assert "gguf sha256: " in printed


def test_importing_bsbr_experiment_silences_the_iprogress_warning_of_tqdm_auto():
    # tqdm.auto warns when imported in a kernel without ipywidgets: a notebook's first import must already filter it.
    import subprocess
    import sys

    code = ("import warnings, bsbr.experiment; "
            "warnings.warn('IProgress not found. Please update jupyter and ipywidgets.'); print('done')")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout == "done\n" and "IProgress" not in proc.stderr


def test_keep_freed_memory_sets_glibc_malloc_where_there_is_one():
    # glibc accepts the three mallopt settings (True); elsewhere there is no mallopt and nothing changes (False)
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    assert keep_freed_memory() is keep_freed_memory()  # the same settings again: the same answer
    block = torch.ones(2**22)  # 16 MiB, allocated and freed with the settings in force
    assert float(block.sum()) == 2**22


def test_fingerprint_and_source_fingerprint_change_exactly_with_their_inputs(tmp_path):
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})  # key order does not matter
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) and len(fingerprint({"a": 1})) == 16
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n")
    second.write_text("y = 2\n")
    both = source_fingerprint([second, first])
    assert both == source_fingerprint([first, second])  # sorted by path
    first.write_text("x = 2\n")
    assert source_fingerprint([first, second]) != both
    with pytest.raises(FileNotFoundError):
        source_fingerprint([tmp_path / "missing.py"])


def test_resume_log_keeps_finished_units_across_runs_and_drops_a_cut_line(tmp_path):
    log = ResumeLog(tmp_path / "log", "k1")
    assert log.resumed == 0 and log.get("u1") is None
    stored = log.add("u1", {"row": {"correct": True, "answer_logprob": -0.123456789012345}, "seconds": 1.5})
    assert stored["unit"] == "u1" and log.get("u1") == stored
    log.add("u2", {"row": {"correct": False}, "seconds": 2.0})
    again = ResumeLog(tmp_path / "log", "k1")  # the next run of the same computation
    assert again.resumed == 2 and again.get("u1")["row"]["answer_logprob"] == -0.123456789012345  # floats exact
    assert ResumeLog(tmp_path / "log", "k2").resumed == 0  # another computation never reads these rows
    with open(tmp_path / "log" / "k1.jsonl", "a") as handle:  # killed while writing u3
        handle.write('{"row": {"correct": tr')
    cut = ResumeLog(tmp_path / "log", "k1")
    assert cut.resumed == 2 and cut.dropped == 1 and cut.get("u3") is None
    cut.add("u3", {"row": {"correct": True}, "seconds": 3.0})  # on a fresh line, not glued to the cut one
    final = ResumeLog(tmp_path / "log", "k1")
    assert final.resumed == 3 and final.dropped == 1 and final.get("u3")["row"] == {"correct": True}
    for bad in ("", "../k", "a/b", None):
        with pytest.raises(ValueError, match="key must be"):
            ResumeLog(tmp_path, bad)
    nothing = ResumeLog(None, "k1")  # no folder: nothing kept, nothing written
    nothing.add("u1", {"row": {}})
    assert nothing.path is None and ResumeLog(None, "k1").resumed == 0


def test_profile_sentence_names_the_section_and_profile(monkeypatch):
    from bsbr.experiment import PROFILE_ENV, profile_sentence

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert profile_sentence("06_long_documents") == (
        "Parameters: the notebook's own defaults, a smoke run outside the pipeline; `dvc repro` runs section "
        "`06_long_documents` of `params.yaml` in profile `quick` (`make repro`'s default) or `publication` (the "
        "published reports).")
    monkeypatch.setenv(PROFILE_ENV, "quick")
    assert profile_sentence("01_scaling") == ("Parameters: section `01_scaling` of `params.yaml`, profile `quick` "
                                              "(`make repro`'s default).")
    monkeypatch.setenv(PROFILE_ENV, "publication")
    assert profile_sentence("01_scaling").endswith("profile `publication` (the published reports).")
