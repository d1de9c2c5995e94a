"""Load a pretrained causal LM + tokenizer for conversion: the project's embedded GGUF checkpoint by default.

The default checkpoint is SmolLM2-135M-Instruct (Q4_1 GGUF) written by the DVC stage ``fetch_model`` to
``data/model/``. transformers reads GGUF files through ``from_pretrained(folder, gguf_file=name)`` and
de-quantises every tensor, so the model here is a plain fp32 ``LlamaForCausalLM`` (the weights carry the Q4_1
rounding, nothing else of the quantisation).

Reading the GGUF costs ~20 s on a 2-core CPU (the pure-Python GGUF reader parses the file for the config, the
tokenizer and the weights), so ``fetch_model`` also writes the de-quantised model once, as an ordinary
``save_pretrained`` folder (float32 safetensors, config, tokenizer) beside the GGUF (:func:`dequantize_gguf`);
:func:`load_pretrained` reads that folder (0.4 s) and de-quantises the GGUF itself only when the folder is absent.
Both give the same weights and tokenizer, bit for bit (tests/convert/test_convert.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["DEFAULT_GGUF", "DEQUANTIZED_SUFFIX", "default_model_path", "dequantize_gguf", "dequantized_path",
           "load_pretrained"]

DEFAULT_GGUF = Path("data/model/SmolLM2-135M-Instruct.Q4_1.gguf")  # relative to the repository root
#: the de-quantised copy of ``<name>.gguf`` is the folder ``<name>.fp32`` beside it (:func:`dequantize_gguf`)
DEQUANTIZED_SUFFIX = ".fp32"
_SOURCE_FILE = "source_gguf.json"  # in the de-quantised folder: the GGUF it was made from (name, sha256)

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # <repo>/bsbr/convert/loading.py -> <repo>


def default_model_path() -> Path:
    """Absolute path of the embedded default checkpoint ``data/model/SmolLM2-135M-Instruct.Q4_1.gguf``.

    The repository root is looked for next to this package first, then in the current working directory.

    Raises:
        FileNotFoundError: in neither place; the message says to run ``dvc repro fetch_model``.
    """
    candidates = [_PACKAGE_ROOT / DEFAULT_GGUF, Path.cwd() / DEFAULT_GGUF]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = ", ".join(str(p) for p in dict.fromkeys(candidates))
    raise FileNotFoundError(
        f"default model checkpoint not found (tried {tried}); create it with `dvc repro fetch_model` "
        "(or `python pipelines/fetch_model.py`) from the repository root"
    )


def dequantized_path(gguf_path: str | os.PathLike) -> Path:
    """The folder :func:`dequantize_gguf` writes for ``gguf_path``: ``/dir/name.gguf`` -> ``/dir/name.fp32``."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + DEQUANTIZED_SUFFIX)


def _gguf_identity(gguf_path: Path) -> dict:
    with open(gguf_path, "rb") as f:
        return {"gguf_file": gguf_path.name, "gguf_sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def dequantize_gguf(gguf_path: str | os.PathLike) -> Path:
    """De-quantise a GGUF checkpoint once into :func:`dequantized_path` (``save_pretrained``: float32 safetensors,
    config, generation config and tokenizer, plus ``source_gguf.json`` with the GGUF's name and sha256), so
    that :func:`load_pretrained` need not parse the GGUF again. Written to a temporary folder beside it, then renamed
    (an older copy is replaced).

    Args:
        gguf_path: path to a ``.gguf`` file.
    Returns:
        The folder written.
    Raises:
        FileNotFoundError: no file at ``gguf_path``.
    """
    gguf_path = Path(gguf_path)
    name_or_path, gguf_file = _split_gguf(gguf_path)
    model, tokenizer = _load(name_or_path, gguf_file)
    # transformers marks a GGUF-loaded model as quantised (its GGUF "quantizer" only de-quantised it on load) and
    # refuses to save it; the weights are plain float32, so the mark is dropped and the model saved as any other
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    target = dequantized_path(gguf_path)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_gguf_identity(gguf_path.resolve()), indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700 (and safetensors its file 0o600)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_pretrained(name_or_path: str | os.PathLike | None = None, gguf_file: str | os.PathLike | None = None):
    """Load a causal language model and its tokenizer in fp32, eval mode.

    Args:
        name_or_path: None = the embedded default GGUF (:func:`default_model_path`), read from its de-quantised
            copy (:func:`dequantize_gguf`) when that exists and was made from this GGUF file (same sha256); a path
            to a ``.gguf`` file; a folder (with ``gguf_file`` naming a file in it, or holding an HF checkpoint); or
            a hub id such as ``"gpt2"``, which goes to ``transformers`` ``from_pretrained`` unchanged (needs the hub
            or its cache). A path may start with ``~`` (the home folder).
        gguf_file: a GGUF file name inside ``name_or_path``, or, with ``name_or_path=None``, a path to a GGUF file.
    Returns:
        ``(model, tokenizer)``: an ``AutoModelForCausalLM`` (``LlamaForCausalLM`` for the default) in
        ``torch.float32`` and eval mode, and its ``AutoTokenizer``.
    Raises:
        FileNotFoundError: the default checkpoint or a given ``.gguf`` path does not exist; ``name_or_path`` is a
            path (an ``os.PathLike``, or a str that starts with ``/``, ``./``, ``../`` or ``~`` or has more than one
            ``/``: no hub id) that does not exist; the hub is not contacted then.
        TypeError: arguments that are not str / os.PathLike / None.
    """
    for name, value in (("name_or_path", name_or_path), ("gguf_file", gguf_file)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a str, os.PathLike or None, got {type(value).__name__}")

    if name_or_path is None and gguf_file is None:
        gguf_path = default_model_path()
        copy = dequantized_path(gguf_path)
        source = copy / _SOURCE_FILE
        if source.is_file() and json.loads(source.read_text()) == _gguf_identity(gguf_path):
            return _load(str(copy), None)
        name_or_path, gguf_file = _split_gguf(gguf_path)
    elif name_or_path is None:
        name_or_path, gguf_file = _split_gguf(Path(gguf_file))
    elif gguf_file is None and str(name_or_path).endswith(".gguf"):
        name_or_path, gguf_file = _split_gguf(Path(name_or_path))
    elif _is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"name_or_path {str(name_or_path)!r} looks like a local path but {path} does not "
                                    "exist (a hub id is 'name' or 'namespace/name')")
        name_or_path = path
    return _load(str(name_or_path), gguf_file)


def _is_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` can only mean a local path, never a hub id (``"gpt2"``, ``"namespace/name"``): an
    ``os.PathLike`` that is not a str, or a str that starts with ``/``, ``./``, ``../`` or ``~``, or has a path
    separator other than ``/`` or more than one ``/``."""
    if not isinstance(name_or_path, str):
        return True
    separators = {os.sep, os.altsep} - {None, "/"}
    return (name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
            or any(separator in name_or_path for separator in separators))


def _load(name_or_path: str, gguf_file):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_kwargs = {} if gguf_file is None else {"gguf_file": str(gguf_file)}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **gguf_kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, **gguf_kwargs)
    model.eval()
    return model, tokenizer


def _split_gguf(path: Path) -> tuple[str, str]:
    """``/dir/file.gguf`` -> ``("/dir", "file.gguf")`` as ``from_pretrained(folder, gguf_file=name)`` wants."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    path = path.resolve()
    return str(path.parent), path.name
