"""BSBRForCausalLM: logits, HF-convention next-token loss, tied/untied head, streaming forward,
generation through the streaming state (greedy == argmax of repeated full forwards, seeded sampling reproducible,
top_k=1 == greedy), padding, and argument checks.

Tiny config (vocab 50, hidden 32, 2 layers, 4 heads, chunk 4), fixed seeds; pieces vs full logits within
atol 1e-5 + rtol 1e-5.
"""

import pytest
import torch
import torch.nn.functional as F

import bsbr
from bsbr import BSBRForCausalLM

VOCAB, HIDDEN, LAYERS, HEADS, CHUNK, FF = 50, 32, 2, 4, 4, 64


def make_lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    return BSBRForCausalLM(VOCAB, HIDDEN, LAYERS, HEADS, CHUNK, FF, **kwargs).eval()


def random_ids(batch, seq_len, seed=1):
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def shifted_cross_entropy(logits, labels):
    """HF convention, by hand: position t predicts labels[t + 1]; -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


# --------------------------------------------------------------------------------------------- forward and loss


@pytest.mark.parametrize("compression", [None, 4])
def test_forward_logits_shape_and_no_loss_without_labels(compression):
    lm = make_lm(compression_factor=compression)
    ids = random_ids(3, 13)
    with torch.no_grad():
        out = lm(ids)
    assert out.logits.shape == (3, 13, VOCAB)
    assert out.loss is None
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("tie", [True, False])
def test_loss_is_mean_shifted_cross_entropy(tie):
    lm = make_lm(tie_word_embeddings=tie)
    ids = random_ids(3, 13)
    with torch.no_grad():
        out = lm(ids, labels=ids)
        torch.testing.assert_close(out.loss, shifted_cross_entropy(out.logits, ids), atol=1e-6, rtol=1e-6)
        labels = ids.clone()
        labels[0, 3:6] = -100
        labels[2, -1] = -100
        labels[1, 0] = -100  # the first label is never predicted anyway
        out = lm(ids, labels=labels)
        torch.testing.assert_close(out.loss, shifted_cross_entropy(out.logits, labels), atol=1e-6, rtol=1e-6)
    assert out.loss.dim() == 0


def test_loss_ignores_right_padded_positions():
    lm = make_lm()
    ids = random_ids(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 9:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        out = lm(ids, attention_mask=mask, labels=ids)
        expected = shifted_cross_entropy(out.logits, ids.masked_fill(mask == 0, -100))
        torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
        # neither the padded ids nor the labels given there change anything
        other = torch.where(mask.bool(), ids, (ids + 11) % VOCAB)
        changed = lm(other, attention_mask=mask, labels=other)
    torch.testing.assert_close(changed.loss, out.loss, atol=1e-6, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(changed.logits[real], out.logits[real], atol=1e-5, rtol=0)


def test_left_padded_logits_and_loss_do_not_depend_on_padding():
    lm = make_lm()
    ids = random_ids(2, 14)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, :5] = False  # row 0: 5 left pads, then 9 real tokens
    with torch.no_grad():
        out = lm(ids, attention_mask=mask, labels=ids)
        alone = lm(ids[:1, 5:]).logits[0]
        torch.testing.assert_close(out.logits[0, 5:], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits[1], lm(ids[1:]).logits[0], atol=1e-5, rtol=1e-5)
        other = torch.where(mask, ids, (ids + 7) % VOCAB)
        changed = lm(other, attention_mask=mask, labels=other)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(changed.loss, out.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("left,right", [(3, 0), (5, 2), (0, 4)])
def test_padded_row_loss_equals_the_row_alone(left, right):
    """'Padded positions ignored': no target is scored from a padded position's logits nor at a padded position,
    so a padded sequence has the loss of the same sequence run alone (left padding included)."""
    lm = make_lm()
    real = random_ids(1, 10, seed=4)
    ids = torch.cat([random_ids(1, left, seed=5), real, random_ids(1, right, seed=6)], dim=1)
    mask = torch.tensor([[0] * left + [1] * 10 + [0] * right])
    with torch.no_grad():
        alone = lm(real, labels=real).loss
        padded = lm(ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_all_padding_row_gives_finite_loss_and_gradients():
    lm = make_lm().train()
    ids = random_ids(2, 11)
    mask = torch.tensor([[0] * 11, [1] * 8 + [0] * 3])
    out = lm(ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    with torch.no_grad():
        expected = shifted_cross_entropy(out.logits, ids.masked_fill(mask == 0, -100))
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-6, rtol=1e-6)
    out.loss.backward()
    for name, parameter in lm.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def test_logits_are_causal():
    lm = make_lm()
    ids = random_ids(2, 17)
    with torch.no_grad():
        base = lm(ids).logits
        for position in (0, 3, 4, 9, 16):
            changed = ids.clone()
            changed[:, position] = (changed[:, position] + 1) % VOCAB
            out = lm(changed).logits
            torch.testing.assert_close(out[:, :position], base[:, :position], atol=1e-5, rtol=0)
            assert (out[:, position] - base[:, position]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------- weight tying


def test_tied_head_shares_the_embedding_tensor():
    lm = make_lm(tie_word_embeddings=True)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    untied = make_lm(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    tied_count = sum(p.numel() for p in lm.parameters())
    untied_count = sum(p.numel() for p in untied.parameters())
    assert untied_count - tied_count == VOCAB * HIDDEN
    default = make_lm()  # tie_word_embeddings=True by default
    assert default.lm_head.weight is default.model.embed_tokens.weight


def test_untied_head_trains_separately():
    lm = make_lm(tie_word_embeddings=False).train()
    ids = random_ids(2, 9)
    lm(ids, labels=ids).loss.backward()
    assert lm.lm_head.weight.grad is not None and lm.model.embed_tokens.weight.grad is not None
    assert not torch.equal(lm.lm_head.weight.grad, lm.model.embed_tokens.weight.grad)


# --------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("compression", [None, 4])
@pytest.mark.parametrize("pieces", [[1] * 19, [7, 12], [4, 4, 3, 8], [2, 9, 1, 7]])
def test_streamed_logits_equal_full_forward(compression, pieces):
    lm = make_lm(compression_factor=compression)
    ids = random_ids(2, 19)
    with torch.no_grad():
        full = lm(ids).logits
        logits, state, start = [], None, 0
        for length in pieces:
            out = lm(ids[:, start : start + length], state=state, return_state=True)
            assert out.state is not None
            logits.append(out.logits)
            state, start = out.state, start + length
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_trunk_streams_through_model_model():
    lm = make_lm()
    ids = random_ids(2, 15)
    with torch.no_grad():
        full = lm.model(ids)
        first, state = lm.model(ids[:, :6], return_state=True)
        second, state = lm.model(ids[:, 6:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- generate


def greedy_by_full_forwards(lm, prompt, max_new_tokens):
    """Reference: re-run the whole prefix every step and take the argmax of the last position."""
    ids = prompt
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = lm(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("compression", [None, 4])
@pytest.mark.parametrize("prompt_len", [1, 4, 5])
def test_greedy_generation_equals_argmax_of_full_forwards(compression, prompt_len):
    lm = make_lm(compression_factor=compression)
    prompt = random_ids(2, prompt_len)
    with torch.no_grad():
        out = lm.generate(prompt, max_new_tokens=13)
    assert out.shape == (2, prompt_len + 13) and out.dtype == prompt.dtype
    assert torch.equal(out[:, :prompt_len], prompt)
    assert torch.equal(out, greedy_by_full_forwards(lm, prompt, 13))


def test_generation_uses_the_streaming_state():
    """Each step feeds only new tokens: the first attention layer sees at most prompt + new tokens in all."""
    lm = make_lm()
    prompt = random_ids(2, 5)
    seen = []
    handle = lm.model.layers[0].attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            lm.generate(prompt, max_new_tokens=12)
    finally:
        handle.remove()
    assert seen and sum(seen) <= 5 + 12, seen


def test_max_new_tokens_zero_returns_the_prompt():
    lm = make_lm()
    prompt = random_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(lm.generate(prompt, max_new_tokens=0), prompt)


def test_seeded_sampling_is_reproducible_and_in_range():
    lm = make_lm()
    prompt = random_ids(2, 5)
    with torch.no_grad():
        first = lm.generate(prompt, 20, do_sample=True, temperature=1.5,
                            generator=torch.Generator().manual_seed(123))
        second = lm.generate(prompt, 20, do_sample=True, temperature=1.5,
                             generator=torch.Generator().manual_seed(123))
        greedy = lm.generate(prompt, 20)
        top_k = lm.generate(prompt, 20, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(4))
    assert first.shape == (2, 25) and torch.equal(first[:, :5], prompt)
    assert torch.equal(first, second)
    assert first.min() >= 0 and first.max() < VOCAB and top_k.min() >= 0 and top_k.max() < VOCAB
    assert not torch.equal(first, greedy)  # 40 draws at temperature 1.5 are not all the argmax


def test_top_k_one_sampling_equals_greedy():
    lm = make_lm()
    prompt = random_ids(2, 3)
    with torch.no_grad():
        greedy = lm.generate(prompt, 15)
        sampled = lm.generate(prompt, 15, do_sample=True, temperature=0.7, top_k=1,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_top_k_sampling_draws_only_from_the_top_k():
    """With top_k=3 every sampled token is among the 3 largest logits of a full forward on its prefix."""
    lm = make_lm()
    prompt = random_ids(2, 4)
    with torch.no_grad():
        out = lm.generate(prompt, 12, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(9))
        logits = lm(out[:, :-1]).logits  # position t predicts token t + 1 (causal)
    top3 = logits[:, 3:].topk(3, dim=-1).indices  # [batch, 12, 3]
    assert (top3 == out[:, 4:, None]).any(-1).all()


def test_generation_does_not_leak_between_calls():
    lm = make_lm()
    a, b = random_ids(1, 6, seed=2), random_ids(1, 3, seed=3)
    with torch.no_grad():
        b_first = lm.generate(b, 9)
        lm.generate(a, 11)
        b_again = lm.generate(b, 9)
    assert torch.equal(b_again, b_first)


def test_eos_token_keeps_the_greedy_prefix():
    lm = make_lm()
    prompt = random_ids(1, 5)
    with torch.no_grad():
        greedy = lm.generate(prompt, 12)
        eos = int(greedy[0, 5 + 3])
        first = 5 + int((greedy[0, 5:] == eos).nonzero()[0])  # first time eos is generated
        out = lm.generate(prompt, 12, eos_token_id=eos)
    assert out.shape[0] == 1 and first < out.shape[1] <= 5 + 12
    assert torch.equal(out[0, : first + 1], greedy[0, : first + 1])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": "3"}, "max_new_tokens"),
        ({"max_new_tokens": 3, "do_sample": True, "temperature": 0.0}, "temperature"),
        ({"max_new_tokens": 3, "do_sample": True, "temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 3, "do_sample": True, "top_k": 0}, "top_k"),
        ({"max_new_tokens": 3, "do_sample": True, "top_k": -2}, "top_k"),
    ],
)
def test_bad_generate_arguments_raise(kwargs, name):
    lm = make_lm()
    with pytest.raises(ValueError, match=name):
        lm.generate(random_ids(1, 4), **kwargs)


def test_public_api():
    assert bsbr.BSBRForCausalLM is BSBRForCausalLM
    assert "BSBRForCausalLM" in bsbr.__all__
