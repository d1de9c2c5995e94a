"""Calibrate a BSBR-converted model's new parameters by attention transfer, layer by layer.

Only the parameters conversion adds are trained (``meta_q_proj``, ``meta_k_proj`` and the normalised retrieval's
feature maps and mix logits, :mod:`bsbr.normalized`; the terraced retrieval's feature maps and mix logits,
:mod:`bsbr.terraced`); every pretrained weight stays frozen. Each converted
attention layer is fitted to reproduce the *original* layer's attention output (after ``o_proj``) on the
original model's own hidden states entering that layer (teacher forcing), with a mean squared error over the tokens
that retrieve (after the first chunk; after the first two for ``"terraced"``). Since the projections and RoPE are
frozen, queries, keys, values and the exact softmax part are computed once per layer; a training step only recomputes
the retrieval.

    captured = capture_attention_io(original, input_ids)            # one pass of the original model
    stats = calibrate_attention_transfer(converted, captured, steps=60)

Source: attention transfer as in LoLCATs (Zhang et al. 2024, arXiv 2410.10254, stage 1, output MSE) and
Hedgehog (Zhang et al. 2024, arXiv 2402.04347).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.models.llama.modeling_llama import LlamaAttention

from bsbr._checks import check_positive_int, check_positive_number
from bsbr.attention import chunk_mean
from bsbr.convert.llama import BSBRLlamaAttention
from bsbr.normalized import chunk_local_softmax
from bsbr.terraced import terraced_exact

__all__ = ["CALIBRATED_MODES", "LayerIO", "calibrate_attention_transfer", "capture_attention_io"]

#: the retrieval modes :func:`calibrate_attention_transfer` fits
CALIBRATED_MODES = ("normalized", "terraced")


@dataclass
class LayerIO:
    """What one original attention layer saw and returned: ``hidden`` ``[batch, n, hidden]`` (its input, after the
    layer norm), ``cos``/``sin`` (RoPE, as the decoder layer passed them) and ``output`` ``[batch, n, hidden]``."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    output: torch.Tensor


@torch.no_grad()
def capture_attention_io(model: nn.Module, input_ids: torch.Tensor) -> list[LayerIO]:
    """Run the original model once on ``input_ids`` ``[batch, n]`` and record every ``LlamaAttention``'s input and
    output (forward hooks). Returns one :class:`LayerIO` per attention layer, in module order.

    Memory: ``2·layers·batch·n·hidden`` floats (e.g. 30 layers, 4 × 1024 tokens, hidden 576: 0.57 GB in fp32).

    Raises:
        ValueError: ``model`` has no ``LlamaAttention`` (e.g. it is already converted).
    """
    layers = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    if not layers:
        raise ValueError(f"no LlamaAttention in {type(model).__name__}: pass the original (unconverted) model")
    captured: dict[int, LayerIO] = {}
    handles = []
    for index, layer in enumerate(layers):
        def hook(module, args, kwargs, output, index=index):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            captured[index] = LayerIO(hidden.detach(), cos.detach(), sin.detach(), output[0].detach())
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(layers))]


def _relative_mse(prediction, target):
    return ((prediction - target).pow(2).mean() / target.pow(2).mean()).item()


