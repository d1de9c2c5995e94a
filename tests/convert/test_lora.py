"""bsbr.convert.lora: LoRA adapters (PEFT) on converted and original models, the KL distillation against the original,
and the adapters' safetensors files. Tiny random Llama models, nothing downloaded."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from bsbr.convert import (LORA_TARGET_MODULES, add_lora, converted_copy, load_conversion, load_lora, lora_parameters,
                          lora_settings, save_conversion, save_lora, set_retrieval, train_lora_distillation)
from bsbr.convert.checkpoint import base_model_fingerprint, conversion_settings
from bsbr.masks import band_mask
from tests.conftest import tiny_llama, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERTED = dict(chunk_size=4, retrieval="terraced", sink_size=1)


def kl(student, teacher, input_ids, student_mask=None) -> float:
    """Mean over sequences and positions of KL(teacher ‖ student) of the next token, in nats (the training loss)."""
    with torch.no_grad():
        total = 0.0
        for row in input_ids:
            target = torch.log_softmax(teacher(row[None]).logits[0].float(), -1)
            prediction = torch.log_softmax(student(row[None], attention_mask=student_mask).logits[0].float(), -1)
            total += (target.exp() * (target - prediction)).sum(-1).mean().item()
    return total / len(input_ids)


def randomize_lora(model, seed=3):
    """Move every LoRA matrix off its initial value (B starts at zero), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora_parameters(model).values():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("converted", [False, True])
def test_add_lora_leaves_the_model_unchanged_and_trains_only_the_adapters(converted):
    model = converted_copy(tiny_llama(), **CONVERTED) if converted else tiny_llama()
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    assert add_lora(model, rank=4, alpha=8.0) is model
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)  # B is zero-initialised
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and len(trainable) == 2 * 4 * 2  # A and B × q/k/v/o × 2 layers
    adapted = {name.rsplit(".", 3)[0] for name in trainable}
    assert len(adapted) == len(LORA_TARGET_MODULES) * model.config.num_hidden_layers
    assert {name.rpartition(".")[2] for name in adapted} == set(LORA_TARGET_MODULES)
    shapes = {name.split(".lora_")[1]: tuple(p.shape) for name, p in lora_parameters(model).items()
              if "layers.0.self_attn.k_proj" in name}
    assert shapes == {"A.default.weight": (4, 64), "B.default.weight": (32, 4)}  # k_proj: 64 -> 2 kv heads × 16
    assert not any("meta_" in name for name in trainable)
    if converted:  # the rest of the package still sees a converted model
        set_retrieval(model, False)
        assert model.model.layers[0].self_attn.retrieval is False


def test_lora_changes_the_output_by_the_scaled_low_rank_update():
    model = add_lora(tiny_llama(), rank=2, alpha=6.0, target_modules=["q_proj"])
    projection = model.model.layers[0].self_attn.q_proj
    randomize_lora(model)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    a, b = projection.lora_A["default"].weight, projection.lora_B["default"].weight
    with torch.no_grad():
        expected = h @ projection.base_layer.weight.T + 3.0 * (h @ a.T @ b.T)  # alpha / rank = 3
        torch.testing.assert_close(projection(h), expected, atol=1e-5, rtol=1e-5)


def test_distillation_lowers_the_kl_and_leaves_the_pretrained_weights_alone():
    teacher = tiny_llama()
    pretrained = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    student = add_lora(converted_copy(teacher, **CONVERTED), rank=4)  # shares the pretrained tensors
    x = tokens(2, 32)
    calls = []

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        calls.append(1)
        return {"kl": kl(model, teacher, x)}

    rows = train_lora_distillation(student, teacher, x, 30, lr=3e-3, eval_every=8, eval_fn=eval_fn, progress=False)
    assert [r["step"] for r in rows] == list(range(31))
    assert [r["step"] for r in rows if "kl" in r] == [0, 8, 16, 24, 30] and len(calls) == 5
    assert rows[0]["loss"] is None and rows[0]["seconds"] == 0.0
    assert rows[1]["loss"] == pytest.approx(kl(converted_copy(teacher, **CONVERTED), teacher, x[:1]), rel=1e-4)
    assert rows[0]["kl"] > 1e-4 and rows[-1]["kl"] < 0.5 * rows[0]["kl"]
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    for name, p in teacher.named_parameters():
        assert torch.equal(p, pretrained[name]), name  # bitwise unchanged
    assert not student.training and all(p.grad is None for p in student.parameters())


def test_an_exact_copy_starts_at_zero_kl_and_a_band_mask_is_used():
    teacher = tiny_llama()
    x = tokens(1, 32)
    exact = add_lora(copy.deepcopy(teacher), rank=2)
    rows = train_lora_distillation(exact, teacher, x, 1, progress=False)
    assert [r["step"] for r in rows] == [1] and 0 <= rows[0]["loss"] <= 1e-6
    mask = band_mask(32, 4, 1)
    banded = add_lora(copy.deepcopy(teacher), rank=2)
    rows = train_lora_distillation(banded, teacher, x, 1, student_attention_mask=mask, progress=False)
    assert rows[0]["loss"] > 1e-4
    assert rows[0]["loss"] == pytest.approx(kl(add_lora(copy.deepcopy(teacher)), teacher, x, mask), rel=1e-4)
    both = add_lora(copy.deepcopy(teacher), rank=2)  # the same mask on both sides: the copy matches again
    rows = train_lora_distillation(both, teacher, x, 1, student_attention_mask=mask, teacher_attention_mask=mask,
                                   progress=False)
    assert rows[0]["loss"] <= 1e-6


