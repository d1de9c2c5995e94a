"""Plain, obviously-correct O(n²) references used by the tests: explicit masks, Python loops over chunks; and
:func:`stream`, a layer fed in pieces through its state."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from transformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from bsbr.baselines.linear import LINEAR_ATTENTION_EPS
from bsbr.convert import BSBRGPT2Attention, BSBRLlamaAttention


def stream(layer, x, pieces):
    """Feed ``x`` ``[batch, seq_len, hidden]`` to ``layer`` in pieces of the given lengths; return (outputs, state)."""
    assert sum(pieces) == x.shape[1]
    outputs, state, start = [], None, 0
    for length in pieces:
        out, state = layer(x[:, start : start + length], state=state, return_state=True)
        assert out.shape == (x.shape[0], length, x.shape[2])
        outputs.append(out)
        start += length
    return torch.cat(outputs, dim=1), state


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


def dense_normalized_bsbr(q, k, v, mq, mk, chunk_size, module, sink=0):
    """The formula written out: explicit [n, n] masks and exponentials, a loop over chunks and heads; the first
    ``sink`` tokens join every token's local softmax and leave chunk 0's state."""
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    k, v, mk = (t.repeat_interleave(group, dim=1) for t in (k, v, mk))
    position = torch.arange(n)
    chunk = position // chunk_size
    same = ((chunk[:, None] == chunk[None, :]) | (position[None, :] < sink)) & (position[None, :] <= position[:, None])
    out = torch.empty_like(q)
    for h in range(heads):
        wq, wk = module.query_map.weight[h], module.key_map.weight[h]

        def phi(x, w):
            p = (x * d**-0.25) @ w
            return torch.cat([torch.exp(p) / torch.exp(p).sum(-1, keepdim=True),
                              torch.exp(-p) / torch.exp(-p).sum(-1, keepdim=True)], -1)

        g = math.exp(module.mix_logit[h].item())
        for b in range(batch):
            a = torch.exp(q[b, h] @ k[b, h].T / math.sqrt(d)) * same  # [n, n] unnormalised local weights
            for i in range(int(chunk.max()) + 1):
                rows = chunk == i
                mass, numer = a[rows].sum(-1), a[rows] @ v[b, h]
                if i > 0:
                    e = torch.exp(mq[b, h, i - 1] @ mk[b, h, :i].T / math.sqrt(d))
                    w = e / e.sum()
                    fq = phi(q[b, h, rows], wq)  # [tokens, F]
                    for j in range(i):
                        cols = (chunk == j) & (position >= sink)
                        fk = phi(k[b, h, cols], wk)
                        numer = numer + g * w[j] * (fq @ fk.T) @ v[b, h, cols]
                        mass = mass + g * w[j] * (fq @ fk.T).sum(-1)
                out[b, h, rows] = numer / mass[:, None]
    return out


def dense_bsbr_llama(attn: BSBRLlamaAttention, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """BSBRLlamaAttention written out from its definition: explicit [n, n] mask, Python loops over chunks,
    HF repeat_kv for GQA, RoPE on queries/keys only. ``hidden``: [batch, n, hidden] -> [batch, n, hidden]."""
    batch, n, _ = hidden.shape
    heads, kv_heads, d, size = attn.num_heads, attn.num_key_value_heads, attn.head_dim, attn.chunk_size
    q = attn.q_proj(hidden).view(batch, n, heads, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(batch, n, kv_heads, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(batch, n, kv_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)  # [batch, heads, n, d]
    position = torch.arange(n)
    chunk = position // size
    allowed = (chunk[:, None] == chunk[None, :]) & (position[None, :] <= position[:, None])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    num_chunks = int(chunk.max()) + 1

    def state(j):  # F_j = K_jᵀ V_j, [batch, heads, d, d]
        members = chunk == j
        f = k[:, :, members].transpose(-1, -2) @ v[:, :, members]
        if attn.compression is not None:
            c = attn.compression
            f = c.decode(c.encode(f.reshape(batch, heads, d * d))).view(batch, heads, d, d)
        return f

    def meta_key(j):  # h_j per kv head, shared by its query heads: [batch, heads, d]
        h = attn.meta_k_proj(hidden[:, chunk == j].mean(1)).view(batch, kv_heads, d)
        return h.repeat_interleave(heads // kv_heads, dim=1)

    for i in range(1, num_chunks):
        r = attn.meta_q_proj(hidden[:, chunk == i - 1].mean(1)).view(batch, heads, d)  # from chunk i-1 only
        logits = torch.stack([(r * meta_key(j)).sum(-1) / math.sqrt(d) for j in range(i)], dim=-1)
        weights = torch.softmax(logits, dim=-1)  # [batch, heads, i]
        retrieved = sum(weights[..., j, None, None] * state(j) for j in range(i))
        out[:, :, chunk == i] += q[:, :, chunk == i] @ retrieved
    return attn.o_proj(out.transpose(1, 2).reshape(batch, n, heads * d))


def dense_gpt2_logits(model: GPT2LMHeadModel, ids: torch.Tensor, retrieval: bool = True) -> torch.Tensor:
    """The converted GPT-2 written out: wte + wpe, pre-LN blocks with :func:`dense_bsbr_gpt2` (or
    :func:`dense_normalized_gpt2`), ln_f, lm_head."""
    t = model.transformer
    h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))[None]
    for block in t.h:
        if block.attn.retrieval_mode == "normalized":
            h = h + dense_normalized_gpt2(block.attn, block.ln_1(h))
        else:
            h = h + dense_bsbr_gpt2(block.attn, block.ln_1(h), retrieval)
        h = h + block.mlp(block.ln_2(h))
    return model.lm_head(t.ln_f(h))


def dense_normalized_gpt2(attn: BSBRGPT2Attention, hidden: torch.Tensor) -> torch.Tensor:
    """A ``retrieval="normalized"`` BSBRGPT2Attention written out: q/k/v from the Conv1D ``c_attn`` by hand, chunk means
    by a loop, meta rows from them, the normalised formula by :func:`dense_normalized_bsbr`.
    ``hidden``: [batch, n, hidden] -> [batch, n, hidden]."""
    batch, n, width = hidden.shape
    heads, d, size = attn.num_heads, attn.head_dim, attn.chunk_size
    qkv = hidden @ attn.c_attn.weight + attn.c_attn.bias  # [batch, n, 3*width]
    q, k, v = (qkv[..., i * width: (i + 1) * width].reshape(batch, n, heads, d).transpose(1, 2) for i in range(3))
    means = torch.stack([hidden[:, j: j + size].mean(1) for j in range(0, n, size)], dim=1)  # [batch, chunks, width]
    meta_q = attn.meta_q_proj(means).view(batch, -1, heads, d).transpose(1, 2)  # [batch, heads, chunks, d]
    meta_k = attn.meta_k_proj(means).view(batch, -1, heads, d).transpose(1, 2)
    out = dense_normalized_bsbr(q, k, v, meta_q, meta_k, size, attn.normalized, attn.normalized.sink_size)
    return attn.c_proj(out.transpose(1, 2).reshape(batch, n, width))


def dense_bsbr_gpt2(attn: BSBRGPT2Attention, hidden: torch.Tensor, retrieval: bool = True) -> torch.Tensor:
    """BSBRGPT2Attention written out from its definition: q/k/v from the Conv1D ``c_attn`` by hand
    (``x @ weight + bias``, split q|k|v), explicit [n, n] mask, Python loops over chunks.
    ``hidden``: [batch, n, hidden] -> [batch, n, hidden]."""
    batch, n, width = hidden.shape
    heads, d, size = attn.num_heads, attn.head_dim, attn.chunk_size
    qkv = hidden @ attn.c_attn.weight + attn.c_attn.bias  # [batch, n, 3*width]

    def per_head(x):  # [batch, n, width] -> [batch, heads, n, d]
        return x.reshape(batch, n, heads, d).transpose(1, 2)

    q, k, v = per_head(qkv[..., :width]), per_head(qkv[..., width : 2 * width]), per_head(qkv[..., 2 * width :])
    position = torch.arange(n)
    chunk = position // size
    allowed = (chunk[:, None] == chunk[None, :]) & (position[None, :] <= position[:, None])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    num_chunks = int(chunk.max()) + 1

    def state(j):  # F_j = K_jᵀ V_j, [batch, heads, d, d]
        members = chunk == j
        f = k[:, :, members].transpose(-1, -2) @ v[:, :, members]
        if attn.compression is not None:
            c = attn.compression
            f = c.decode(c.encode(f.reshape(batch, heads, d * d))).view(batch, heads, d, d)
        return f

    def meta_key(j):  # h_j: [batch, heads, d]
        return attn.meta_k_proj(hidden[:, chunk == j].mean(1)).view(batch, heads, d)

    for i in range(1, num_chunks if retrieval else 1):
        r = attn.meta_q_proj(hidden[:, chunk == i - 1].mean(1)).view(batch, heads, d)  # from chunk i-1 only
        logits = torch.stack([(r * meta_key(j)).sum(-1) / math.sqrt(d) for j in range(i)], dim=-1)
        weights = torch.softmax(logits, dim=-1)  # [batch, heads, i]
        retrieved = sum(weights[..., j, None, None] * state(j) for j in range(i))
        out[:, :, chunk == i] += q[:, :, chunk == i] @ retrieved
    return attn.c_proj(out.transpose(1, 2).reshape(batch, n, width))


def naive_delta_rule(q, k, v, beta, memory=None):
    """Independent reference: per row and head, ``S ← (I − β k kᵀ) S + β k vᵀ``, ``o = Sᵀ q``."""
    batch, heads, n, d_k = q.shape
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=q.dtype)
    final = torch.zeros(batch, heads, d_k, v.shape[-1], dtype=q.dtype)
    eye = torch.eye(d_k, dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            s = torch.zeros(d_k, v.shape[-1], dtype=q.dtype) if memory is None else memory[b, h]
            for t in range(n):
                kt = k[b, h, t][:, None]  # column vector [d_k, 1]
                s = (eye - beta[b, h, t] * kt @ kt.T) @ s + beta[b, h, t] * kt @ v[b, h, t][None, :]
                out[b, h, t] = s.T @ q[b, h, t]
            final[b, h] = s
    return out, final


def naive_linear_attention(q, k, v, eps=LINEAR_ATTENTION_EPS):
    """Feature-mapped ``q, k``: explicit causal mask over ``q kᵀ`` and the row-sum normaliser."""
    n = q.shape[2]
    scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), 0.0)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps), k.transpose(-1, -2) @ v, k.sum(2)


def gau_reference(layer, x):
    """FLASH causal mixed chunk attention with explicit loops over tokens and chunks."""
    size = layer.chunk_size
    u = torch.nn.functional.silu(layer.u_proj(x))
    v = torch.nn.functional.silu(layer.v_proj(x))
    z = torch.nn.functional.silu(layer.z_proj(x))
    q_quad, k_quad, q_lin, k_lin = (z * layer.gamma[i] + layer.beta[i] for i in range(4))
    batch, seq_len, _ = x.shape
    rows = []
    for b in range(batch):
        outputs = []
        for t in range(seq_len):
            chunk_start = (t // size) * size
            quad = sum(torch.relu(q_quad[b, t] @ k_quad[b, s] / size) ** 2 * v[b, s] for s in range(chunk_start, t + 1))
            state = torch.zeros(layer.qk_dim, v.shape[-1], dtype=x.dtype)
            for start in range(0, chunk_start, size):  # every finished earlier chunk
                for s in range(start, start + size):
                    state = state + torch.outer(k_lin[b, s], v[b, s]) / size
            outputs.append(u[b, t] * (quad + q_lin[b, t] @ state))
        rows.append(torch.stack(outputs))
    return layer.out_proj(torch.stack(rows))


def hopfield_reference(layer, x):
    q, k, v = heads(layer, x)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    xi = q
    for _ in range(layer.num_updates - 1):
        xi = dense_attention(xi, k, k, causal, layer.beta)
    return merge(layer, dense_attention(xi, k, v, causal, layer.beta))


def heads(layer, x):
    """``q, k, v`` of a q/k/v/out layer: ``[batch, heads, seq_len, head_dim]``."""
    batch, seq_len, _ = x.shape
    return [proj(x).view(batch, seq_len, layer.num_heads, layer.head_dim).transpose(1, 2)
            for proj in (layer.q_proj, layer.k_proj, layer.v_proj)]


def merge(layer, out):
    """``[batch, heads, seq_len, head_dim]`` -> the layer's ``out_proj`` of the concatenated heads."""
    batch, _, seq_len, _ = out.shape
    return layer.out_proj(out.transpose(1, 2).reshape(batch, seq_len, layer.num_heads * layer.head_dim))


