"""bsbr.convert: selecting the retrieval formula in the converter, and safetensors checkpoints of what conversion
adds (round trip, tied maps, bad files). Tiny random models, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bsbr.convert import convert_to_bsbr, converted_copy, load_conversion, save_conversion, set_retrieval
from bsbr.convert.checkpoint import conversion_settings, new_parameters
from bsbr.convert.normalized import NormalizedBSBRLlamaAttention, enable_normalized_retrieval
from tests.test_convert import tiny_llama, tokens
from tests.test_convert_gpt2 import tiny_gpt2


def perturb_new_parameters(model, seed=5):
    """Move every added parameter off its initial value, as calibration would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in new_parameters(model).values():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def test_retrieval_normalized_equals_switching_a_seed_conversion():
    x = tokens()
    direct = convert_to_bsbr(tiny_llama(), 8, retrieval="normalized", sink_size=2)
    switched = enable_normalized_retrieval(convert_to_bsbr(tiny_llama(), 8), sink_size=2)
    assert all(type(layer.self_attn) is NormalizedBSBRLlamaAttention for layer in direct.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(direct(x).logits, switched(x).logits, atol=0, rtol=0)
        seed = convert_to_bsbr(tiny_llama(), 8)(x).logits
    assert (direct(x).logits - seed).abs().max() > 1e-3  # a different formula


def test_normalized_conversion_handles_padding_like_each_row_alone():
    model = convert_to_bsbr(tiny_llama(), 5, retrieval="normalized", sink_size=1)
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding: positions are relative under RoPE, no position_ids needed
    with torch.no_grad():
        padded = model(x, attention_mask=mask).logits
        alone = model(x[:1, 4:]).logits
    torch.testing.assert_close(padded[0, 4:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(retrieval="fancy"), "retrieval must be one of"),
    (dict(sink_size=2), "apply to retrieval='normalized' only"),
    (dict(retrieval="normalized", compression_factor=3), "dividing head_dim=16"),
    (dict(retrieval="normalized", compression_factor=4, feature_dim=8), "contradicts compression_factor=4"),
])
def test_bad_retrieval_arguments_raise_before_any_change(kwargs, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        convert_to_bsbr(model, 8, **kwargs)
    with pytest.raises(ValueError, match="Llama family only"):
        convert_to_bsbr(tiny_gpt2(), 8, retrieval="normalized")


@pytest.mark.parametrize("settings", [
    dict(chunk_size=8),
    dict(chunk_size=5, compression_factor=4),
    dict(chunk_size=8, retrieval="normalized", sink_size=2),
    dict(chunk_size=8, retrieval="normalized", tie_qk=True, feature_dim=8),
    dict(chunk_size=8, retrieval="normalized", compression_factor=4, sink_size=1),
], ids=["seed", "seed_compressed", "normalized", "normalized_tied", "normalized_compressed"])
def test_save_and_load_round_trip_rebuilds_the_converted_model(tmp_path, settings):
    x = tokens()
    model = converted_copy(tiny_llama(), **settings)
    perturb_new_parameters(model)
    path = tmp_path / "conversion.safetensors"
    save_conversion(model, path)
    rebuilt = load_conversion(tiny_llama(), path)  # a fresh original: same pretrained weights (same seed)
    assert conversion_settings(rebuilt) == conversion_settings(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, model(x).logits, atol=0, rtol=0)
        fresh = converted_copy(tiny_llama(), **settings)(x).logits
    assert (fresh - model(x).logits).abs().max() > 1e-4  # the saved parameters were not the initial ones
    if settings.get("tie_qk"):
        layer = rebuilt.model.layers[0].self_attn.normalized
        assert layer.key_map is layer.query_map
    if settings.get("retrieval") == "normalized" and settings.get("compression_factor"):  # head_dim 16 / 4 features
        layer = rebuilt.model.layers[0].self_attn
        assert layer.compression_factor == 4 and layer.normalized.key_map.weight.shape == (4, 16, 4)


def test_save_writes_only_the_added_parameters(tmp_path):
    model = converted_copy(tiny_llama(), 8, retrieval="normalized")
    path = tmp_path / "c.safetensors"
    save_conversion(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        metadata = handle.metadata()
    assert names == set(new_parameters(model))
    assert all(any(part in name for part in ("meta_q_proj", "meta_k_proj", "normalized")) for name in names)
    assert not any("q_proj.weight" == name.split(".", 4)[-1] for name in names)
    assert metadata["format"] == "bsbr-conversion" and metadata["retrieval"] == "normalized"
    gpt2 = converted_copy(tiny_gpt2(), 8)
    save_conversion(gpt2, tmp_path / "g.safetensors")
    rebuilt = load_conversion(tiny_gpt2(), tmp_path / "g.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens()).logits, gpt2(tokens()).logits, atol=0, rtol=0)


def test_bad_files_and_models_raise(tmp_path):
    model = converted_copy(tiny_llama(), 8)
    good = tmp_path / "good.safetensors"
    save_conversion(model, good)
    with pytest.raises(FileNotFoundError):
        load_conversion(tiny_llama(), tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a bsbr-conversion file"):
        load_conversion(tiny_llama(), plain)
    with pytest.raises(ValueError, match="'llama' model"):
        load_conversion(tiny_gpt2(), good)
    with pytest.raises(ValueError, match="not converted|no BSBR-converted"):
        save_conversion(tiny_llama(), tmp_path / "x.safetensors")
    other = converted_copy(tiny_llama(), 8, retrieval="normalized")
    tensors = {name: p.detach().clone() for name, p in new_parameters(other).items()}
    first = next(iter(tensors))
    tensors[first] = tensors[first][..., :1].contiguous()
    metadata = {"format": "bsbr-conversion", "version": "1", "model_type": "llama", "chunk_size": "8",
                "compression_factor": "null", "retrieval": "normalized", "normalized_options": "{}"}
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match="wrong shape"):
        load_conversion(tiny_llama(), broken)


def test_set_retrieval_still_switches_normalized_layers_to_own_chunk():
    model = convert_to_bsbr(tiny_llama(), 8, retrieval="normalized", sink_size=0)
    reference = convert_to_bsbr(tiny_llama(), 8)
    x = tokens()
    with torch.no_grad():
        own = set_retrieval(model, False)(x).logits
        torch.testing.assert_close(own, set_retrieval(reference, False)(x).logits, atol=1e-5, rtol=1e-5)
