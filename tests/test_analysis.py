"""bsbr.analysis against plain references: attention maps, chunk mass, routing weights, Wilson interval, passkey."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bsbr.analysis import (
    PASSKEY_ANSWER,
    PASSKEY_FACT,
    PASSKEY_QUESTION,
    answer_exact_match,
    causal_attention_probs,
    chunk_mass,
    PASSKEY_TEMPLATES,
    passkey_sample,
    repeated_filler,
    retrieval_weights,
    wilson_interval,
)

HEADS, KV_HEADS, D = 4, 2, 8


def inputs(n, chunk_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    chunks = -(-n // chunk_size)
    q = torch.randn(2, HEADS, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, KV_HEADS, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, KV_HEADS, n, D, generator=g, dtype=torch.float64)
    mq = torch.randn(2, HEADS, chunks, D, generator=g, dtype=torch.float64)
    mk = torch.randn(2, KV_HEADS, chunks, D, generator=g, dtype=torch.float64)
    return q, k, v, mq, mk


def test_causal_attention_probs_is_softmax_attention():
    q, k, v, _, _ = inputs(11, 4)
    probs = causal_attention_probs(q, k)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                 v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(probs @ v.repeat_interleave(2, 1), reference, rtol=0, atol=1e-12)
    assert torch.all(probs.triu(1) == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, HEADS, 11, dtype=torch.float64))
    torch.testing.assert_close(causal_attention_probs(q, k, start=7), probs[:, :, 7:], rtol=0, atol=1e-14)  # rows 7..10
    for start in (-1, 11, 2.0):
        with pytest.raises(ValueError, match="start must be"):
            causal_attention_probs(q, k, start=start)


def test_retrieval_weights_rows():
    _, _, _, mq, mk = inputs(20, 5)
    w = retrieval_weights(mq, mk, 4)
    assert w.shape == (2, HEADS, 3, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, HEADS, 3, dtype=torch.float64))
    assert torch.all(w.triu(1) == 0)
    e = torch.exp(mq[0, 1, 2] @ mk[0, 0, :3].T / math.sqrt(D))  # head 1 uses kv head 0; chunk 3 from meta row 2
    torch.testing.assert_close(w[0, 1, 2], e / e.sum())
    with pytest.raises(ValueError, match="num_chunks"):
        retrieval_weights(mq, mk, 1)


@pytest.mark.parametrize("n,chunk_size,sink", [(23, 5, 0), (23, 5, 3), (8, 4, 4)])
def test_chunk_mass_matches_loops(n, chunk_size, sink):
    probs = torch.rand(3, n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mass, sink_mass = chunk_mass(probs, chunk_size, sink)
    chunks = -(-n // chunk_size)
    assert mass.shape == (3, n, chunks)
    for j in range(chunks):
        keys = [u for u in range(j * chunk_size, min(n, (j + 1) * chunk_size)) if u >= sink]
        torch.testing.assert_close(mass[..., j], probs[..., keys].sum(-1))
    torch.testing.assert_close(sink_mass, probs[..., :sink].sum(-1))
    torch.testing.assert_close(mass.sum(-1) + sink_mass, probs.sum(-1))
    with pytest.raises(ValueError, match="sink_size"):
        chunk_mass(probs, chunk_size, chunk_size + 1)
    rows, _ = chunk_mass(probs[:, n // 2:], chunk_size, sink)  # a subset of the query rows
    torch.testing.assert_close(rows, mass[:, n // 2:])
    with pytest.raises(ValueError, match="probs must be"):
        chunk_mass(probs[0, 0], chunk_size, sink)


@pytest.mark.parametrize("successes,trials,low,high", [
    (0, 10, 0.0, 0.2775327),  # Brown, Cai & DasGupta 2001; statsmodels proportion_confint(method="wilson")
    (5, 10, 0.2365931, 0.7634069),
    (10, 10, 0.7224673, 1.0),
    (1, 1, 0.2065493, 1.0),
])
def test_wilson_interval_known_values(successes, trials, low, high):
    lo, hi = wilson_interval(successes, trials)
    assert lo == pytest.approx(low, abs=1e-6) and hi == pytest.approx(high, abs=1e-6)


def test_wilson_interval_contains_the_estimate_and_checks_input():
    for trials in (1, 7, 40):
        for successes in range(trials + 1):
            lo, hi = wilson_interval(successes, trials)
            assert 0 <= lo <= successes / trials <= hi <= 1
    for bad in [(3, 2), (-1, 2), (1, 0)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


class CharTokenizer:
    """One token per character (code point)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_sample_layout(depth):
    tok = CharTokenizer()
    filler = torch.arange(1000, 1400)  # token ids no character here has
    sample = passkey_sample(tok, filler, 200, depth, "48213")
    ids = sample["input_ids"].tolist()
    fact, question, answer = (tok.encode(t.format(passkey="48213")) for t in (PASSKEY_FACT, PASSKEY_QUESTION,
                                                                               PASSKEY_ANSWER))
    filler_len = 200 - len(fact) - len(question) - len(answer)
    assert len(ids) == 200
    assert sample["fact_start"] == round(depth * filler_len) and sample["fact_end"] == sample["fact_start"] + len(fact)
    assert ids[sample["fact_start"]:sample["fact_end"]] == fact
    assert ids[sample["answer_start"]:] == answer == sample["answer_ids"]
    assert ids[sample["answer_start"] - len(question):sample["answer_start"]] == question
    kept = [t for t in ids if t >= 1000]
    assert kept == list(range(1000, 1000 + filler_len))  # the filler, in order, nothing else
    with pytest.raises(ValueError, match="length"):
        passkey_sample(tok, filler, 20, depth, "48213")
    with pytest.raises(ValueError, match="depth"):
        passkey_sample(tok, filler, 200, 1.5, "48213")
    with pytest.raises(ValueError, match="filler_ids"):
        passkey_sample(tok, filler[:10], 200, depth, "48213")


