"""Gated attention unit with mixed chunk attention, causal (FLASH: Hua et al. 2022, "Transformer Quality in Linear
Time", arXiv 2202.10447, Sec. 2 and 3, the causal pseudo-code of its Appendix).

For ``x``: ``[batch, seq_len, hidden_dim]`` (``D``), expansion ``e`` (``E = e·D``), shared width ``s = qk_dim``:

* ``u = SiLU(W_u x)``, ``v = SiLU(W_v x)``: ``[batch, seq_len, E]``; ``z = SiLU(W_z x)``: ``[batch, seq_len, s]``.
* Four cheap per-dimension scale/offset maps of the shared ``z`` (``γ, β``: ``[4, s]``):
  ``q_quad, k_quad, q_lin, k_lin = z·γ_i + β_i``.
* The sequence is split into chunks of ``C = chunk_size`` tokens from its first token (the last may be partial).
  Token ``t`` of chunk ``g``:
  ``quad_t = Σ_{s in g, s<=t} relu(q_quad_t · k_quad_s / C)² v_s`` (squared-ReLU attention inside the chunk) and
  ``lin_t = q_lin_t · Σ_{h<g} (k_lin_hᵀ v_h / C)`` (linear attention over the *finished earlier* chunks, a
  causal exclusive cumulative sum of per-chunk ``[s, E]`` states).
* ``output = W_o(u ⊙ (quad + lin))``: ``[batch, seq_len, D]``.

The divisor is always ``C`` (also in a partial last chunk), as in the paper, so streamed and one-call outputs
agree. Differences from the paper: no relative position bias inside chunks (``relu²(q kᵀ/C + b)`` with ``b = 0``;
the shared model uses no position information, see :mod:`bsbr.model`), and GAU is single-head: ``num_heads`` is
accepted for the common interface and validated (``hidden_dim % num_heads == 0``) but otherwise unused.

Cost: O(seq_len·C·(s + E)) time and O(seq_len·C) memory for the chunk kernels, O(seq_len·s·E) for the linear part.
Streaming (:class:`GAUState`) keeps the current chunk's ``k_quad, k_lin, v`` and the sum of the finished chunks'
``k_linᵀ v / C``: O(C·(2s + E) + s·E) values per row, whatever the position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_positive_int
from bsbr.layer import AttentionLayer

__all__ = ["GAU", "GAUState"]

#: Chunks per batched call without autograd: bounds the per-group temporaries.
_GROUP = 32


@dataclass
class GAUState:
    """Streaming state of a :class:`GAU` after ``num_tokens`` tokens (``p = num_tokens % chunk_size`` in the current
    chunk): ``partial_key_quad, partial_key_lin`` ``[batch, p, qk_dim]`` and ``partial_value`` ``[batch, p, E]`` of the
    current chunk; ``kv`` ``[batch, qk_dim, E]``, the sum of ``k_linᵀ v / chunk_size`` over the finished chunks.

    Size: ``element_size · batch · (p·(2·qk_dim + E) + qk_dim·E)`` bytes. ``chunk_size``, ``batch_size`` and ``owner``
    (``id`` of the producing module) are checked when the state is passed back.
    """

    chunk_size: int
    batch_size: int
    owner: int
    num_tokens: int
    partial_key_quad: torch.Tensor
    partial_key_lin: torch.Tensor
    partial_value: torch.Tensor
    kv: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = (self.partial_key_quad, self.partial_key_lin, self.partial_value, self.kv)
        return sum(t.numel() * t.element_size() for t in tensors)


class GAU(AttentionLayer):
    """FLASH gated attention unit (single head) with mixed chunk attention; see the module docstring.

    Parameters: ``u_proj, v_proj`` (``nn.Linear(hidden_dim, expansion·hidden_dim)``), ``z_proj``
    (``nn.Linear(hidden_dim, qk_dim)``), ``gamma, beta`` (``[4, qk_dim]``, rows: quad query, quad key, linear query,
    linear key; ``gamma ~ N(0, 0.02²)``, ``beta = 0`` as in the paper), ``out_proj``
    (``nn.Linear(expansion·hidden_dim, hidden_dim)``).

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: accepted for the common attention interface and validated; GAU has a single head.
        dropout: dropout on the squared-ReLU chunk kernel during training, in [0, 1).
        chunk_size: tokens per chunk ``C`` (>= 1).
        qk_dim: width ``s`` of the shared query/key representation ``z`` (>= 1).
        expansion: ``e``, width of ``u`` and ``v`` is ``e·hidden_dim`` (>= 1).
    ``forward(hidden_states, attention_mask=None, state=None, return_state=False)`` as
    :meth:`bsbr.layer.AttentionLayer.forward` (chunks counted from each row's first real token); the streaming state
    is a :class:`GAUState`, which must come from a module with the same ``chunk_size``.

    Raises:
        ValueError: invalid arguments (see :meth:`forward` for its own).
    """

    state_type = GAUState
    span_settings = state_settings = ("chunk_size",)

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, chunk_size: int = 128,
                 qk_dim: int = 128, expansion: int = 2):
        super().__init__(hidden_dim, num_heads, dropout)
        check_positive_int(chunk_size=chunk_size, qk_dim=qk_dim, expansion=expansion)
        self.chunk_size, self.qk_dim, self.expansion = chunk_size, qk_dim, expansion
        inner = expansion * hidden_dim
        self.u_proj = nn.Linear(hidden_dim, inner)
        self.v_proj = nn.Linear(hidden_dim, inner)
        self.z_proj = nn.Linear(hidden_dim, qk_dim)
        self.gamma = nn.Parameter(torch.randn(4, qk_dim) * 0.02)
        self.beta = nn.Parameter(torch.zeros(4, qk_dim))
        self.out_proj = nn.Linear(inner, hidden_dim)

    def _empty_state(self, batch: int, like: torch.Tensor) -> GAUState:
        inner = self.expansion * self.hidden_dim
        keys, values = like.new_zeros(batch, 0, self.qk_dim), like.new_zeros(batch, 0, inner)
        return GAUState(self.chunk_size, batch, id(self), 0, keys, keys.clone(), values,
                        like.new_zeros(batch, self.qk_dim, inner))

    def _attend(self, hidden_states: torch.Tensor, state: GAUState | None, return_state: bool):
        batch, length, _ = hidden_states.shape
        size = self.chunk_size
        inplace = not torch.is_grad_enabled()  # no autograd: activations in place (no extra sequence-long tensors)
        u = F.silu(self.u_proj(hidden_states), inplace=inplace)  # [batch, L, E]
        v = F.silu(self.v_proj(hidden_states), inplace=inplace)  # [batch, L, E]
        z = F.silu(self.z_proj(hidden_states), inplace=inplace)  # [batch, L, s]
        q_quad, k_quad, q_lin, k_lin = (z[:, :, None] * self.gamma + self.beta).unbind(2)  # 4 × [batch, L, s]
        partial = 0
        kv = None
        if state is not None:
            partial, kv = state.partial_key_quad.shape[1], state.kv
            if partial:  # the state's partial chunk comes first (its keys only: its outputs were returned before)
                k_quad = torch.cat([state.partial_key_quad, k_quad], dim=1)  # [batch, p + L, s]
                k_lin = torch.cat([state.partial_key_lin, k_lin], dim=1)
                v = torch.cat([state.partial_value, v], dim=1)  # [batch, p + L, E]
        total = partial + length
        chunks = -(-total // size)
        if chunks > 1 and not partial and not torch.is_grad_enabled():
            return self._attend_inference(u, v, q_quad, k_quad, q_lin, k_lin, kv, state, return_state)
        back = chunks * size - total  # zero tokens after the last real one: causally invisible, zero kᵀv
        inner = v.shape[-1]

        if chunks == 1:  # one chunk (decoding, short calls): only the L new query rows, no padding
            kernel = F.relu(q_quad @ k_quad.transpose(-1, -2) / size).square()  # [batch, L, p + L]
            causal = torch.ones(length, total, dtype=torch.bool, device=kernel.device).tril(partial)  # key <= p + t
            kernel = F.dropout(kernel.masked_fill(~causal, 0.0), self.dropout, self.training)
            mixed = kernel @ v  # [batch, L, E]
            if kv is not None:
                mixed = mixed + q_lin @ kv
            chunk_kv = (k_lin.transpose(-1, -2) @ v / size)[:, None]  # [batch, 1, s, E]
        else:
            def blocked(x, front=0):  # [batch, T, f] -> [batch, chunks, C, f]
                return F.pad(x, (0, 0, front, back)).view(batch, chunks, size, x.shape[-1])

            qq, ql = blocked(q_quad, partial), blocked(q_lin, partial)  # [batch, chunks, C, s]
            kq, kl, vb = blocked(k_quad), blocked(k_lin), blocked(v)  # [batch, chunks, C, s or E]
            # Quadratic part: relu²(q kᵀ / C), causal inside each chunk.
            kernel = F.relu(qq @ kq.transpose(-1, -2) / size).square()  # [batch, chunks, C, C]
            kernel = kernel.masked_fill(~torch.ones(size, size, dtype=torch.bool, device=kernel.device).tril(), 0.0)
            kernel = F.dropout(kernel, self.dropout, self.training)
            quad = kernel @ vb  # [batch, chunks, C, E]
            # Linear part: q_lin · Σ_{earlier chunks} k_linᵀ v / C (exclusive cumulative sum over chunks).
            chunk_kv = kl.transpose(-1, -2) @ vb / size  # [batch, chunks, s, E]
            prefix = torch.cat([torch.zeros_like(chunk_kv[:, :1]), chunk_kv[:, :-1].cumsum(1)], dim=1)  # before
            if kv is not None:
                prefix = prefix + kv[:, None]
            lin = ql @ prefix  # [batch, chunks, C, E]
            mixed = (quad + lin).view(batch, chunks * size, inner)[:, partial : partial + length]  # [batch, L, E]
        out = self.out_proj(u * mixed)
        if not return_state:
            return out
        finished = total // size
        new_kv = chunk_kv[:, :finished].sum(1)  # [batch, s, E]
        if kv is not None:
            new_kv = new_kv + kv
        tail = slice(finished * size, total)  # the unfinished chunk's tokens (clone: no view of the whole call)
        new_state = GAUState(size, batch, id(self), (0 if state is None else state.num_tokens) + length,
                             k_quad[:, tail].clone(), k_lin[:, tail].clone(), v[:, tail].clone(), new_kv)
        return out, new_state

    def _attend_inference(self, u, v, q_quad, k_quad, q_lin, k_lin, kv, state, return_state):
        """:meth:`_attend` without autograd for a call that starts on a chunk boundary and spans several chunks.

        Chunks are strided views of the token-major projections (no padding), processed in groups of
        :data:`_GROUP` with batched ``bmm`` (temporaries bounded by ~GROUP·C·(C + 2·E) + GROUP·s·E values per
        group); the linear part keeps a running ``Σ k_linᵀ v / C`` instead of a sequence-long prefix tensor, and
        both parts accumulate into one ``[batch, L, E]`` buffer (``baddbmm``), which is then gated in place.
        """
        batch, length, inner = v.shape
        size = self.chunk_size
        full = length // size
        rest = length - full * size
        mixed = v.new_empty(batch, length, inner)
        causal = torch.ones(size, size, dtype=torch.bool, device=v.device).tril()
        dropout = self.dropout if self.training else 0.0
        new_kv = []
        for row in range(batch):
            running = v.new_zeros(self.qk_dim, inner) if kv is None else kv[row].clone()  # Σ earlier chunks
            out_row = mixed[row]
            for start in range(0, full, _GROUP):
                stop = min(start + _GROUP, full)
                span = slice(start * size, stop * size)
                qq, kq, ql, kl = (t[row, span].unflatten(0, (stop - start, size))
                                  for t in (q_quad, k_quad, q_lin, k_lin))  # [G, C, s] views
                vb = v[row, span].unflatten(0, (stop - start, size))  # [G, C, E]
                out = out_row[span].unflatten(0, (stop - start, size))  # [G, C, E], written in place
                # Linear part: chunk g reads running + Σ_{group chunks h < g} k_lin_hᵀ v_h / C.
                states = torch.bmm(kl.transpose(1, 2), vb).div_(size)  # [G, s, E]
                states[0].add_(running)
                for index in range(1, stop - start):  # inclusive prefix sums in place (cumsum(0) is slow here)
                    states[index].add_(states[index - 1])
                torch.mm(ql[0], running, out=out[0])
                if stop - start > 1:
                    torch.bmm(ql[1:], states[:-1], out=out[1:])
                running = states[-1].clone()
                del states
                # Quadratic part: relu²(q kᵀ / C), causal inside each chunk, accumulated onto the linear part.
                kernel = torch.bmm(qq, kq.transpose(1, 2)).div_(size).relu_().square_().masked_fill_(~causal, 0.0)
                out.baddbmm_(F.dropout(kernel, dropout, self.training), vb)
            if rest:  # a partial last chunk
                tail = slice(full * size, length)
                kernel = (q_quad[row, tail] @ k_quad[row, tail].T).div_(size).relu_().square_()
                kernel = F.dropout(kernel.masked_fill_(~causal[:rest, :rest], 0.0), dropout, self.training)
                torch.mm(q_lin[row, tail], running, out=out_row[tail])
                out_row[tail].addmm_(kernel, v[row, tail])
            new_kv.append(running)
        out = self.out_proj(mixed.mul_(u))
        if not return_state:
            return out
        tail = slice(full * size, length)  # the unfinished chunk's tokens (clone: no view of the whole call)
        new_state = GAUState(size, batch, id(self), (0 if state is None else state.num_tokens) + length,
                             k_quad[:, tail].clone(), k_lin[:, tail].clone(), v[:, tail].clone(), torch.stack(new_kv))
        return out, new_state
