"""AdaLoRA against the real peft package: logits, files both ways, the allocator step by step, the regularizer."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from lorakit.adapters.adalora import AdaLoraConfig, AdaLoraLinear
from lorakit.adapters.base import AdapterLinear
from lorakit.adapters.rank_allocator import AdaLoraController, budget_schedule
from lorakit.errors import ConfigError
from lorakit.quant import Linear4bit
from lorakit.variants import (
    merge_and_unload_variants,
    merge_variants,
    unmerge_variants,
    variant_layers,
    wrap_adalora,
)
from lorakit.variants_io import checkpoint_state_dict, load_adalora, load_variant, save_adalora, save_variant

from tiny_models import BUILDERS, VOCAB, model_output, sample_ids, tiny_llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
# Warm-up (step 1), budget phase with masking on even steps (2-4), pattern fixed (5), final phase (6-7).
SCHEDULE = dict(
    init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=7, lora_alpha=8, beta1=0.8, beta2=0.7
)


def _pair(arch: str = "llama", **kwargs):
    """A PEFT AdaLoRA model and a lorakit one on identical bases with identical (random) adapter weights."""
    kwargs = {**SCHEDULE, "target_modules": TARGETS[arch], **kwargs}
    peft_model = peft.get_peft_model(
        BUILDERS[arch](), peft.AdaLoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kwargs)
    )
    ours = wrap_adalora(BUILDERS[arch](), AdaLoraConfig(**kwargs))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".lora_" in name:
                param.copy_(peft_model.get_parameter(f"base_model.model.{name}") * 0.3)
                peft_model.get_parameter(f"base_model.model.{name}").copy_(param)
    return peft_model, ours


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_logits_as_peft_for_same_weights(arch):
    peft_model, ours = _pair(arch)
    ids = sample_ids()
    expected = model_output(peft_model.eval(), ids)
    torch.testing.assert_close(model_output(ours.eval(), ids), expected, atol=1e-6, rtol=0)
    base = model_output(BUILDERS[arch](), ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output
    assert sum(isinstance(m, AdaLoraLinear) for m in ours.modules()) == 2 * len(TARGETS[arch])


def test_init_leaves_the_model_unchanged_and_trains_only_the_adapter():
    model = wrap_adalora(tiny_llama(), AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=5))
    ids = sample_ids()
    torch.testing.assert_close(model_output(model, ids), model_output(tiny_llama(), ids), atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * 3 and all(".lora_" in n for n in trainable)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_E["default"].abs().max() == 0
    assert 0.01 < layer.lora_A["default"].std() < 0.03 and 0.01 < layer.lora_B["default"].std() < 0.03


def test_regularizer_equals_peft_orthogonality_term():
    peft_model, ours = _pair(orth_reg_weight=0.7)
    ids = sample_ids()
    with_reg = _lm_loss(peft_model, ids)
    peft_model.peft_config["default"].orth_reg_weight = 0.0
    peft_term = with_reg - _lm_loss(peft_model, ids)
    controller = AdaLoraController(ours, "default")
    ours_term = controller.regularizer(ours)
    torch.testing.assert_close(ours_term, peft_term.detach(), atol=1e-5, rtol=0)
    assert ours_term > 0.1 and ours_term.requires_grad


def test_budget_schedule_matches_peft():
    peft_model, ours = _pair()
    allocator = peft_model.base_model.rankallocator
    controller = AdaLoraController(ours, "default")
    assert (controller.allocator.init_budget, controller.allocator.target_budget) == (24, 12)
    config = AdaLoraConfig(**SCHEDULE)
    for step in range(0, SCHEDULE["total_step"] + 3):
        assert budget_schedule(step, 24, 12, config) == allocator.budget_schedule(step), step


def _sgd(model, lr=0.5):
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.grad is not None:
                param -= lr * param.grad


def test_allocator_matches_peft_update_and_allocate_step_by_step():
    """Same batches and gradients: identical importance EMAs, masks, Λ values and rank patterns every step."""
    peft_model, ours = _pair()
    peft_model.train(), ours.train()
    controller = AdaLoraController(ours, "default")
    allocator = peft_model.base_model.rankallocator
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    patterns = []
    for step in range(1, SCHEDULE["total_step"] + 1):
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(step))
        _lm_loss(peft_model, ids).backward()  # PEFT adds the regularizer inside forward
        (_lm_loss(ours, ids) + controller.regularizer(ours)).backward()
        for name in names:
            theirs = peft_model.get_parameter(f"base_model.model.{name}").grad
            mine = ours.get_parameter(name)
            torch.testing.assert_close(mine.grad, theirs, atol=1e-6, rtol=1e-5)
            mine.grad.copy_(theirs)  # identical gradients from here on: the allocators see the same input
        _sgd(peft_model), _sgd(ours)
        peft_model.base_model.update_and_allocate(step)
        controller.step(ours, step)
        peft_model.zero_grad(), ours.zero_grad()

        for name in names:
            assert torch.equal(
                ours.get_parameter(name), peft_model.get_parameter(f"base_model.model.{name}")
            ), name
        for key, value in allocator.exp_avg_ipt.items():  # empty after the pattern is fixed (reset), as ours
            ours_key = key.removesuffix(".default")
            assert torch.equal(controller.allocator.sensitivity[ours_key], value)
            assert torch.equal(controller.allocator.uncertainty[ours_key], allocator.exp_avg_unc[key])
        assert len(allocator.exp_avg_ipt) == len(controller.allocator.sensitivity)
        theirs = peft_model.peft_config["default"].rank_pattern
        theirs = {k.removesuffix(".default"): v for k, v in theirs.items()} if theirs else None
        assert ours.lorakit_configs["default"].rank_pattern == theirs, step
        patterns.append(theirs)
    assert patterns[0] is None and patterns[1] is not None  # warm-up, then masking on even steps
    final = patterns[-1]
    assert sum(map(sum, final.values())) <= 12 < 24  # pruned to the target budget (ties may prune more)
    assert len({sum(v) for v in final.values()}) > 1  # the budget is shared unevenly by importance
    e = ours.model.layers[0].self_attn.q_proj.lora_E["default"].view(-1)
    pruned = ~torch.tensor(final["model.layers.0.self_attn.q_proj.lora_E"])
    assert torch.all(e[pruned] == 0)


def _trained_pair(tmp_path):
    """Both libraries trained for 6 steps so the rank pattern is final and pruning happened."""
    peft_model, ours = _pair(tinit=1, tfinal=2, deltaT=1, total_step=6)
    controller = AdaLoraController(ours, "default")
    for step in range(1, 7):
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(step))
        _lm_loss(peft_model, ids).backward()
        (_lm_loss(ours, ids) + controller.regularizer(ours)).backward()
        _sgd(peft_model), _sgd(ours)
        peft_model.base_model.update_and_allocate(step)
        controller.step(ours, step)
        peft_model.zero_grad(), ours.zero_grad()
    return peft_model.eval(), ours.eval()


def test_peft_loads_our_pruned_adapter_and_we_load_peft(tmp_path):
    peft_model, ours = _trained_pair(tmp_path)
    ids = sample_ids()
    save_adalora(ours, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and "r" not in config
    key = "model.layers.1.self_attn.v_proj"
    kept = sum(pattern[f"{key}.lora_E"])
    assert tensors[f"base_model.model.{key}.lora_A"].shape == (kept, 32)  # trimmed as PEFT saves
    assert tensors[f"base_model.model.{key}.lora_B"].shape == (32, kept)
    assert tensors[f"base_model.model.{key}.lora_E"].shape == (kept, 1)
    assert not any(k.endswith(".weight") for k in tensors) and len(tensors) == 6 * 3
    # PEFT's own file for its own run has the same keys, shapes and pattern layout.
    peft_model.save_pretrained(tmp_path / "peft")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(peft_tensors) == sorted(tensors)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(peft_config["rank_pattern"]) == sorted(pattern)

    expected = model_output(ours, ids)
    loaded_by_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(model_output(loaded_by_peft, ids), expected, atol=1e-6, rtol=0)
    loaded_by_us = load_adalora(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(model_output(loaded_by_us, ids), expected, atol=1e-6, rtol=0)
    assert loaded_by_us.get_submodule(key).r["default"] == kept
    assert loaded_by_us.get_submodule(key).ranknum["default"] == 4  # the scale keeps dividing by init_r

    # A training checkpoint keeps every component (untrimmed) and comes back exactly, by its peft_type.
    save_variant(ours, tmp_path / "checkpoint", trim=False)
    resumed = load_variant(tiny_llama(), tmp_path / "checkpoint", is_trainable=True)
    state, resumed_state = checkpoint_state_dict(ours), checkpoint_state_dict(resumed)
    assert all(torch.equal(resumed_state[k], v) for k, v in state.items()) and len(state) == len(
        resumed_state
    )
    assert (
        resumed.get_submodule(key).r["default"] == 4
        and resumed.lorakit_configs["default"].rank_pattern == pattern
    )

    theirs = model_output(peft_model, ids)
    ours_from_peft = load_adalora(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(model_output(ours_from_peft, ids), theirs, atol=1e-6, rtol=0)
    assert (theirs - model_output(tiny_llama(), ids)).abs().max() > 1e-3


def test_modules_to_save_head_round_trips_through_peft(tmp_path):
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = wrap_adalora(tiny_llama(), config)
    head = model.lm_head.modules_to_save["default"].weight
    assert head.requires_grad
    with torch.no_grad():
        head.mul_(1.5)
        model.model.layers[0].self_attn.q_proj.lora_E["default"].fill_(1.0)
    save_adalora(model, tmp_path)
    ids = sample_ids()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(model_output(loaded, ids), model_output(model, ids), atol=1e-6, rtol=0)


def test_merge_equals_unmerged_and_unload_gives_plain_model():
    _, model = _pair()
    model.eval()
    ids = sample_ids()
    expected = model_output(model, ids)
    base_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    merge_variants(model)
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)
    unmerge_variants(model)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight, atol=1e-6, rtol=0
    )
    plain = merge_and_unload_variants(model)
    assert not any(isinstance(m, AdapterLinear) for m in plain.modules())
    torch.testing.assert_close(model_output(plain, ids), expected, atol=1e-5, rtol=0)


def test_4bit_base_forward_backward_and_exact_merge():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.q_proj = Linear4bit.from_linear(layer.self_attn.q_proj, compute_dtype=torch.float32)
    wrap_adalora(model, AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2, total_step=5))
    assert all(isinstance(layer.base_layer, Linear4bit) for _, layer in variant_layers(model))
    with torch.no_grad():
        for _, layer in variant_layers(model):
            layer.lora_E["default"].normal_()
    ids = sample_ids()
    model.train()
    controller = AdaLoraController(model)
    loss = _lm_loss(model, ids) + controller.regularizer(model)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    assert len(grads) == 6 and all(
        g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads
    )
    controller.step(model, 1)
    model.eval()
    expected = model_output(model, ids)
    plain = merge_and_unload_variants(copy.deepcopy(model))
    assert isinstance(plain.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(model_output(plain, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_r=13), "target_r"),
        (dict(total_step=0), "total_step"),
        (dict(tinit=5, tfinal=5, total_step=10), "budget phase"),
        (dict(beta1=1.0), "beta1"),
        (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
        (dict(target_modules=5), "AdaLoraConfig.target_modules"),
        (dict(rank_pattern={"x.lora_E": [1, 0]}), "rank_pattern"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AdaLoraConfig(**kwargs)


def test_controller_needs_total_step():
    model = wrap_adalora(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoraController(model)
    controller = AdaLoraController(model, total_step=7)
    assert model.lorakit_configs["default"].total_step == 7 and controller.allocator.init_budget == 24
