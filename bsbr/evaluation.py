"""Scoring language-model variants against a reference model on common token positions.

The conversion notebooks (02, 03) run several variants of one pretrained causal LM (converted BSBR models,
own-chunk-only attention, a sliding window) on the same held-out windows and compare each with the original:
perplexity of the variant, KL divergence of its next-token distribution from the original's, top-k agreement of
the greedy tokens and the cosine similarity of the final hidden states. The per-token metrics themselves are in
:mod:`bsbr.metrics`; this module runs the models and restricts the metrics to the positions being scored.

Notebook 02's steps are here too: :func:`one_chunk_logit_differences` (one chunk is the original),
:func:`collect_variant_metrics` (every variant on every window), :func:`similarity_table` and :func:`per_chunk_table`
(what the report shows), :func:`seed_retrieval_ratio` and :func:`gpt2_perplexity` (the GPT-2 path).

Shapes: ``input_ids`` ``[batch, n]``; hidden states ``[batch, n, hidden]``; logits ``[batch, n, vocab]``. The
logits at position ``t`` predict token ``t + 1``, so next-token metrics exist for positions ``0 .. n - 2``.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch
from tqdm import tqdm

from bsbr import metrics as M
from bsbr.convert import converted_copy, load_pretrained, set_retrieval
from bsbr.data import token_windows
from bsbr.masks import band_mask

__all__ = ["chunk_means", "collect_variant_metrics", "final_hidden_and_logits", "gpt2_perplexity",
           "one_chunk_logit_differences", "per_chunk_table", "per_token_metrics", "perplexity_from", "positions_from",
           "score_against_reference", "seed_perplexity", "seed_retrieval_ratio", "similarity_table"]


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


def perplexity_from(lm, windows: torch.Tensor, start: int, attention_mask: torch.Tensor | None = None) -> float:
    """Perplexity of ``lm`` on every window of ``windows`` ``[windows, n]`` (run one at a time, under
    ``attention_mask``: None or a 4-D mask such as :func:`bsbr.masks.band_mask`), scoring the predictions made at
    positions ``start .. n - 2``. Runs under ``torch.inference_mode()``.

    Raises:
        ValueError: ``windows`` not ``[windows, n]``, or ``start`` not an integer in ``[0, n - 1)``.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be [windows, n], got shape {tuple(windows.shape)}")
    n = windows.shape[1]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n - 1:
        raise ValueError(f"start must be an integer in [0, n - 1 = {n - 1}), got {start!r}")
    with torch.inference_mode():
        nll = torch.cat([M.token_nll(final_hidden_and_logits(lm, w[None], attention_mask)[1], w[None])[:, start:]
                         for w in windows])  # [windows, n - 1 - start]
    return M.perplexity(nll)


