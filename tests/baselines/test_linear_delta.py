"""Linear attention and DeltaNet baselines: the recurrent, chunkwise and naive forms of each operator
agree (forward, backward, carried state), the layers equal their written-out references, keep a length-free state,
get gradients everywhere, and run in half precision. Causality, streaming, padding and argument/state checks are
the contract every architecture keeps (tests/test_contract.py).

Tolerances: operator forms in float64, max |difference| <= 1e-8; layers in fp32, <= 1e-5. Shapes tiny, seeds fixed.
"""

import pytest
import torch
import torch.nn.functional as F

from bsbr.baselines.delta_net import DeltaNet, DeltaNetState, delta_rule_chunkwise, delta_rule_recurrent
from bsbr.baselines.linear import (LINEAR_ATTENTION_EPS, LinearAttention, LinearAttentionState, elu_feature_map,
                                   linear_attention_chunkwise, linear_attention_recurrent)
from tests.reference import naive_delta_rule, naive_linear_attention

HIDDEN, HEADS, CHUNK, SEQ = 32, 4, 4, 23  # SEQ: five chunks of 4 and a partial one of 3
HEAD_DIM = HIDDEN // HEADS
OP_ATOL = 1e-8
LAYER_ATOL = 1e-5

#: (seq_len, chunk_size): not a multiple, chunk 1, chunk == seq, chunk > seq, a multiple.
OP_SHAPES = [(13, 4), (13, 1), (13, 13), (13, 32), (12, 4)]


