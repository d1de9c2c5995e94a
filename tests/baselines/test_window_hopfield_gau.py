"""Efficient causal baselines: SlidingWindowAttention, HopfieldAttention, GAU.

Each fast module is compared with a plain reference written here (a dense ``n × n`` band mask, a dense causal softmax
iterated ``num_updates`` times, explicit loops over tokens and chunks for GAU), then checked for what is its own: the
window's reach, streaming with non-default settings, state contents, gradients, dropout and its own arguments.
Causality, streaming, padding and the common argument/state checks are the contract every architecture keeps
(tests/test_contract.py).

Tolerances: max |difference| <= 1e-5 in fp32 and <= 1e-10 (sliding window, Hopfield) / 1e-8 (GAU) in float64.
Shapes are tiny and seeds fixed.
"""

import math

import pytest
import torch

from bsbr import StandardAttention
from bsbr.baselines.gau import GAU, GAUState
from bsbr.baselines.hopfield import HopfieldAttention
from bsbr.baselines.sliding_window import SlidingWindowAttention, WindowCache, sliding_window_attention
from tests.reference import dense_attention, gau_reference, heads, hopfield_reference, window_reference

HIDDEN, HEADS = 16, 2
HEAD_DIM = HIDDEN // HEADS
WINDOW = CHUNK = 4
SEQ = 11  # two whole windows/chunks of 4 and a partial one of 3


def make_window(window_size=WINDOW, seed=0):
    torch.manual_seed(seed)
    return SlidingWindowAttention(HIDDEN, HEADS, window_size=window_size).eval()


def make_hopfield(num_updates=1, beta=None, seed=0):
    torch.manual_seed(seed)
    return HopfieldAttention(HIDDEN, HEADS, beta=beta, num_updates=num_updates).eval()


def make_gau(chunk_size=CHUNK, seed=0):
    """A small GAU whose scale/offset maps are O(1), so both the chunk kernel and the linear part matter."""
    torch.manual_seed(seed)
    layer = GAU(HIDDEN, HEADS, chunk_size=chunk_size, qk_dim=8, expansion=2).eval()
    with torch.no_grad():
        layer.gamma.normal_(0.0, 1.0)
        layer.beta.normal_(0.0, 0.5)
    return layer


MAKERS = {"window": make_window, "hopfield": make_hopfield, "hopfield_3_updates": lambda: make_hopfield(3),
          "gau": make_gau}