def calibrate_attention_transfer(
    model: nn.Module,
    captured: list[LayerIO],
    steps: int = 60,
    lr: float = 1e-2,
    meta_lr: float = 1e-4,
    mix_lr: float = 1e-1,
    progress: bool = True,
    student_input_ids: torch.Tensor | None = None,
) -> list[dict]:
    """Fit each :class:`bsbr.convert.llama.BSBRLlamaAttention` of ``model`` converted with ``retrieval="normalized"``
    or ``"terraced"`` (:data:`CALIBRATED_MODES`) to the original layer's output, in place. Llama family only (the
    captured ``cos``/``sin`` are its RoPE).

    Args:
        model: a converted Llama-family model whose attention layers use ``retrieval="normalized"`` or
            ``"terraced"`` (in module order, matching ``captured``); its pretrained weights are not changed.
        captured: :func:`capture_attention_io` of the original model.
        steps: full-batch Adam steps per layer (>= 1).
        lr: learning rate of the feature maps; meta_lr: of ``meta_q_proj``/``meta_k_proj`` (``"normalized"`` only:
            ``"terraced"`` does not route); mix_lr: of the mix logits.
        progress: show a tqdm bar over layers.
        student_input_ids: None = teacher forcing (each layer sees the original model's hidden states). Or the
            ``[batch, n]`` ids ``captured`` was made from: each layer then sees the hidden states of the converted
            model itself, with the layers before it already calibrated (targets stay the original outputs), so a
            layer learns to absorb upstream errors. Needs a ``LlamaForCausalLM``/``LlamaModel``-like ``model``
            (``embed_tokens``, ``layers``, ``rotary_emb``).
    Returns:
        one dict per layer: ``layer``, ``own_chunk_rel_mse`` (the mode without retrieval: own-chunk attention with
        the sink tokens if any; for ``"terraced"`` its exact region), ``initial_rel_mse``, ``final_rel_mse`` (MSE
        over the retrieving tokens divided by the target's mean square), ``mean_share`` (mean retrieved share ``s``
        after calibration), ``seconds``.
    Raises:
        ValueError: no normalised/terraced layers, a count that differs from ``captured``, ``steps < 1`` or a learning
            rate that is not a finite positive number (named).
    """
    check_positive_int(steps=steps)
    check_positive_number(lr=lr, meta_lr=meta_lr, mix_lr=mix_lr)
    layers = [m for m in model.modules()
              if isinstance(m, BSBRLlamaAttention) and m.retrieval_mode in CALIBRATED_MODES]
    if not layers:
        raise ValueError(f"model has no Llama attention converted with retrieval in {list(CALIBRATED_MODES)}; see "
                         "bsbr.convert.convert_to_bsbr")
    if len(layers) != len(captured):
        raise ValueError(f"model has {len(layers)} normalised/terraced attention layers but captured holds "
                         f"{len(captured)}")
    stats = []
    student = None
    if student_input_ids is not None:
        body = model.model if hasattr(model, "model") else model
        decoder_layers = list(body.layers)
        with torch.no_grad():
            student = body.embed_tokens(student_input_ids)  # [batch, n, hidden] residual stream
    bar = tqdm(list(zip(layers, captured)), desc="calibrating layers", unit="layer", disable=not progress,
               file=sys.stdout, ascii=True, ncols=100)
    for index, (layer, io) in enumerate(bar):
        started = time.perf_counter()
        size = layer.chunk_size
        was_retrieval, layer.retrieval = layer.retrieval, True
        with torch.no_grad():
            hidden = io.hidden if student is None else decoder_layers[index].input_layernorm(student)
            query, key, value = layer._project(hidden, (io.cos, io.sin))
            terraced = layer.retrieval_mode == "terraced"
            retrieval = layer.terraced if terraced else layer.normalized
            start = 2 * size if terraced else size  # first token that retrieves
            local = (terraced_exact if terraced else chunk_local_softmax)(query, key, value, size,
                                                                          retrieval.sink_size)  # frozen: computed once
            target = io.output[:, start:]  # [batch, n - start, hidden]: tokens that retrieve
            batch, heads = query.shape[:2]
            own = layer.o_proj(local[0][:, :, start:].transpose(1, 2).reshape(batch, -1, heads * layer.head_dim))
        if target.shape[1] == 0:
            raise ValueError(f"sequences of {io.hidden.shape[1]} tokens hold no token that retrieves (chunk {size}, "
                             f"retrieval={layer.retrieval_mode!r}): nothing to calibrate")
        params = [{"params": list(retrieval.query_map.parameters()) + (
                      [] if retrieval.key_map is retrieval.query_map else list(retrieval.key_map.parameters())),
                   "lr": lr},
                  {"params": [retrieval.mix_logit], "lr": mix_lr}]
        if not terraced:  # the terraced retrieval sums every older chunk: no meta projections to fit
            params.append({"params": list(layer.meta_q_proj.parameters()) + list(layer.meta_k_proj.parameters()),
                           "lr": meta_lr})
        trained = [p for group in params for p in group["params"]]
        for p in trained:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params)

        def predict(return_mix=False):
            if terraced:
                result = layer.terraced(query, key, value, size, local=local, return_mix=return_mix)
            else:
                meta_query, meta_key = layer.meta_from_means(chunk_mean(hidden, size))
                result = layer.normalized(query, key, value, meta_query, meta_key, size, local=local,
                                          return_mix=return_mix)
            out = result[0] if return_mix else result
            out = out[:, :, start:].transpose(1, 2).reshape(batch, -1, heads * layer.head_dim)  # [b, n - start, h·d]
            bias = None if layer.o_proj.bias is None else layer.o_proj.bias.detach()
            out = nn.functional.linear(out, layer.o_proj.weight.detach(), bias)  # frozen: no gradient kept
            return (out, result[1]) if return_mix else out

        with torch.no_grad():
            initial = _relative_mse(predict(), target)
        scale = target.pow(2).mean()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = (predict() - target).pow(2).mean() / scale
            loss.backward()
            optimizer.step()
        for p in trained:
            p.grad = None
        with torch.no_grad():
            prediction, share = predict(return_mix=True)
            row = {"layer": index, "own_chunk_rel_mse": _relative_mse(own, target), "initial_rel_mse": initial,
                   "final_rel_mse": _relative_mse(prediction, target), "mean_share": share[:, :, start:].mean().item(),
                   "seconds": time.perf_counter() - started}
        if student is not None:
            with torch.no_grad():
                student = decoder_layers[index](student, position_embeddings=(io.cos, io.sin))
                student = student[0] if isinstance(student, tuple) else student
        layer.retrieval = was_retrieval
        stats.append(row)
        bar.set_postfix(rel_mse=f"{row['final_rel_mse']:.3f}", own=f"{row['own_chunk_rel_mse']:.3f}")
    return stats
