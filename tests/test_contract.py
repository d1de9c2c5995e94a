"""The contract every registered architecture keeps, read from its registry record (``bsbr.registry``), so an eighth
architecture inherits all of it by registering (the last test registers one to show it).

For every name in ``available_models()`` (and every setting in ``VARIANTS``, e.g. BSBR's ``retrieval="blocks"``), its
attention layer alone and its model trunk:

* causality by perturbation: changing token ``t`` changes no output before ``t`` (and changes output ``t``);
* padding (left, right, both, interior, all) == each row alone; padded outputs are exactly zero; padding holding NaN/inf or
  other values never reaches a real token; rows never influence each other;
* streaming in pieces (single tokens, odd splits across chunk/window boundaries) == one forward, also with padded
  pieces of equal real-token counts; the returned state is that of one call;
* a fresh call after another sequence == the sequence alone (bitwise: no leaked state);
* bad config, state and input raise ValueError/TypeError naming the argument;
* every dtype in the record's ``dtypes`` runs and stays close to float32.

The record's ``span_setting`` (chunk or window size) is set to ``SPAN = 4`` so a 19-token sequence holds four whole
chunks/windows and a partial one. Parameters are redrawn from N(0, 0.3²) (fixed seed) so every architecture mixes
tokens strongly (at GAU's paper init one token moves a later output by only ~1e-5). Layers run in float64 where the
record supports it, with max |difference| <= 1e-10 (1e-5 in float32); model trunks in float32 within 1e-5.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from bsbr import AttentionLayer, available_models, build_attention, build_model, get_architecture
from bsbr.model import AttentionModel
from bsbr.registry import ARCHITECTURES, Architecture

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, HEADS, SPAN, SEQ = 16, 2, 4, 19  # SEQ: four whole chunks/windows of SPAN and a partial one of 3
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
#: relative error (norm of the difference over the norm of the float32 output) allowed per dtype
DTYPE_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 3e-3}
CONFIG = dict(vocab_size=50, hidden_dim=HIDDEN, num_layers=2, num_heads=HEADS, ff_dim=32, dropout=0.0)
STATE_NAME = r"\bstate\b"  # the argument `state`, not "hidden_states"

#: piece lengths, each summing to SEQ
SCHEDULES = {
    "single_tokens": [1] * SEQ,
    "odd_across_boundaries": [3, 2, 5, 1, 8],
    "on_boundaries": [SPAN, 2 * SPAN, SEQ - 3 * SPAN],
    "one_then_rest": [1, SEQ - 1],
    "rest_then_one": [SEQ - 1, 1],
}


# --------------------------------------------------------------------------------------------- builders


#: settings of a registered architecture the contract also holds for: case id -> (architecture, settings beyond the
#: span). BSBR's exact block retrieval: 2-token blocks, one retrieved per token (so the routing chooses among up to 5
#: earlier blocks at SEQ tokens), one sink token.
VARIANTS = {"bsbr_blocks": ("bsbr", {"retrieval": "blocks", "block_size": 2, "top_k": 1, "sink_size": 1})}
CASES = available_models() + sorted(VARIANTS)
#: Where a case's exact contract differs, and why:
#: * block retrieval's selection is a discrete top-k: in bfloat16 the rounded query/key projections may pick another
#:   block (measured: relative error 0.07 with top_k=1, 0.004 with every block retrieved), so its dtype check
#:   retrieves every block (the attention's numerics) — the selection itself is checked in float64 everywhere else;
#: * its union gather (bsbr.blocks.UNION_GATHER_RATIO) gathers one set of blocks for all rows of a batch and masks the
#:   blocks a row did not select: they add exact zeros, but the matmul's length, so its rounding, depends on the
#:   other rows, and rows are independent to TOLERANCE rather than bitwise.
DTYPE_SETTINGS = {"bsbr_blocks": {"top_k": SEQ}}
ROWS_TO_TOLERANCE = {"bsbr_blocks"}


def arch(name: str) -> str:
    """The registered architecture of a case (an architecture's name, or a key of VARIANTS)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def record(name: str) -> Architecture:
    return get_architecture(arch(name))


def span(name: str) -> dict:
    """The record's span setting (chunk/window size) set to SPAN, or nothing, and the case's own settings."""
    setting = record(name).span_setting
    return {**({setting: SPAN} if setting else {}), **VARIANTS.get(name, ("", {}))[1]}


def layer_dtype(name: str) -> torch.dtype:
    return torch.float64 if torch.float64 in record(name).dtypes else torch.float32


def strongly_mixing(module: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Every parameter redrawn from N(0, 0.3²) with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.3)
    return module


def make_layer(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return strongly_mixing(build_attention(arch(name), HIDDEN, HEADS, **span(name))).to(layer_dtype(name)).eval()


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return strongly_mixing(build_model(arch(name), **CONFIG, **span(name))).eval()


def hidden(name: str, batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq_len, HIDDEN, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(layer_dtype(name))


def ids(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def stream(module, inputs, pieces, mask=None):
    """``module`` fed ``inputs`` in pieces of the given lengths with its state: (joined outputs, last state)."""
    outputs, state, start = [], None, 0
    for length in pieces:
        piece_mask = None if mask is None else mask[:, start : start + length]
        out, state = module(inputs[:, start : start + length], attention_mask=piece_mask, state=state,
                            return_state=True)
        outputs.append(out)
        start += length
    return torch.cat(outputs, dim=1), state


def assert_close(actual, expected, tolerance, message=""):
    difference = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert difference <= tolerance, f"{message}: max |difference| {difference:.3g} > {tolerance:.3g}"


# --------------------------------------------------------------------------------------------- the contract
# Each check takes an architecture name and reads everything else from its record.


def check_causal(name):
    """Changing token t changes no layer output before t, and changes some output from t on (in every row)."""
    layer, tolerance = make_layer(name), TOLERANCE[layer_dtype(name)]
    x = hidden(name, 2, SEQ)
    with torch.no_grad():
        base = layer(x)
        for position in (0, SPAN - 1, SPAN, 2 * SPAN + 1, SEQ - 1):
            changed = x.clone()
            changed[:, position] += hidden(name, 2, 1, seed=10 + position)[:, 0]
            difference = (layer(changed) - base).abs().amax(-1)  # [batch, seq_len]
            assert position == 0 or difference[:, :position].max() <= tolerance, position
            assert difference[:, position:].amax(-1).min() > 1e-6, position  # in every row the change is seen


def check_padding(name):
    """Left, right, both, interior and all padding, bool and integer masks: each row == the row alone; padded outputs
    zero; whatever the padded positions hold (NaN, inf, other values) never reaches a real token."""
    layer, tolerance = make_layer(name), TOLERANCE[layer_dtype(name)]
    mask = torch.ones(6, SEQ, dtype=torch.bool)  # row 0: no padding
    mask[1, :3] = False  # left
    mask[2, -5:] = False  # right
    mask[3, :2] = mask[3, -1:] = False  # both
    mask[4, 6:11] = mask[4, -2:] = False  # interior and right
    mask[5] = False  # all padding
    x = hidden(name, 6, SEQ)
    poisoned = x.clone()
    poisoned[~mask] = hidden(name, 1, int((~mask).sum()), seed=7)[0] * 10
    poisoned[1, 0], poisoned[4, 7], poisoned[2, -1] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        for mask_like in (mask, mask.long()):
            out = layer(x, attention_mask=mask_like)
            assert torch.isfinite(out).all() and (out[~mask] == 0).all()
            for row in range(5):
                assert_close(out[row, mask[row]], layer(x[row : row + 1, mask[row]])[0], tolerance, f"row {row}")
        assert_close(layer(poisoned, attention_mask=mask), out, tolerance, "poisoned padding")


def check_rows_independent(name):
    """Changing one row never changes another, with and without padding and streaming."""
    layer = make_layer(name)
    x = hidden(name, 2, SEQ)
    changed = x.clone()
    changed[0] += hidden(name, 1, SEQ, seed=5)[0]
    mask = torch.ones(2, SEQ, dtype=torch.bool)
    mask[0, :3] = False
    same = ((lambda a, b: assert_close(a, b, TOLERANCE[layer_dtype(name)], "row 1")) if name in ROWS_TO_TOLERANCE
            else (lambda a, b: torch.equal(a, b) or pytest.fail("row 1 changed")))
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            same(layer(changed, **kwargs)[1], layer(x, **kwargs)[1])
        same(stream(layer, changed, [5, 1, 13])[0][1], stream(layer, x, [5, 1, 13])[0][1])


def check_streaming(name):
    """Pieces with the returned state == one forward (every schedule); return_state does not change the output; the
    streamed state is the one-call state (same token count and size)."""
    layer, tolerance = make_layer(name), TOLERANCE[layer_dtype(name)]
    x = hidden(name, 2, SEQ)
    with torch.no_grad():
        full, full_state = layer(x, return_state=True)
        assert torch.equal(layer(x), full)
        for schedule, pieces in SCHEDULES.items():
            streamed, state = stream(layer, x, pieces)
            assert_close(streamed, full, tolerance, schedule)
            assert state.num_tokens == full_state.num_tokens == SEQ, schedule
            assert state.nbytes() == full_state.nbytes(), schedule


def check_streaming_padded_pieces(name):
    """A streaming call may pad its rows (left, right) when every row has the same number of real tokens; each row
    continues its own real tokens; a piece of padding only leaves the state as it was."""
    layer, tolerance = make_layer(name), TOLERANCE[layer_dtype(name)]
    x = hidden(name, 2, 13)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, :2] = False  # piece 1 (7 tokens): 5 real in each row
    mask[1, 5:7] = False
    mask[:, 7:9] = False  # piece 2 (2 tokens): padding only
    with torch.no_grad():
        out, state = stream(layer, x, [7, 2, 4], mask)
        assert state.num_tokens == 9
        assert (out[~mask] == 0).all()
        for row in range(2):
            assert_close(out[row, mask[row]], layer(x[row : row + 1, mask[row]])[0], tolerance, f"row {row}")


def check_fresh_call(name):
    """A call without a state after other sequences (stateful or not) == the sequence alone, bitwise."""
    layer = make_layer(name)
    a, b = hidden(name, 2, SEQ, seed=1), hidden(name, 2, 13, seed=2)
    with torch.no_grad():
        alone, (alone_stateful, alone_state) = layer(b), layer(b, return_state=True)
        stream(layer, a, [6, 5, 8])
        layer(a, return_state=True)
        assert torch.equal(layer(b), alone)
        again, again_state = layer(b, return_state=True)
    assert torch.equal(again, alone_stateful)
    assert again_state.num_tokens == alone_state.num_tokens == 13


def check_bad_config(name):
    """Invalid common arguments, span setting or an unknown setting raise ValueError naming it."""
    setting = record(name).span_setting
    cases = [({"hidden_dim": HIDDEN + 1}, "hidden_dim"), ({"num_heads": 0}, "num_heads"),
             ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"), ({"nonsense": 1}, "nonsense")]
    if setting:
        cases += [({setting: 0}, setting), ({setting: 2.5}, setting)]
    for change, match in cases:
        arguments = {"hidden_dim": HIDDEN, "num_heads": HEADS, **VARIANTS.get(name, ("", {}))[1], **change}
        with pytest.raises(ValueError, match=match):
            build_attention(arch(name), **arguments)
        with pytest.raises(ValueError, match=match):
            build_model(arch(name), **{**CONFIG, **VARIANTS.get(name, ("", {}))[1], **change})


def check_bad_state(name):
    """A state of another module, batch size, type or dtype, or made before the span setting changed (when the
    state records it), raises ValueError naming ``state`` (or the setting)."""
    layer, other = make_layer(name), make_layer(name)
    x = hidden(name, 2, 6)
    with torch.no_grad():
        _, state = layer(x, return_state=True)
        _, foreign = other(x, return_state=True)
        for bad in (foreign, object(), (state,)):
            with pytest.raises(ValueError, match=STATE_NAME):
                layer(x[:, :2], state=bad)
        for call in ({}, {"return_state": True}):
            with pytest.raises(ValueError, match=STATE_NAME):
                layer(x[:1, :2], state=state, **call)  # another batch size
        low = torch.float32 if layer_dtype(name) == torch.float64 else torch.bfloat16
        with pytest.raises(ValueError, match=STATE_NAME):  # the module moved to another dtype since
            layer.to(low)(x[:, :2].to(low), state=state)
        layer.to(layer_dtype(name))
        with pytest.raises(ValueError, match="attention_mask"):  # streaming calls need equal real-token counts
            layer(x[:, :3], attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), state=state)
        setting = record(name).span_setting
        if setting and hasattr(state, setting):
            setattr(layer, setting, 2 * SPAN)
            with pytest.raises(ValueError, match=setting):
                layer(x[:, :2], state=state)
            setattr(layer, setting, 0)
            with pytest.raises(ValueError, match=setting):
                layer(x[:, :2])


def check_bad_input(name):
    """Malformed hidden states and masks raise ValueError/TypeError naming the argument, with or without a state."""
    layer = make_layer(name)
    dtype = layer_dtype(name)
    good = hidden(name, 2, 5)
    with torch.no_grad():
        _, state = layer(good, return_state=True)
    for call in ({}, {"return_state": True}, {"state": state}):
        for bad, error, match in [(good[0], ValueError, "hidden_states"), (good[..., 1:], ValueError, "hidden_dim"),
                                  (good[:, :0], ValueError, "hidden_states"), (good.long(), TypeError, "hidden_states"),
                                  (good.to(torch.float32 if dtype == torch.float64 else torch.float64), TypeError,
                                   "hidden_states"), (good.tolist(), TypeError, "hidden_states")]:
            with pytest.raises(error, match=match):
                layer(bad, **call)
        for mask, error in [(torch.ones(2, 4, dtype=torch.bool), ValueError), (torch.ones(1, 5), ValueError),
                            (torch.ones(2, 5), ValueError), (torch.full((2, 5), 2), ValueError),
                            (torch.ones(5, dtype=torch.long), ValueError), ([[1] * 5] * 2, TypeError)]:
            with pytest.raises(error, match="attention_mask"):
                layer(good, attention_mask=mask, **call)


def check_dtypes(name):
    """Every dtype of the record runs (padded, streamed, backward) and stays within DTYPE_TOLERANCE of float32."""
    torch.manual_seed(0)
    fp32 = build_attention(arch(name), HIDDEN, HEADS, **{**span(name), **DTYPE_SETTINGS.get(name, {})}).eval()
    x = torch.randn(2, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, SEQ, dtype=torch.bool)
    mask[0, :3] = False
    reference = fp32(x, attention_mask=mask).detach()
    assert torch.float32 in record(name).dtypes
    for dtype in record(name).dtypes:
        layer = copy.deepcopy(fp32).to(dtype)
        inputs = x.to(dtype).clone().requires_grad_()
        out = layer(inputs, attention_mask=mask)
        out.float().square().sum().backward()
        assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(inputs.grad).all(), dtype
        error = ((out.detach().float() - reference).norm() / reference.norm()).item()
        assert error <= DTYPE_TOLERANCE[dtype], f"{dtype}: relative error {error:.3g}"
        with torch.no_grad():
            streamed, _ = stream(layer, x[1:].to(dtype), [5, 1, SEQ - 6])
        assert streamed.dtype == dtype
        error = ((streamed.float() - reference[1:]).norm() / reference[1:].norm()).item()
        assert error <= DTYPE_TOLERANCE[dtype], f"{dtype} streamed: relative error {error:.3g}"


def check_model(name):
    """The model trunk: causal, padding == each row alone, pieces == one forward, fresh call == alone, and the
    layers hold the record's attention class."""
    architecture, model = record(name), make_model(name)
    assert isinstance(model, architecture.model or AttentionModel)
    assert all(isinstance(layer.attention, architecture.attention) for layer in model.layers)
    tokens = ids(2, SEQ)
    with torch.no_grad():
        full = model(tokens)
        for position in (0, SPAN, SEQ - 2):
            changed = tokens.clone()
            changed[:, position] = (changed[:, position] + 1) % CONFIG["vocab_size"]
            out = model(changed)
            assert_close(out[:, :position], full[:, :position], 1e-6, f"causal {position}")
            # the change reaches the next token through attention alone (its own embedding is unchanged)
            assert (out[:, position + 1] - full[:, position + 1]).abs().max() > 1e-4, position
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[0, :3] = 0  # left padding
        mask[1, 14:] = 0  # right padding
        padded = model(tokens, attention_mask=mask)
        for row in range(2):
            real = mask[row].bool()
            assert_close(padded[row, real], model(tokens[row : row + 1, real])[0], 1e-5, f"padded row {row}")
            assert (padded[row, ~real] == 0).all()
        for schedule, pieces in SCHEDULES.items():
            assert_close(stream(model, tokens, pieces)[0], full, 1e-5, schedule)
        model(ids(2, 7, seed=9), return_state=True)
        assert torch.equal(model(tokens), full)


CHECKS = [check_causal, check_padding, check_rows_independent, check_streaming, check_streaming_padded_pieces,
          check_fresh_call, check_bad_config, check_bad_state, check_bad_input, check_dtypes, check_model]


@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__.removeprefix("check_") for check in CHECKS])
@pytest.mark.parametrize("name", CASES)
def test_contract(name, check):
    check(name)


# --------------------------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", available_models())
def test_record_builds_what_it_says(name):
    arch = get_architecture(name)
    assert arch.name == name and issubclass(arch.attention, AttentionLayer) and {arch: name}[arch] == name  # hashable
    layer = build_attention(name, HIDDEN, HEADS)
    assert type(layer) is arch.attention
    if arch.span_setting:
        assert getattr(layer, arch.span_setting) == arch.defaults[arch.span_setting]
    model = build_model(name, **CONFIG)
    assert type(model) is (arch.model or AttentionModel)
    assert model(ids(2, 9)).shape == (2, 9, HIDDEN)


def test_unknown_architecture_raises_naming_it_and_the_choices():
    with pytest.raises(ValueError, match=r"name must be one of \['bsbr'.*'standard'\], got 'nope'"):
        get_architecture("nope")


def test_record_checks_its_own_consistency():
    from bsbr import StandardAttention

    with pytest.raises(ValueError, match="span_setting"):
        Architecture("x", StandardAttention, None, {}, "chunk_size", (torch.float32,))
    with pytest.raises(ValueError, match="window_size"):
        Architecture("x", StandardAttention, None, {"window_size": 4}, None, (torch.float32,))


# --------------------------------------------------------------------------------------------- an eighth architecture


@dataclass
class PrefixMeanState:
    batch_size: int
    owner: int
    num_tokens: int
    total: torch.Tensor  # [batch, hidden_dim]: sum of the values so far

    def nbytes(self) -> int:
        return self.total.numel() * self.total.element_size()


class PrefixMean(AttentionLayer):
    """A toy eighth architecture: ``out_t = out_proj(sigmoid(q_t) * mean_{s<=t} v_s)``. It brings only its maths."""

    state_type = PrefixMeanState

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(hidden_dim, num_heads, dropout)
        self._add_projections("q_proj", "v_proj", "out_proj")

    def _empty_state(self, batch, like):
        return PrefixMeanState(batch, id(self), 0, like.new_zeros(batch, self.hidden_dim))

    def _attend(self, hidden_states, state, return_state):
        seen = 0 if state is None else state.num_tokens
        totals = self.v_proj(hidden_states).cumsum(1)  # [batch, L, hidden_dim]
        if state is not None:
            totals = totals + state.total[:, None]
        count = seen + torch.arange(1, hidden_states.shape[1] + 1, dtype=totals.dtype)[:, None]
        out = self.out_proj(torch.sigmoid(self.q_proj(hidden_states)) * totals / count)
        if not return_state:
            return out
        return out, PrefixMeanState(hidden_states.shape[0], id(self), seen + hidden_states.shape[1], totals[:, -1])


def test_an_eighth_architecture_inherits_the_contract_by_registering(monkeypatch):
    record = Architecture("prefix_mean", PrefixMean, None, {}, None, (torch.float32, torch.float64, torch.bfloat16))
    monkeypatch.setitem(ARCHITECTURES, "prefix_mean", record)
    assert "prefix_mean" in available_models()
    for check in CHECKS:
        check("prefix_mean")
