"""Scoring language-model variants against a reference model on common token positions.

The conversion notebooks (02, 03) run several variants of one pretrained causal LM (converted BSBR models,
own-chunk-only attention, a sliding window) on the same held-out windows and compare each with the original:
perplexity of the variant, KL divergence of its next-token distribution from the original's, top-k agreement of
the greedy tokens and the cosine similarity of the final hidden states. The per-token metrics themselves are in
:mod:`bsbr.metrics`; this module runs the models and restricts the metrics to the positions being scored.

Shapes: ``input_ids`` ``[batch, n]``; hidden states ``[batch, n, hidden]``; logits ``[batch, n, vocab]``. The
logits at position ``t`` predict token ``t + 1``, so next-token metrics exist for positions ``0 .. n - 2``.
"""

from __future__ import annotations

import torch

from bsbr import metrics as M

__all__ = ["chunk_means", "final_hidden_and_logits", "per_token_metrics", "positions_from", "score_against_reference",
           "seed_retrieval_ratio"]


def final_hidden_and_logits(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (after the last norm) ``[batch, n, hidden]`` and logits ``[batch, n, vocab]`` of a
    Hugging Face causal LM ``lm`` (``lm.model`` the decoder, ``lm.lm_head`` the head).

    ``attention_mask`` is passed on as given (a 4-D boolean mask ``[batch, 1, n, n]`` makes transformers run the
    original model as e.g. sliding-window attention, see :func:`bsbr.masks.band_mask`); ``model_kwargs`` (e.g.
    ``cache=``, ``use_cache=True``) go to ``lm.model``. Runs under the caller's grad mode.
    """
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state
    return hidden, lm.lm_head(hidden)


def per_token_metrics(reference_hidden: torch.Tensor, reference_logits: torch.Tensor, hidden: torch.Tensor,
                      logits: torch.Tensor, input_ids: torch.Tensor, topk=(1,)) -> dict[str, torch.Tensor]:
    """A variant's per-token metrics against the reference run on the same ``input_ids`` ``[batch, n]``.

    Returns ``{"cos", "mse", "kl", "nll", "top<k>" for k in topk}``: ``[batch, n]`` tensors (hidden-state cosine and
    mean squared difference, KL(reference ‖ variant) in nats, 1.0 where the reference's greedy token is in the
    variant's top k), and ``nll`` ``[batch, n - 1]`` (the variant's next-token negative log-likelihood, nats).

    Raises:
        ValueError: mismatched shapes (from :mod:`bsbr.metrics`).
    """
    return {"cos": M.cosine_similarity(reference_hidden, hidden), "mse": M.squared_error(reference_hidden, hidden),
            "kl": M.kl_divergence(reference_logits, logits), "nll": M.token_nll(logits, input_ids),
            **{f"top{k}": M.topk_agreement(reference_logits, logits, k) for k in topk}}


def positions_from(parts: list[torch.Tensor], start: int) -> torch.Tensor:
    """Per-token tensors ``[1, n]`` (one per window) restricted to positions ``>= start`` and flattened into one
    ``[windows · (n - start)]`` tensor."""
    return torch.cat([p[:, start:].reshape(-1) for p in parts])


def chunk_means(parts: list[torch.Tensor], size: int) -> list[float]:
    """Mean of per-token values ``[1, n]`` (one tensor per window) over the windows and then over each block of
    ``size`` consecutive positions (the last block may be shorter): one float per chunk index, in order."""
    per_token = torch.cat(parts).double().mean(0)  # [n] ([n - 1] for nll), mean over windows
    return [per_token[i * size : (i + 1) * size].mean().item() for i in range(-(-per_token.shape[0] // size))]


def score_against_reference(reference_hidden: torch.Tensor, reference_logits: torch.Tensor, hidden: torch.Tensor,
                            logits: torch.Tensor, input_ids: torch.Tensor, start: int) -> dict[str, float]:
    """Perplexity of a variant and its similarity to the reference on the predictions made at positions
    ``start .. n - 2`` (the logits at ``t`` score token ``t + 1``), every window of ``input_ids`` ``[windows, n]``.

    Returns ``{"perplexity", "kl_to_original" (nats/token), "top1_agreement", "hidden_cosine"}``, the last three
    means over the scored positions and windows.

    Raises:
        ValueError: ``start`` not in ``[0, n - 1)``, or mismatched shapes.
    """
    n = input_ids.shape[1]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n - 1:
        raise ValueError(f"start must be an integer in [0, n - 1 = {n - 1}), got {start!r}")
    nll = M.token_nll(logits[:, start:], input_ids[:, start:])
    span = slice(start, n - 1)
    return {"perplexity": M.perplexity(nll),
            "kl_to_original": M.kl_divergence(reference_logits[:, span], logits[:, span]).mean().item(),
            "top1_agreement": M.topk_agreement(reference_logits[:, span], logits[:, span], 1).mean().item(),
            "hidden_cosine": M.cosine_similarity(reference_hidden[:, span], hidden[:, span]).mean().item()}


def seed_retrieval_ratio(base, converted, input_ids: torch.Tensor, chunk_size: int) -> list[dict]:
    """Per layer, how large the seed formula's retrieved term is next to the local attention output.

    Every layer of ``converted`` (a seed-formula BSBR conversion of the Llama-family ``base``) runs on the *original*
    model's hidden states (so all layers see the same input in both), with and without retrieval; the ratio
    ``‖with − without‖ / ‖without‖`` of the attention outputs (after ``o_proj``) is taken per token after the first
    chunk of ``input_ids`` ``[1, n]``.

    Returns one ``{"layer", "median_ratio", "p90_ratio"}`` per layer, in layer order. Leaves every layer's
    ``retrieval`` on. Runs under the caller's grad mode (use ``torch.inference_mode()``).
    """
    states = base.model(input_ids=input_ids, output_hidden_states=True).hidden_states  # [l]: input of layer l
    position_embeddings = base.model.rotary_emb(states[0], torch.arange(input_ids.shape[1])[None])
    rows = []
    for index, layer in enumerate(converted.model.layers):
        normed = layer.input_layernorm(states[index])  # [1, n, hidden]
        attn = layer.self_attn
        with_retrieval, _ = attn(normed, position_embeddings=position_embeddings)
        attn.retrieval = False
        local, _ = attn(normed, position_embeddings=position_embeddings)
        attn.retrieval = True
        ratio = ((with_retrieval - local).norm(dim=-1) / local.norm(dim=-1))[0, chunk_size:]  # tokens after chunk 0
        rows.append({"layer": index, "median_ratio": ratio.median().item(), "p90_ratio": ratio.quantile(0.9).item()})
    return rows
