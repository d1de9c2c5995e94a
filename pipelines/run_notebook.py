"""Execute one notebook with its params.yaml section (the command of every notebook stage in dvc.yaml).

    python pipelines/run_notebook.py notebooks/01_scaling.ipynb --section 01_scaling --out data/01_scaling/

* params.yaml is read as DVC reads it (``dvc.utils.serialize.parse_yaml``: ruamel.yaml, YAML 1.2), so the notebook
  gets the value ``dvc.lock`` records: ``1e-3`` is the float 0.001 (PyYAML's YAML 1.1 would pass the string
  ``"1e-3"``), ``yes`` is the string ``"yes"``. ``-p`` values are parsed the same way.
* The section's values are those of the profile params.yaml's ``profile`` key names (:func:`load_section`):
  ``quick`` (the default, what ``make repro`` runs) is the section as written; ``publication`` (the published
  reports) overrides the keys listed under ``profiles.publication.<section>``.
* Every key of the section must be a parameter of the notebook's ``parameters`` cell and vice versa
  (``papermill.inspect_notebook``); an unknown or missing key is an error before anything runs.
* A code line that runs a shell command (``!cmd``, ``x = !cmd``, ``%%bash``/``%%sh``/``%%script``, ``%system``,
  ``%sx``) is an error before anything runs: a failing shell command does not raise in the kernel, so the stage
  would succeed with a wrong result. Call ``subprocess.run(..., check=True)`` instead.
* The notebook runs under papermill (kernel ``python3``, cell output logged, working directory = repo root)
  and its executed copy is written to ``OUT/<notebook file name>``; its ``metadata.papermill.output_path`` names
  that file (not the temporary folder papermill wrote it to).
* If the notebook raises, the exit status is non-zero and nothing is left behind that DVC could mistake for
  a result: no executed notebook in ``OUT``, no ``metrics_path`` file, and no file the run wrote into ``OUT``
  (the executed notebook with the traceback is kept in a temporary folder whose path is printed).

``-p key=value`` (repeatable) overrides one parameter, value parsed as YAML (for tests and quick looks).

``python pipelines/run_notebook.py --check-profile`` (``make repro`` runs it before ``dvc repro``, which removes a
stage's outputs before the stage could fail) checks every profile of every notebook stage of dvc.yaml the same way,
without running anything (:func:`check_profile`), and exits with status 2 naming the profile, section and keys.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import nbformat
import papermill
from dvc.utils.serialize import parse_yaml

from bsbr.experiment import PROFILE_ENV  # the variable through which the kernel learns its profile

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("run_notebook")


class ParamsError(ValueError):
    """params.yaml section and notebook ``parameters`` cell disagree, or the section is missing."""


class NotebookError(ValueError):
    """The notebook cannot be a pipeline stage as written (e.g. it runs shell commands)."""


#: A code line that runs a shell command: ``!cmd`` or ``x = !cmd`` (IPython's system call), or a shell cell/line
#: magic. Their exit status never raises in the kernel.
SHELL_LINE = re.compile(r"^\s*(?:[\w.,\s]+=\s*)?(?:!|%%?(?:system|sx|sc|bash|sh|script|perl|ruby)\b)")


class _ReadableStreams(logging.Formatter):
    """Log formatter for papermill's cell output: a progress bar redraw (``\\r``) becomes its own line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        lines = [part.rstrip() for chunk in message.split("\n") for part in chunk.split("\r")]
        record.msg, record.args = "\n".join(line for line in lines if line), None
        return super().format(record)


def read_yaml(text: str, path: str | os.PathLike = "<string>"):
    """Parse YAML ``text`` as DVC does (ruamel.yaml, YAML 1.2): the values ``dvc.lock`` records for params.yaml."""
    return parse_yaml(text, str(path))


#: The profile whose values are the sections as written (the default); every other profile, named in params.yaml's
#: ``profiles`` mapping (``publication``: the published reports), overrides some of their keys.
DEFAULT_PROFILE = "quick"


def read_params(params_file: str | os.PathLike) -> dict:
    """params.yaml parsed as DVC reads it (:func:`read_yaml`); an empty file is ``{}``."""
    return read_yaml(Path(params_file).read_text(), params_file) or {}


