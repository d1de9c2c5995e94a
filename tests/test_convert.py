"""bsbr.convert: pretrained Llama -> BSBR. Tiny random GQA Llama configs (nothing downloaded), the real SmolLM2
checkpoint from data/model (the `fetch_model` stage), and a smoke run of notebook 02."""

from __future__ import annotations

import copy
import json
import math

import nbformat
import pandas as pd
import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, repeat_kv

from bsbr.convert import (
    SUPPORTED_FAMILIES,
    BSBRLlamaAttention,
    convert_to_bsbr,
    converted_copy,
    default_model_path,
    load_pretrained,
    set_retrieval,
)
from tests.conftest import ROOT, run_notebook_cli, tiny_llama

SEQ_LEN = 23  # odd on purpose: the last chunk is partial for every chunk size below
SPLITTING_CHUNK_SIZES = [4, 5, 8]


def tokens(batch: int = 2, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


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
    # padded batches: tests/test_convert_cache.py (each row equals the row alone)


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
def smollm2():
    try:
        default_model_path()
    except FileNotFoundError as error:
        pytest.fail(f"the real-model tests need the SmolLM2 checkpoint: {error}")
    return load_pretrained()


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


def test_load_pretrained_missing_gguf_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_pretrained(tmp_path / "missing.gguf")


# --- notebook 02, smoke parameters --------------------------------------------------------------------------

NOTEBOOK_SMOKE = {"seq_len": 64, "chunk_sizes": [32], "calibration_chunk_size": 32, "num_windows": 1,
                  "calibration_windows": 1, "calibration_steps": 2, "sink_size": 4, "gpt2_model": "gpt2"}
NOTEBOOK_VARIANTS = ["calibrated", "normalized", "own_chunk", "own_chunk_sinks", "seed", "sliding_window",
                     "sliding_window_sinks"]  # sorted, as the CSV


@pytest.fixture(scope="module")
def conversion_smoke(tmp_path_factory):
    try:
        default_model_path()
    except FileNotFoundError as error:
        pytest.fail(f"notebook 02 needs the SmolLM2 checkpoint: {error}")
    for split in ("validation", "train"):
        if not (ROOT / "data" / "corpus" / f"{split}.jsonl").is_file():
            pytest.fail(f"notebook 02 needs data/corpus/{split}.jsonl: run `dvc repro prepare_corpus`")
    out = tmp_path_factory.mktemp("conversion")
    metrics = out / "metrics" / "02_conversion_similarity.json"
    proc = run_notebook_cli(ROOT / "notebooks" / "02_conversion_similarity.ipynb", "02_conversion_similarity", out,
                            overrides={**NOTEBOOK_SMOKE, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()),
            "notebook": nbformat.read(out / "02_conversion_similarity.ipynb", as_version=4)}


def test_notebook_writes_sorted_results_csv(conversion_smoke):
    table = pd.read_csv(conversion_smoke["out"] / "conversion_similarity.csv")
    assert list(zip(table.seq_len, table.chunk_size, table.variant)) == [(64, 32, v) for v in NOTEBOOK_VARIANTS]
    # Scored after the first chunk only: logit positions 32..62, each predicting the next token.
    assert (table.num_chunks == 2).all() and (table.tokens_scored == 31).all()
    assert table.ppl_original.nunique() == 1 and 1 < table.ppl_original.iloc[0] < 1000
    assert table.ppl.map(math.isfinite).all() and (table.ppl >= 1).all()
    assert ((table.top1 <= table.top5) & (table.top5 <= table.top10)).all()
    assert table.cos.between(-1, 1).all() and (table.kl >= 0).all() and (table.mse >= 0).all()
    for row in table.itertuples():
        assert row.ppl == pytest.approx(math.exp(row.nll), rel=1e-9)
        assert row.ppl_ratio == pytest.approx(row.ppl / row.ppl_original, rel=1e-9)
    by_variant = table.set_index("variant")
    # Every variant differs from the original after the first chunk; the seed formula's retrieval swamps the output.
    assert (by_variant.kl > 1e-3).all()
    assert by_variant.ppl["seed"] > by_variant.ppl["own_chunk"] > by_variant.ppl_original["own_chunk"]


def test_notebook_per_chunk_table_shows_first_chunk_exact(conversion_smoke):
    per_chunk = pd.read_csv(conversion_smoke["out"] / "per_chunk.csv")
    for variant in NOTEBOOK_VARIANTS:  # the first chunk retrieves nothing and sees everything before it
        first = per_chunk[(per_chunk.variant == variant) & (per_chunk.chunk_index == 0)].set_index("metric").value
        assert first["cos"] == pytest.approx(1.0, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-4)
        assert first["top1"] == 1.0
    second = per_chunk[(per_chunk.variant == "seed") & (per_chunk.chunk_index == 1)].set_index("metric").value
    assert second["kl"] > 0.01
    original = per_chunk[per_chunk.variant == "original"]
    assert list(original.chunk_index) == [0, 1] and set(original.metric) == {"nll"}
    seed_nll = per_chunk[(per_chunk.variant == "seed") & (per_chunk.metric == "nll")].value
    assert seed_nll.iloc[0] == pytest.approx(original.value.iloc[0], abs=1e-4)


def test_notebook_measures_retrieved_term_per_layer(conversion_smoke):
    scale = pd.read_csv(conversion_smoke["out"] / "retrieval_scale.csv")
    assert list(scale.layer) == list(range(30)) and (scale.chunk_size == 32).all()
    assert (scale.median_ratio > 0).all() and (scale.p90_ratio >= scale.median_ratio).all()


def test_notebook_calibration_table(conversion_smoke):
    table = pd.read_csv(conversion_smoke["out"] / "calibration.csv")
    assert list(table.layer) == list(range(30))
    for column in ("own_chunk_rel_mse", "initial_rel_mse", "final_rel_mse", "seconds"):
        assert (table[column] >= 0).all() and table[column].map(math.isfinite).all()
    assert table.final_rel_mse.median() <= table.initial_rel_mse.median()
    assert table.mean_share.between(0, 1).all()


def test_notebook_calibrated_file_reloads_with_the_reported_perplexity(conversion_smoke, smollm2):
    from bsbr import metrics as M
    from bsbr.convert import load_conversion
    from bsbr.data import load_split, token_windows

    original, tokenizer = smollm2
    reloaded = load_conversion(copy.deepcopy(original), conversion_smoke["out"] / "calibrated.safetensors")
    layers = [m for m in reloaded.modules() if isinstance(m, BSBRLlamaAttention) and m.retrieval_mode == "normalized"]
    assert len(layers) == 30 and all(m.chunk_size == 32 and m.normalized.sink_size == 4 for m in layers)
    x = token_windows(tokenizer, load_split(ROOT / "data" / "corpus", "validation"), 64, 1)  # the notebook's window
    with torch.inference_mode():
        ppl = M.perplexity(M.token_nll(reloaded(x).logits, x)[:, 32:])
    metrics = conversion_smoke["metrics"]
    assert ppl == pytest.approx(metrics["perplexity"]["calibrated"], rel=1e-4)
    assert metrics["calibration"]["reload_max_abs_logit_diff"] <= 1e-4


def test_notebook_metrics_json_matches_csv(conversion_smoke):
    metrics = conversion_smoke["metrics"]
    table = pd.read_csv(conversion_smoke["out"] / "conversion_similarity.csv").set_index(["chunk_size", "variant"])
    assert metrics["seq_len"] == 64 and metrics["num_windows"] == 1 and metrics["split"] == "validation"
    assert metrics["calibration_chunk_size"] == 32 and metrics["tokens_scored"] == 31
    assert metrics["exact_max_abs_logit_diff"] <= 5e-4  # the normalised one-chunk check (seed and window: 1e-4)
    assert metrics["original_ppl"] == pytest.approx(table.ppl_original.iloc[0], abs=1e-4)  # JSON: 4 decimals
    assert set(metrics["perplexity"]) == {"original", *NOTEBOOK_VARIANTS}
    for variant in NOTEBOOK_VARIANTS:
        assert metrics["perplexity"][variant] == pytest.approx(table.loc[(32, variant)].ppl, rel=1e-6, abs=1e-4)
    for variant in NOTEBOOK_VARIANTS:
        similarity = metrics["similarity"][variant]
        assert similarity["kl"] == pytest.approx(table.loc[(32, variant)].kl, abs=1e-4)
        assert similarity["top1_agreement"] == pytest.approx(table.loc[(32, variant)].top1, abs=1e-4)
    ppl = metrics["perplexity"]
    assert metrics["retrieval_helps"] == (ppl["calibrated"] < min(ppl["own_chunk"], ppl["own_chunk_sinks"]))
    assert metrics["calibrated_within_1_25x"] == (ppl["calibrated"] <= 1.25 * ppl["original"])
    calibration = metrics["calibration"]
    assert calibration["steps"] == 2 and calibration["windows"] == 1 and calibration["tokens"] == 64
    assert calibration["split"] == "train" and calibration["sink_size"] == 4 and calibration["seconds"] > 0
    head = metrics["chunk_sizes"]["32"]
    assert set(head) == {"bsbr_ppl", "local_only_ppl", "original_ppl", "cos_sim", "kl", "top1_agreement"}
    assert head["bsbr_ppl"] == pytest.approx(table.loc[(32, "seed")].ppl, rel=1e-6, abs=1e-4)
    assert head["local_only_ppl"] == pytest.approx(table.loc[(32, "own_chunk")].ppl, rel=1e-6, abs=1e-4)
    assert head["top1_agreement"] == pytest.approx(table.loc[(32, "seed")].top1, abs=1e-4)
    assert metrics["gpt2"]["model"] == "gpt2" and metrics["gpt2"]["status"] in {"skipped", "measured"}
    if metrics["gpt2"]["status"] == "measured":
        assert math.isfinite(metrics["gpt2"]["original_ppl"]) and math.isfinite(metrics["gpt2"]["seed_ppl"])
    assert len(metrics["gguf_sha256"]) == 64


def test_notebook_provenance_plots_and_no_errors(conversion_smoke):
    nb = conversion_smoke["notebook"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "torch ", "threads:", "gguf sha256: ", "seq_len = 64", "windows × variants: 100%",
                 "calibrating layers: 100%", "with load_conversion: max |logit difference|"):
        assert line in printed
    if conversion_smoke["metrics"]["gpt2"]["status"] == "skipped":
        assert "NOTE: GPT-2 path skipped" in printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    for name in ("conversion_similarity.png", "per_chunk_and_layer.png", "calibrated.safetensors"):
        assert (conversion_smoke["out"] / name).stat().st_size > 1000


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
