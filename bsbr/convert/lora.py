"""The second calibration stage: LoRA adapters on the attention projections, trained end to end by distillation.

After layer-wise attention transfer (:mod:`bsbr.convert.calibrate`), LoLCATs trains low-rank adapters on the
attention projections of the converted model so that its next-token distributions match the original model's.
The adapters are PEFT's (injected in place: the model stays a ``LlamaForCausalLM``, so conversion, caches,
:func:`bsbr.convert.set_retrieval` and :func:`bsbr.convert.load_conversion` keep working); every pretrained weight
stays frozen. The same applies to an unconverted model (e.g. the sliding-window + LoRA control, trained with a
:func:`bsbr.masks.band_mask`).

    add_lora(student, rank=8)
    rows = train_lora_distillation(student, original, input_ids, steps=200)   # KL(original ‖ student)
    save_lora(student, "lora.safetensors", settings=conversion_settings(student))
    load_lora(load_conversion(fresh_original, "conversion.safetensors"), "lora.safetensors")

A LoRA'd projection computes ``W x + (alpha / rank) · B A x`` with ``A [rank, in]`` (random init) and ``B [out, rank]``
(zeros: the model is unchanged right after :func:`add_lora`).

File layout (:func:`save_lora`): safetensors tensors named by their parameter names in the model
(``…q_proj.lora_A.default.weight``), metadata ``{"format": "bsbr-lora", "version": "1", "rank", "alpha",
"target_modules" (JSON), "base_model" (JSON, :func:`bsbr.convert.checkpoint.base_model_fingerprint`),
"conversion" (JSON: :func:`bsbr.convert.checkpoint.conversion_settings` of the model the adapters were trained in, or
null for an unconverted model), "settings" (JSON)}``.

Sources: LoLCATs (Zhang et al. 2024, arXiv 2410.10254, stage 2); LoRA (Hu et al. 2021, arXiv 2106.09685); the
adapters are Hugging Face PEFT's (``peft.inject_adapter_in_model``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm

from bsbr._checks import check_int_at_least, check_positive_int, check_positive_number
from bsbr.convert.base import BSBRConvertedAttention
from bsbr.convert.checkpoint import (base_model_fingerprint, check_base_model, conversion_settings, read_safetensors,
                                     save_file_atomic)

__all__ = ["LORA_FORMAT", "LORA_TARGET_MODULES", "add_lora", "load_lora", "lora_parameters", "lora_settings",
           "save_lora", "train_lora_distillation"]

LORA_FORMAT = "bsbr-lora"
#: the attention projections LoLCATs adapts (Llama-family names)
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_ADAPTER = "default"  # PEFT's adapter name: parameters are ``<module>.lora_A.default.weight``


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` of every ``nn.Linear`` whose last name part is in ``target_modules``; each must match one."""
    if (isinstance(target_modules, str) or not isinstance(target_modules, (tuple, list)) or not target_modules
            or not all(isinstance(t, str) for t in target_modules)):
        raise ValueError(f"target_modules must be a non-empty tuple or list of module names (e.g. "
                         f"{LORA_TARGET_MODULES}), got {target_modules!r}")
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rpartition(".")[2] in target_modules]
    unmatched = sorted(set(target_modules) - {name.rpartition(".")[2] for name, _ in found})
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no nn.Linear of {type(model).__name__}")
    return found


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
             target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place (PEFT, ``lora_dropout=0``, ``bias="none"``) and make them its only
    trainable parameters; returns ``model`` (same object and type).

    Args:
        model: a transformers model, converted (:func:`bsbr.convert.convert_to_bsbr`) or not.
        rank: ``r``, the adapters' rank (integer >= 1).
        alpha: ``lora_alpha`` (finite, > 0): the update is scaled by ``alpha / rank``.
        target_modules: last name parts of the ``nn.Linear`` modules to adapt; each must match at least one.
    Memory: ``rank · (in + out)`` parameters per adapted projection (SmolLM2-135M, rank 8, q/k/v/o: 0.92 M).
    Raises:
        ValueError: a bad ``rank``/``alpha``/``target_modules`` (empty, or a name matching no ``nn.Linear``), or a
            ``model`` that already holds LoRA; the model is then unchanged.
    """
    check_positive_int(rank=rank)
    check_positive_number(alpha=alpha)
    if _lora_layers(model):
        raise ValueError("model already holds LoRA adapters; add them to a model without (e.g. a fresh copy)")
    _targets(model, target_modules)
    config = LoraConfig(r=rank, lora_alpha=float(alpha), target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none")
    inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in lora_parameters(model).values():
        parameter.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA ``A`` (``[rank, in]``) and ``B`` (``[out, rank]``) matrices of ``model``, by parameter name.

    Raises:
        ValueError: ``model`` holds no LoRA (see :func:`add_lora`).
    """
    found = {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    if not found:
        raise ValueError("model holds no LoRA adapters; add them with bsbr.convert.add_lora")
    return found


def _check_mask(name: str, mask) -> None:
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4)):
        raise ValueError(f"{name} must be None or a 2-D [batch, seq_len] / 4-D [batch, 1, seq_len, seq_len] tensor, "
                         f"got {mask if not isinstance(mask, torch.Tensor) else list(mask.shape)!r}")