def one_chunk_logit_differences(base, input_ids: torch.Tensor, **normalized_options) -> dict[str, float]:
    """How far each variant's logits are from the original's when the whole text is one chunk (nothing to retrieve).

    On ``input_ids`` ``[batch, n]`` the Llama- or GPT-2-family ``base`` is compared with its seed-formula,
    normalised and (Llama family) terraced BSBR conversions at ``chunk_size = n`` (``normalized_options`` go to the
    normalised and terraced ones, e.g. ``sink_size``) and with itself under a sliding-window mask of width ``n``
    (:func:`bsbr.masks.band_mask`): all must be the original up to fp32 rounding. A window of ``n // 2`` tokens is the control that must differ
    (the mask is used).

    Returns:
        ``{"seed", "normalized", "terraced", "sliding_window", "half_window", "max_abs_logit"}`` (``"terraced"``
        only for a Llama-family ``base``): the max |logit difference| to
        the original of each (logit units), and the largest |logit| of the original (the scale). ``base`` is
        unchanged (the conversions are copies). Runs under ``torch.inference_mode()``.
    Raises:
        ValueError: ``input_ids`` not ``[batch, n]`` with ``n >= 2``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, n] with n >= 2, got shape {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    with torch.inference_mode():
        _, reference = final_hidden_and_logits(base, input_ids)  # [batch, n, vocab]

        def difference(lm, mask=None) -> float:
            return (final_hidden_and_logits(lm, input_ids, mask)[1] - reference).abs().max().item()

        terraced = ({} if base.config.model_type == "gpt2" else
                    {"terraced": difference(converted_copy(base, n, retrieval="terraced", **normalized_options))})
        return {"seed": difference(converted_copy(base, n)),
                "normalized": difference(converted_copy(base, n, retrieval="normalized", **normalized_options)),
                **terraced,
                "sliding_window": difference(base, band_mask(n, n)),
                "half_window": difference(base, band_mask(n, n // 2)),
                "max_abs_logit": reference.abs().max().item()}


def collect_variant_metrics(base, windows: torch.Tensor, variants: dict, topk=(1,),
                            tolerances: dict[str, float] | None = None) -> dict:
    """Run the original model and every variant on each window and keep the variants' per-token metrics.

    Args:
        base: the original causal LM; windows: ``[windows, n]`` token ids, run one window at a time.
        variants: ``{(chunk_size, name): (lm, attention_mask, retrieval)}``: ``lm`` runs with ``attention_mask``
            (None, or a 4-D mask such as :func:`bsbr.masks.band_mask`) after ``set_retrieval(lm, retrieval)`` when
            ``retrieval`` is not None (one converted model can serve with and without retrieval).
        topk: the ``top<k>`` agreements kept; tolerances: name -> the max |logit difference| to the original allowed
            on a variant's first chunk, where it retrieves nothing (default 1e-4, logit units).
    Returns:
        ``{(chunk_size, name): {metric: [per-token tensor per window]}}`` (:func:`per_token_metrics`: ``[1, n]``,
        ``nll`` ``[1, n - 1]``) plus ``(0, "original")``: ``{"nll": [...]}``, the input of :func:`similarity_table`
        and :func:`per_chunk_table`. Every converted ``lm`` is left with retrieval on. Shows tqdm progress (one step
        per forward).
    Raises:
        RuntimeError: a variant's first chunk differs from the original's by more than its tolerance.
    """
    tolerances = tolerances or {}
    collected = {}
    jobs = [(w, key) for w in range(windows.shape[0]) for key in [(0, "original"), *variants]]
    with torch.inference_mode():
        for w, key in tqdm(jobs, desc="windows × variants", unit="forward", file=sys.stdout, ascii=True, ncols=100):
            x = windows[w : w + 1]  # [1, n]
            if key == (0, "original"):  # first for every window: the reference of the variants that follow
                hidden, logits = final_hidden_and_logits(base, x)
                collected.setdefault(key, {}).setdefault("nll", []).append(M.token_nll(logits, x))
                continue
            lm, mask, retrieval = variants[key]
            if retrieval is not None:
                set_retrieval(lm, retrieval)
            hidden_v, logits_v = final_hidden_and_logits(lm, x, mask)
            for name, value in per_token_metrics(hidden, logits, hidden_v, logits_v, x, topk).items():
                collected.setdefault(key, {}).setdefault(name, []).append(value)
            first_chunk_diff = (logits_v[:, : key[0]] - logits[:, : key[0]]).abs().max().item()
            if first_chunk_diff > tolerances.get(key[1], 1e-4):
                raise RuntimeError(f"{key}: the first chunk differs from the original by {first_chunk_diff}")
    for lm, _, retrieval in variants.values():
        if retrieval is not None:
            set_retrieval(lm, True)
    return collected


def similarity_table(collected: dict, seq_len: int, labels: dict[str, str], topk=(1,)) -> pd.DataFrame:
    """One row per (chunk size, variant): perplexity and similarity to the original, scored after the first chunk.

    Args:
        collected: :func:`collect_variant_metrics`: ``{(chunk_size, variant): {metric: [per-token tensor [1, n] per
            window]}}`` (``nll`` ``[1, n - 1]``), plus ``(0, "original")`` holding the original's ``{"nll": [...]}``.
        seq_len: the window length ``n`` (tokens); labels: variant -> label; topk: the ``top<k>`` columns.
    Returns:
        ``[seq_len, chunk_size, variant, label, num_chunks, windows, tokens_scored, ppl, ppl_original, ppl_ratio,
        nll, kl, cos, mse, top<k>...]`` sorted by chunk size and variant: every metric is the mean over the positions
        ``>= chunk_size`` of every window (nll in nats/token, kl in nats/token), ``ppl_original`` the original's on
        the same tokens.
    Raises:
        KeyError: no ``(0, "original")`` entry, or a variant without a label.
    """
    original = collected[(0, "original")]["nll"]
    rows = []
    for (c, variant), values in collected.items():
        if variant == "original":
            continue
        summary = M.summarize({name: positions_from(parts, c) for name, parts in values.items()})
        original_nll = positions_from(original, c)
        rows.append({"seq_len": seq_len, "chunk_size": c, "variant": variant, "label": labels[variant],
                     "num_chunks": -(-seq_len // c), "windows": len(original), "tokens_scored": original_nll.numel(),
                     "ppl": summary["ppl"], "ppl_original": M.perplexity(original_nll),
                     "ppl_ratio": summary["ppl"] / M.perplexity(original_nll), "nll": summary["nll"],
                     "kl": summary["kl"], "cos": summary["cos"], "mse": summary["mse"],
                     **{f"top{k}": summary[f"top{k}"] for k in topk}})
    return pd.DataFrame(rows).sort_values(["chunk_size", "variant"]).reset_index(drop=True)


def per_chunk_table(collected: dict, seq_len: int, chunk_sizes) -> pd.DataFrame:
    """Every metric of :func:`similarity_table`'s ``collected`` per chunk index, averaged over windows: where the
    damage happens.

    A variant is grouped by its own chunk size; the original's ``nll`` (key ``(0, "original")``) by each of
    ``chunk_sizes`` for comparison. Each value is the mean over windows, then over the positions of chunk ``i``
    (all positions, the first chunk included; the last chunk may be shorter, and ``nll`` has ``n - 1`` positions).

    Returns:
        ``[seq_len, chunk_size, variant, chunk_index, metric, value]`` sorted by the first five (long format).
    """
    columns = ["seq_len", "chunk_size", "variant", "chunk_index", "metric", "value"]
    rows = [{"seq_len": seq_len, "chunk_size": size, "variant": variant, "chunk_index": index, "metric": name,
             "value": value}
            for (c, variant), values in collected.items()
            for size in ([c] if variant != "original" else chunk_sizes)
            for name, parts in values.items()
            for index, value in enumerate(chunk_means(parts, size))]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["seq_len", "chunk_size", "variant", "metric", "chunk_index"]).reset_index(drop=True)


def seed_perplexity(lm, input_ids: torch.Tensor, chunk_size: int, desc: str = "windows") -> dict:
    """Perplexity of a pretrained causal LM and of its seed-formula BSBR conversion at ``chunk_size``, on every
    window of ``input_ids`` ``[windows, n]``, scored after the first chunk (the logits at ``chunk_size .. n - 2``).

    Returns:
        ``{"chunk_size", "tokens_scored", "original_ppl", "seed_ppl"}`` (perplexities rounded to 4 decimals). ``lm``
        is unchanged (the conversion is a copy). Shows one tqdm step per window (``desc``).
    Raises:
        ValueError: ``chunk_size`` not an integer in ``[1, n - 1)``.
    """
    n = input_ids.shape[1]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size < n - 1:
        raise ValueError(f"chunk_size must be an integer in [1, n - 1 = {n - 1}), got {chunk_size!r}")
    bsbr_lm = converted_copy(lm, chunk_size)
    nll = {"original": [], "seed": []}  # per window [1, n - 1 - chunk_size]
    with torch.inference_mode():
        for w in tqdm(range(input_ids.shape[0]), desc=desc, unit="window", file=sys.stdout, ascii=True, ncols=100):
            x = input_ids[w : w + 1]
            nll["original"].append(M.token_nll(lm(x).logits, x)[:, chunk_size:])
            nll["seed"].append(M.token_nll(bsbr_lm(x).logits, x)[:, chunk_size:])
    return {"chunk_size": chunk_size, "tokens_scored": sum(p.numel() for p in nll["original"]),
            **{f"{k}_ppl": round(M.perplexity(torch.cat(v, 1)), 4) for k, v in nll.items()}}


def gpt2_perplexity(gpt2_model: str | None, documents, seq_len: int, num_windows: int, chunk_size: int) -> dict:
    """The GPT-2 path of the conversion experiment: load ``gpt2_model`` (a hub id or local folder, with
    :func:`bsbr.convert.load_pretrained`), cut ``num_windows`` windows of ``seq_len`` tokens from ``documents`` with
    its own tokenizer, and measure :func:`seed_perplexity` at ``chunk_size``.

    A model that cannot be loaded (no hub, no cache) is reported, not raised.

    Returns:
        ``{"model": gpt2_model, "status": "measured", "chunk_size", "tokens_scored", "original_ppl", "seed_ppl"}``,
        or ``{"model", "status": "skipped", "reason"}`` when ``gpt2_model`` is None or its loading failed (the reason
        names the exception and the first line of its message).
    Raises:
        ValueError: ``chunk_size`` not in ``[1, seq_len - 1)`` (from :func:`seed_perplexity`).
    """
    if gpt2_model is None:
        return {"model": gpt2_model, "status": "skipped", "reason": "gpt2_model is None"}
    try:
        gpt2, tokenizer = load_pretrained(gpt2_model)
    except Exception as error:  # noqa: BLE001 - no hub, no cache: report and go on
        message = (str(error).strip().splitlines() or [""])[0].rstrip(".")
        return {"model": gpt2_model, "status": "skipped",
                "reason": f"load_pretrained({gpt2_model!r}) failed: {type(error).__name__}: {message}"}
    input_ids = token_windows(tokenizer, documents, seq_len, num_windows)  # [num_windows, seq_len]
    return {"model": gpt2_model, "status": "measured",
            **seed_perplexity(gpt2, input_ids, chunk_size, desc="gpt2 windows")}