def load_section(params_file: Path, section: str, profile: str | None = None) -> dict:
    """The ``section`` mapping of ``params_file``, read as DVC reads it (:func:`read_yaml`), with the keys of the
    profile overriding it.

    The profile is ``profile`` if given, else params.yaml's top-level ``profile`` key, else ``"quick"``
    (:data:`DEFAULT_PROFILE`: the section as written). Any other profile ``P`` takes ``profiles.P.<section>`` (a
    mapping of some of the section's keys; absent: nothing changes) over the section.

    Raises ParamsError if the section is absent or not a mapping, the profile is not ``"quick"`` or a key of
    ``profiles``, or the profile's mapping for the section is not a mapping or names keys the section does not have.
    """
    return section_values(read_params(params_file), section, profile, params_file)


def section_values(params: dict, section: str, profile: str | None = None,
                   params_file: str | os.PathLike = "params.yaml") -> dict:
    """:func:`load_section` on an already parsed params.yaml (``params_file`` names it in the errors)."""
    if section not in params:
        raise ParamsError(f"{params_file} has no section {section!r} (sections: {sorted(params)})")
    values = params[section]
    if not isinstance(values, dict):
        raise ParamsError(f"{params_file}: section {section!r} must be a mapping, got {type(values).__name__}")
    values = dict(values)
    profile = profile_name(params) if profile is None else profile
    profiles = params.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ParamsError(f"{params_file}: profiles must be a mapping of profile name to sections, "
                          f"got {type(profiles).__name__}")
    if DEFAULT_PROFILE in profiles:
        raise ParamsError(f"{params_file}: profiles must not define {DEFAULT_PROFILE!r} (the sections as written are "
                          "it)")
    if profile == DEFAULT_PROFILE:
        return values
    if not isinstance(profile, str) or profile not in profiles:
        raise ParamsError(f"{params_file}: profile must be {DEFAULT_PROFILE!r} or one of profiles "
                          f"{sorted(profiles)}, got {profile!r}")
    sections = profiles[profile] or {}
    if not isinstance(sections, dict):
        raise ParamsError(f"{params_file}: profiles.{profile} must be a mapping of section to values, "
                          f"got {type(sections).__name__}")
    overlay = sections.get(section) or {}
    if not isinstance(overlay, dict):
        raise ParamsError(f"{params_file}: profiles.{profile}.{section} must be a mapping, "
                          f"got {type(overlay).__name__}")
    unknown = sorted(set(overlay) - set(values))
    if unknown:
        raise ParamsError(f"{params_file}: profiles.{profile}.{section} sets {unknown}, which section {section!r} "
                          f"does not have (it has {sorted(values)})")
    values.update(overlay)
    return values


def notebook_sections(dvc_file: str | os.PathLike = REPO_ROOT / "dvc.yaml") -> dict[str, Path]:
    """params section -> notebook of every stage of ``dvc_file`` whose command runs this script
    (``python pipelines/run_notebook.py NOTEBOOK --section SECTION ...``); the notebook's path is relative to the
    folder of ``dvc_file``, as DVC runs the command there.

    Raises ParamsError if ``dvc_file`` has no ``stages`` mapping or such a command lacks the notebook or ``--section``.
    """
    dvc_file = Path(dvc_file)
    stages = (read_yaml(dvc_file.read_text(), dvc_file) or {}).get("stages")
    if not isinstance(stages, dict):
        raise ParamsError(f"{dvc_file} has no stages mapping")
    found = {}
    for name, stage in stages.items():
        command = stage.get("cmd") if isinstance(stage, dict) else None
        argv = shlex.split(command) if isinstance(command, str) else []  # a foreach stage has no cmd of its own
        if argv[1:2] != [f"pipelines/{Path(__file__).name}"]:
            continue
        if len(argv) < 3 or argv[2].startswith("-") or "--section" not in argv[:-1]:
            raise ParamsError(f"{dvc_file}: stage {name!r} runs {argv[1]} without a notebook and --section: "
                              f"{stage['cmd']!r}")
        found[argv[argv.index("--section") + 1]] = dvc_file.parent / argv[2]
    return found


