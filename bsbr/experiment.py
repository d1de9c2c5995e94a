"""The opening and closing every experiment notebook shares, written once.

A notebook's first code cell after ``parameters`` calls :func:`start_experiment` with its parameters; it

* changes to the repository root, so ``data/...`` and ``reports/...`` mean the same under papermill and JupyterLab;
* silences what would clutter a report (transformers' download/de-quantisation progress bars), sets the plot theme, torch's threads and seed;
* creates the stage's output folder and the metrics file's folder;
* prints the parameters and the provenance (git revision, params profile, torch, device, threads, CPU, load average);

and returns an :class:`Experiment`. The notebooks that study the calibrated conversion of stage
``02_conversion_similarity`` load it with :func:`load_base_and_conversion`. The last cell writes the headline numbers with :func:`write_metrics`
(atomically: a half-written metrics file never exists).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from bsbr.provenance import git_revision, machine_info
from bsbr.paths import find_repo_root

__all__ = ["CORPUS_DIR", "BaseAndConversion", "Experiment", "ResumeLog", "check_ints", "fingerprint",
           "load_base_and_conversion", "model_description", "profile_of_run", "profile_sentence", "source_fingerprint",
           "start_experiment", "write_json", "write_metrics"]

# tqdm.auto warns "IProgress not found" when it is *imported* in a kernel without ipywidgets (transformers imports
# it), so the filter must exist before transformers is: a notebook imports bsbr.experiment first.
warnings.filterwarnings("ignore", message="IProgress not found")

#: Output folder of the ``prepare_corpus`` stage, relative to the repository root.
CORPUS_DIR = Path("data/corpus")


@dataclass
class Experiment:
    """What :func:`start_experiment` set up: the parameters as given, the output folder and metrics path (relative to
    the repository root, which is the working directory), the machine header and the git revision."""

    params: dict
    out_dir: Path
    metrics_path: Path
    machine: dict = field(default_factory=dict)
    revision: str = "unknown"


def check_ints(minimum: int = 1, allow_none: bool = False, **values) -> None:
    """Raise ValueError naming the first keyword whose value is not an ``int`` >= ``minimum`` (``bool`` is rejected;
    ``None`` is accepted only with ``allow_none``)."""
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            extra = " or None" if allow_none else ""
            raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


#: glibc ``mallopt`` parameters (``<malloc.h>``) and what :func:`keep_freed_memory` sets them to.
_MALLOPT = {"M_MMAP_THRESHOLD": (-3, 2**31 - 1), "M_TRIM_THRESHOLD": (-1, 2**31 - 1), "M_TOP_PAD": (-2, 2**28)}


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep freed memory for the next allocation instead of handing it back to the OS.

    By default glibc serves a large allocation (above its mmap threshold, at most 32 MiB) from fresh pages of its own
    ``mmap`` and returns them when it is freed, so a forward pass that allocates and frees tensors of the same sizes
    chunk after chunk pays a page fault per 4 KiB page every time. This sets ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` to 2 GiB and ``M_TOP_PAD`` to 256 MiB (``mallopt``) for the rest of the process. Measured
    on this project's 2-core machine: gathering 5,376 blocks of 64 keys (22 MB) took ~29 ms on fresh pages and ~7 ms
    on reused ones, and an 8,192-token forward of SmolLM2 with block retrieval 58 s and 36 s. The cost: the process
    keeps the memory of its peak (its resident size does not shrink afterwards). Timings compare like with like
    only when every timed variant runs in the same process (a notebook calls this once, before its timings).

    Returns:
        True when every setting was accepted; False where the C library has no ``mallopt`` (macOS, Windows) or
        refused one — then nothing or only part was changed.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no mallopt (macOS), no process symbol table (Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in _MALLOPT.values()])


def start_experiment(params: dict, threads: int | None = None, seed: int | None = None) -> Experiment:
    """Open an experiment notebook: repository root as working directory, quiet libraries, folders, provenance.

    Args:
        params: the notebook's parameters (name -> value); must hold ``out_dir`` and ``metrics_path`` (paths
            relative to the repository root). Printed one per line.
        threads: torch intra-op threads; None or 0 keeps torch's default (the machine's cores).
        seed: ``torch.manual_seed(seed)`` when given.
    Returns:
        the :class:`Experiment`.
    Raises:
        ValueError: ``params`` without ``out_dir``/``metrics_path``, or ``threads``/``seed`` not integers >= 0.
        FileNotFoundError: not inside the repository (no ``dvc.yaml`` above the working directory).
    """
    missing = [key for key in ("out_dir", "metrics_path") if key not in params]
    if missing:
        raise ValueError(f"params must hold {missing} (every experiment writes an output folder and a metrics file)")
    check_ints(0, allow_none=True, threads=threads, seed=seed)
    os.chdir(find_repo_root())  # papermill starts the kernel at the root, JupyterLab in notebooks/

    import seaborn as sns
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # GGUF de-quantisation bars would flood the log and the report
    hf_logging.set_verbosity_error()
    sns.set_theme(style="whitegrid", context="notebook")
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)

    out_dir, metrics_path = Path(params["out_dir"]), Path(params["metrics_path"])
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info(threads or None)
    revision = git_revision()
    print("parameters:")
    for key, value in params.items():
        print(f"  {key} = {value!r}")
    print(f"git revision: {revision}")
    print(f"params profile: {profile_of_run()}")
    print(f"torch {machine['torch']}, device: cpu, threads: {machine['threads']}")
    print(f"CPU: {machine['cpu']} ({machine['cores']} logical CPUs), python {machine['python']}, {machine['platform']}")
    if machine.get("load_average") is not None:
        print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in machine["load_average"]))
    return Experiment(params=dict(params), out_dir=out_dir, metrics_path=metrics_path, machine=machine,
                      revision=revision)


#: Set by pipelines/run_notebook.py for the notebook's kernel: the params.yaml profile of the run.
PROFILE_ENV = "BSBR_PROFILE"


def profile_of_run() -> str:
    """The params.yaml profile this notebook runs with (``quick`` or ``publication``, set by
    ``pipelines/run_notebook.py`` in ``$BSBR_PROFILE``), or ``"none"`` outside the pipeline (JupyterLab, a test: the
    notebook's own parameters)."""
    return os.environ.get(PROFILE_ENV) or "none"


def profile_sentence(section: str) -> str:
    """One Markdown sentence saying which parameters this run used, for a report's "what we found" box: the
    ``params.yaml`` section and profile (:func:`profile_of_run`), or the notebook's own defaults (a smoke run) outside
    the pipeline. The two profiles are ``quick`` (``make repro``'s default) and ``publication`` (the published
    reports); the notebook's defaults are not a profile."""
    profile = profile_of_run()
    if profile == "none":
        return (f"Parameters: the notebook's own defaults, a smoke run outside the pipeline; `dvc repro` runs section "
                f"`{section}` of `params.yaml` in profile `quick` (`make repro`'s default) or `publication` (the "
                f"published reports).")
    role = {"quick": "`make repro`'s default", "publication": "the published reports"}.get(profile, "")
    return f"Parameters: section `{section}` of `params.yaml`, profile `{profile}`" + (f" ({role})." if role else ".")


def model_description(model: str | None) -> str:
    """How a notebook names the model it loads: the embedded GGUF and the PyPI package it came from when ``model``
    is None (as :func:`bsbr.convert.load_pretrained` does), else ``model`` itself (a hub id or local path)."""
    if model is not None:
        return str(model)
    from bsbr.convert import default_model_path

    info = json.loads((default_model_path().parent / "model.json").read_text())
    return f"{info['gguf_file']} (from {info['package']}=={info['version']})"


class BaseAndConversion(NamedTuple):
    """What :func:`load_base_and_conversion` loaded."""

    base: Any  #: the original model (``AutoModelForCausalLM``, fp32, eval mode)
    tokenizer: Any  #: its tokenizer
    converted: Any  #: a copy of ``base`` with the conversion file loaded into it (eval mode)
    settings: dict  #: ``bsbr.convert.checkpoint.conversion_settings(converted)``
    seconds: float  #: wall-clock load time of both (seconds)


def load_base_and_conversion(calibrated_path: str | os.PathLike, model: str | None = None) -> BaseAndConversion:
    """Load the original model and a converted copy of it from a ``save_conversion`` file, and print what was loaded
    (the model with its GGUF sha256 when it is the embedded default, the file, its settings and the time).

    Args:
        calibrated_path: the file ``bsbr.convert.save_conversion`` wrote (stage ``02_conversion_similarity`` writes
            ``data/02_conversion_similarity/calibrated.safetensors``).
        model: what ``bsbr.convert.load_pretrained`` loads; None: the embedded SmolLM2 GGUF.
    Returns:
        :class:`BaseAndConversion` ``(base, tokenizer, converted, settings, seconds)``; ``base`` is left unconverted.
    Raises:
        ValueError: no file at ``calibrated_path`` (checked before anything is loaded).
    """
    if not Path(calibrated_path).is_file():
        raise ValueError(f"calibrated_path: no file {str(calibrated_path)!r} (run stage 02_conversion_similarity, or "
                         "pass a save_conversion file)")
    from bsbr.convert import default_model_path, load_conversion, load_pretrained
    from bsbr.convert.checkpoint import conversion_settings

    print(f"model: {model_description(model)}")
    if model is None:
        sha256 = json.loads((default_model_path().parent / "model.json").read_text())["gguf_sha256"]
        print(f"gguf sha256: {sha256}")
    started = time.perf_counter()
    base, tokenizer = load_pretrained(model)
    converted = load_conversion(copy.deepcopy(base), calibrated_path).eval()
    settings = conversion_settings(converted)
    seconds = time.perf_counter() - started
    print(f"loaded the model and {calibrated_path} ({settings}) in {seconds:.1f} s")
    return BaseAndConversion(base, tokenizer, converted, settings, seconds)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys, trailing newline) atomically: to a temporary file in the same
    folder, then renamed over ``path``, so a reader never sees a half-written file.

    Raises:
        ValueError: ``obj`` holds NaN or infinity (not JSON; write None or a string instead).
        TypeError: ``obj`` holds something JSON cannot encode.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Write an experiment's headline numbers (``reports/metrics/<experiment>.json``) atomically with
    :func:`write_json`. Floats that are NaN or infinite are an error (ValueError naming the key): a metric no run
    produced must not be published.
    """
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")

    def check(value, key):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metrics[{key!r}] is {value}: not a number a run can publish")
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, f"{key}.{k}" if key else k)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check(v, f"{key}[{i}]")

    check(metrics, "")
    write_json(path, metrics)


def fingerprint(parts: dict) -> str:
    """sha256 (hex, 16 characters) of ``parts`` as sorted-key JSON (non-JSON values by their ``str``): what identifies
    a computation for :class:`ResumeLog`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(paths) -> str:
    """sha256 (hex) over the contents of ``paths`` (files, sorted by path, each with its path): changes when any of
    them changes. Raises FileNotFoundError for a missing file."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class ResumeLog:
    """An append-only log of finished work units, so that a long run that is stopped (a session's end, a killed
    ``dvc repro``) continues where it stopped instead of starting again.

    The log is ``folder / f"{key}.jsonl"``: ``key`` is a :func:`fingerprint` of everything that determines the results
    (settings, input files' hashes, the source code's :func:`source_fingerprint`), so a run with any of them changed
    starts a new log and never reads another computation's rows. Each finished unit is one JSON line, written and
    flushed to disk (``fsync``) as it finishes; a line cut short by a kill is not valid JSON and is dropped when the
    log is read (that unit runs again), so a partly written unit is never used.

    ``folder=None`` keeps nothing (every unit runs; :meth:`get` always misses).
    """

    def __init__(self, folder: str | os.PathLike | None, key: str):
        """Raises ValueError: ``key`` is not a file-name-safe string (letters, digits, ``_.-``)."""
        if not isinstance(key, str) or not key or not all(ch.isalnum() or ch in "_.-" for ch in key):
            raise ValueError(f"key must be a non-empty string of letters, digits and _.- (a file name), got {key!r}")
        self.path = None if folder is None else Path(folder) / f"{key}.jsonl"
        self.rows: dict[str, dict] = {}
        self.dropped = 0  # lines cut short by a kill
        text = self.path.read_text() if self.path is not None and self.path.is_file() else ""
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                self.dropped += 1
                continue
            self.rows[row["unit"]] = row
        self.resumed = len(self.rows)  # units found when the log was opened
        self._cut = bool(text) and not text.endswith("\n")  # the last line was cut short: append on a fresh line

    def get(self, unit: str) -> dict | None:
        """The logged row of ``unit`` (a string naming one work unit), or None."""
        return self.rows.get(unit)

    def add(self, unit: str, row: dict) -> dict:
        """Log ``row`` (JSON-serialisable) as ``unit``'s result, on disk before this returns; returns the stored row
        (with ``"unit"``)."""
        stored = {**row, "unit": unit}
        self.rows[unit] = stored
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                # never on the end of a line cut short by a kill: a fresh line first
                handle.write(("\n" if self._cut else "") + json.dumps(stored, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self._cut = False
        return stored
