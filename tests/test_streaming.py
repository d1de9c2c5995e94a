"""Streaming: a sequence fed in pieces through the returned ``state`` gives the outputs of one full forward,
for BSBRAttention with and without compression and its model trunk (every architecture: tests/test_contract.py);
the BSBR state holds chunk states, not every token, and its size follows ``BSBRAttention.state_nbytes``; states
never leak between rows or calls; stateful misuse raises.

Tolerances: pieces vs full forward, max |difference| <= 1e-5 (fp32). Shapes are tiny and seeds fixed.
"""

import pytest
import torch
from torch import nn

import bsbr
from bsbr import BSBRAttention, build_model
from tests.reference import stream

HIDDEN, HEADS, CHUNK = 32, 4, 4
HEAD_DIM = HIDDEN // HEADS
SEQ = 23  # five full chunks of 4 and a partial one of 3
FP32_BYTES = 4

#: Piece lengths (each sums to SEQ = 23, chunk_size 4).
SCHEDULES = {
    "whole": [23],
    "single_tokens": [1] * 23,
    "ending_on_boundaries": [4, 8, 4, 7],  # 4, 12, 16: exactly on chunk boundaries; 8 is two whole chunks
    "crossing_and_long": [3, 2, 6, 1, 9, 2],  # 3 -> 5 and 5 -> 11 cross boundaries, 11 -> 12 ends on one
    "one_then_rest": [1, 22],
    "rest_then_one": [22, 1],
}


def make_bsbr(compression_factor=None, chunk_size=CHUNK, seed=0):
    torch.manual_seed(seed)
    return BSBRAttention(HIDDEN, HEADS, chunk_size, compression_factor=compression_factor).eval()


def random_hidden(batch, seq_len, seed=1):
    return torch.randn(batch, seq_len, HIDDEN, generator=torch.Generator().manual_seed(seed))


def random_pieces(total, high, seed):
    generator = torch.Generator().manual_seed(seed)
    pieces = []
    while sum(pieces) < total:
        pieces.append(min(int(torch.randint(1, high + 1, (1,), generator=generator)), total - sum(pieces)))
    return pieces


