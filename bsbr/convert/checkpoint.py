"""Save and load what conversion adds to a pretrained model, as safetensors (never a pickle).

A converted model is its pretrained checkpoint plus a few new modules per attention layer: ``meta_q_proj``,
``meta_k_proj``, ``compression`` (with ``compression_factor``) and, with ``retrieval="normalized"``, ``normalized``
(feature maps and mix logits). :func:`save_conversion` writes only those tensors (e.g. after calibration), with the
conversion settings in the file's metadata; :func:`load_conversion` converts a freshly loaded original model with
the same settings and loads them, so ``load_conversion(load_pretrained()[0], path)`` rebuilds the calibrated model.

File layout: safetensors tensors named by their parameter names in the converted model (a tied feature map is stored
once, under its query-map name), metadata ``{"format": "bsbr-conversion", "version": "1", "model_type",
"chunk_size", "compression_factor", "retrieval", "normalized_options" (JSON)}``.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bsbr.convert.base import converted_layers
from bsbr.convert.families import convert_to_bsbr
from bsbr.convert.retrieval import RETRIEVAL_MODES

__all__ = ["CONVERSION_FORMAT", "conversion_settings", "load_conversion", "new_parameters", "save_conversion"]

CONVERSION_FORMAT = "bsbr-conversion"
_META_MODULES = ("meta_q_proj", "meta_k_proj")  # every mode's; a mode adds its own (RetrievalMode.new_modules)


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
    """Write the parameters conversion added to ``model`` (:func:`new_parameters`) and its settings to ``path``
    (safetensors). Nothing of the pretrained checkpoint is written.

    Raises:
        ValueError: ``model`` is not converted.
    """
    settings = conversion_settings(model)
    tensors = {name: p.detach().contiguous().cpu() for name, p in new_parameters(model).items()}
    metadata = {"format": CONVERSION_FORMAT, "version": "1", "model_type": settings["model_type"],
                "chunk_size": str(settings["chunk_size"]), "compression_factor": json.dumps(settings["compression_factor"]),
                "retrieval": settings["retrieval"], "normalized_options": json.dumps(settings["normalized_options"])}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_conversion(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Convert the *original* pretrained ``model`` in place with the settings stored in ``path`` and load the
    stored parameters into it; returns ``model``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a file written by :func:`save_conversion`, a model of another family, or stored tensors
            that do not match the converted model's new parameters (names or shapes); the message names them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no conversion file at {path}")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != CONVERSION_FORMAT:
            raise ValueError(f"{path} is not a {CONVERSION_FORMAT} file (metadata format={metadata.get('format')!r})")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != metadata["model_type"]:
        raise ValueError(f"{path} holds a conversion of a {metadata['model_type']!r} model, got model_type="
                         f"{model_type!r}")
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
