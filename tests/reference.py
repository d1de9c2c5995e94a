"""Plain, obviously-correct O(n²) references used by the tests: explicit masks, Python loops over chunks."""

from __future__ import annotations

import math

import torch


def dense_bsbr(attn, x: torch.Tensor) -> torch.Tensor:
    """BSBR attention written out from its definition; ``x``: ``[batch, seq_len, hidden_dim]``."""
    batch, n, _ = x.shape
    heads, d, size = attn.num_heads, attn.head_dim, attn.chunk_size

    def split(t):  # [batch, n, hidden] -> [batch, heads, n, d]
        return t.view(batch, -1, heads, d).transpose(1, 2)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    position = torch.arange(n)
    chunk = position // size
    same_chunk_causal = (chunk[:, None] == chunk[None, :]) & (position[None, :] <= position[:, None])  # [n, n]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~same_chunk_causal, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [batch, heads, n, d]

    num_chunks = int(chunk.max()) + 1
    states, meta_keys, pooled = [], [], []
    for j in range(num_chunks):
        members = chunk == j
        state = k[:, :, members].transpose(-1, -2) @ v[:, :, members]  # [batch, heads, d, d]
        if attn.compression is not None:
            flat = state.reshape(batch, heads, d * d)
            state = attn.compression.decode(attn.compression.encode(flat)).view(batch, heads, d, d)
        states.append(state)
        pooled.append(x[:, members].mean(1))  # [batch, hidden]
        meta_keys.append(attn.meta_k_proj(pooled[-1]).view(batch, heads, d))
    readout = torch.zeros_like(out)
    for i in range(1, num_chunks):
        r = attn.meta_q_proj(pooled[i - 1]).view(batch, heads, d)
        logits = torch.stack([(r * meta_keys[j]).sum(-1) / math.sqrt(d) for j in range(i)], dim=-1)  # [batch, heads, i]
        weights = torch.softmax(logits, dim=-1)
        retrieved = sum(weights[..., j, None, None] * states[j] for j in range(i))  # [batch, heads, d, d]
        members = chunk == i
        readout[:, :, members] = q[:, :, members] @ retrieved
    out = (out + readout).transpose(1, 2).reshape(batch, n, heads * d)
    return attn.out_proj(out)


def dense_causal_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Standard causal multi-head softmax attention with ``attn``'s projections, explicit mask."""
    batch, n, _ = x.shape
    heads, d = attn.num_heads, attn.head_dim

    def split(t):
        return t.view(batch, n, heads, d).transpose(1, 2)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    out = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
    return attn.out_proj(out.transpose(1, 2).reshape(batch, n, heads * d))