def tensors_held(obj, seen=None):
    """Every tensor reachable from a state object (its fields, lists, tuples, dicts, nested bsbr objects).

    Modules (a state may name its owner) and non-bsbr objects are not entered."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, nn.Module):
        return []
    if isinstance(obj, (list, tuple, set)):
        return [t for item in obj for t in tensors_held(item, seen)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_held(item, seen)]
    if type(obj).__module__.startswith("bsbr"):
        fields = dict(getattr(obj, "__dict__", {}))
        for klass in type(obj).__mro__:
            for name in getattr(klass, "__slots__", ()):
                if hasattr(obj, name):
                    fields[name] = getattr(obj, name)
        return [t for item in fields.values() for t in tensors_held(item, seen)]
    return []


# --------------------------------------------------------------------------------------------- pieces == full


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("compression", [None, 4])
def test_bsbr_pieces_equal_full_forward(schedule, batch, compression):
    attn = make_bsbr(compression)
    x = random_hidden(batch, SEQ)
    with torch.no_grad():
        full = attn(x)
        pieces, state = stream(attn, x, SCHEDULES[schedule])
    torch.testing.assert_close(pieces, full, atol=1e-5, rtol=0)
    assert type(state.num_tokens) is int and state.num_tokens == SEQ


@pytest.mark.parametrize("compression", [None, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bsbr_random_pieces_equal_full_forward_chunk_6(compression, seed):
    attn = make_bsbr(compression, chunk_size=6, seed=seed)
    x = random_hidden(2, 40, seed=seed + 10)
    pieces = random_pieces(40, high=13, seed=seed)  # pieces of 1..13 tokens: shorter and longer than a chunk
    with torch.no_grad():
        full = attn(x)
        streamed, state = stream(attn, x, pieces)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=0)
    assert state.num_tokens == 40


@pytest.mark.parametrize("compression", [None, 4])
def test_bsbr_full_call_with_return_state_equals_plain_call(compression):
    attn = make_bsbr(compression)
    x = random_hidden(3, SEQ)
    with torch.no_grad():
        plain = attn(x)
        out, state = attn(x, return_state=True)
        out_none, _ = attn(x, state=None, return_state=True)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_none, plain, atol=1e-6, rtol=0)
    assert state.num_tokens == SEQ


# every architecture at its registry defaults: tests/test_contract.py
@pytest.mark.parametrize("name,extra", [("bsbr", {"chunk_size": CHUNK, "compression_factor": 4})])
@pytest.mark.parametrize("pieces", [[1] * 21, [5, 3, 8, 1, 4], [4, 4, 13]])
def test_model_trunk_pieces_equal_full_forward(name, extra, pieces):
    torch.manual_seed(0)
    model = build_model(name, vocab_size=50, hidden_dim=HIDDEN, num_layers=2, num_heads=HEADS, ff_dim=64,
                        **extra).eval()
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        outputs, state, start = [], None, 0
        for length in pieces:
            hidden, state = model(ids[:, start : start + length], state=state, return_state=True)
            outputs.append(hidden)
            start += length
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-5, rtol=0)


def test_stateful_calls_accept_padding_with_equal_real_counts_per_row():
    """Derived from the spec: a stateful call may pad rows (left, right or both) as long as every row has the same
    number of real tokens; each row then continues its own real-token sequence."""
    attn = make_bsbr()
    real = random_hidden(2, 11)
    # piece 1: 3 real tokens per row, row 0 left-padded by 2, row 1 right-padded by 2
    # piece 2: 6 real tokens per row (8 long), row 0 right-padded by 2, row 1 padded 1 left and 1 right
    # piece 3: 2 real tokens per row, no padding
    junk = random_hidden(2, 8, seed=99)
    piece1 = torch.stack([torch.cat([junk[0, :2], real[0, 0:3]]), torch.cat([real[1, 0:3], junk[1, :2]])])
    mask1 = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    piece2 = torch.stack([torch.cat([real[0, 3:9], junk[0, :2]]), torch.cat([junk[1, :1], real[1, 3:9], junk[1, 1:2]])])
    mask2 = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    piece3 = real[:, 9:11]
    with torch.no_grad():
        full = attn(real)
        out1, state = attn(piece1, attention_mask=mask1, return_state=True)
        out2, state = attn(piece2, attention_mask=mask2, state=state, return_state=True)
        out3, state = attn(piece3, state=state, return_state=True)
    torch.testing.assert_close(out1[0, 2:], full[0, 0:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(out1[1, :3], full[1, 0:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(out2[0, :6], full[0, 3:9], atol=1e-5, rtol=0)
    torch.testing.assert_close(out2[1, 1:7], full[1, 3:9], atol=1e-5, rtol=0)
    torch.testing.assert_close(out3, full[:, 9:11], atol=1e-5, rtol=0)
    assert out1[0, :2].abs().max() == 0 and out1[1, 3:].abs().max() == 0
    assert out2[0, 6:].abs().max() == 0 and out2[1, [0, 7]].abs().max() == 0


# --------------------------------------------------------------------------------------------- state size


@pytest.mark.parametrize("compression", [None, 4])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 13, 16, 37])
def test_state_nbytes_matches_formula_and_held_tensors(compression, batch, num_tokens):
    attn = make_bsbr(compression)
    x = random_hidden(batch, num_tokens)
    with torch.no_grad():
        _, state = attn(x, return_state=True)
    expected = attn.state_nbytes(num_tokens, batch_size=batch)
    assert type(expected) is int
    assert state.num_tokens == num_tokens
    assert state.nbytes() == expected
    held = tensors_held(state)
    assert held, "the state holds no tensors"
    assert sum(t.numel() * t.element_size() for t in held) == state.nbytes()
    if num_tokens == 37:  # 37 is none of the natural sizes (hidden 32, head_dim 8, head_dim² 64, 9 chunks, ...)
        # nothing in the state is per token of the whole sequence
        assert all(num_tokens not in t.shape for t in held), [tuple(t.shape) for t in held]


@pytest.mark.parametrize("compression", [None, 4])
def test_streamed_state_has_the_same_size_as_a_one_call_state(compression):
    attn = make_bsbr(compression)
    x = random_hidden(3, 21)
    with torch.no_grad():
        _, streamed = stream(attn, x, [3, 6, 4, 1, 7])
    assert streamed.num_tokens == 21
    assert streamed.nbytes() == attn.state_nbytes(21, batch_size=3)
    assert sum(t.numel() * t.element_size() for t in tensors_held(streamed)) == streamed.nbytes()


@pytest.mark.parametrize("compression", [None, 2, 4])
def test_state_grows_per_chunk_not_per_token(compression):
    attn = make_bsbr(compression)
    nbytes = attn.state_nbytes
    chunk_state = HEADS * HEAD_DIM * HEAD_DIM // (compression or 1) * FP32_BYTES  # F_j for every head

    # one finished chunk adds the same number of bytes at every chunk boundary (n and 2n alike) ...
    growth = {k: nbytes((k + 1) * CHUNK) - nbytes(k * CHUNK) for k in (1, 2, 4, 8, 16)}
    assert len(set(growth.values())) == 1, growth
    per_chunk = growth[1]
    # ... about head_dim² per head: the chunk state plus its meta-key (a vector or two of hidden_dim at most)
    assert chunk_state <= per_chunk <= chunk_state + 2 * HIDDEN * FP32_BYTES, (per_chunk, chunk_state)
    assert nbytes(2 * 8 * CHUNK) - nbytes(8 * CHUNK) == 8 * per_chunk

    # inside a chunk only the partial chunk's keys and values grow, hidden_dim each per token
    for k in (1, 3, 8):
        for r in range(1, CHUNK):
            assert nbytes(k * CHUNK + r) - nbytes(k * CHUNK + 1) == (r - 1) * 2 * HIDDEN * FP32_BYTES, (k, r)

    # every row holds its own copy; bytes follow the parameter dtype
    for n in (1, 4, 13, 37):
        assert nbytes(n, batch_size=3) == 3 * nbytes(n, batch_size=1)
    fp32_bytes = nbytes(37)
    assert attn.double().state_nbytes(37) == 2 * fp32_bytes


def test_state_is_smaller_than_a_kv_cache_for_long_inputs():
    """With chunk_size 8 a chunk's K/V (2·8·hidden values) outweighs its state (heads·head_dim² + meta-key)."""
    torch.manual_seed(0)
    attn = BSBRAttention(HIDDEN, HEADS, 8).eval()
    kv_cache = 2 * 400 * HIDDEN * FP32_BYTES
    assert attn.state_nbytes(400) < kv_cache / 1.5