def check_profile(params_file: Path, dvc_file: str | os.PathLike = REPO_ROOT / "dvc.yaml") -> str:
    """Raise ParamsError unless every profile (``quick`` and each of ``profiles``) applies to every section, names
    only existing sections, and gives each notebook stage of ``dvc_file`` (:func:`notebook_sections`) exactly the
    parameters of its notebook (:func:`check_parameters`): what each stage will load, whichever profile is chosen.
    The message lists every problem, each naming the profile, the section and the keys. Returns params.yaml's
    profile. ``make repro`` runs this before ``dvc repro``, which removes a stage's outputs before the stage can fail
    on a misspelt profile or key."""
    params = read_params(params_file)
    profile = profile_name(params)
    profiles = params.get("profiles") or {}
    sections = [name for name, values in params.items() if name != "profiles" and isinstance(values, dict)]
    notebooks = notebook_sections(dvc_file)
    problems = []  # dict.fromkeys below: an error of params.yaml as a whole is listed once, not once per section
    for name in dict.fromkeys([profile, DEFAULT_PROFILE, *(profiles if isinstance(profiles, dict) else [])]):
        for section in dict.fromkeys([*sections, *notebooks]):
            try:
                values = section_values(params, section, name, params_file)  # the profile's errors, naming the section
                if section in notebooks:
                    if not notebooks[section].is_file():
                        raise ParamsError(f"{dvc_file}: the notebook {notebooks[section]} of section {section!r} "
                                          "does not exist")
                    check_parameters(notebooks[section], values,
                                     f"section {section!r} of {params_file} (profile {name!r})")
            except ParamsError as error:
                problems.append(str(error))
        overridden = profiles.get(name) if name != DEFAULT_PROFILE and isinstance(profiles, dict) else None
        unknown = sorted(set(overridden) - set(params)) if isinstance(overridden, dict) else []
        if unknown:
            problems.append(f"{params_file}: profiles.{name} overrides sections {unknown}, which params.yaml does "
                            f"not have")
    if problems:
        raise ParamsError("\n".join(dict.fromkeys(problems)))
    return profile


def profile_name(params: dict) -> str:
    """A parsed params.yaml's top-level ``profile`` (``"quick"`` when absent): the profile :func:`load_section`
    applies."""
    return params.get("profile", DEFAULT_PROFILE)


def check_parameters(notebook: Path, values: dict, what: str = "params") -> None:
    """Raise ParamsError unless ``values`` has exactly the names of the notebook's ``parameters`` cell."""
    declared = set(papermill.inspect_notebook(str(notebook)))
    if not declared:
        raise ParamsError(f"{notebook} has no cell tagged 'parameters'")
    unknown, missing = sorted(set(values) - declared), sorted(declared - set(values))
    problems = []
    if unknown:
        problems.append(f"unknown to the notebook: {unknown}")
    if missing:
        problems.append(f"missing from {what}: {missing}")
    if problems:
        raise ParamsError(f"{what} and the parameters cell of {notebook} disagree; " + "; ".join(problems)
                          + f" (the notebook declares {sorted(declared)})")


