"""Models and registry: every registered name builds from the common config, is causal, and rejects bad input."""

import pytest
import torch

import bsbr
from bsbr import BSBRModel, available_models, build_model

CONFIG = dict(vocab_size=50, hidden_dim=32, num_layers=2, num_heads=4, ff_dim=64, dropout=0.0)


def test_registry_lists_bsbr_and_the_six_baselines():
    assert available_models() == ["bsbr", "delta_net", "gau", "hopfield", "linear", "sliding_window", "standard"]


def strongly_mixing(model):
    """Every parameter redrawn from N(0, 0.3²) (fixed seed): every architecture then mixes tokens strongly, so a
    leak or a lost state shows far above the tolerances (at GAU's paper init one token moves a later output by
    only ~1e-5, below any float tolerance)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("name", available_models())
def test_every_model_builds_from_common_config_and_is_causal(name):
    torch.manual_seed(0)
    assert build_model(name, **CONFIG)(torch.randint(0, 50, (2, 300))).shape == (2, 300, 32)
    model = strongly_mixing(build_model(name, **CONFIG).eval())
    ids = torch.randint(0, 50, (2, 300))  # > 2 chunks at the default chunk_size=128
    with torch.no_grad():
        base = model(ids)
        for position in (0, 127, 128, 250):
            changed = ids.clone()
            changed[:, position] = (changed[:, position] + 1) % 50
            out = model(changed)
            torch.testing.assert_close(out[:, :position], base[:, :position], atol=1e-7, rtol=0)  # (measured: 0)
            # the change reaches the next tokens through attention alone (their own embeddings are unchanged), at
            # least a hundred times above the tolerance on the earlier ones (GAU's relu² inside a chunk is weakest)
            assert (out[:, position + 1 : position + 50] - base[:, position + 1 : position + 50]).abs().max() > 1e-5


def test_bsbr_model_with_one_chunk_equals_standard_model():
    torch.manual_seed(0)
    standard = build_model("standard", **CONFIG).eval()
    bsbr_model = build_model("bsbr", chunk_size=64, **CONFIG).eval()
    missing, unexpected = bsbr_model.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all(".meta_" in key for key in missing)
    ids = torch.randint(0, 50, (3, 64))
    with torch.no_grad():
        torch.testing.assert_close(bsbr_model(ids), standard(ids), atol=1e-5, rtol=1e-5)


def test_bsbr_model_signature_and_architecture_defaults():
    model = BSBRModel(vocab_size=50, hidden_dim=32, num_layers=1, num_heads=4, chunk_size=8, ff_dim=64,
                      compression_factor=4)
    attention = model.layers[0].attention
    assert (attention.chunk_size, attention.compression.compression_factor) == (8, 4)
    assert build_model("bsbr", **CONFIG).layers[0].attention.chunk_size == 128
    assert isinstance(bsbr.BSBRLayer(32, 4, 8, 64).attention, bsbr.BSBRAttention)


@pytest.mark.parametrize(
    "name,config,match",
    [
        ("nope", CONFIG, "name must be one of"),
        ("bsbr", {k: v for k, v in CONFIG.items() if k != "ff_dim"}, "ff_dim"),
        ("standard", {**CONFIG, "chunk_size": 4}, "chunk_size"),
        ("bsbr", {**CONFIG, "num_layers": 0}, "num_layers"),
        ("bsbr", {**CONFIG, "hidden_dim": 30}, "hidden_dim"),
    ],
)
def test_bad_config_raises(name, config, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, **config)


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.zeros(4, dtype=torch.long), "input_ids"),
        (torch.zeros(1, 4), "input_ids"),
        (torch.zeros(1, 0, dtype=torch.long), "seq_len"),
        (torch.full((1, 4), 50), "vocab_size"),
    ],
)
def test_bad_input_ids_raise(ids, match):
    with pytest.raises(ValueError, match=match):
        build_model("bsbr", **CONFIG)(ids)
