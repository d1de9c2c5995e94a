"""DeltaNet: linear attention with the delta rule (Schlag et al. 2021, "Linear Transformers Are Secretly Fast
Weight Programmers", arXiv 2102.11174), trained with the chunkwise-parallel WY form of Yang et al. 2024
("Parallelizing Linear Transformers with the Delta Rule over Sequence Length", arXiv 2406.06484).

Per head, the memory ``S_t`` is a ``[d_k, d_v]`` matrix (keys index rows). With a write strength
``β_t ∈ (0, 1)``, every token replaces the value stored under its key by a β-mix of the old and the new one:

    S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ  =  (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,
    o_t = S_tᵀ q_t                                   (the output reads the memory *after* token t's write).

This is flash-linear-attention's convention (``fla.ops.delta_rule``), except that ``q`` is not multiplied by
``head_dim^-0.5`` (queries here are unit vectors).

Two forms on per-head tensors, both continuing a carried ``S``:

* :func:`delta_rule_recurrent`: the token loop, the obviously-correct reference (sequential, O(n·d²)).
* :func:`delta_rule_chunkwise`: in chunks of ``C`` tokens, the chunk's ``C`` rank-one updates are collected in the
  WY/UT form: with ``A = I + tril(diag(β) K Kᵀ, −1)`` (unit lower triangular) and ``T = A⁻¹``,
  ``W = T diag(β) K`` and ``U = T diag(β) V`` (one triangular solve per chunk), then for chunk ``c`` with carried
  ``S``: ``U' = U − W S``, ``O = Q S + tril(Q Kᵀ) U'``, ``S ← S + Kᵀ U'``. Time O(n·C·d + n·d²), a Python loop over
  chunks only (Yang et al. 2024, §3; fla's ``naive`` chunk implementation).

:class:`DeltaNet` is the multi-head layer (same interface as :class:`bsbr.StandardAttention`). Feature map, as in
fla's ``DeltaNet`` defaults without the short convolution: ``q, k = l2norm(silu(q_proj(x)))`` per head (unit vectors,
so ``I − β k kᵀ`` is a contraction for ``β ∈ (0, 1)``), ``v = v_proj(x)``, ``β = sigmoid(b_proj(x))`` per head.
fla's short convolutions and output norm/gate are left out to keep the baseline minimal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_per_head_qkv, check_positive_int
from bsbr.layer import AttentionLayer

__all__ = ["DeltaNet", "DeltaNetState", "delta_rule_chunkwise", "delta_rule_recurrent"]

#: ``eps`` of the per-head L2 normalisation of queries and keys (``F.normalize``).
L2_NORM_EPS = 1e-6

#: dtypes the triangular solve runs in directly; others (bfloat16, float16) are solved in float32.
_SOLVE_DTYPES = (torch.float32, torch.float64)


def _check_inputs(q, k, v, beta, state):
    """Shapes of per-head ``q, k`` ``[b, h, n, d_k]``, ``v`` ``[b, h, n, d_v]``, ``beta`` ``[b, h, n]``, ``S``."""
    check_per_head_qkv(q, k, v)
    if not isinstance(beta, torch.Tensor) or beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [batch, heads, seq_len] = {list(q.shape[:3])}, "
                         f"got {list(beta.shape) if isinstance(beta, torch.Tensor) else type(beta).__name__}")
    if any(t.dtype != q.dtype for t in (k, v, beta)):
        raise ValueError(f"q, k, v, beta must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}, {beta.dtype}")
    batch, heads, _, d_k = q.shape
    expected = (batch, heads, d_k, v.shape[-1])
    if state is None:
        return q.new_zeros(expected)
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
        raise ValueError(f"state must be None or the memory S {list(expected)}, "
                         f"got {list(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}")
    if state.dtype != q.dtype:
        raise ValueError(f"state must have the dtype of q ({q.dtype}), got {state.dtype}")
    return state


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor | None = None):
    """The delta rule as a token loop (the reference form; conventions in the module docstring).

    Args:
        q, k: ``[batch, heads, seq_len, d_k]`` (the layer passes unit vectors; any values are accepted).
        v: ``[batch, heads, seq_len, d_v]``.
        beta: ``[batch, heads, seq_len]`` write strengths (the layer's are in (0, 1)).
        state: None (``S_0 = 0``, a fresh sequence) or the memory ``S`` ``[batch, heads, d_k, d_v]`` returned by an
            earlier call.
    Returns:
        ``(out [batch, heads, seq_len, d_v], S [batch, heads, d_k, d_v])``, ``S`` after the last token.
    Raises:
        ValueError: inconsistent shapes of ``q, k, v, beta`` or ``state``.
    """
    memory = _check_inputs(q, k, v, beta, state)
    outputs = []
    for t in range(q.shape[2]):
        k_t = k[:, :, t]  # [batch, heads, d_k]
        stored = (memory * k_t[..., None]).sum(-2)  # S_{t-1}ᵀ k_t: [batch, heads, d_v]
        delta = beta[:, :, t, None] * (v[:, :, t] - stored)  # [batch, heads, d_v]
        memory = memory + k_t[..., None] * delta[..., None, :]  # [batch, heads, d_k, d_v]
        outputs.append((memory * q[:, :, t, :, None]).sum(-2))  # S_tᵀ q_t: [batch, heads, d_v]
    return torch.stack(outputs, dim=2), memory


def delta_rule_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         chunk_size: int = 64, state: torch.Tensor | None = None):
    """The delta rule in chunks with the WY/UT representation (Yang et al. 2024, arXiv 2406.06484); equal to
    :func:`delta_rule_recurrent` up to rounding.

    ``W, U`` of all chunks come from one batched unit-lower-triangular solve (``torch.linalg.solve_triangular``);
    only the carry of ``S`` between chunks is a loop. torch has no CPU triangular solve in bfloat16 or float16, so
    in those dtypes that one step is computed in float32 and rounded back (what autocast does in training); the
    rest runs in the inputs' dtype, and float32/float64 results are unchanged. The last chunk may be partial: zero keys, values, queries and
    ``β = 0`` are appended internally, which leave ``S`` unchanged.

    Args:
        q, k, v, beta, state: as in :func:`delta_rule_recurrent`.
        chunk_size: tokens per chunk (>= 1); any value gives the same result.
    Returns:
        ``(out [batch, heads, seq_len, d_v], S [batch, heads, d_k, d_v])``.
    Raises:
        ValueError: ``chunk_size`` not a positive integer, inconsistent shapes of ``q, k, v, beta`` or ``state``.
    """
    check_positive_int(chunk_size=chunk_size)
    memory = _check_inputs(q, k, v, beta, state)
    batch, heads, length, d_k = q.shape
    d_v = v.shape[-1]
    chunk_size = min(chunk_size, length)  # a short call (a decode step) is one chunk of its own length, not padded
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    groups = batch * heads

    def chunk_major(t):  # [batch, heads, seq_len, dim] -> contiguous [chunks, batch * heads, C, dim]
        t = F.pad(t, (0, 0, 0, pad)) if pad else t
        return t.reshape(groups, num_chunks, chunk_size, t.shape[-1]).transpose(0, 1).contiguous()

    q, k = chunk_major(q), chunk_major(k)  # [chunks, groups, C, d_k]
    beta = F.pad(beta, (0, pad)) if pad else beta
    beta = beta.reshape(groups, num_chunks, chunk_size, 1).transpose(0, 1)  # view [chunks, groups, C, 1]
    v = (F.pad(v, (0, 0, 0, pad)) if pad else v).reshape(groups, num_chunks, chunk_size, d_v).transpose(0, 1)
    # Without autograd, results go straight into preallocated buffers (out=); with it, the same values by cat/stack.
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, beta, memory))
    if grad:
        rhs = torch.cat([k * beta, v * beta], dim=-1)  # [diag(β) K | diag(β) V]: [chunks, groups, C, d_k + d_v]
    else:
        rhs = q.new_empty(num_chunks, groups, chunk_size, d_k + d_v)
        torch.mul(k, beta, out=rhs[..., :d_k])
        torch.mul(v, beta, out=rhs[..., d_k:])
    # A = I + tril(diag(β) K Kᵀ, −1): solve_triangular(upper=False, unitriangular=True) reads only the strictly lower
    # triangle of its matrix and takes the diagonal as ones, so diag(β) K Kᵀ itself stands for A (no masking).
    # torch has no CPU triangular solve in half precision: bfloat16/float16 solve in float32 (as under autocast),
    # then round back; float32 and float64 are solved in their own dtype.
    system = rhs[..., :d_k] @ k.transpose(-1, -2)
    if system.dtype in _SOLVE_DTYPES:
        wu = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    else:
        wu = torch.linalg.solve_triangular(system.float(), rhs.float(), upper=False, unitriangular=True).to(q.dtype)
    w, u = wu[..., :d_k], wu[..., d_k:]  # views: W = T diag(β) K, U = T diag(β) V (bmm takes their row stride)
    scores = torch.matmul(q, k.transpose(-1, -2)).tril_()  # tril(Q Kᵀ): [chunks, groups, C, C]
    k_t = k.transpose(-1, -2)  # [chunks, groups, d_k, C]
    memory = memory.reshape(groups, d_k, d_v)
    if grad:
        memories, corrected = [], []  # S before each chunk, U' of each chunk
        for c in range(num_chunks):  # only the carry of S is sequential; operands are [groups, ., .] views
            memories.append(memory)
            corrected.append(torch.baddbmm(u[c], w[c], memory, alpha=-1.0))  # U' = U − W S: [groups, C, d_v]
            memory = torch.baddbmm(memory, k_t[c], corrected[-1])  # S + Kᵀ U': [groups, d_k, d_v]
        memories, corrected = torch.stack(memories), torch.stack(corrected)
    else:
        memories = q.new_empty(num_chunks, groups, d_k, d_v)  # S before each chunk
        corrected = q.new_empty(num_chunks, groups, chunk_size, d_v)  # U' of each chunk
        memories[0] = memory
        for c in range(num_chunks):
            torch.baddbmm(u[c], w[c], memories[c], alpha=-1.0, out=corrected[c])
            if c + 1 < num_chunks:
                torch.baddbmm(memories[c], k_t[c], corrected[c], out=memories[c + 1])
        memory = torch.baddbmm(memories[-1], k_t[-1], corrected[-1])  # S after the last chunk
    flat = num_chunks * groups
    out = torch.baddbmm(torch.bmm(q.view(flat, chunk_size, d_k), memories.view(flat, d_k, d_v)),
                        scores.view(flat, chunk_size, chunk_size),
                        corrected.view(flat, chunk_size, d_v))  # Q S + tril(Q Kᵀ) U'
    out = out.view(num_chunks, groups, chunk_size, d_v).transpose(0, 1).reshape(batch, heads, -1, d_v)[:, :, :length]
    return out, memory.view(batch, heads, d_k, d_v)


@dataclass
class DeltaNetState:
    """Streaming state of one :class:`DeltaNet` after ``num_tokens`` tokens.

    ``memory``: ``[batch, heads, head_dim, head_dim]``, the fast-weight memory ``S`` (keys index rows). Size
    ``element_size · batch · heads · head_dim²`` bytes, constant in ``num_tokens``. ``batch_size`` and ``owner``
    (``id`` of the producing module) are checked when it is passed back.
    """

    batch_size: int
    owner: int
    num_tokens: int
    memory: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return self.memory.numel() * self.memory.element_size()


class DeltaNet(AttentionLayer):
    """Multi-head DeltaNet layer (Schlag et al. 2021, arXiv 2102.11174; chunkwise form of Yang et al. 2024,
    arXiv 2406.06484). Conventions and feature map: see the module docstring.

    Parameters: ``q_proj, k_proj, v_proj, out_proj`` (``nn.Linear(hidden_dim, hidden_dim)``) and ``b_proj``
    (``nn.Linear(hidden_dim, num_heads)``, ``β = sigmoid(b_proj(x))``).

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: heads; ``head_dim = hidden_dim // num_heads``.
        dropout: dropout probability on the attention output before ``out_proj`` (training only), in [0, 1).
        chunk_size: tokens per chunk of :func:`delta_rule_chunkwise` (>= 1); it changes speed, not the result.
    ``forward(hidden_states, attention_mask=None, state=None, return_state=False)`` as
    :meth:`bsbr.layer.AttentionLayer.forward`; the streaming state is a :class:`DeltaNetState`.

    Raises:
        ValueError: invalid arguments (see :meth:`forward` for its own).
    """

    state_type = DeltaNetState
    span_settings = ("chunk_size",)

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, chunk_size: int = 64):
        super().__init__(hidden_dim, num_heads, dropout)
        check_positive_int(chunk_size=chunk_size)
        self.chunk_size = chunk_size
        self._add_projections("q_proj", "k_proj", "v_proj")
        self.b_proj = nn.Linear(hidden_dim, num_heads)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def state_nbytes(self, batch_size: int = 1) -> int:
        """Bytes of a :class:`DeltaNetState` (any length): ``element_size · batch · heads · head_dim²``."""
        check_positive_int(batch_size=batch_size)
        return self.q_proj.weight.element_size() * batch_size * self.num_heads * self.head_dim ** 2

    def _empty_state(self, batch: int, like: torch.Tensor) -> DeltaNetState:
        return DeltaNetState(batch, id(self), 0, like.new_zeros(batch, self.num_heads, self.head_dim, self.head_dim))

    def project(self, hidden_states: torch.Tensor):
        """Per-head ``q, k`` (unit vectors), ``v`` ``[batch, heads, L, head_dim]`` and ``β`` ``[batch, heads, L]``
        of ``hidden_states`` ``[batch, L, hidden_dim]`` (what :func:`delta_rule_chunkwise` consumes)."""
        q = F.normalize(F.silu(self.split_heads(self.q_proj(hidden_states))), dim=-1, eps=L2_NORM_EPS)
        k = F.normalize(F.silu(self.split_heads(self.k_proj(hidden_states))), dim=-1, eps=L2_NORM_EPS)
        v = self.split_heads(self.v_proj(hidden_states))
        beta = torch.sigmoid(self.b_proj(hidden_states)).transpose(1, 2)  # [batch, heads, L]
        return q, k, v, beta

    def _attend(self, hidden_states: torch.Tensor, state: DeltaNetState | None, return_state: bool):
        """Unpadded core: ``[batch, L, hidden_dim]`` (continuing ``state``) -> output (and the new state)."""
        batch, length, _ = hidden_states.shape
        q, k, v, beta = self.project(hidden_states)
        out, memory = delta_rule_chunkwise(q, k, v, beta, self.chunk_size, None if state is None else state.memory)
        out = F.dropout(out, self.dropout, self.training)
        out = self.out_proj(self.merge_heads(out))  # [batch, L, hidden_dim]
        if not return_state:
            return out
        seen = 0 if state is None else state.num_tokens
        return out, DeltaNetState(batch, id(self), seen + length, memory)
