"""Chunked causal softmax attention with its log-normaliser, on torch's fused CPU attention kernel.

For token ``t`` of chunk ``i`` (``C = chunk_size``, ``d = head_dim``, ``k = sink_size``) the keys it sees are its
own chunk up to itself and, after chunk 0, the sink tokens ``0..k-1`` (Xiao et al. 2023, arXiv 2309.17453):

    a_tu = q_t·k_u / sqrt(d),   l_t = logsumexp_u a_tu,   o_t = Σ_u exp(a_tu - l_t) v_u.

The normalised/terraced retrieval (:mod:`bsbr.normalized`) needs both ``o_t`` and ``l_t``: the retrieved mass
joins ``l_t`` in one shared normaliser (LoLCATs, Zhang et al. 2024, arXiv 2410.10254).

Two forms of one operator (flash-linear-attention keeps ``naive`` beside ``chunk`` the same way):

* :func:`local_softmax_attention` (fused): ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` returns
  ``(out, logsumexp)``. The chunks are laid side by side as the kernel's batch, ``[batch·chunks, heads, C, d]``, in
  one causal call. Sinks: chunks after 0 get the ``k`` sink keys/values prepended, ``[k + C]`` keys, and ``k``
  placeholder (zero) queries in front of their ``C`` queries, whose outputs are dropped; the kernel's causal mask
  (query ``i`` sees keys ``0..i``) then gives query ``j`` exactly the sinks and its chunk up to ``j``, in one
  softmax, so nothing is merged afterwards. Chunk 0 (which holds the sinks) is its own call, and so is a partial
  last chunk (its own length). GQA: the kernel takes ``kv_heads`` dividing ``heads`` itself (query head ``h`` uses
  key/value head ``h // (heads / kv_heads)``, HF ``repeat_kv`` order), so keys and values are never repeated.
  Memory: no score tensor is written out (the kernel works in tiles). Copies, O(n·d) per head: the blocks with
  sinks prepended (queries ``(1 + k/C)×``, keys and values per key/value head), the outputs back to
  ``[batch, heads, n, d]``; a chunk-major view of the inputs themselves is free for batch 1.
* :func:`local_softmax_attention_naive` (written out): ``[batch, heads, chunks, C, C]`` score blocks, O(n·C) per
  head, any dtype and device. The fused form falls back to it where the kernel cannot run: a device other than
  CPU, a dtype other than float32/float64 (the kernel's bfloat16/float16 path returns a float32 ``lse`` and rounds
  differently), value head size != query head size, or an empty sequence.

Gradients (:func:`softmax_attention_with_lse`, a ``torch.autograd.Function`` around one kernel call): the kernel's
``logsumexp`` carries no gradient of its own, so backward is written for both outputs. With ``p_tu = exp(a_tu -
l_t)``, ``s = 1/sqrt(d)``, incoming gradients ``g_t`` (of ``o_t``) and ``γ_t`` (of ``l_t``):

* through ``o``: the kernel's own backward (``dv_u = Σ_t p_tu g_t``; ``∂a_tu = p_tu (g_t·v_u - g_t·o_t)``);
* through ``l``: ``∂l_t/∂a_tu = p_tu``, so ``∂q_t = s·γ_t Σ_u p_tu k_u`` (the same attention with the keys as
  values) and ``∂k_u = s·Σ_t γ_t p_tu q_t`` (the attention-weighted scatter of the queries). Both come from a second
  call of the kernel's backward with ``dO_t = e_1``, ``V = 0`` and ``O_t = -γ_t e_1``: the kernel forms
  ``∂a_tu = p_tu (dO_t·v_u - dO_t·O_t) = p_tu γ_t`` and contracts it with ``k`` and ``q`` exactly as above, in
  tiles, recomputing ``p`` from the saved ``l`` (nothing of size ``C²`` is stored).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from bsbr._checks import check_positive_int
from bsbr.utils import check_sink_size, repeat_kv

__all__ = [
    "FUSED_DTYPES",
    "fused_kernel_supports",
    "local_softmax_attention",
    "local_softmax_attention_naive",
    "softmax_attention_with_lse",
]

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
#: dtypes the fused form runs in (anything else takes the written-out form).
FUSED_DTYPES = (torch.float32, torch.float64)


def fused_kernel_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`local_softmax_attention` runs these tensors on the fused CPU kernel: CPU, one dtype in
    :data:`FUSED_DTYPES`, the same head size for queries, keys and values, at least one token."""
    return (all(t.device.type == "cpu" and t.dtype == query.dtype for t in (query, key, value))
            and query.dtype in FUSED_DTYPES and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[2] > 0)


