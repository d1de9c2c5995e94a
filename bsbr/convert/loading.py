"""Load a pretrained causal LM + tokenizer for conversion: the project's embedded GGUF checkpoint by default.

The default checkpoint is SmolLM2-135M-Instruct (Q4_1 GGUF) written by the DVC stage ``fetch_model`` to
``data/model/``. transformers reads GGUF files through ``from_pretrained(folder, gguf_file=name)`` and
de-quantises every tensor, so the model here is a plain fp32 ``LlamaForCausalLM`` (the weights carry the Q4_1
rounding, nothing else of the quantisation).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_GGUF", "default_model_path", "load_pretrained"]

DEFAULT_GGUF = Path("data/model/SmolLM2-135M-Instruct.Q4_1.gguf")  # relative to the repository root

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


def load_pretrained(name_or_path: str | os.PathLike | None = None, gguf_file: str | os.PathLike | None = None):
    """Load a causal language model and its tokenizer in fp32, eval mode.

    Args:
        name_or_path: None = the embedded default GGUF (:func:`default_model_path`); a path to a ``.gguf`` file;
            a folder (with ``gguf_file`` naming a file in it, or holding an HF checkpoint); or a hub id such as
            ``"gpt2"``, which goes to ``transformers`` ``from_pretrained`` unchanged (needs the hub or its cache).
        gguf_file: a GGUF file name inside ``name_or_path``, or, with ``name_or_path=None``, a path to a GGUF file.
    Returns:
        ``(model, tokenizer)``: an ``AutoModelForCausalLM`` (``LlamaForCausalLM`` for the default) in
        ``torch.float32`` and eval mode, and its ``AutoTokenizer``.
    Raises:
        FileNotFoundError: the default checkpoint or a given ``.gguf`` path does not exist.
        TypeError: arguments that are not str / os.PathLike / None.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, value in (("name_or_path", name_or_path), ("gguf_file", gguf_file)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a str, os.PathLike or None, got {type(value).__name__}")

    if name_or_path is None and gguf_file is None:
        name_or_path, gguf_file = _split_gguf(default_model_path())
    elif name_or_path is None:
        name_or_path, gguf_file = _split_gguf(Path(gguf_file))
    elif gguf_file is None and str(name_or_path).endswith(".gguf"):
        name_or_path, gguf_file = _split_gguf(Path(name_or_path))
    name_or_path = str(name_or_path)
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
