"""bsbr.convert: selecting the retrieval formula in the converter, and safetensors checkpoints of what conversion
adds (round trip, tied maps, bad files). Tiny random models, nothing downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bsbr.convert import (convert_to_bsbr, converted_copy, load_conversion, load_meta_router, save_conversion,
                          set_retrieval)
from bsbr.convert.checkpoint import conversion_settings, new_parameters
from tests.conftest import tiny_gpt2, tiny_llama, tokens

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def perturb_new_parameters(model, seed=5):
    """Move every added parameter off its initial value, as calibration would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in new_parameters(model).values():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_retrieval_normalized_adds_its_module_and_changes_the_formula(family):
    x = tokens()
    direct = convert_to_bsbr(BUILDERS[family](), 8, retrieval="normalized", sink_size=2)
    layers = [m for m in direct.modules() if hasattr(m, "retrieval_mode")]
    assert len(layers) == 2 and all(layer.retrieval_mode == "normalized" for layer in layers)
    assert all(layer.compression is None and layer.normalized.sink_size == 2 for layer in layers)
    with torch.no_grad():
        seed = convert_to_bsbr(BUILDERS[family](), 8)(x).logits
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
    (dict(retrieval="fancy"), r"retrieval must be one of \['seed', 'normalized'"),
    (dict(sink_size=2), "retrieval='seed' takes no options"),
    (dict(retrieval="normalized", compression_factor=3), "dividing head_dim=16"),
    (dict(retrieval="normalized", compression_factor=4, feature_dim=8), "contradicts compression_factor=4"),
    (dict(retrieval="normalized", sink_size=9), r"sink_size must be an integer in \[0, chunk_size=8\], got 9"),
    (dict(retrieval="normalized", sink_size=-1), r"sink_size must be an integer in \[0, chunk_size=8\], got -1"),
    (dict(retrieval="normalized", sinks=2), r"unknown options \['sinks'\].*accepted"),
])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bad_retrieval_arguments_raise_before_any_change(family, kwargs, match):
    model = BUILDERS[family]()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        convert_to_bsbr(model, 8, **kwargs)
    assert [type(m) for m in model.modules()] == before


SETTINGS = {
    "seed": dict(chunk_size=8),
    "seed_compressed": dict(chunk_size=5, compression_factor=4),
    "normalized": dict(chunk_size=8, retrieval="normalized", sink_size=2),
    "normalized_tied": dict(chunk_size=8, retrieval="normalized", tie_qk=True, feature_dim=8),
    "normalized_compressed": dict(chunk_size=8, retrieval="normalized", compression_factor=4, sink_size=1),
}
ROUND_TRIPS = [("llama", name) for name in SETTINGS] + [("gpt2", "seed"), ("gpt2", "normalized"),
                                                        ("gpt2", "normalized_compressed")]


@pytest.mark.parametrize(("family", "name"), ROUND_TRIPS)
def test_save_and_load_round_trip_rebuilds_the_converted_model(tmp_path, family, name):
    settings, build = SETTINGS[name], BUILDERS[family]
    x = tokens()
    model = converted_copy(build(), **settings)
    perturb_new_parameters(model)
    path = tmp_path / "conversion.safetensors"
    save_conversion(model, path)
    rebuilt = load_conversion(build(), path)  # a fresh original: same pretrained weights (same seed)
    assert conversion_settings(rebuilt) == conversion_settings(model)
    assert conversion_settings(model)["retrieval"] == settings.get("retrieval", "seed")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, model(x).logits, atol=0, rtol=0)
        fresh = converted_copy(build(), **settings)(x).logits
    assert (fresh - model(x).logits).abs().max() > 1e-4  # the saved parameters were not the initial ones
    layer = next(m for m in rebuilt.modules() if hasattr(m, "retrieval_mode"))
    if settings.get("tie_qk"):
        assert layer.normalized.key_map is layer.normalized.query_map
    if settings.get("retrieval") == "normalized" and settings.get("compression_factor"):  # head_dim 16 / 4 features
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


def test_fingerprint_is_the_pretrained_checkpoints(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    from bsbr.convert.checkpoint import base_model_fingerprint

    original = base_model_fingerprint(tiny_llama())
    assert original == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
                        "weights_sha256": original["weights_sha256"]}
    assert len(original["weights_sha256"]) == 64
    converted = converted_copy(tiny_llama(), 8, retrieval="terraced", sink_size=2)
    perturb_new_parameters(converted)
    lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), converted_copy(tiny_llama(), 8))
    assert base_model_fingerprint(converted) == original == base_model_fingerprint(lora)
    assert base_model_fingerprint(tiny_llama(seed=1))["weights_sha256"] != original["weights_sha256"]
    gpt2 = base_model_fingerprint(tiny_gpt2())
    assert (gpt2["model_type"], gpt2["num_key_value_heads"], gpt2["head_dim"]) == ("gpt2", 4, 16)
    assert base_model_fingerprint(converted_copy(tiny_gpt2(), 8)) == gpt2
    with pytest.raises(ValueError, match="model must be a transformers model"):
        base_model_fingerprint(torch.nn.Linear(2, 2))