class _SoftmaxAttentionWithLSE(torch.autograd.Function):
    """One call of the fused CPU kernel; backward through both ``out`` and ``lse`` (module docstring)."""

    @staticmethod
    def forward(ctx, query, key, value, is_causal: bool):
        output, lse = _FORWARD(query, key, value, 0.0, is_causal)  # [B, H, L, d], [B, H, L]
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.is_causal = is_causal
        ctx.set_materialize_grads(False)  # an output no loss reaches gets None, and its backward call is skipped
        return output, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_lse):
        query, key, value, output, lse = ctx.saved_tensors
        grad_query = grad_key = grad_value = None
        if grad_output is not None:
            grad_query, grad_key, grad_value = _BACKWARD(grad_output.contiguous(), query, key, value, output, lse,
                                                         0.0, ctx.is_causal)
        if grad_lse is not None:
            # ∂a_tu = p_tu γ_t: the kernel's backward with dO_t = e_1, V = 0, O_t = -γ_t e_1 (module docstring).
            unit = torch.zeros_like(output)
            unit[..., 0] = 1
            shifted = torch.zeros_like(output)
            shifted[..., 0] = -grad_lse
            lse_query, lse_key, _ = _BACKWARD(unit, query, key, torch.zeros_like(value), shifted, lse, 0.0,
                                              ctx.is_causal)
            grad_query = lse_query if grad_query is None else grad_query + lse_query
            grad_key = lse_key if grad_key is None else grad_key + lse_key
        return grad_query, grad_key, grad_value, None


def softmax_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-normaliser from one fused CPU kernel call, differentiable in both outputs.

    Args:
        query: ``[batch, heads, L, d]``; key, value: ``[batch, kv_heads, S, d]`` (``kv_heads`` divides ``heads``;
            query head ``h`` uses key/value head ``h // (heads / kv_heads)``), CPU, float32 or float64.
        is_causal: mask ``u > t`` (top-left aligned: query ``t`` sees keys ``0..t``).
    Returns:
        ``(output [batch, heads, L, d], lse [batch, heads, L])`` with ``lse_t = logsumexp_u q_t·k_u/sqrt(d)``.
    Raises:
        ValueError: not 4-D, a head count that does not divide, or tensors the kernel does not take
            (:func:`fused_kernel_supports`).
    """
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
        raise ValueError(f"query must be [batch, heads, L, d] and key/value [batch, kv_heads, S, d], got "
                         f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads, which must divide the {query.shape[1]} query heads")
    if not fused_kernel_supports(query, key, value):
        raise ValueError(f"the fused CPU kernel takes CPU tensors of one dtype in {FUSED_DTYPES} with one head size; "
                         f"got {query.dtype}/{key.dtype}/{value.dtype} on {query.device.type}")
    return _SoftmaxAttentionWithLSE.apply(query, key, value, bool(is_causal))


def _check(query, key, value, chunk_size, sink_size) -> None:
    check_positive_int(chunk_size=chunk_size)
    check_sink_size(sink_size, chunk_size)
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, heads, n, head_dim], got {list(query.shape)}")
    if key.shape != value.shape or key.dim() != 4 or key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"key/value must be [batch, kv_heads, {query.shape[2]}, head_dim], got {list(key.shape)}, "
                         f"{list(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads, which must divide the {query.shape[1]} query heads")


def local_softmax_attention(query, key, value, chunk_size: int, sink_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention inside each chunk (plus ``sink_size`` sink tokens), with its log-normaliser; fused.

    Args:
        query: ``[batch, heads, n, d]``; key, value: ``[batch, kv_heads, n, d]`` (``kv_heads`` divides ``heads``,
            HF ``repeat_kv`` order; keys are not repeated).
        chunk_size: tokens per chunk (>= 1); the last chunk may be partial.
        sink_size: tokens ``0..sink_size-1`` are attended exactly (same softmax) by every token after chunk 0 too;
            ``0 <= sink_size <= chunk_size``.
    Returns:
        ``(output [batch, heads, n, d], lse [batch, heads, n])``, ``lse_t = logsumexp_u q_t·k_u/sqrt(d)`` over the
        keys token ``t`` sees; differentiable in both (module docstring). Runs the written-out
        :func:`local_softmax_attention_naive` where the kernel cannot (:func:`fused_kernel_supports`).
    Raises:
        ValueError: bad ``chunk_size``/``sink_size`` or inconsistent shapes.
    """
    _check(query, key, value, chunk_size, sink_size)
    if not fused_kernel_supports(query, key, value):
        return local_softmax_attention_naive(query, key, value, chunk_size, sink_size)
    batch, heads, n, d = query.shape
    size, full = chunk_size, n // chunk_size
    sinks = sink_size if n > size else 0

    def attend(start: int, stop: int, width: int, with_sinks: bool):
        """Tokens ``start..stop-1``, ``m`` chunks of ``width``, side by side as the kernel's batch; with the sink
        tokens prepended to each chunk's keys (and as many placeholder queries, whose outputs are dropped), so that
        one causal call gives every real query its sinks and its chunk up to itself."""
        def blocks(x):  # [batch, h, n, d] -> [batch, m, h, width, d]
            return x[:, :, start:stop].unflatten(2, (-1, width)).transpose(1, 2)

        q, k, v = blocks(query), blocks(key), blocks(value)
        m, prefix = q.shape[1], sinks if with_sinks else 0
        if prefix:
            q = torch.cat([q.new_zeros(batch, m, heads, prefix, d), q], dim=3)  # [batch, m, heads, k + width, d]
            k, v = (torch.cat([x[:, None, :, :prefix].expand(-1, m, -1, -1, -1), y], dim=3)
                    for x, y in ((key, k), (value, v)))  # [batch, m, kv_heads, k + width, d]
        output, lse = softmax_attention_with_lse(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), is_causal=True)
        output = output[:, :, prefix:].unflatten(0, (batch, m)).transpose(1, 2).flatten(2, 3)  # [b, h, m·width, d]
        return output, lse[:, :, prefix:].unflatten(0, (batch, m)).transpose(1, 2).flatten(2, 3)  # [b, h, m·width]

    parts = []
    if full and sinks:  # chunk 0 holds the sinks already; chunks 1.. see them in front of their own keys
        parts.append(attend(0, size, size, False))
        if full > 1:
            parts.append(attend(size, full * size, size, True))
    elif full:
        parts.append(attend(0, full * size, size, False))
    if n > full * size:  # the partial last chunk: its own call
        parts.append(attend(full * size, n, n - full * size, full > 0 and sinks > 0))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