def test_zero_steps_only_evaluates():
    teacher = tiny_llama()
    student = add_lora(copy.deepcopy(teacher))
    rows = train_lora_distillation(student, teacher, tokens(1, 8), 0, eval_every=5, eval_fn=lambda m: {"n": 1},
                                   progress=False)
    assert rows == [{"step": 0, "loss": None, "seconds": 0.0, "n": 1}]


@pytest.mark.parametrize("converted", [False, True])
def test_save_and_load_round_trip(tmp_path, converted):
    build = (lambda: converted_copy(tiny_llama(), **CONVERTED)) if converted else tiny_llama
    model = add_lora(build(), rank=4, alpha=4.0, target_modules=("q_proj", "v_proj"))
    randomize_lora(model)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path, settings={"window": 512, "sinks": 4})
    if converted:
        save_conversion(converted_copy(tiny_llama(), **CONVERTED), tmp_path / "conversion.safetensors")
        fresh = load_conversion(tiny_llama(), tmp_path / "conversion.safetensors")
    else:
        fresh = tiny_llama()
    loaded = load_lora(fresh, path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
        assert (loaded(x).logits - build()(x).logits).abs().max() > 1e-4  # the adapters were not the initial ones
    assert set(lora_parameters(loaded)) == set(lora_parameters(model))
    assert lora_settings(path) == {"rank": 4, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"],
                                   "base_model": base_model_fingerprint(tiny_llama()),
                                   "conversion": conversion_settings(model) if converted else None,
                                   "settings": {"window": 512, "sinks": 4}}


def test_load_refuses_adapters_trained_in_another_conversion(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(add_lora(converted_copy(tiny_llama(), **CONVERTED)), path)
    with pytest.raises(ValueError, match="trained in a model with conversion .* but model has conversion None"):
        load_lora(tiny_llama(), path)  # the original, unconverted
    other = {**CONVERTED, "chunk_size": CONVERTED["chunk_size"] * 2, "sink_size": 2}
    with pytest.raises(ValueError) as error:  # only the settings that differ, each with both values
        load_lora(converted_copy(tiny_llama(), **other), path)
    assert str(error.value) == (f"{path} holds adapters trained in a model converted with other settings: chunk_size 4 "
                                "in the file, 8 in model; normalized_options.sink_size 1 in the file, 2 in model. "
                                "Convert model the same way first (bsbr.convert.load_conversion)")
    with pytest.raises(ValueError) as error:  # another retrieval mode: its options differ too
        load_lora(converted_copy(tiny_llama(), chunk_size=4, retrieval="normalized", sink_size=1), path)
    assert str(error.value).split(": ", 1)[1] == (
        "normalized_options.tie_qk absent in the file, False in model; retrieval 'terraced' in the file, 'normalized' "
        "in model. Convert model the same way first (bsbr.convert.load_conversion)")
    plain = tmp_path / "plain.safetensors"
    save_lora(add_lora(tiny_llama()), plain)
    with pytest.raises(ValueError, match="conversion None, but model has conversion .*: load them onto the "
                                         "unconverted model"):
        load_lora(converted_copy(tiny_llama(), **CONVERTED), plain)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.0), "rank must be an integer >= 1"),
    (dict(alpha=0), "alpha must be a finite positive number"),
    (dict(alpha=float("inf")), "alpha must be a finite positive number"),
    (dict(alpha=True), "alpha must be a finite positive number"),
    (dict(target_modules=()), "target_modules must be a non-empty"),
    (dict(target_modules="q_proj"), "target_modules must be a non-empty"),
    (dict(target_modules=("q_proj", "qkv")), r"target_modules \['qkv'\] match no nn.Linear"),
])
def test_bad_lora_arguments_raise_before_any_change(kwargs, match):
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        add_lora(model, **kwargs)
    assert [type(m) for m in model.modules()] == before