def per_head(seed, batch=2, heads=3, seq_len=13, d_k=5, d_v=6):
    """Random float64 ``q, k [batch, heads, seq_len, d_k]``, ``v [.., d_v]``, ``beta [batch, heads, seq_len]``."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, seq_len, d_k, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, heads, seq_len, d_v, generator=g, dtype=torch.float64)
    beta = torch.rand(batch, heads, seq_len, generator=g, dtype=torch.float64)
    return q, k, v, beta


# --------------------------------------------------------------------------------------------- linear attention


@pytest.mark.parametrize("seq_len,chunk_size", OP_SHAPES)
def test_linear_attention_chunkwise_equals_recurrent_equals_naive(seq_len, chunk_size):
    q, k, v, _ = per_head(0, seq_len=seq_len)
    q, k = elu_feature_map(q), elu_feature_map(k)
    naive = naive_linear_attention(q, k, v)
    recurrent = linear_attention_recurrent(q, k, v)
    chunkwise = linear_attention_chunkwise(q, k, v, chunk_size)
    for a, b, c in zip(naive, recurrent, chunkwise):
        torch.testing.assert_close(b, a, atol=OP_ATOL, rtol=0)
        torch.testing.assert_close(c, a, atol=OP_ATOL, rtol=0)


@pytest.mark.parametrize("split,chunk_size", [(5, 4), (8, 4), (1, 3), (12, 64)])
def test_linear_attention_carried_state_two_calls_equal_one(split, chunk_size):
    q, k, v, _ = per_head(1)
    q, k = elu_feature_map(q), elu_feature_map(k)
    whole = linear_attention_recurrent(q, k, v)
    for form in (linear_attention_recurrent, lambda *a, state=None: linear_attention_chunkwise(*a, chunk_size, state)):
        out1, s, z = form(q[:, :, :split], k[:, :, :split], v[:, :, :split])
        out2, s, z = form(q[:, :, split:], k[:, :, split:], v[:, :, split:], state=(s, z))
        torch.testing.assert_close(torch.cat([out1, out2], dim=2), whole[0], atol=OP_ATOL, rtol=0)
        torch.testing.assert_close(s, whole[1], atol=OP_ATOL, rtol=0)
        torch.testing.assert_close(z, whole[2], atol=OP_ATOL, rtol=0)


def test_linear_attention_chunkwise_backward_equals_recurrent():
    inputs = per_head(2)[:3]
    weight = torch.randn(2, 3, 13, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for form in (linear_attention_recurrent, lambda q, k, v: linear_attention_chunkwise(q, k, v, 4)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, s, z = form(elu_feature_map(leaves[0]), elu_feature_map(leaves[1]), leaves[2])
        ((out * weight).sum() + s.sum() + z.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=OP_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- delta rule


def unit_qk(q, k, v, beta):
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta


@pytest.mark.parametrize("seq_len,chunk_size", OP_SHAPES)
def test_delta_rule_chunkwise_equals_recurrent_equals_naive(seq_len, chunk_size):
    q, k, v, beta = unit_qk(*per_head(4, seq_len=seq_len))
    naive = naive_delta_rule(q, k, v, beta)
    recurrent = delta_rule_recurrent(q, k, v, beta)
    chunkwise = delta_rule_chunkwise(q, k, v, beta, chunk_size)
    for a, b, c in zip(naive, recurrent, chunkwise):
        torch.testing.assert_close(b, a, atol=OP_ATOL, rtol=0)
        torch.testing.assert_close(c, a, atol=OP_ATOL, rtol=0)


def test_delta_rule_forms_agree_for_unnormalised_keys():
    """The forms are exact rewrites of one recurrence, whatever ``k`` and ``β`` (not only unit keys, β < 1)."""
    q, k, v, beta = per_head(5)
    beta = 2 * beta / k.square().sum(-1)  # β‖k‖² in (0, 2): the recurrence stays bounded
    naive = naive_delta_rule(q, k, v, beta)
    chunkwise = delta_rule_chunkwise(q, k, v, beta, 4)
    for a, c in zip(naive, chunkwise):
        torch.testing.assert_close(c, a, atol=OP_ATOL, rtol=0)


@pytest.mark.parametrize("split,chunk_size", [(5, 4), (8, 4), (1, 3), (12, 64)])
def test_delta_rule_carried_state_two_calls_equal_one(split, chunk_size):
    q, k, v, beta = unit_qk(*per_head(6))
    whole_out, whole_state = naive_delta_rule(q, k, v, beta)
    first = naive_delta_rule(q[:, :, :split], k[:, :, :split], v[:, :, :split], beta[:, :, :split])[1]
    tail = [t[:, :, split:] for t in (q, k, v, beta)]
    torch.testing.assert_close(naive_delta_rule(*tail, memory=first)[0], whole_out[:, :, split:], atol=OP_ATOL, rtol=0)
    for form in (delta_rule_recurrent, lambda *a, state=None: delta_rule_chunkwise(*a, chunk_size, state)):
        out1, s = form(*(t[:, :, :split] for t in (q, k, v, beta)))
        out2, s = form(*tail, state=s)
        torch.testing.assert_close(torch.cat([out1, out2], dim=2), whole_out, atol=OP_ATOL, rtol=0)
        torch.testing.assert_close(s, whole_state, atol=OP_ATOL, rtol=0)


def test_delta_rule_chunkwise_backward_equals_recurrent():
    inputs = per_head(7)
    weight = torch.randn(2, 3, 13, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = []
    for form in (delta_rule_recurrent, lambda *a: delta_rule_chunkwise(*a, 4)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, s = form(F.normalize(leaves[0], dim=-1), F.normalize(leaves[1], dim=-1), leaves[2], leaves[3])
        ((out * weight).sum() + s.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=OP_ATOL, rtol=0)


def test_delta_rule_chunkwise_fp32_long_sequence_stays_close_to_recurrent():
    q, k, v, beta = (t.float() for t in unit_qk(*per_head(9, batch=1, heads=2, seq_len=300, d_k=8, d_v=8)))
    ref_out, ref_state = delta_rule_recurrent(q, k, v, beta)
    out, state = delta_rule_chunkwise(q, k, v, beta, 64)
    torch.testing.assert_close(out, ref_out, atol=LAYER_ATOL, rtol=0)
    torch.testing.assert_close(state, ref_state, atol=LAYER_ATOL, rtol=0)


@pytest.mark.parametrize("form", ["linear_recurrent", "linear_chunkwise", "delta_recurrent", "delta_chunkwise"])
def test_operator_shape_and_state_errors(form):
    q, k, v, beta = per_head(0)
    call = {
        "linear_recurrent": lambda q, k, v, state=None: linear_attention_recurrent(q, k, v, state),
        "linear_chunkwise": lambda q, k, v, state=None: linear_attention_chunkwise(q, k, v, 4, state),
        "delta_recurrent": lambda q, k, v, state=None: delta_rule_recurrent(q, k, v, beta[:, :, : q.shape[2]], state),
        "delta_chunkwise": lambda q, k, v, state=None: delta_rule_chunkwise(q, k, v, beta[:, :, : q.shape[2]], 4,
                                                                              state),
    }[form]
    with pytest.raises(ValueError, match="q and k"):
        call(q, k[..., :4], v)
    with pytest.raises(ValueError, match=r"^state"):
        call(q, k, v, state=torch.zeros(1))
    with pytest.raises(ValueError, match="at least one token"):
        call(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="dtype"):
        call(q, k.float(), v)
    good_state = call(q, k, v)[1:] if form.startswith("linear") else call(q, k, v)[1]
    wrong_dtype = tuple(t.float() for t in good_state) if form.startswith("linear") else good_state.float()
    with pytest.raises(ValueError, match=r"^state must have the dtype"):
        call(q, k, v, state=wrong_dtype)
    if form == "linear_chunkwise":
        with pytest.raises(ValueError, match="chunk_size"):
            linear_attention_chunkwise(q, k, v, 0)
    if form == "delta_chunkwise":
        with pytest.raises(ValueError, match="chunk_size"):
            delta_rule_chunkwise(q, k, v, beta, 0)
        with pytest.raises(ValueError, match="beta"):
            delta_rule_chunkwise(q, k, v, beta[:, :, :5], 4)


# --------------------------------------------------------------------------------------------- layers

LAYERS = {"linear": LinearAttention, "delta_net": DeltaNet}


def make(kind, seed=0, chunk_size=CHUNK, **kwargs):
    torch.manual_seed(seed)
    return LAYERS[kind](HIDDEN, HEADS, chunk_size=chunk_size, **kwargs).eval()


def random_hidden(batch, seq_len, seed=1):
    return torch.randn(batch, seq_len, HIDDEN, generator=torch.Generator().manual_seed(seed))


def reference_layer(layer, x):
    """The layer written with its operator's recurrent (token-loop) form."""
    batch, n, _ = x.shape
    if isinstance(layer, DeltaNet):
        out, _ = delta_rule_recurrent(*layer.project(x))
    else:
        q, k, v = (p(x).view(batch, n, HEADS, HEAD_DIM).transpose(1, 2) for p in (layer.q_proj, layer.k_proj,
                                                                                  layer.v_proj))
        out = linear_attention_recurrent(elu_feature_map(q), elu_feature_map(k), v)[0]
    return layer.out_proj(out.transpose(1, 2).reshape(batch, n, HIDDEN))