def local_softmax_attention_naive(query, key, value, chunk_size: int,
                                  sink_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_softmax_attention` written out: ``[batch, heads, chunks, C, C]`` score blocks (O(n·C) per head,
    keys and values repeated to the query heads), any dtype and device; arguments, result and errors as there."""
    _check(query, key, value, chunk_size, sink_size)
    batch, heads, n, d = query.shape
    key, value = repeat_kv(key, heads, "key"), repeat_kv(value, heads, "value")
    chunks = -(-n // chunk_size)
    pad = chunks * chunk_size - n

    def blocks(x):  # [batch, heads, n, d] -> [batch, heads, chunks, C, d], zero rows appended to the last chunk
        if pad:
            x = torch.cat([x, x.new_zeros(batch, heads, pad, d)], dim=2)
        return x.unflatten(2, (chunks, chunk_size))

    q, k, v = blocks(query), blocks(key), blocks(value)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [batch, heads, chunks, C, C]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))  # padded keys come after every real query: masked too
    lse = torch.logsumexp(scores, dim=-1)  # [batch, heads, chunks, C]
    output = torch.exp(scores - lse[..., None]) @ v  # [batch, heads, chunks, C, d]
    output, lse = output.flatten(2, 3)[:, :, :n], lse.flatten(2, 3)[:, :, :n]
    if sink_size == 0 or n <= chunk_size:
        return output, lse
    sink_scores = query[:, :, chunk_size:] @ key[:, :, :sink_size].transpose(-1, -2) / math.sqrt(d)  # [b, h, n-C, k]
    sink_lse = torch.logsumexp(sink_scores, dim=-1)  # [batch, heads, n - C]
    sink_out = torch.exp(sink_scores - sink_lse[..., None]) @ value[:, :, :sink_size]  # [batch, heads, n - C, d]
    tail_lse = torch.logaddexp(lse[:, :, chunk_size:], sink_lse)
    tail = (torch.exp(lse[:, :, chunk_size:] - tail_lse)[..., None] * output[:, :, chunk_size:]
            + torch.exp(sink_lse - tail_lse)[..., None] * sink_out)
    return torch.cat([output[:, :, :chunk_size], tail], dim=2), torch.cat([lse[:, :, :chunk_size], tail_lse], dim=2)
