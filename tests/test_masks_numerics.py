"""Padding masks and numerics.

Padding: left, right or both, bool or integer masks. Padded outputs are zeros; real positions equal the same
sequence run alone (max |difference| <= 1e-5); padded inputs never reach real outputs; rows made only of padding are
finite zeros. Numerics: float64 gradcheck of BSBRAttention, bfloat16 within 2e-2 relative (norm of the difference
over the norm of the fp32 value) of fp32 forward and backward, no magic large constants in bsbr/attention.py.
Bad input raising ValueError naming the argument is part of the contract every architecture keeps
(tests/test_contract.py).
"""

import copy
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from bsbr import BSBRAttention, StandardAttention, build_model

HIDDEN, HEADS, CHUNK = 32, 4, 4
ROOT = Path(__file__).resolve().parents[1]

#: (left padding, real tokens, right padding) per row; every row is 19 long.
LAYOUT = [(0, 19, 0), (3, 16, 0), (0, 14, 5), (2, 14, 3), (5, 13, 1), (1, 18, 0)]
LENGTH = 19


def make_layer(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "bsbr":
        return BSBRAttention(HIDDEN, HEADS, CHUNK).eval()
    if kind == "bsbr_compressed":
        return BSBRAttention(HIDDEN, HEADS, CHUNK, compression_factor=4).eval()
    return StandardAttention(HIDDEN, HEADS).eval()


def layout_mask(layout, dtype):
    mask = torch.zeros(len(layout), LENGTH, dtype=torch.long)
    for row, (left, real, _) in enumerate(layout):
        mask[row, left : left + real] = 1
    return mask.to(dtype)


def real_slice(row_layout):
    left, real, _ = row_layout
    return slice(left, left + real)


LAYER_KINDS = ["bsbr", "bsbr_compressed", "standard"]
MASK_DTYPES = [torch.bool, torch.long, torch.int32]


# --------------------------------------------------------------------------------------------- attention padding


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_attention_padding_matches_each_sequence_alone(kind, mask_dtype):
    layer = make_layer(kind)
    x = torch.randn(len(LAYOUT), LENGTH, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = layout_mask(LAYOUT, mask_dtype)
    with torch.no_grad():
        out = layer(x, attention_mask=mask)
        assert out.shape == x.shape and torch.isfinite(out).all()
        for row, row_layout in enumerate(LAYOUT):
            real = real_slice(row_layout)
            alone = layer(x[row : row + 1, real])[0]
            torch.testing.assert_close(out[row, real], alone, atol=1e-5, rtol=0, msg=f"row {row} {row_layout}")
    padded = ~mask.bool()
    assert out[padded].abs().max() == 0  # padded positions are exactly zero


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_attention_padded_inputs_never_reach_real_outputs(kind):
    layer = make_layer(kind)
    x = torch.randn(len(LAYOUT), LENGTH, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = layout_mask(LAYOUT, torch.bool)
    perturbed = x.clone()
    perturbed[~mask] = 10.0 * torch.randn(int((~mask).sum()), HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base, out = layer(x, attention_mask=mask), layer(perturbed, attention_mask=mask)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_left_padding_does_not_shift_chunks(kind):
    """Left padding by 1..5 tokens (not a multiple of chunk_size) leaves every real output unchanged."""
    layer = make_layer(kind)
    real = torch.randn(1, 14, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        alone = layer(real)[0]
        for left in range(1, 6):
            x = torch.cat([torch.randn(1, left, HIDDEN), real], dim=1)
            mask = torch.tensor([[0] * left + [1] * 14])
            out = layer(x, attention_mask=mask)[0]
            torch.testing.assert_close(out[left:], alone, atol=1e-5, rtol=0, msg=f"left padding {left}")
            assert out[:left].abs().max() == 0


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_attention_all_padding_row_is_zero_and_gradients_finite(kind):
    layer = make_layer(kind).train()  # dropout is 0: train mode only switches the autograd path
    x = torch.randn(2, 11, HIDDEN, generator=torch.Generator().manual_seed(4), requires_grad=True)
    mask = torch.tensor([[0] * 11, [1] * 11])
    out = layer(x, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(out[1], layer(x[1:].detach())[0], atol=1e-5, rtol=0)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().max() == 0
    for name, parameter in layer.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


# --------------------------------------------------------------------------------------------- model padding


def make_model(name, seed=0):
    torch.manual_seed(seed)
    extra = {"chunk_size": CHUNK} if name == "bsbr" else {}
    return build_model(name, vocab_size=50, hidden_dim=HIDDEN, num_layers=2, num_heads=HEADS, ff_dim=64,
                       **extra).eval()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long], ids=str)
@pytest.mark.parametrize("name", ["bsbr", "standard"])
def test_model_padding_matches_each_sequence_alone(name, mask_dtype):
    model = make_model(name)
    ids = torch.randint(0, 50, (len(LAYOUT), LENGTH), generator=torch.Generator().manual_seed(6))
    mask = layout_mask(LAYOUT, mask_dtype)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert torch.isfinite(out).all()
        for row, row_layout in enumerate(LAYOUT):
            real = real_slice(row_layout)
            torch.testing.assert_close(out[row, real], model(ids[row : row + 1, real])[0], atol=1e-5, rtol=0,
                                       msg=f"row {row} {row_layout}")
        assert out[~mask.bool()].abs().max() == 0
        # padded ids never reach real positions
        changed = torch.where(mask.bool(), ids, (ids + 17) % 50)
        torch.testing.assert_close(model(changed, attention_mask=mask), out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["bsbr", "standard"])
def test_model_all_padding_row_is_zero_and_gradients_finite(name):
    model = make_model(name).train()
    ids = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[0] * 13, [0, 0] + [1] * 11])
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    out.square().mean().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), parameter_name


# --------------------------------------------------------------------------------------------- gradcheck


def tiny_bsbr(compression_factor=None):
    torch.manual_seed(0)
    # hidden 8, 2 heads (head_dim 4, state 16 values), chunk 3
    return BSBRAttention(8, 2, 3, compression_factor=compression_factor).double().eval()


def assert_gradcheck(attn, x, kwargs):
    """Every entry of d(output)/d(input, meta_q_proj.weight) by finite differences, then random projections of the
    Jacobian for the input and every parameter (gradcheck ``fast_mode``: the full check of ~800 inputs is slow)."""
    names = [name for name, _ in attn.named_parameters()]
    values = [p.detach().clone().requires_grad_() for _, p in attn.named_parameters()]

    def run(x, *params):
        return functional_call(attn, dict(zip(names, params)), (x,), kwargs)

    meta_q = names.index("meta_q_proj.weight")

    def run_meta_q(x, weight):
        return functional_call(attn, {"meta_q_proj.weight": weight}, (x,), kwargs)

    assert gradcheck(run_meta_q, (x, values[meta_q]), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradcheck(run, (x, *values), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("compression", [None, 2])
def test_gradcheck_float64_over_three_chunks_and_a_partial_one(compression):
    attn = tiny_bsbr(compression)
    # 11 tokens: chunks of 3, 3, 3 and a partial 2
    x = torch.randn(2, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    assert_gradcheck(attn, x, {})


@pytest.mark.parametrize("compression", [None, 2])
def test_gradcheck_float64_with_padding_mask(compression):
    attn = tiny_bsbr(compression)
    x = torch.randn(3, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert_gradcheck(attn, x, {"attention_mask": mask})


# --------------------------------------------------------------------------------------------- bfloat16


def relative_error(low, reference):
    return ((low.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("compression", [None, 4])
def test_bfloat16_forward_and_backward_close_to_float32(compression, padded):
    torch.manual_seed(0)
    fp32 = BSBRAttention(HIDDEN, HEADS, CHUNK, compression_factor=compression).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(2, 26, HIDDEN, generator=generator)  # 26 tokens: 6 chunks of 4 and a partial 2
    weight = torch.randn(2, 26, HIDDEN, generator=generator)
    mask = None
    if padded:
        mask = torch.ones(2, 26, dtype=torch.bool)
        mask[0, :3] = False
        mask[1, -5:] = False
    x32, x16 = x.clone().requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    out32, out16 = fp32(x32, attention_mask=mask), bf16(x16, attention_mask=mask)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    assert relative_error(out16, out32) <= 2e-2
    (out32 * weight).sum().backward()
    (out16.float() * weight).sum().backward()
    assert torch.isfinite(x16.grad).all()
    assert relative_error(x16.grad, x32.grad) <= 2e-2
    largest = max(p.grad.norm() for p in fp32.parameters())
    for (name, p32), (_, p16) in zip(fp32.named_parameters(), bf16.named_parameters()):
        assert torch.isfinite(p16.grad).all(), name
        # meta_k_proj.bias has an exactly-zero gradient (softmax over chunks is shift-invariant), so its fp32
        # value is rounding noise; relative error is only meaningful for gradients that are not zero.
        if p32.grad.norm() > 1e-4 * largest:
            assert relative_error(p16.grad, p32.grad) <= 2e-2, name


# --------------------------------------------------------------------------------------------- source hygiene

#: a numeric literal of magnitude >= 1e4: five or more integer digits, or a decimal exponent >= 4
LARGE_LITERAL = re.compile(r"^(\d[\d_]{4,}(\.\d*)?|[\d.]+[eE]\+?0*([4-9]|[1-9]\d+))$")
MAGIC_IN_TEXT = re.compile(r"(?<![\w.])-?\s*(1(\.0*)?[eE]\+?0*9|10000(\.0*)?)(?![\w.])")


@pytest.mark.parametrize("path", ["attention.py", "layer.py", *(f"baselines/{p.name}" for p in
                                                                 sorted((ROOT / "bsbr" / "baselines").glob("*.py")))])
def test_attention_source_has_no_magic_mask_constants(path):
    source = (ROOT / "bsbr" / path).read_text()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    numbers = [tok.string for tok in tokens if tok.type == tokenize.NUMBER]
    assert [n for n in numbers if LARGE_LITERAL.match(n)] == []
    # the code without comments and strings (docstrings may discuss such constants)
    skipped = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    code = " ".join(tok.string for tok in tokens if tok.type not in skipped)
    assert MAGIC_IN_TEXT.findall(code) == []
    assert LARGE_LITERAL.match("1e9") and LARGE_LITERAL.match("10000") and LARGE_LITERAL.match("1e+4")
    assert not LARGE_LITERAL.match("1e-5") and not LARGE_LITERAL.match("0.5") and not LARGE_LITERAL.match("1000")
    assert MAGIC_IN_TEXT.search("x.masked_fill(m, -1e9)") and MAGIC_IN_TEXT.search("s - 10000.0")