def parse_overrides(items: list[str]) -> dict:
    """``["key=value", ...]`` -> dict, each value parsed as YAML (``seq_lens=[64,128]``, ``models=null``)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"-p expects key=value, got {item!r}")
        try:
            overrides[key.strip()] = read_yaml(f"value: {value}")["value"]
        except Exception as error:  # DVC's YAMLFileCorruptedError names no argument
            raise ParamsError(f"-p {item!r}: the value is not valid YAML ({type(error).__name__})") from error
    return overrides


def shell_lines(notebook: Path) -> list[str]:
    """``"cell N, line M: <line>"`` for every code line of ``notebook`` that runs a shell command (``SHELL_LINE``)."""
    found = []
    for index, cell in enumerate(nbformat.read(str(notebook), as_version=4).cells):
        if cell.cell_type != "code":
            continue
        for number, line in enumerate(cell.source.splitlines(), start=1):
            if SHELL_LINE.match(line):
                found.append(f"cell {index}, line {number}: {line.strip()}")
    return found


def check_no_shell(notebook: Path) -> None:
    """Raise NotebookError if ``notebook`` has a shell line: its failure would not fail the stage."""
    found = shell_lines(notebook)
    if found:
        raise NotebookError(f"{notebook} runs shell commands, whose failure would not fail the stage: "
                            + "; ".join(found) + " (use subprocess.run(..., check=True) in Python instead)")


def _record_output_path(executed: Path, target: Path) -> None:
    """Set the executed notebook's ``metadata.papermill.output_path`` to ``target`` (repository-relative when inside
    the repository), the path it is moved to, instead of the temporary folder papermill wrote it into."""
    notebook = nbformat.read(str(executed), as_version=4)
    target = target.resolve()
    shown = target.relative_to(REPO_ROOT) if target.is_relative_to(REPO_ROOT) else target
    notebook.metadata.setdefault("papermill", {})["output_path"] = str(shown)
    nbformat.write(notebook, str(executed))


def _files_under(folder: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def run_notebook(notebook: Path, section: str, out: Path, params_file: Path = REPO_ROOT / "params.yaml",
                 overrides: dict | None = None) -> Path:
    """Execute ``notebook`` with ``section`` of ``params_file`` (plus ``overrides``) into ``out``.

    Returns the executed notebook's path. Raises ParamsError (bad params, before running), NotebookError (shell
    lines, before running) or the papermill error of a failing cell (after cleaning up, see the module docstring).
    """
    notebook, out = Path(notebook), Path(out)
    if not notebook.is_file():
        raise ParamsError(f"notebook {notebook} does not exist")
    check_no_shell(notebook)
    params = read_params(params_file)
    profile = profile_name(params)
    values = section_values(params, section, profile, params_file)
    check_parameters(notebook, values, f"section {section!r} of {params_file}")
    unknown = sorted(set(overrides or {}) - set(values))
    if unknown:
        raise ParamsError(f"overrides {unknown} are not parameters of {notebook} (it declares {sorted(values)})")
    values.update(overrides or {})
    # The kernel runs in the repo root, so the notebook's relative paths are relative to it.
    if "out_dir" in values and (REPO_ROOT / values["out_dir"]).resolve() != out.resolve():
        raise ParamsError(f"--out {out} differs from the notebook's out_dir {values['out_dir']!r}")
    metrics = REPO_ROOT / values["metrics_path"] if values.get("metrics_path") else None
    target = out / notebook.name
    out.mkdir(parents=True, exist_ok=True)
    # Whatever the last run left is stale now: a failure below must not leave it looking current.
    for stale in (target, metrics):
        if stale is not None:
            stale.unlink(missing_ok=True)
    before = _files_under(out)
    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix=f"{notebook.stem}-"))
    executed = scratch / notebook.name
    log.info("running %s (profile %s) with %s", notebook, profile, values)
    try:
        # the kernel inherits the environment: bsbr.experiment.start_experiment prints the profile by the revision
        with mock.patch.dict(os.environ, {PROFILE_ENV: str(profile)}):  # restored afterwards
            papermill.execute_notebook(
                str(notebook), str(executed), parameters=values, kernel_name="python3",
                log_output=True, progress_bar=False, cwd=str(REPO_ROOT),
            )
        if metrics is not None and not metrics.is_file():
            raise RuntimeError(f"{notebook} finished but did not write its metrics_path {metrics}")
        _record_output_path(executed, target)
    except BaseException:
        # nothing of a failed run stays where the stage's outputs belong, but what it wrote is moved aside, not
        # deleted: a long scoring loop that fails in its last table keeps its rows (e.g. trials.csv) for a look
        partial = scratch / "partial"
        written = [(metrics, partial / metrics.name)] if metrics is not None and metrics.is_file() else []
        written += [(path, partial / path.relative_to(out)) for path, mtime in _files_under(out).items()
                    if (path not in before or mtime >= started) and path != metrics]
        for source, destination in written:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(destination))
        log.error("%s failed; the executed notebook with the error is kept at %s%s", notebook, executed,
                  f"; the {len(written)} files it wrote are moved to {partial}" if written else "")
        raise
    shutil.move(str(executed), str(target))
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path, nargs="?")
    parser.add_argument("--section", help="params.yaml section, e.g. 01_scaling")
    parser.add_argument("--out", type=Path, help="folder for the executed notebook (the stage's data/<folder>/)")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter (value parsed as YAML); repeatable")
    parser.add_argument("--check-profile", action="store_true",
                        help="only check that every profile of params.yaml applies to every section and gives each "
                             "notebook stage exactly its notebook's parameters (make repro runs this before dvc repro)")
    parser.add_argument("--dvc", type=Path, default=REPO_ROOT / "dvc.yaml",
                        help="with --check-profile: the dvc.yaml whose notebook stages are checked (default: dvc.yaml)")
    args = parser.parse_args(argv)
    if args.check_profile:
        try:
            print(f"params profile: {check_profile(args.params, args.dvc)}", file=sys.stderr)
        except ParamsError as error:
            print("\n".join(f"error: {problem}" for problem in str(error).splitlines()), file=sys.stderr)
            return 2
        return 0
    if args.notebook is None or args.section is None or args.out is None:
        parser.error("the notebook, --section and --out are required (or --check-profile alone)")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ReadableStreams("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        target = run_notebook(args.notebook, args.section, args.out, args.params, parse_overrides(args.parameter))
    except (ParamsError, NotebookError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except papermill.PapermillExecutionError as error:
        print(f"error: {args.notebook} raised {error.ename}: {error.evalue}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - any other failure must fail the stage with a readable message
        print(f"error: {args.notebook}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