def test_lora_twice_and_no_lora_raise():
    model = add_lora(tiny_llama())
    with pytest.raises(ValueError, match="already holds LoRA"):
        add_lora(model)
    with pytest.raises(ValueError, match="holds no LoRA"):
        lora_parameters(tiny_llama())
    with pytest.raises(ValueError, match="holds no LoRA"):
        save_lora(tiny_llama(), "unused.safetensors")


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=-1), "steps must be an integer >= 0"),
    (dict(lr=0.0), "lr must be a finite positive number"),
    (dict(lr=float("nan")), "lr must be a finite positive number"),
    (dict(input_ids=torch.zeros(8, dtype=torch.long)), "input_ids must be a non-empty 2-D integer"),
    (dict(input_ids=torch.zeros(1, 8)), "input_ids must be a non-empty 2-D integer"),
    (dict(input_ids=[[1, 2]]), "input_ids must be a non-empty 2-D integer"),
    (dict(eval_every=-1), "eval_every must be an integer >= 0"),
    (dict(eval_every=2), "eval_every=2 needs an eval_fn"),
    (dict(eval_fn=lambda m: {}), "eval_fn is given but eval_every=0"),
    (dict(student_attention_mask=torch.ones(8, dtype=torch.bool)), "student_attention_mask must be None or"),
    (dict(teacher_attention_mask="band"), "teacher_attention_mask must be None or"),
    (dict(student=None), "student holds no LoRA"),
    (dict(teacher=None), "teacher must be a separate model"),
])
def test_bad_training_arguments_raise_before_any_step(kwargs, match):
    teacher = tiny_llama()
    student = add_lora(copy.deepcopy(teacher))
    arguments = dict(student=student, teacher=teacher, input_ids=tokens(1, 8), steps=1, progress=False)
    arguments.update(kwargs)
    if "student" in kwargs:
        arguments["student"] = copy.deepcopy(teacher)
    if "teacher" in kwargs:
        arguments["teacher"] = arguments["student"]
    before = {name: p.detach().clone() for name, p in lora_parameters(student).items()}
    with pytest.raises(ValueError, match=match):
        train_lora_distillation(**arguments)
    assert all(torch.equal(p, before[name]) for name, p in lora_parameters(student).items())
    with pytest.raises(ValueError, match="teacher is in training mode"):
        train_lora_distillation(student, teacher.train(), tokens(1, 8), 1, progress=False)


def test_bad_lora_files_raise(tmp_path):
    model = add_lora(tiny_llama(), rank=2)
    good = tmp_path / "good.safetensors"
    save_lora(model, good)
    with pytest.raises(FileNotFoundError):
        load_lora(tiny_llama(), tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        lora_settings(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a bsbr-lora file"):
        load_lora(tiny_llama(), plain)
    other = tiny_llama(seed=1)
    with pytest.raises(ValueError, match=r"different base model.*weights_sha256 [0-9a-f]{64} vs [0-9a-f]{64}"):
        load_lora(other, good)
    assert not any("lora" in name for name, _ in other.named_modules())
    with pytest.raises(ValueError, match="already holds LoRA"):
        load_lora(add_lora(tiny_llama()), good)
    with pytest.raises(ValueError, match="settings must be JSON-serialisable"):
        save_lora(model, tmp_path / "x.safetensors", settings={"mask": torch.ones(1)})
    with pytest.raises(ValueError, match="settings must be None or a dict"):
        save_lora(model, tmp_path / "x.safetensors", settings=[1])
    tensors = {name: p.detach().clone() for name, p in lora_parameters(model).items()}
    first = next(iter(tensors))
    metadata = {"format": "bsbr-lora", "version": "1", "rank": "2", "alpha": "16.0",
                "target_modules": json.dumps(list(LORA_TARGET_MODULES)),
                "base_model": json.dumps(base_model_fingerprint(model)), "settings": "null"}
    broken = tmp_path / "broken.safetensors"
    save_file({**tensors, first: tensors[first][:1].contiguous()}, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match=rf"wrong shape \['{first}'\]"):
        load_lora(tiny_llama(), broken)
    save_file({name: t for name, t in tensors.items() if name != first}, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match=rf"missing \['{first}'\]"):
        load_lora(tiny_llama(), broken)
    fresh = tiny_llama()
    save_file({**tensors, "model.extra.lora_A.default.weight": torch.zeros(2, 2)}, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match=r"unexpected \['model.extra.lora_A.default.weight'\]"):
        load_lora(fresh, broken)
    assert not any("lora" in name for name, _ in fresh.named_modules())  # refused before adding adapters


def test_real_model_keeps_its_fingerprint_and_logits_under_lora(smollm2):
    base, tokenizer = smollm2
    student = add_lora(converted_copy(base, 64, retrieval="terraced", sink_size=4))
    assert base_model_fingerprint(student) == base_model_fingerprint(base)
    assert sum(p.numel() for p in lora_parameters(student).values()) == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192))
    x = tokenizer("LoRA starts as the identity: B is zero.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, converted_copy(base, 64, retrieval="terraced",
                                                                     sink_size=4)(x).logits, atol=0, rtol=0)


def test_warm_up_then_constant_lr_and_a_bad_eval_fn(monkeypatch):
    teacher = tiny_llama()
    student = add_lora(copy.deepcopy(teacher), rank=2)
    lrs, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train_lora_distillation(student, teacher, tokens(3, 8), 30, lr=0.3, progress=False)
    assert lrs == pytest.approx([0.1, 0.2] + [0.3] * 28)  # min(10, 30 // 10) = 3 warm-up steps
    with pytest.raises(ValueError, match="eval_fn must return a dict without the keys"):
        train_lora_distillation(student, teacher, tokens(1, 8), 2, eval_every=1, eval_fn=lambda m: {"loss": 1.0},
                                progress=False)
    assert not student.training and all(p.grad is None for p in student.parameters())