def random_hidden(batch, seq_len, seed=1, dtype=torch.float32):
    return torch.randn(batch, seq_len, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


REFERENCES = {"window": window_reference, "hopfield": hopfield_reference, "hopfield_3_updates": hopfield_reference,
              "gau": gau_reference}


def stream(layer, x, pieces):
    outputs, state, start = [], None, 0
    for length in pieces:
        out, state = layer(x[:, start : start + length], state=state, return_state=True)
        outputs.append(out)
        start += length
    return torch.cat(outputs, dim=1), state


# ---------------------------------------------------------------------------------------------- fast == reference


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("window_size, seq_len", [(8, 5), (4, 4), (4, 11), (1, 7), (3, 12), (2, 1)],
                         ids=["shorter_than_window", "equal_to_window", "not_a_multiple", "window_1", "multiple",
                              "one_token"])
def test_window_equals_dense_band_mask(window_size, seq_len, dtype, tol):
    layer = make_window(window_size).to(dtype)
    x = random_hidden(2, seq_len, dtype=dtype)
    with torch.no_grad():
        assert (layer(x) - window_reference(layer, x)).abs().max() <= tol


def test_window_at_least_seq_len_is_standard_attention():
    layer = make_window(window_size=SEQ)
    standard = StandardAttention(HIDDEN, HEADS).eval()
    standard.load_state_dict(layer.state_dict())
    x = random_hidden(2, SEQ)
    with torch.no_grad():
        assert (layer(x) - standard(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("num_updates, beta", [(1, None), (1, 0.7), (2, None), (3, 1.3)])
def test_hopfield_equals_dense_iterated_softmax(num_updates, beta, dtype, tol):
    layer = make_hopfield(num_updates, beta).to(dtype)
    x = random_hidden(2, SEQ, dtype=dtype)
    with torch.no_grad():
        assert (layer(x) - hopfield_reference(layer, x)).abs().max() <= tol


def test_hopfield_defaults_are_standard_attention():
    layer = make_hopfield()
    assert layer.beta == pytest.approx(1 / math.sqrt(HEAD_DIM)) and layer.num_updates == 1
    standard = StandardAttention(HIDDEN, HEADS).eval()
    standard.load_state_dict(layer.state_dict())
    x = random_hidden(2, SEQ)
    with torch.no_grad():
        assert (layer(x) - standard(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk_size, seq_len", [(4, 11), (4, 8), (5, 3), (1, 4)])
def test_gau_equals_naive_loops_float64(chunk_size, seq_len):
    layer = make_gau(chunk_size).double()
    x = random_hidden(2, seq_len, dtype=torch.float64)
    with torch.no_grad():
        fast, reference = layer(x), gau_reference(layer, x)
    assert reference.abs().max() > 1e-3  # the comparison is not of zeros
    assert (fast - reference).abs().max() <= 1e-8


@pytest.mark.parametrize("kind", ["window", "gau"])
def test_more_than_32_blocks_equal_the_reference_float64(kind):
    """The fast paths process blocks/chunks in groups of 32: 150 tokens of blocks of 4 is 38 of them (two groups, the
    second partial), with and without autograd, and streamed across the group boundary."""
    layer = (make_window() if kind == "window" else make_gau()).double()
    reference = window_reference if kind == "window" else gau_reference
    x = random_hidden(2, 150, dtype=torch.float64)
    expected = reference(layer, x)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() <= 1e-8
        pieces, _ = stream(layer, x, [4, 130, 16])
        assert (pieces - expected).abs().max() <= 1e-8
    assert (layer(x) - expected).abs().max() <= 1e-8  # autograd path


def test_gau_linear_part_reads_earlier_chunks():
    """Zeroing the linear key map changes tokens after the first chunk only."""
    layer = make_gau().double()
    x = random_hidden(1, SEQ, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.gamma[3].zero_()
        layer.beta[3].zero_()
        after = layer(x)
    difference = (before - after).abs().amax(-1)[0]
    assert difference[:CHUNK].max() <= 1e-12 and difference[CHUNK:].min() > 1e-8


# ---------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("position", [0, 3, 4, 9])
def test_window_a_token_is_seen_by_exactly_the_next_window_size_tokens(position):
    layer = make_window()
    x = random_hidden(1, SEQ)
    changed = x.clone()
    changed[:, position] += 1.0
    with torch.no_grad():
        difference = (layer(x) - layer(changed)).abs().amax(-1)[0]  # [seq_len]
    assert (difference[:position] == 0).all() and (difference[position + WINDOW :] == 0).all()
    assert difference[position : position + WINDOW].min() > 0.0


# ---------------------------------------------------------------------------------------------- streaming

SCHEDULES = {
    "single_tokens": [1] * SEQ,
    "on_boundaries": [4, 4, 3],
    "crossing": [3, 2, 5, 1],
    "one_then_rest": [1, 10],
    "rest_then_one": [10, 1],
    "long_then_short": [9, 2],
    "boundary_then_chunks": [4, 7],  # a state ending on a chunk boundary, then a call of several chunks
}


@pytest.mark.parametrize("kind", ["hopfield_3_updates", "gau"])  # settings the contract's registry defaults miss
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pieces_equal_full_forward(kind, schedule):
    layer = MAKERS[kind]()
    x = random_hidden(2, SEQ)
    with torch.no_grad():
        full, full_state = layer(x, return_state=True)
        pieces, state = stream(layer, x, SCHEDULES[schedule])
        assert (full - layer(x)).abs().max() <= 1e-6  # return_state does not change the output
        assert (pieces - full).abs().max() <= 1e-5
    assert state.num_tokens == full_state.num_tokens == SEQ
    assert state.nbytes() == full_state.nbytes()


def test_window_cache_keeps_only_the_last_window_minus_one_tokens():
    layer = make_window()
    x = random_hidden(2, SEQ)
    with torch.no_grad():
        _, state = layer(x, return_state=True)
        _, k, v = heads(layer, x)
    assert isinstance(state, WindowCache)
    assert torch.equal(state.key, k[:, :, -(WINDOW - 1):]) and torch.equal(state.value, v[:, :, -(WINDOW - 1):])
    assert state.nbytes() == 2 * 4 * 2 * HEADS * (WINDOW - 1) * HEAD_DIM
    with torch.no_grad():
        _, short = layer(x[:, :2], return_state=True)
    assert short.key.shape[2] == 2
    with torch.no_grad():
        _, single = make_window(window_size=1)(x, return_state=True)
    assert single.key.shape[2] == 0 and single.nbytes() == 0


def test_gau_state_holds_the_partial_chunk_and_one_kv_sum():
    layer = make_gau()
    with torch.no_grad():
        _, state = layer(random_hidden(2, SEQ), return_state=True)
    assert isinstance(state, GAUState)
    partial, inner = SEQ % CHUNK, 2 * HIDDEN
    assert state.partial_value.shape == (2, partial, inner) and state.kv.shape == (2, layer.qk_dim, inner)
    assert state.nbytes() == 4 * 2 * (partial * (2 * layer.qk_dim + inner) + layer.qk_dim * inner)


# ---------------------------------------------------------------------------------------------- padding


# ---------------------------------------------------------------------------------------------- gradients

SMALL_CONFIGS = [(SlidingWindowAttention, {"window_size": 3}), (HopfieldAttention, {"num_updates": 2}),
                 (GAU, {"chunk_size": 3, "qk_dim": 8})]


@pytest.mark.parametrize("kind", MAKERS)
def test_gradients_finite_and_nonzero_on_every_parameter(kind):
    layer = MAKERS[kind]().train()
    x = random_hidden(2, SEQ).requires_grad_()
    mask = torch.ones(2, SEQ, dtype=torch.bool)
    mask[1, :2] = False
    layer(x, attention_mask=mask).square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name
    assert torch.isfinite(x.grad).all() and (x.grad[1, :2] == 0).all()


@pytest.mark.parametrize("cls, extra", SMALL_CONFIGS)
def test_dropout_only_in_training(cls, extra):
    torch.manual_seed(0)
    layer = cls(HIDDEN, HEADS, dropout=0.5, **extra)
    if cls is GAU:  # O(1) scale maps: the paper's init (gamma ~ N(0, 0.02²)) makes the chunk kernel ~1e-7
        torch.nn.init.normal_(layer.gamma)
    x = random_hidden(2, 7)
    with torch.no_grad():
        trained = layer.train()(x)
        evaluated = layer.eval()(x)
        assert torch.equal(evaluated, layer(x))
    assert torch.isfinite(trained).all() and (trained - evaluated).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls, kwargs, name", [  # the common arguments and span settings: tests/test_contract.py
    (SlidingWindowAttention, {"window_size": 2.0}, "window_size"),
    (HopfieldAttention, {"num_updates": 0}, "num_updates"),
    (HopfieldAttention, {"beta": 0.0}, "beta"),
    (HopfieldAttention, {"beta": -1.0}, "beta"),
    (HopfieldAttention, {"beta": float("nan")}, "beta"),
    (GAU, {"qk_dim": 0}, "qk_dim"),
    (GAU, {"expansion": 0}, "expansion"),
])
def test_bad_config_raises_naming_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**{"hidden_dim": HIDDEN, "num_heads": HEADS, **kwargs})


# ---------------------------------------------------------------------------------------------- the functional core


@pytest.mark.parametrize("window_size, cached, length", [(4, 0, 11), (4, 2, 3), (4, 3, 40), (3, 0, 150)])
def test_window_function_value_head_size_may_differ_from_query(window_size, cached, length):
    """``value`` with d_v != d (a reshape RuntimeError before): equal to the dense band-mask reference, with and
    without autograd, over one block, several blocks and more than 32 of them."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, cached + length, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, cached + length, 7, generator=g, dtype=torch.float64)
    offset = (cached + torch.arange(length))[:, None] - torch.arange(cached + length)[None, :]  # query - key position
    expected = dense_attention(q, k, v, (offset >= 0) & (offset < window_size), 1 / math.sqrt(5))
    with torch.no_grad():
        assert (sliding_window_attention(q, k, v, window_size) - expected).abs().max() <= 1e-10
    out = sliding_window_attention(q.requires_grad_(), k, v, window_size)
    assert out.shape == (2, 3, length, 7) and (out - expected).abs().max() <= 1e-10


def test_window_function_inconsistent_shapes_raise_naming_the_argument():
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="^key"):
        sliding_window_attention(q, k[..., :3], k, 4)
    with pytest.raises(ValueError, match="^key"):
        sliding_window_attention(q, k[:, :1], k[:, :1], 4)
    with pytest.raises(ValueError, match="^value"):
        sliding_window_attention(q, k, k[:, :, :5], 4)
    with pytest.raises(ValueError, match="^query"):
        sliding_window_attention(q[0], k, k, 4)