# --------------------------------------------------------------------------------------------- isolation


def test_rows_never_influence_each_other_with_compression():  # every architecture: tests/test_contract.py
    layer = make_bsbr(4)
    x = random_hidden(2, SEQ)
    changed = x.clone()
    changed[0] += 2.0 * random_hidden(1, SEQ, seed=5)[0]
    mask = torch.ones(2, SEQ, dtype=torch.bool)
    mask[0, :3] = False  # row 0 padded on the left, row 1 not
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            base, changed_out = layer(x, **kwargs), layer(changed, **kwargs)
            torch.testing.assert_close(changed_out[1], base[1], atol=1e-6, rtol=0)
            assert (changed_out[0] - base[0]).abs().max() > 1e-3
        streamed, _ = stream(layer, x, [5, 1, 9, 8])
        streamed_changed, _ = stream(layer, changed, [5, 1, 9, 8])
    torch.testing.assert_close(streamed_changed[1], streamed[1], atol=1e-6, rtol=0)


def test_a_state_never_leaks_into_a_fresh_call_with_compression():  # every architecture: tests/test_contract.py
    layer = make_bsbr(4)
    a, b = random_hidden(2, 17, seed=1), random_hidden(2, 13, seed=2)
    with torch.no_grad():
        b_alone = layer(b)
        b_alone_stateful, _ = layer(b, return_state=True)
        stream(layer, a, [6, 5, 6])  # a stateful run on other data
        _, a_state = layer(a, return_state=True)
        b_again = layer(b)
        b_again_stateful, b_state = layer(b, return_state=True)
    assert torch.equal(b_again, b_alone)
    assert torch.equal(b_again_stateful, b_alone_stateful)
    assert b_state.num_tokens == 13 and a_state.num_tokens == 17


# --------------------------------------------------------------------------------------------- stateful misuse


def test_bsbr_state_after_chunk_size_change_raises():
    attn = make_bsbr()
    with torch.no_grad():
        _, state = attn(random_hidden(1, 6), return_state=True)
        attn.chunk_size = 8
        with pytest.raises(ValueError, match="chunk_size"):
            attn(random_hidden(1, 2), state=state)


@pytest.mark.parametrize("with_state", [False, True])
def test_bsbr_stateful_call_with_unequal_real_counts_raises(with_state):
    attn = make_bsbr()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 3 and 4 real tokens
    with torch.no_grad():
        state = attn(random_hidden(2, 5), return_state=True)[1] if with_state else None
        with pytest.raises(ValueError, match="attention_mask"):
            attn(random_hidden(2, 4), attention_mask=mask, state=state, return_state=True)
        if with_state:
            with pytest.raises(ValueError, match="attention_mask"):
                attn(random_hidden(2, 4), attention_mask=mask, state=state)
    # the same mask is fine without a state (stateless calls pad rows freely)
    with torch.no_grad():
        assert torch.isfinite(attn(random_hidden(2, 4), attention_mask=mask)).all()


def test_public_api_exports_the_streaming_classes():
    assert hasattr(bsbr, "BSBRForCausalLM")
    assert callable(BSBRAttention.state_nbytes)
