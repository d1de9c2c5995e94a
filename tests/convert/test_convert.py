"""bsbr.convert: pretrained Llama -> BSBR. Tiny random GQA Llama configs (nothing downloaded), the real SmolLM2
checkpoint from data/model (the `fetch_model` stage). Notebook 02: tests/notebooks/test_02_conversion_similarity.py."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from bsbr.convert import (
    BSBRLlamaAttention,
    convert_to_bsbr,
    converted_copy,
    load_pretrained,
    set_retrieval,
)
from tests.conftest import tiny_llama, tokens
from tests.reference import dense_bsbr_llama

SEQ_LEN = 23  # odd on purpose: the last chunk is partial for every chunk size below
SPLITTING_CHUNK_SIZES = [4, 5, 8]




# --- tiny random Llama ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [SEQ_LEN, SEQ_LEN + 9, 512])
def test_one_chunk_equals_original(attn_implementation, chunk_size):
    model = tiny_llama(attn_implementation)
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        got = convert_to_bsbr(model, chunk_size)(x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_returns_same_object_of_same_type():
    model = tiny_llama()
    converted = convert_to_bsbr(model, 8)
    assert converted is model and type(converted) is LlamaForCausalLM
    assert all(isinstance(layer.self_attn, BSBRLlamaAttention) for layer in model.model.layers)
    assert not any(isinstance(m, LlamaAttention) for m in model.modules())
    assert model.config.use_cache is False
    assert model(tokens()).logits.shape == (2, SEQ_LEN, 100)


def test_pretrained_weights_are_shared_and_unchanged():
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    old_attention = [layer.self_attn for layer in model.model.layers]
    convert_to_bsbr(model, 8)
    after = model.state_dict()
    for name, tensor in before.items():  # every pretrained tensor kept, under its old name, same values
        assert torch.equal(after[name], tensor), name
    new_names = set(after) - set(before)
    assert new_names == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("meta_q_proj", "meta_k_proj")}
    for old, layer in zip(old_attention, model.model.layers):
        new = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(new, name) is getattr(old, name)  # the same modules (same tensors), not copies
        # meta-projections: copies of q_proj / k_proj (equal values, separate storage, trainable)
        assert torch.equal(new.meta_q_proj.weight, old.q_proj.weight)
        assert torch.equal(new.meta_k_proj.weight, old.k_proj.weight)
        assert new.meta_q_proj.weight.data_ptr() != old.q_proj.weight.data_ptr()
        assert new.meta_k_proj.weight.data_ptr() != old.k_proj.weight.data_ptr()
        assert new.meta_q_proj.weight.shape == (4 * 16, 64) and new.meta_k_proj.weight.shape == (2 * 16, 64)
        assert new.meta_q_proj.weight.requires_grad and new.compression is None


@pytest.mark.parametrize("compression_factor", [None, 4])
@pytest.mark.parametrize("chunk_size", SPLITTING_CHUNK_SIZES + [SEQ_LEN])
def test_layer_matches_dense_reference(chunk_size, compression_factor):
    torch.manual_seed(0)
    model = convert_to_bsbr(tiny_llama(), chunk_size, compression_factor)
    attn = model.model.layers[1].self_attn
    hidden = torch.randn(2, SEQ_LEN, 64)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(SEQ_LEN)[None])
    with torch.no_grad():
        got, weights = attn(hidden, position_embeddings=(cos, sin))
        expected = dense_bsbr_llama(attn, hidden, cos, sin)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", SPLITTING_CHUNK_SIZES)
def test_converted_model_is_causal(chunk_size):
    model = convert_to_bsbr(tiny_llama(), chunk_size)
    x = tokens()
    for t in (3, chunk_size, 13, SEQ_LEN - 1):  # inside the first chunk, a chunk start, middle, last token
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 100
        with torch.no_grad():
            a, b = model(x).logits, model(changed).logits
        torch.testing.assert_close(b[:, :t], a[:, :t], atol=1e-6, rtol=0)
        assert (b[:, t:] - a[:, t:]).abs().max() > 1e-3  # the change does reach later positions


@pytest.mark.parametrize("chunk_size", SPLITTING_CHUNK_SIZES)
def test_first_chunk_is_original_and_retrieval_changes_the_rest(chunk_size):
    model = tiny_llama()
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        got = convert_to_bsbr(model, chunk_size)(x).logits
    torch.testing.assert_close(got[:, :chunk_size], expected[:, :chunk_size], atol=1e-5, rtol=0)
    assert (got[:, chunk_size:] - expected[:, chunk_size:]).abs().amax(-1).min() > 1e-4


def test_retrieval_off_is_the_original_model_on_each_chunk_alone():
    model = tiny_llama()
    x = tokens()
    with torch.no_grad():
        per_chunk = [model(x[:, start : start + 8]).logits for start in range(0, SEQ_LEN, 8)]
        converted = set_retrieval(convert_to_bsbr(model, 8), False)
        local = converted(x).logits
        set_retrieval(converted, True)
        retrieving = converted(x).logits
    # RoPE scores depend only on relative positions, so restarting positions at each chunk changes only rounding.
    torch.testing.assert_close(local, torch.cat(per_chunk, dim=1), atol=1e-5, rtol=0)
    assert (retrieving[:, 8:] - local[:, 8:]).abs().max() > 1e-3


def test_meta_projections_receive_gradients():
    model = convert_to_bsbr(tiny_llama(), 8).train()
    loss = model(tokens(), labels=tokens()).loss
    loss.backward()
    for layer in model.model.layers:
        for name in ("meta_q_proj", "meta_k_proj", "q_proj"):
            grad = getattr(layer.self_attn, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_converted_copy_shares_weights_and_leaves_original():
    model = tiny_llama()
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        copy8 = converted_copy(model, 8)
        got = copy8(x).logits
        assert torch.equal(model(x).logits, expected)  # original untouched
        assert torch.equal(got, convert_to_bsbr(copy.deepcopy(model), 8)(x).logits)
    assert isinstance(model.model.layers[0].self_attn, LlamaAttention)
    assert copy8.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
    assert copy8.lm_head.weight is model.lm_head.weight


def test_model_without_a_family_is_rejected():
    with pytest.raises(ValueError, match=r"\['llama', 'gpt2'\].*model_type=None"):
        convert_to_bsbr(torch.nn.Linear(4, 4), 8)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "64", None])
def test_bad_chunk_size_is_rejected_before_any_change(chunk_size):
    model = tiny_llama()
    with pytest.raises(ValueError, match="chunk_size"):
        convert_to_bsbr(model, chunk_size)
    assert all(type(layer.self_attn) is LlamaAttention for layer in model.model.layers)


def test_bad_compression_factor_is_rejected_before_any_change():
    model = tiny_llama()
    with pytest.raises(ValueError, match="compression_factor"):
        convert_to_bsbr(model, 8, compression_factor=7)  # does not divide head_dim² = 256
    assert all(type(layer.self_attn) is LlamaAttention for layer in model.model.layers)


def test_converting_twice_is_rejected():
    model = convert_to_bsbr(tiny_llama(), 8)
    with pytest.raises(ValueError, match="already converted"):
        convert_to_bsbr(model, 4)


def test_all_ones_mask_equals_no_mask():
    model = convert_to_bsbr(tiny_llama(), 8)
    x = tokens()
    mask = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=mask).logits, model(x).logits, atol=0, rtol=0)
    # padded batches: tests/convert/test_cache.py (each row equals the row alone)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_a_kv_cache_other_than_bsbrcache_is_rejected():
    model = convert_to_bsbr(tiny_llama(), 8)
    x = tokens()
    with torch.no_grad():
        with pytest.raises(TypeError, match="BSBRCache"):
            model(x, past_key_values=DynamicCache(config=model.config))
        with pytest.raises(TypeError, match="BSBRCache"):
            model.model.layers[0].self_attn(torch.zeros(1, 4, 64), position_embeddings=(torch.ones(1, 4, 16),
                                                                                         torch.zeros(1, 4, 16)),
                                            cache=DynamicCache(config=model.config))


# --- the real checkpoint (data/model, from `dvc repro fetch_model`) --------------------------------------------


@pytest.fixture(scope="module")
def real_text_ids(smollm2):
    """256 tokens of real English/Python documentation (the stdlib's pydoc topics), [1, 256]."""
    from pydoc_data.topics import topics

    _, tokenizer = smollm2
    text = "\n\n".join(topics[name] for name in ("assignment", "if", "for", "while"))
    ids = tokenizer.encode(text, add_special_tokens=False)[:256]
    assert len(ids) == 256
    return torch.tensor([ids])


def test_loaded_checkpoint_is_fp32_eval_smollm2(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32 and not model.training
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (30, 9, 3, 64)
    assert tokenizer.eos_token_id == 2 and len(tokenizer) == config.vocab_size == 49152


def test_real_smollm2_one_chunk_equals_original(smollm2, real_text_ids):
    model, _ = smollm2
    with torch.inference_mode():
        expected = model(real_text_ids).logits
        got = converted_copy(model, real_text_ids.shape[1])(real_text_ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_real_smollm2_chunked_keeps_first_chunk(smollm2, real_text_ids):
    model, _ = smollm2
    with torch.inference_mode():
        expected = model(real_text_ids).logits
        got = converted_copy(model, 64)(real_text_ids).logits
    assert (got[:, :64] - expected[:, :64]).abs().max().item() <= 1e-4
    assert (got[:, 64:] - expected[:, 64:]).abs().max().item() > 1.0  # seed retrieval moves the logits a lot


def test_the_dequantized_copy_is_the_gguf_bit_for_bit(smollm2):
    """load_pretrained() reads the copy fetch_model wrote; parsing the GGUF itself gives the same weights (every
    tensor equal), the same config apart from the GGUF mark, the same tied head and the same tokens."""
    from bsbr.convert.loading import _load, default_model_path, dequantized_path

    model, tokenizer = smollm2
    gguf = default_model_path()
    assert model.config._name_or_path == str(dequantized_path(gguf)), "load_pretrained() did not read the copy"
    reference, reference_tokenizer = _load(str(gguf.parent), gguf.name)
    got, expected = model.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    differ = {k for k in model.config.to_dict().keys() | reference.config.to_dict().keys()
              if model.config.to_dict().get(k) != reference.config.to_dict().get(k)}
    assert differ <= {"_name_or_path", "architectures", "quantization_config"}, differ
    from pydoc_data.topics import topics

    text = topics["assignment"] + "\nHAMLET. To be, or not to be, that is the question — ünïcode"
    assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (
        reference_tokenizer.bos_token_id, reference_tokenizer.eos_token_id, len(reference_tokenizer))


def test_load_pretrained_reads_the_copy_only_when_it_was_made_from_this_gguf(tmp_path, monkeypatch):
    import json

    from bsbr.convert import loading

    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    monkeypatch.setattr(loading, "default_model_path", lambda: gguf)
    monkeypatch.setattr(loading, "_load", lambda name_or_path, gguf_file: (name_or_path, gguf_file))
    copy_dir = loading.dequantized_path(gguf)
    assert copy_dir == tmp_path / "m.Q4_1.fp32"
    assert loading.load_pretrained() == (str(tmp_path), gguf.name)  # no copy: the GGUF
    copy_dir.mkdir()
    (copy_dir / "source_gguf.json").write_text(json.dumps(loading._gguf_identity(gguf)))
    assert loading.load_pretrained() == (str(copy_dir), None)
    gguf.write_bytes(b"GGUF" + bytes(range(255)))  # another GGUF under the same name: the copy is stale
    assert loading.load_pretrained() == (str(tmp_path), gguf.name)
    assert loading.load_pretrained(gguf) == (str(tmp_path), gguf.name)  # a named GGUF is always read itself


def test_load_pretrained_missing_gguf_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_pretrained(tmp_path / "missing.gguf")


def test_load_pretrained_names_a_missing_local_path_without_asking_the_hub(tmp_path, monkeypatch):
    from bsbr.convert import loading

    monkeypatch.setattr(loading, "_load", lambda name_or_path, gguf_file: (name_or_path, gguf_file))  # no hub
    monkeypatch.setenv("HOME", str(tmp_path))
    for given, resolved in [("/nonexistent", "/nonexistent"), ("./missing", "missing"), ("../missing", "../missing"),
                            ("~/missing", f"{tmp_path}/missing"), ("data/model/missing", "data/model/missing"),
                            (tmp_path / "missing", f"{tmp_path}/missing")]:
        with pytest.raises(FileNotFoundError) as error:
            loading.load_pretrained(given)
        assert str(error.value) == (f"name_or_path {str(given)!r} looks like a local path but {resolved} does not "
                                    "exist (a hub id is 'name' or 'namespace/name')")
    (tmp_path / "model").mkdir()
    assert loading.load_pretrained("~/model") == (str(tmp_path / "model"), None)  # ~ is the home folder
    assert loading.load_pretrained(tmp_path / "model") == (str(tmp_path / "model"), None)
    for hub_id in ("gpt2", "openai-community/gpt2"):  # hub ids still go to transformers unchanged
        assert loading.load_pretrained(hub_id) == (hub_id, None)


def test_a_third_family_is_one_subclass_and_one_entry(monkeypatch):
    """Mistral's attention is Llama's (projections, GQA, RoPE): its converted class names only the HF classes it
    replaces, and one FAMILIES entry makes convert_to_bsbr, both retrievals, padding and the cache take it."""
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.models.mistral.modeling_mistral import MistralAttention, MistralModel

    from bsbr.convert import FAMILIES, BSBRCache

    class BSBRMistralAttention(BSBRLlamaAttention):
        source_class, base_model_class = MistralAttention, MistralModel

    monkeypatch.setitem(FAMILIES, "mistral", BSBRMistralAttention)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=None)
    original = MistralForCausalLM(config).eval()
    x = tokens()
    with torch.no_grad():
        expected = original(x).logits
        torch.testing.assert_close(converted_copy(original, SEQ_LEN)(x).logits, expected, atol=1e-5, rtol=0)
        model = converted_copy(original, 5, retrieval="normalized", sink_size=1)
        full = model(x).logits
        cache = BSBRCache(2)
        pieces = torch.cat([model(x[:, :7], cache=cache).logits, model(x[:, 7:], cache=cache).logits], 1)
        mask = torch.ones_like(x)
        mask[0, :6] = 0
        padded = model(x, attention_mask=mask).logits[0, 6:]
        alone = model(x[:1, 6:]).logits[0]
    assert all(type(layer.self_attn) is BSBRMistralAttention for layer in model.model.layers)
    torch.testing.assert_close(full[:, :5], expected[:, :5], atol=1e-5, rtol=0)  # chunk 0 is the original
    torch.testing.assert_close(pieces, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=0)