def window_reference(layer, x):
    q, k, v = heads(layer, x)
    position = torch.arange(x.shape[1])
    offset = position[:, None] - position[None, :]  # query - key
    band = (offset >= 0) & (offset < layer.window_size)  # [n, n]: itself and the window_size - 1 before
    return merge(layer, dense_attention(q, k, v, band, 1 / math.sqrt(layer.head_dim)))


def dense_attention(q, k, v, allowed, scale):
    """Plain softmax attention with an explicit ``[n, n]`` bool mask (True = may attend)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def dense_terraced(q, k, v, chunk_size, module, sink=0, retrieve=True):
    """The terraced formula written out: explicit [n, n] masks of the exact region (own chunk up to t, the whole
    previous chunk, the first ``sink`` tokens) and of the retrieved region (chunks <= i-2, sinks excluded), plain
    exponentials, one loop over query heads; key features per key/value head (``module.key_map.weight[h // group]``).
    ``(e^a·exact @ v + g·φq φkᵀ·older @ v) / (row sums)``."""
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    position = torch.arange(n)
    chunk = position // chunk_size
    causal = position[None, :] <= position[:, None]
    exact = causal & ((chunk[None, :] == chunk[:, None]) | (chunk[None, :] == chunk[:, None] - 1)
                      | (position[None, :] < sink))  # [n, n]
    older = (chunk[None, :] <= chunk[:, None] - 2) & (position[None, :] >= sink) & retrieve  # [n, n]

    def phi(x, w):
        p = (x * d**-0.25) @ w
        return torch.cat([torch.exp(p) / torch.exp(p).sum(-1, keepdim=True),
                          torch.exp(-p) / torch.exp(-p).sum(-1, keepdim=True)], -1)

    out = torch.empty_like(q)
    for h in range(heads):
        kv = h // group
        g = math.exp(module.mix_logit[h].item())
        a = torch.exp(q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(d)) * exact  # [batch, n, n]
        lin = g * (phi(q[:, h], module.query_map.weight[h]) @ phi(k[:, kv], module.key_map.weight[kv]).transpose(-1, -2))
        lin = lin * older
        out[:, h] = ((a + lin) @ v[:, kv]) / (a + lin).sum(-1, keepdim=True)
    return out


def dense_block_attention(q, k, v, chunk_size, block_size, top_k, sink_size=0, summary="minmax", selection="group",
                          page_size=None, chunk_scores=None):
    """Block retrieval (:mod:`bsbr.blocks`) written out token by token: for every token and head an explicit ``[n]``
    mask (local region, sinks, its selected blocks), the block scores summed over its key/value group's heads
    (``selection="group"``) from per-page min/max or mean keys of its non-sink tokens (a block scores its best page;
    one page per block without ``page_size``) — or, with ``chunk_scores [b, heads, chunks, chunks]``, head ``hh``'s
    score of block ``j`` for a token of chunk ``c`` is ``chunk_scores[b, hh, c, j]`` — the best ``top_k`` candidates by
    sorting (blocks of sink tokens only are no candidates)."""
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    page = page_size or block_size
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(n):
            local_start = max(0, (t // chunk_size - 1) * chunk_size)
            candidates = local_start // block_size
            usable = [j for j in range(candidates) if (j + 1) * block_size > sink_size]
            for h in range(heads):
                kv = h // group
                score_heads = range(kv * group, (kv + 1) * group) if selection == "group" else [h]
                scores = []
                for j in usable:
                    total = 0.0
                    for hh in score_heads:
                        if chunk_scores is not None:
                            total += float(chunk_scores[b, hh, t // chunk_size, j])
                            continue
                        query = q[b, hh, t]
                        best = -math.inf
                        for start in range(j * block_size, (j + 1) * block_size, page):
                            if start + page <= sink_size:
                                continue  # a page of sink tokens only
                            keys = k[b, kv, max(start, sink_size): start + page]  # [page or fewer, d]
                            if summary == "minmax":
                                score = torch.maximum(query * keys.amin(0), query * keys.amax(0)).sum()
                            else:
                                score = (query * keys.mean(0)).sum()
                            best = max(best, float(score))
                        total += best
                    scores.append(total)
                chosen = [usable[i] for i in sorted(range(len(usable)), key=lambda i: -scores[i])[:top_k]]
                allowed = torch.zeros(n, dtype=torch.bool)
                allowed[local_start: t + 1] = True
                allowed[: min(sink_size, t + 1)] = True
                for j in chosen:
                    allowed[j * block_size: (j + 1) * block_size] = True
                logits = (k[b, kv] @ q[b, h, t]) / math.sqrt(d)  # [n]
                weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=0)
                out[b, h, t] = weights @ v[b, kv]
    return out


def dense_local_softmax(q, k, v, chunk_size, sink=0):
    """Own-chunk causal softmax attention plus ``sink`` sink tokens with its log-normaliser, written out with an
    explicit ``[n, n]`` mask (keys repeated to the query heads): ``(output [b, h, n, d], lse [b, h, n])``."""
    heads, n, d = q.shape[1], q.shape[2], q.shape[3]
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    position = torch.arange(n)
    chunk = position // chunk_size
    seen = ((chunk[:, None] == chunk[None, :]) | (position[None, :] < sink)) & (position[None, :] <= position[:, None])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~seen, float("-inf"))  # [b, h, n, n]
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def rope_at(x, positions, inv_freq):
    """RoPE (rotate-half layout, as transformers' ``apply_rotary_pos_emb``) of raw vectors ``x [..., n, d]`` at the
    explicit ``positions [n]``, written out from cos/sin tables."""
    angle = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [n, d/2]
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def dense_block_attention_compact(q_raw, k_raw, v, inv_freq, chunk_size, block_size, top_k, sink_size=0,
                                  summary="minmax", selection="group"):
    """Block retrieval with ``positions="compact"`` written out token by token from *raw* (un-rotated) queries and
    keys: token ``t`` (local region from ``L``) sits at position ``sink_size + block_size + t - L``, a local key ``s``
    at ``sink_size + block_size + s - L``, a sink ``s`` at ``s``, and token ``i`` of any retrieved block at
    ``sink_size + i``; RoPE is applied at those explicit positions (:func:`rope_at`), blocks are scored with the
    query at its position against the summary of the block's keys at theirs."""
    batch, heads, n, d = q_raw.shape
    group = heads // k_raw.shape[1]
    out = torch.zeros_like(q_raw)
    one = torch.ones(1, dtype=torch.long)
    for b in range(batch):
        for t in range(n):
            local_start = max(0, (t // chunk_size - 1) * chunk_size)
            q_pos = sink_size + block_size + t - local_start
            candidates = local_start // block_size
            usable = [j for j in range(candidates) if (j + 1) * block_size > sink_size]
            for h in range(heads):
                kv = h // group
                score_heads = range(kv * group, (kv + 1) * group) if selection == "group" else [h]
                scores = []
                for j in usable:
                    first = max(j * block_size, sink_size)
                    placed = rope_at(k_raw[b, kv, first: (j + 1) * block_size],
                                     sink_size + torch.arange(first - j * block_size, block_size), inv_freq)
                    total = 0.0
                    for hh in score_heads:
                        query = rope_at(q_raw[b, hh, t][None], q_pos * one, inv_freq)[0]
                        if summary == "minmax":
                            total += torch.maximum(query * placed.amin(0), query * placed.amax(0)).sum()
                        else:
                            total += (query * placed.mean(0)).sum()
                    scores.append(float(total))
                chosen = [usable[i] for i in sorted(range(len(usable)), key=lambda i: -scores[i])[:top_k]]
                keys, values = [], []
                for s in range(min(sink_size, local_start)):  # sinks before the local region, at their own place
                    keys.append(rope_at(k_raw[b, kv, s][None], s * one, inv_freq)[0])
                    values.append(v[b, kv, s])
                for j in chosen:
                    for p in range(max(j * block_size, sink_size), (j + 1) * block_size):
                        keys.append(rope_at(k_raw[b, kv, p][None], (sink_size + p - j * block_size) * one,
                                            inv_freq)[0])
                        values.append(v[b, kv, p])
                for s in range(local_start, t + 1):
                    keys.append(rope_at(k_raw[b, kv, s][None], (sink_size + block_size + s - local_start) * one,
                                        inv_freq)[0])
                    values.append(v[b, kv, s])
                query = rope_at(q_raw[b, h, t][None], q_pos * one, inv_freq)[0]
                weights = torch.softmax(torch.stack(keys) @ query / math.sqrt(d), dim=0)
                out[b, h, t] = weights @ torch.stack(values)
    return out


def t_bounds(values) -> tuple[float, float]:
    """The plain 95 % Student-t interval of the mean of ``values`` (one per seed): ``(low, high)``, unclipped. The
    reference the reports' intervals over seeds (bsbr.convergence, bsbr.mqar) are checked against."""
    values = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half
