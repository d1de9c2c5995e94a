"""Save and load what conversion adds to a pretrained model, as safetensors (never a pickle).

A converted model is its pretrained checkpoint plus a few new modules per attention layer: ``meta_q_proj``,
``meta_k_proj``, ``compression`` (with ``compression_factor``) and, with ``retrieval="normalized"``, ``normalized``
(feature maps and mix logits). :func:`save_conversion` writes only those tensors (e.g. after calibration), with the
conversion settings in the file's metadata; :func:`load_conversion` converts a freshly loaded original model with
the same settings and loads them, so ``load_conversion(load_pretrained()[0], path)`` rebuilds the calibrated model.

File layout: safetensors tensors named by their parameter names in the converted model (a tied feature map is stored
once, under its query-map name), metadata ``{"format": "bsbr-conversion", "version": "1", "model_type",
"chunk_size", "compression_factor", "retrieval", "normalized_options" (JSON), "base_model" (JSON,
:func:`base_model_fingerprint`)}``. A file is written atomically (:func:`save_file_atomic`), and refuses to load onto
another base model (files written before ``base_model`` existed load without that check).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bsbr._checks import check_positive_int
from bsbr.convert.base import converted_layers
from bsbr.convert.families import convert_to_bsbr
from bsbr.convert.retrieval import RETRIEVAL_MODES

__all__ = ["CONVERSION_FORMAT", "base_model_fingerprint", "check_base_model", "conversion_settings", "load_conversion",
           "load_meta_router", "new_parameters", "read_safetensors", "save_conversion", "save_file_atomic"]

CONVERSION_FORMAT = "bsbr-conversion"
_META_MODULES = ("meta_q_proj", "meta_k_proj")  # every mode's; a mode adds its own (RetrievalMode.new_modules)
#: the pretrained attention projection whose first instance goes into the fingerprint (Llama family, GPT-2)
_FINGERPRINT_PROJECTIONS = ("q_proj", "c_attn")
_FINGERPRINT_ROWS = 64  # rows of the input embedding that go into the fingerprint


def base_model_fingerprint(model: nn.Module) -> dict:
    """What identifies the pretrained checkpoint under ``model``: ``{"model_type", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "weights_sha256"}``.

    ``weights_sha256`` is the SHA-256 of the bytes (fp32, contiguous, CPU) of the input embedding's first 64 rows and
    of the first attention layer's query projection (``q_proj``; GPT-2: ``c_attn``), tensors that neither conversion
    nor LoRA change: an original, a converted and a LoRA'd model (its ``base_layer.weight``) of one checkpoint have the
    same fingerprint; two checkpoints of one architecture (e.g. two seeds) do not.

    Raises:
        ValueError: ``model`` has no ``config``, input embedding or query projection.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"model must be a transformers model with a config and input embeddings, got "
                         f"{type(model).__name__}")
    projection = next((m for name, m in model.named_modules()
                       if name.rpartition(".")[2] in _FINGERPRINT_PROJECTIONS), None)
    if projection is None:
        raise ValueError(f"model has no attention projection named one of {list(_FINGERPRINT_PROJECTIONS)}")
    projection = getattr(projection, "base_layer", projection)  # a LoRA wrapper holds the pretrained one
    digest = hashlib.sha256()
    for tensor in (model.get_input_embeddings().weight[:_FINGERPRINT_ROWS], projection.weight):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    heads = config.num_attention_heads
    return {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "vocab_size": config.vocab_size, "weights_sha256": digest.hexdigest()}