def _next_token_logp(model: nn.Module, input_ids: torch.Tensor, mask) -> torch.Tensor:
    """``[seq_len, vocab]`` fp32 log-probabilities of the next token at every position of ``input_ids [1, n]``."""
    device = next(model.parameters()).device
    mask = None if mask is None else mask.to(device)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def train_lora_distillation(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    *,
    student_attention_mask: torch.Tensor | None = None,
    teacher_attention_mask: torch.Tensor | None = None,
    eval_every: int = 0,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Train ``student``'s LoRA adapters to match ``teacher``'s next-token distributions, in place (LoLCATs stage 2).

    Step ``i`` (1-based) runs sequence ``(i - 1) % num_sequences`` (batch 1) through the teacher (``torch.no_grad``)
    and the student, and takes one AdamW step (``weight_decay=0``, on :func:`lora_parameters` only) on
    ``KL(teacher ‖ student)`` of the next-token distributions, in nats, averaged over all ``seq_len`` positions
    (fp32 ``log_softmax``). The learning rate warms up linearly over ``min(10, steps // 10)`` steps, then stays at
    ``lr``. The student runs in training mode during the steps (its dropout, if any, seeded by ``seed``); the teacher
    as given.

    Args:
        student: a model holding LoRA (:func:`add_lora`), e.g. a converted copy of ``teacher``.
        teacher: the original model, a separate object in eval mode (not trained; it may share frozen tensors with
            the student, as :func:`bsbr.convert.converted_copy` does).
        input_ids: ``[num_sequences, seq_len]`` integer token ids of the training text.
        steps: optimiser steps (>= 0; 0 = only the step-0 evaluation).
        lr: peak learning rate (finite, > 0).
        student_attention_mask, teacher_attention_mask: None, or the ``attention_mask`` each model gets every step:
            2-D ``[1, seq_len]`` or 4-D ``[1, 1, seq_len, seq_len]`` (e.g. :func:`bsbr.masks.band_mask` for the
            sliding-window control student).
        eval_every: 0 = no evaluation; else call ``eval_fn(student)`` (student in eval mode, under
            ``torch.no_grad``) before the first step, every ``eval_every`` steps and after the last step.
        eval_fn: returns a dict of metrics, merged into that step's row (keys other than step/loss/seconds).
        progress: show a tqdm bar with the loss.
        seed: integer >= 0 seeding torch's RNG for the steps (the global RNG state is restored after).
    Returns:
        one row per step ``{"step", "loss" (KL in nats, before that step's update), "seconds" (training time since
        the start, evaluations excluded)}``, plus a ``"step": 0`` row (``loss`` None) when evaluating, with the
        metrics merged into the evaluated steps' rows. The student is left in eval mode with no gradients kept.
    Raises:
        ValueError: a bad ``steps``/``lr``/``input_ids``/``eval_every``/``eval_fn``/mask, a ``student`` without
            LoRA, a ``teacher`` that is the student or is in training mode.
    """
    check_int_at_least(0, steps=steps, eval_every=eval_every, seed=seed)
    check_positive_number(lr=lr)
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point
            or input_ids.dtype.is_complex or input_ids.dtype == torch.bool or input_ids.numel() == 0):
        raise ValueError(f"input_ids must be a non-empty 2-D integer tensor [num_sequences, seq_len], got "
                         f"{list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
                         f"{' ' + str(input_ids.dtype) if isinstance(input_ids, torch.Tensor) else ''}")
    if eval_every > 0 and not callable(eval_fn):
        raise ValueError(f"eval_every={eval_every} needs an eval_fn (a callable: student -> dict), got {eval_fn!r}")
    if eval_every == 0 and eval_fn is not None:
        raise ValueError("eval_fn is given but eval_every=0 would never call it; pass eval_every >= 1")
    _check_mask("student_attention_mask", student_attention_mask)
    _check_mask("teacher_attention_mask", teacher_attention_mask)
    if teacher is student:
        raise ValueError("teacher must be a separate model from student (the original, unadapted one)")
    if teacher.training:
        raise ValueError("teacher is in training mode (dropout would make its targets noisy); call teacher.eval()")
    if not _lora_layers(student):
        raise ValueError("student holds no LoRA adapters; add them with bsbr.convert.add_lora")
    trained = list(lora_parameters(student).values())
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    warmup = min(10, steps // 10)
    device = trained[0].device
    rows, seconds = [], 0.0

    def evaluate(row: dict) -> None:
        student.eval()
        with torch.no_grad():
            metrics = eval_fn(student)
        if not isinstance(metrics, dict) or {"step", "loss", "seconds"} & set(metrics):
            raise ValueError(f"eval_fn must return a dict without the keys step/loss/seconds, got {metrics!r}")
        row.update(metrics)

    bar = tqdm(range(1, steps + 1), desc="LoRA distillation", unit="step", disable=not progress, file=sys.stdout,
               ascii=True, ncols=100)
    try:
        if eval_every:
            rows.append({"step": 0, "loss": None, "seconds": 0.0})
            evaluate(rows[-1])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for step in bar:
                started = time.perf_counter()
                student.train()
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, step / warmup) if warmup else lr
                sequence = input_ids[(step - 1) % input_ids.shape[0]][None]  # [1, seq_len]
                with torch.no_grad():
                    target = _next_token_logp(teacher, sequence, teacher_attention_mask).to(device)  # [n, vocab]
                prediction = _next_token_logp(student, sequence, student_attention_mask)
                loss = nn.functional.kl_div(prediction, target, log_target=True, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seconds += time.perf_counter() - started
                rows.append({"step": step, "loss": loss.item(), "seconds": seconds})
                bar.set_postfix(kl=f"{rows[-1]['loss']:.4f}")
                if eval_every and (step % eval_every == 0 or step == steps):
                    evaluate(rows[-1])
    finally:  # also after an error: no gradients kept, eval mode
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        student.eval()
    return rows


def _lora_config(model: nn.Module) -> tuple[int, float, list[str]]:
    """``(rank, alpha, target_modules)`` of ``model``'s LoRA adapters (target names in module order)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model holds no LoRA adapters; add them with bsbr.convert.add_lora")
    _, first = layers[0]
    targets = list(dict.fromkeys(name.rpartition(".")[2] for name, _ in layers))
    return first.r[_ADAPTER], float(first.lora_alpha[_ADAPTER]), targets


def _conversion(model: nn.Module) -> dict | None:
    """:func:`bsbr.convert.checkpoint.conversion_settings` of a converted ``model``, None for an unconverted one."""
    converted = any(isinstance(module, BSBRConvertedAttention) for module in model.modules())
    return conversion_settings(model) if converted else None


def save_lora(model: nn.Module, path: str | os.PathLike, settings: dict | None = None) -> None:
    """Write ``model``'s LoRA tensors (:func:`lora_parameters`) to ``path`` (safetensors, atomically: a temporary file
    in the same folder, then ``os.replace``), with its rank, alpha, target modules, base-model fingerprint and
    ``settings`` (any JSON-serialisable dict: e.g. the conversion settings or the mask the student was trained with)
    in the metadata. Nothing of the pretrained checkpoint is written.

    Raises:
        ValueError: ``model`` holds no LoRA, or ``settings`` is not a JSON-serialisable dict.
    """
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"settings must be None or a dict, got {type(settings).__name__}")
    try:
        settings_json = json.dumps(settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"settings must be JSON-serialisable: {error}") from None
    rank, alpha, targets = _lora_config(model)
    tensors = {name: p.detach().contiguous().cpu() for name, p in lora_parameters(model).items()}
    metadata = {"format": LORA_FORMAT, "version": "1", "rank": str(rank), "alpha": json.dumps(alpha),
                "target_modules": json.dumps(targets), "base_model": json.dumps(base_model_fingerprint(model)),
                "conversion": json.dumps(_conversion(model)), "settings": settings_json}
    save_file_atomic(tensors, path, metadata)


def lora_settings(path: str | os.PathLike) -> dict:
    """``{"rank", "alpha", "target_modules", "base_model", "conversion", "settings"}`` stored by :func:`save_lora` at ``path``.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not a file written by :func:`save_lora`.
    """
    return _settings(read_safetensors(path, LORA_FORMAT, "LoRA", tensors=False)[1])


def _settings(metadata: dict[str, str]) -> dict:
    return {"rank": int(metadata["rank"]), "alpha": json.loads(metadata["alpha"]),
            "target_modules": json.loads(metadata["target_modules"]), "base_model": json.loads(metadata["base_model"]),
            "conversion": json.loads(metadata.get("conversion", "null")), "settings": json.loads(metadata["settings"])}


def _flat(settings: dict) -> dict:
    """``{"chunk_size": 8, "normalized_options": {"sink_size": 4}}`` -> ``{"chunk_size": 8,
    "normalized_options.sink_size": 4}``."""
    flat = {}
    for key, value in settings.items():
        flat.update({f"{key}.{inner}": v for inner, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def _check_conversion(path, trained_in: dict | None, given: dict | None) -> None:
    """ValueError unless ``given`` (the model's :func:`_conversion`) is ``trained_in`` (the adapters' at ``path``),
    naming only the settings that differ, with both values."""
    if trained_in == given:
        return
    if trained_in is None or given is None:
        raise ValueError(f"{path} holds adapters trained in a model with conversion {trained_in}, but model has "
                         f"conversion {given}: " + ("load them onto the unconverted model" if trained_in is None
                                                    else "convert it that way first (bsbr.convert.load_conversion)"))
    trained_in, given = _flat(trained_in), _flat(given)

    def shown(settings: dict, key: str) -> str:
        return repr(settings[key]) if key in settings else "absent"

    differences = [f"{key} {shown(trained_in, key)} in the file, {shown(given, key)} in model"
                   for key in sorted(set(trained_in) | set(given))
                   if key not in trained_in or key not in given or trained_in[key] != given[key]]
    raise ValueError(f"{path} holds adapters trained in a model converted with other settings: "
                     + "; ".join(differences) + ". Convert model the same way first (bsbr.convert.load_conversion)")


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add LoRA to ``model`` in place with the rank, alpha and target modules stored in ``path`` (:func:`add_lora`)
    and load the stored tensors into it; returns ``model``. For a converted student, convert first (e.g.
    :func:`bsbr.convert.load_conversion`), then load its LoRA.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a file written by :func:`save_lora`; a ``model`` of another checkpoint than the file was
            trained on (its :func:`bsbr.convert.checkpoint.base_model_fingerprint` differs); a ``model`` that already
            holds LoRA; a ``model`` converted with other settings than the one the adapters were trained in (the
            message names each differing setting with both values), or converted where that one was not, or the
            reverse; stored tensors whose names or shapes do not match the adapters ``model`` gets (e.g. converted
            vs not, another architecture). The message names them; ``model`` is then unchanged.
    """
    path, metadata, tensors = read_safetensors(path, LORA_FORMAT, "LoRA")
    settings = _settings(metadata)
    check_base_model(model, metadata["base_model"], path)
    if _lora_layers(model):
        raise ValueError("model already holds LoRA adapters; load onto a model without (e.g. a fresh copy)")
    if "conversion" in metadata:  # files written before the key existed are not checked
        _check_conversion(path, json.loads(metadata["conversion"]), _conversion(model))
    rank = settings["rank"]
    expected = {}
    for name, linear in _targets(model, settings["target_modules"]):  # the names and shapes PEFT will give them
        expected[f"{name}.lora_A.{_ADAPTER}.weight"] = (rank, linear.in_features)
        expected[f"{name}.lora_B.{_ADAPTER}.weight"] = (linear.out_features, rank)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(name for name in set(expected) & set(tensors) if tuple(tensors[name].shape) != expected[name])
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match the model's LoRA adapters: missing {missing}, unexpected "
                         f"{unexpected}, wrong shape {wrong}")
    add_lora(model, rank, settings["alpha"], settings["target_modules"])
    parameters = lora_parameters(model)
    if set(parameters) != set(expected):
        raise RuntimeError(f"PEFT named the adapters differently than expected: "
                           f"{sorted(set(parameters) ^ set(expected))}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name])
    return model