def test_load_refuses_another_base_model_or_setting(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "c.safetensors"
    save_conversion(converted_copy(tiny_llama(), 8, retrieval="normalized"), path)
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["base_model"])["hidden_size"] == 64
    other = tiny_llama(seed=1)
    before = [type(m) for m in other.modules()]
    with pytest.raises(ValueError, match=r"calibrated on a different base model.*weights_sha256 [0-9a-f]{64} vs "):
        load_conversion(other, path)
    assert [type(m) for m in other.modules()] == before  # refused before converting
    with pytest.raises(ValueError, match="calibrated for chunk_size=8, asked for chunk_size=16"):
        load_conversion(tiny_llama(), path, chunk_size=16)
    with pytest.raises(ValueError, match="calibrated for retrieval='normalized', asked for retrieval='terraced'"):
        load_conversion(tiny_llama(), path, retrieval="terraced")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        load_conversion(tiny_llama(), path, chunk_size=0)
    with pytest.raises(ValueError, match="retrieval must be None or one of"):
        load_conversion(tiny_llama(), path, retrieval="fancy")
    loaded = load_conversion(tiny_llama(), path, chunk_size=8, retrieval="normalized")
    assert conversion_settings(loaded)["chunk_size"] == 8


def test_files_without_a_fingerprint_still_load(tmp_path):
    model = converted_copy(tiny_llama(), 8)
    perturb_new_parameters(model)
    tensors = {name: p.detach().clone() for name, p in new_parameters(model).items()}
    metadata = {"format": "bsbr-conversion", "version": "1", "model_type": "llama", "chunk_size": "8",
                "compression_factor": "null", "retrieval": "seed", "normalized_options": "{}"}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    x = tokens()
    assert conversion_settings(load_conversion(tiny_llama(seed=1), old))["chunk_size"] == 8  # nothing to check against
    with torch.no_grad():
        torch.testing.assert_close(load_conversion(tiny_llama(), old)(x).logits, model(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("saver", ["save_conversion", "save_lora"])
def test_save_is_atomic(tmp_path, monkeypatch, saver):
    import bsbr.convert.checkpoint as checkpoint
    from bsbr.convert import add_lora, save_lora

    model = converted_copy(tiny_llama(), 8)
    if saver == "save_lora":
        model = add_lora(model)
    save = {"save_conversion": save_conversion, "save_lora": save_lora}[saver]
    path = tmp_path / "c.safetensors"

    def broken_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save(model, path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    monkeypatch.undo()
    save(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_load_meta_router_copies_only_the_meta_projections_of_another_mode(tmp_path):
    """A normalised conversion's calibrated meta projections into a blocks conversion (router="meta"): exactly the
    stored meta_q_proj/meta_k_proj tensors arrive, nothing else changes, and a file for another chunk size, base
    model or family is refused naming it."""
    normalized = converted_copy(tiny_llama(), 8, retrieval="normalized")
    perturb_new_parameters(normalized)
    path = tmp_path / "normalized.safetensors"
    save_conversion(normalized, path)
    blocks = converted_copy(tiny_llama(), 8, retrieval="blocks", router="meta", block_size=8, top_k=1)
    untouched = {name: p.clone() for name, p in blocks.named_parameters() if ".meta_" not in name}
    assert load_meta_router(blocks, path) is blocks
    stored, loaded = new_parameters(normalized), new_parameters(blocks)
    assert sorted(loaded) == sorted(name for name in stored if ".meta_" in name)  # the blocks mode adds no modules
    for name, parameter in loaded.items():
        torch.testing.assert_close(parameter, stored[name], atol=0, rtol=0)
    for name, parameter in blocks.named_parameters():
        if ".meta_" not in name:
            torch.testing.assert_close(parameter, untouched[name], atol=0, rtol=0)
    with pytest.raises(ValueError, match="calibrated for chunk_size=8, the model has chunk_size=4"):
        load_meta_router(converted_copy(tiny_llama(), 4, retrieval="blocks"), path)
    with pytest.raises(ValueError, match="calibrated on a different base model"):
        load_meta_router(converted_copy(tiny_llama(seed=1), 8, retrieval="blocks"), path)
    with pytest.raises(ValueError, match="'llama' model, got model_type='gpt2'"):
        load_meta_router(converted_copy(tiny_gpt2(), 8, retrieval="blocks"), path)
    with pytest.raises(ValueError, match="not converted|no BSBR-converted"):
        load_meta_router(tiny_llama(), path)