def check_base_model(model: nn.Module, stored: str | None, path: str) -> None:
    """Raise ValueError unless ``stored`` (the JSON of a file's ``base_model`` metadata; None = an older file without
    it: not checked) is :func:`base_model_fingerprint` of ``model``; the message names the fields that differ."""
    if stored is None:
        return
    expected, actual = json.loads(stored), base_model_fingerprint(model)
    differ = [f"{key} {expected.get(key)} vs {actual.get(key)}" for key in sorted(set(expected) | set(actual))
              if expected.get(key) != actual.get(key)]
    if differ:
        raise ValueError(f"{path} was calibrated on a different base model (file vs model): {'; '.join(differ)}")


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` to a temporary file in ``path``'s folder, then ``os.replace`` onto ``path``:
    a reader never sees a half-written file, and a failure leaves neither ``path`` nor the temporary file."""
    path = os.fspath(path)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                         prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_safetensors(path: str | os.PathLike, file_format: str, what: str,
                     tensors: bool = True) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
    """Open a safetensors file this package wrote: ``(path as str, metadata, {name: tensor})`` (the tensors only when
    ``tensors``; else ``{}``).

    Raises:
        FileNotFoundError: no file at ``path`` (``what`` names the kind, e.g. "conversion").
        ValueError: its metadata ``format`` is not ``file_format``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} file at {path}")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != file_format:
            raise ValueError(f"{path} is not a {file_format} file (metadata format={metadata.get('format')!r})")
        return path, metadata, {name: handle.get_tensor(name) for name in handle.keys()} if tensors else {}


def new_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters conversion added (meta projections, compression, normalised retrieval), by name, each tensor
    once (a tied query/key feature map appears under its query-map name only).

    Raises:
        ValueError: ``model`` is not converted.
    """
    found, seen = {}, set()
    for layer_name, layer in converted_layers(model):
        for child in _META_MODULES + layer.mode.new_modules:
            module = getattr(layer, child, None)
            if module is None:
                continue
            for name, parameter in module.named_parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    found[f"{layer_name}.{child}.{name}"] = parameter
    return found


def conversion_settings(model: nn.Module) -> dict:
    """``{"model_type", "chunk_size", "compression_factor", "retrieval", "normalized_options"}`` of a converted
    model, as :func:`bsbr.convert.convert_to_bsbr` takes them (read from its first converted layer).

    Raises:
        ValueError: ``model`` is not converted.
    """
    layer = converted_layers(model)[0][1]
    compression_factor, options = RETRIEVAL_MODES[layer.retrieval_mode].settings(layer)
    return {"model_type": model.config.model_type, "chunk_size": layer.chunk_size,
            "compression_factor": compression_factor, "retrieval": layer.retrieval_mode,
            "normalized_options": options}


def save_conversion(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the parameters conversion added to ``model`` (:func:`new_parameters`), its settings and
    :func:`base_model_fingerprint` to ``path`` (safetensors, written atomically: :func:`save_file_atomic`). Nothing of
    the pretrained checkpoint is written.

    Raises:
        ValueError: ``model`` is not converted.
    """
    settings = conversion_settings(model)
    tensors = {name: p.detach().contiguous().cpu() for name, p in new_parameters(model).items()}
    metadata = {"format": CONVERSION_FORMAT, "version": "1", "model_type": settings["model_type"],
                "chunk_size": str(settings["chunk_size"]), "compression_factor": json.dumps(settings["compression_factor"]),
                "retrieval": settings["retrieval"], "normalized_options": json.dumps(settings["normalized_options"]),
                "base_model": json.dumps(base_model_fingerprint(model))}
    save_file_atomic(tensors, path, metadata)


def _check_model_type(model_type, metadata: dict, path: str) -> None:
    """Raise ValueError unless the conversion file ``path`` (its ``metadata``) is of ``model_type``'s family."""
    if model_type != metadata["model_type"]:
        raise ValueError(f"{path} holds a conversion of a {metadata['model_type']!r} model, got model_type="
                         f"{model_type!r}")


def load_conversion(model: nn.Module, path: str | os.PathLike, chunk_size: int | None = None,
                    retrieval: str | None = None) -> nn.Module:
    """Convert the *original* pretrained ``model`` in place with the settings stored in ``path`` and load the
    stored parameters into it; returns ``model``.

    Args:
        model: the original (unconverted) pretrained model the file was calibrated on.
        path: a file written by :func:`save_conversion`.
        chunk_size, retrieval: None, or the setting the caller expects the file to hold (an error if it differs).
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a bad ``chunk_size``/``retrieval``; not a file written by :func:`save_conversion`; a model of
            another family, or of another checkpoint than the file was calibrated on (its
            :func:`base_model_fingerprint` differs; files without one are not checked); a file calibrated for
            another ``chunk_size``/``retrieval`` than asked for; or stored tensors that do not match the converted
            model's new parameters (names or shapes). The message names them. ``model`` is unchanged on any error
            before the tensor check.
    """
    if chunk_size is not None:
        check_positive_int(chunk_size=chunk_size)
    if retrieval is not None and retrieval not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval must be None or one of {list(RETRIEVAL_MODES)}, got {retrieval!r}")
    path, metadata, tensors = read_safetensors(path, CONVERSION_FORMAT, "conversion")
    _check_model_type(getattr(getattr(model, "config", None), "model_type", None), metadata, path)
    for name, asked in (("chunk_size", chunk_size), ("retrieval", retrieval)):
        stored = int(metadata[name]) if name == "chunk_size" else metadata[name]
        if asked is not None and asked != stored:
            raise ValueError(f"{path} was calibrated for {name}={stored!r}, asked for {name}={asked!r}")
    check_base_model(model, metadata.get("base_model"), path)
    convert_to_bsbr(model, int(metadata["chunk_size"]), json.loads(metadata["compression_factor"]),
                    metadata["retrieval"], **json.loads(metadata["normalized_options"]))
    expected = new_parameters(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(name for name in set(expected) & set(tensors) if expected[name].shape != tensors[name].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match the converted model: missing {missing}, unexpected {unexpected}, "
                         f"wrong shape {wrong}")
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(tensors[name])
    return model


def load_meta_router(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the meta projections (``meta_q_proj``, ``meta_k_proj``: BSBR's chunk router) of the conversion stored in
    ``path`` — e.g. a ``retrieval="normalized"`` calibration, which trains them — into the converted ``model`` of any
    retrieval mode (e.g. ``retrieval="blocks"`` with ``router="meta"``); returns ``model``. The other stored tensors
    are not read.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``model`` is not converted; not a :func:`save_conversion` file; a file of another family, another
            base checkpoint (:func:`base_model_fingerprint`) or another ``chunk_size`` (the projections read chunk
            means of that size); stored meta projections missing or of other shapes. The message names them.
    """
    settings = conversion_settings(model)
    path, metadata, tensors = read_safetensors(path, CONVERSION_FORMAT, "conversion")
    _check_model_type(settings["model_type"], metadata, path)
    if int(metadata["chunk_size"]) != settings["chunk_size"]:
        raise ValueError(f"{path} was calibrated for chunk_size={metadata['chunk_size']}, the model has chunk_size="
                         f"{settings['chunk_size']}")
    check_base_model(model, metadata.get("base_model"), path)
    expected = {name: p for name, p in new_parameters(model).items()
                if name.split(".")[-2] in _META_MODULES}  # <layer>.<meta_q_proj|meta_k_proj>.<weight|bias>
    missing = sorted(name for name in expected if name not in tensors)
    wrong = sorted(name for name in expected if name in tensors and tensors[name].shape != expected[name].shape)
    if missing or wrong:
        raise ValueError(f"{path} does not hold this model's meta projections: missing {missing}, wrong shape {wrong}")
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(tensors[name])
    return model