def test_passkey_sample_with_a_template_puts_its_prefix_first_and_repeated_filler_is_the_sentence_cut():
    tok = CharTokenizer()
    template = PASSKEY_TEMPLATES["passkey"]
    filler = repeated_filler(tok, template, 300)
    sentence = tok.encode(template.filler)
    assert filler.tolist() == (sentence * 4)[:300]
    sample = passkey_sample(tok, filler, 400, 0.5, "48213", template)
    ids = sample["input_ids"].tolist()
    prefix = tok.encode(template.prefix)
    fact = tok.encode(template.fact.format(passkey="48213"))
    question = tok.encode(template.question)
    filler_len = 400 - len(prefix) - len(fact) - len(question) - len(" 48213")
    assert ids[:len(prefix)] == prefix
    assert sample["fact_start"] == len(prefix) + round(0.5 * filler_len)
    assert ids[sample["fact_start"]:sample["fact_end"]] == fact
    assert ids[len(prefix):sample["fact_start"]] + ids[sample["fact_end"]:sample["answer_start"] - len(question)] \
        == filler[:filler_len].tolist()
    with pytest.raises(ValueError, match="template"):
        passkey_sample(tok, filler, 400, 0.5, "48213", "passkey")
    with pytest.raises(ValueError, match="template"):
        repeated_filler(tok, PASSKEY_TEMPLATES["fact_in_text"], 10)
    with pytest.raises(ValueError, match="num_tokens"):
        repeated_filler(tok, template, 0)


def test_answer_exact_match_equals_greedy_generation():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=0)
        right = greedy  # the model's own greedy answer
        wrong = greedy.clone()
        wrong[0, -2] = (wrong[0, -2] + 1) % 50  # one answer token changed
        for ids, expected in ((right, True), (wrong, False)):
            logits = model(ids).logits
            assert answer_exact_match(logits, ids, 12).tolist() == [expected]
            assert answer_exact_match(logits[:, -5:], ids, 12).tolist() == [expected]  # last positions suffice
    with pytest.raises(ValueError, match="answer_start"):
        answer_exact_match(logits, ids, 16)
    with pytest.raises(ValueError, match="logits"):
        answer_exact_match(logits[:, -2:], ids, 12)