def test_layer_feature_maps_follow_the_papers_written_out():
    """Independent of the layers' own ``project``/feature map: DeltaNet q, k = l2norm(silu(x Wᵀ + b)) per head,
    β = sigmoid(x W_βᵀ + b_β), then the delta-rule token loop; linear attention φ(x) = elu(x) + 1 written as
    where(x > 0, x + 1, exp(x)), then explicit causal sums."""
    x = random_hidden(2, SEQ).double()
    delta, linear = make("delta_net").double(), make("linear").double()

    def heads(t):  # [batch, n, hidden] -> [batch, heads, n, head_dim]
        return t.view(2, SEQ, HEADS, HEAD_DIM).transpose(1, 2)

    def linear_map(t, layer):
        return t @ layer.weight.T + layer.bias

    def unit(t):
        t = t * torch.sigmoid(t)  # silu
        return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    q, k = (unit(heads(linear_map(x, p))) for p in (delta.q_proj, delta.k_proj))
    v, beta = heads(linear_map(x, delta.v_proj)), torch.sigmoid(linear_map(x, delta.b_proj)).transpose(1, 2)
    memory, outs = torch.zeros(2, HEADS, HEAD_DIM, HEAD_DIM, dtype=torch.float64), []
    for t in range(SEQ):  # S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ, o_t = S_tᵀ q_t
        kt = k[:, :, t]
        memory = memory + beta[:, :, t, None, None] * kt[..., None] * (
            v[:, :, t] - torch.einsum("bhkv,bhk->bhv", memory, kt))[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", memory, q[:, :, t]))
    expected = linear_map(torch.stack(outs, 2).transpose(1, 2).reshape(2, SEQ, HIDDEN), delta.out_proj)
    with torch.no_grad():
        torch.testing.assert_close(delta(x), expected, atol=1e-10, rtol=0)

    def phi(t):
        return torch.where(t > 0, t + 1, torch.exp(t))

    q, k = (phi(heads(linear_map(x, p))) for p in (linear.q_proj, linear.k_proj))
    v = heads(linear_map(x, linear.v_proj))
    outs = []
    for t in range(SEQ):
        weights = (q[:, :, t, None, :] * k[:, :, : t + 1]).sum(-1)  # [batch, heads, t + 1]
        outs.append((weights[..., None] * v[:, :, : t + 1]).sum(2) / (weights.sum(-1, keepdim=True)
                                                                       + LINEAR_ATTENTION_EPS))
    expected = linear_map(torch.stack(outs, 2).transpose(1, 2).reshape(2, SEQ, HIDDEN), linear.out_proj)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("chunk_size", [1, CHUNK, 64])
def test_layer_equals_recurrent_reference(kind, chunk_size):
    layer = make(kind, chunk_size=chunk_size)
    x = random_hidden(2, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_layer(layer, x), atol=LAYER_ATOL, rtol=0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_state_size_is_constant_in_length(kind):
    """The state after any number of tokens holds S (and z) only: ``state_nbytes`` bytes, whatever the length."""
    layer = make(kind)
    state_type = LinearAttentionState if kind == "linear" else DeltaNetState
    d = HEAD_DIM
    assert layer.state_nbytes() == 4 * HEADS * (d * d + (d if kind == "linear" else 0))  # fp32, length-free
    with torch.no_grad():
        for seq_len in (1, CHUNK, SEQ):
            _, state = layer(random_hidden(2, seq_len), return_state=True)
            assert isinstance(state, state_type) and state.num_tokens == seq_len
            assert state.nbytes() == layer.state_nbytes(batch_size=2)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_gradients_are_finite_and_nonzero_on_every_parameter(kind):
    layer = make(kind).train()
    x = random_hidden(2, SEQ).requires_grad_()
    mask = torch.ones(2, SEQ, dtype=torch.bool)
    mask[1, :5] = False
    (layer(x, attention_mask=mask) * random_hidden(2, SEQ, seed=2)).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad[1, :5].abs().max() == 0  # padding gets no gradient


# --------------------------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)], ids=str)
def test_delta_net_half_precision_solves_in_float32_and_matches_float32(dtype, tolerance):
    """torch has no CPU triangular solve in bfloat16/float16 (a bare NotImplementedError before): that step runs in
    float32. Forward, backward and a streamed continuation stay within ``tolerance`` relative error (norm of the
    difference over the norm of the float32 value) of the float32 layer."""
    fp32 = make("delta_net")
    low = make("delta_net").to(dtype)
    x = random_hidden(2, SEQ)
    weight = random_hidden(2, SEQ, seed=2)
    x32, x16 = x.clone().requires_grad_(), x.to(dtype).requires_grad_()
    out32, out16 = fp32(x32), low(x16)
    assert out16.dtype == dtype

    def relative(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert relative(out16, out32) <= tolerance
    (out32 * weight).sum().backward()
    (out16.float() * weight).sum().backward()
    assert relative(x16.grad, x32.grad) <= tolerance
    with torch.no_grad():
        _, state = low(x[:, :9].to(dtype), return_state=True)
        rest = low(x[:, 9:].to(dtype), state=state)
    assert relative(rest, out32[:, 9:].detach()) <= tolerance


def test_delta_rule_chunkwise_half_precision_equals_float32_solve_rounded():
    """The operator in bfloat16 is the float32 operator on the same (rounded) inputs, within bfloat16 rounding."""
    q, k, v, beta = (t.to(torch.bfloat16) for t in unit_qk(*per_head(11)))
    out, memory = delta_rule_chunkwise(q, k, v, beta, 4)
    ref_out, ref_memory = delta_rule_chunkwise(*(t.float() for t in (q, k, v, beta)), 4)
    assert out.dtype == memory.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(memory.float(), ref_memory, atol=5e-2, rtol=2e-2)
