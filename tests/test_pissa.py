"""PiSSA initialization: unchanged output, parity with PEFT's init, QPiSSA (4-bit residual), rank-2r LoRA export."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters import pissa
from lorakit.errors import ConfigError
from lorakit.quant import Linear4bit
from lorakit.train import train
from train_fixtures import make_workspace, tiny_recipe

from tiny_models import BUILDERS, model_output, sample_ids

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _train_a_little(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    """A few real SGD steps, so A and B move away from their PiSSA init."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_unchanged_and_factors_equal_peft_s(arch):
    ids = sample_ids()
    expected = model_output(BUILDERS[arch](), ids)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="pissa")
    model = lorakit.wrap(BUILDERS[arch](), config)
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(
        BUILDERS[arch](),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="pissa"),
    )
    ours = dict(model.named_parameters())
    for name, param in theirs.named_parameters():
        key = name.removeprefix("base_model.model.")
        if "lora_" in name or "base_layer" in name:
            torch.testing.assert_close(ours[key], param, atol=1e-6, rtol=0)


def test_residual_is_what_the_principal_part_leaves():
    model = lorakit.wrap(
        BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    original = BUILDERS["llama"]().model.layers[0].self_attn.q_proj.weight
    layer = model.model.layers[0].self_attn.q_proj
    principal = layer.delta_weight("default")
    torch.testing.assert_close(layer.base_layer.weight + principal, original, atol=1e-6, rtol=0)
    u, s, vh = torch.linalg.svd(original)
    torch.testing.assert_close(principal, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=0)


def test_niter_variant_is_close_to_exact():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    spectrum = 0.7 ** torch.arange(48.0)  # a decaying spectrum, as pretrained weights have
    weight = u[:, :48] @ torch.diag(spectrum) @ v.T  # [64, 48]
    exact_a, exact_b = pissa.pissa_factors(weight, 6, 2.0)
    fast_a, fast_b = pissa.pissa_factors(weight, 6, 2.0, niter=4)
    exact, fast = exact_b @ exact_a, fast_b @ fast_a
    assert (fast - exact).norm() / exact.norm() < 1e-2
    layer = lorakit.wrap(
        nn.Sequential(nn.Linear(48, 64)),
        lorakit.LoraConfig(r=6, target_modules=["0"], init_lora_weights="pissa_niter_4"),
    )[0]
    x = torch.randn(3, 48)
    torch.testing.assert_close(
        layer(x), x @ (layer.base_layer.weight + layer.delta_weight("default")).T + layer.base_layer.bias
    )


def test_converted_adapter_on_original_base_equals_trained_pissa_model(tmp_path):
    ids = sample_ids()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="pissa")
    model = lorakit.wrap(BUILDERS["llama"](), config)
    start = pissa.initial_state(model)
    _train_a_little(model, ids)
    ours = model_output(model, ids)
    pissa.save_as_lora(model, tmp_path / "lora", start)

    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    theirs = model_output(peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "lora"), ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    back = model_output(lorakit.load_adapter(BUILDERS["llama"](), tmp_path / "lora"), ids)
    torch.testing.assert_close(back, ours, atol=1e-4, rtol=0)
    assert (ours - model_output(BUILDERS["llama"](), ids)).abs().max() > 1e-3  # training changed the model

    # The PiSSA adapter itself: loading it on the original base re-runs the (exact) init first, in PEFT and here.
    lorakit.save_adapter(model, tmp_path / "pissa")
    assert (
        json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    )
    theirs = model_output(peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "pissa"), ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    back = model_output(lorakit.load_adapter(BUILDERS["llama"](), tmp_path / "pissa"), ids)
    torch.testing.assert_close(back, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qpissa_quantizes_the_residual_with_less_error(arch):
    config = lorakit.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="pissa")
    model = pissa.pissa_quantize(BUILDERS[arch](), config, compute_dtype=torch.float32)
    original = dict(BUILDERS[arch]().named_modules())
    error_pissa = error_plain = 0.0
    for path, layer in lorakit.inject.lora_layers(model):
        assert isinstance(layer.base_layer, Linear4bit) and not layer.fan_in_fan_out
        weight = original[path].weight.T if arch == "gpt2" else original[path].weight  # [out, in]
        rebuilt = layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
        plain = Linear4bit.from_linear(_linear(weight), compute_dtype=torch.float32)
        error_pissa += (rebuilt - weight).norm().item()
        error_plain += (plain.dequantize(torch.float32) - weight).norm().item()
    assert error_pissa < 0.9 * error_plain
    # every other Linear is 4-bit too (QLoRA layout), the output head is not
    plain_layers = [
        n for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D) and "lora_" not in n
    ]
    assert plain_layers == ["lm_head"]
    ids = sample_ids()
    drift = (model_output(model, ids) - model_output(BUILDERS[arch](), ids)).abs().max()
    assert drift < 0.5  # 4-bit rounding only


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return linear


def test_pissa_on_a_quantized_base_is_refused():
    model = pissa.quantize_model(
        lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    )
    with pytest.raises(ConfigError, match="before quantizing"):
        lorakit.wrap(
            model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"), "p"
        )
    with pytest.raises(ConfigError, match="init_lora_weights"):
        lorakit.LoraConfig(init_lora_weights="pissa_niter_x")


def test_recipe_with_pissa_on_a_4bit_base_trains_and_exports_lora(tmp_path):
    workspace = make_workspace(tmp_path)
    recipe = tiny_recipe(
        workspace, "adapter.init_lora_weights=pissa", "model.quantize=nf4", "train.max_steps=2", "adapter.r=4"
    )
    result = train(recipe, progress=False)
    assert json.loads((result.output_dir / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    exported = json.loads((result.output_dir / "as_lora" / "adapter_config.json").read_text())
    assert (exported["r"], exported["init_lora_weights"]) == (8, True)
    model = lorakit.load_adapter(
        lorakit.load_model(workspace / "model", quantize=None), result.output_dir / "as_lora"
    )
    assert all(layer.r["default"] == 8 for _, layer in lorakit.inject.lora_layers(model))
