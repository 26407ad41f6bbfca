"""DoRA: the math against an explicit reference, parity with PEFT's use_dora, merge, 4-bit bases, mixed batches."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters import dora
from lorakit.adapters.lora import LoraLinear
from lorakit.quant import Linear4bit
from lorakit.train import train
from train_fixtures import make_workspace, tiny_recipe

from tiny_models import BUILDERS, model_output, sample_ids


def _randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every adapter weight away from its init (B = 0 would hide most of the math)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def _dora_layer(base: nn.Module, r: int = 4, scaling: float = 2.0) -> LoraLinear:
    layer = LoraLinear(base.requires_grad_(False))
    layer.add_adapter("d", r=r, lora_alpha=r * scaling, scaling=scaling, use_dora=True)
    layer.active_adapters = ["d"]
    _randomize(layer)
    return layer


def _reference_output(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W'ᵀ + b`` with ``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖`` formed explicitly (norm detached, §4.3)."""
    lora_a, lora_b = layer.lora_A["d"].weight, layer.lora_B["d"].weight
    weight = layer.base_weight_rows().float()  # [out, in]
    merged = weight + layer.scaling["d"] * (lora_b @ lora_a)
    norm = torch.linalg.vector_norm(merged, dim=1).detach()
    new_weight = (layer.lora_magnitude_vector["d"].weight / norm)[:, None] * merged
    return F.linear(x, new_weight, getattr(layer.base_layer, "bias", None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_norm_equals_reference(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator).to(dtype)
    lora_a, lora_b = torch.randn(6, 40, generator=generator), torch.randn(48, 6, generator=generator)
    for scaling in (0.5, 2.0):
        expected = dora.weight_norm_reference(weight, lora_a, lora_b, scaling)
        torch.testing.assert_close(
            dora.weight_norm(weight, lora_a, lora_b, scaling), expected, rtol=1e-5, atol=1e-5
        )
        cached = dora.row_sq_norm(weight)
        torch.testing.assert_close(
            dora.weight_norm(weight.T.contiguous().T, lora_a, lora_b, scaling, cached),
            expected,
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "conv1d"])
def test_forward_and_gradients_equal_explicit_reference(kind):
    base = Conv1D(24, 16) if kind == "conv1d" else nn.Linear(16, 24, bias=kind == "linear")
    layer = _dora_layer(base)
    x = torch.randn(3, 5, 16)
    out = layer(x)
    expected = _reference_output(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    params = [layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.lora_magnitude_vector["d"].weight]
    ours = torch.autograd.grad(out, params, grad)
    theirs = torch.autograd.grad(expected, params, grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The fused forward (k·s folded into B) equals the plain formula.
    with torch.no_grad():
        hidden = layer.lora_A["d"](x)
        result = layer.base_layer(x)
        k, b = layer.dora_scale("d"), layer._bias()
        fused = dora.dora_forward(result, hidden, layer.lora_B["d"].weight, k, 2.0, b)
        torch.testing.assert_close(fused, dora.dora_output(result, layer.lora_B["d"](hidden), k, 2.0, b))


def test_magnitude_starts_at_row_norms_and_output_is_unchanged():
    base = nn.Linear(16, 24)
    layer = LoraLinear(base.requires_grad_(False))
    layer.add_adapter("d", r=4, lora_alpha=8, scaling=2.0, use_dora=True)
    layer.active_adapters = ["d"]
    torch.testing.assert_close(layer.lora_magnitude_vector["d"].weight, base.weight.norm(dim=1))
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_our_dora_adapter_and_we_load_peft_s(arch, tmp_path):
    ids = sample_ids()
    model = lorakit.wrap(
        BUILDERS[arch](), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    )
    _randomize(model)
    ours = model_output(model, ids)
    lorakit.save_adapter(model, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if "magnitude" in k]
    assert magnitudes and all(k.endswith(".lora_magnitude_vector") for k in magnitudes)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True

    peft_model = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours").eval()
    assert sorted(n for n, _ in peft_model.named_parameters() if "magnitude" in n) == sorted(
        f"base_model.model.{n}" for n, _ in model.named_parameters() if "magnitude" in n
    )
    torch.testing.assert_close(model_output(peft_model, ids), ours, atol=1e-5, rtol=0)
    trainable = peft.get_peft_model(
        BUILDERS[arch](), peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True)
    )
    assert lorakit.trainable_parameters(model) == trainable.get_nb_trainable_parameters()
    with lorakit.disable_adapters(model):
        assert (model_output(model, ids) - ours).abs().max() > 1e-3  # the adapter does something

    peft_model = peft.get_peft_model(
        BUILDERS[arch](),
        peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False),
    ).eval()
    _randomize(peft_model, seed=1)
    theirs = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = lorakit.load_adapter(BUILDERS[arch](), tmp_path / "theirs")
    torch.testing.assert_close(model_output(loaded, ids), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload(arch):
    ids = sample_ids()
    model = lorakit.wrap(
        BUILDERS[arch](), lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=True)
    )
    lorakit.wrap(model, lorakit.LoraConfig(r=2, target_modules="all-linear"), adapter_name="plain")
    lorakit.set_adapter(
        model, ["plain", "default"]
    )  # a LoRA, then a DoRA rescaling it (PEFT's order semantics)
    _randomize(model)
    with torch.no_grad():
        expected = model_output(model, ids)
        lorakit.merge(model)
        torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)
        lorakit.unmerge(model)
        torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)
        with lorakit.disable_adapters(model):
            torch.testing.assert_close(
                model_output(model, ids), model_output(BUILDERS[arch](), ids), atol=1e-5, rtol=0
            )
        merged = lorakit.merge_and_unload(model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(model_output(merged, ids), expected, atol=1e-5, rtol=0)


def test_multi_adapter_order_matches_peft(tmp_path):
    """With a LoRA and a DoRA active, DoRA rescales the running output (PEFT's forward); so do we."""
    ids = sample_ids()
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), adapter_name="d")
    _randomize(model)
    lorakit.set_adapter(model, ["default", "d"])
    lorakit.save_adapter(model, tmp_path / "a", "default")
    lorakit.save_adapter(model, tmp_path / "d", "d")
    peft_model = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "a")
    peft_model.load_adapter(tmp_path / "d", adapter_name="d")
    peft_model.base_model.set_adapter(["default", "d"])
    torch.testing.assert_close(model_output(peft_model, ids), model_output(model, ids), atol=1e-5, rtol=0)


def test_quantized_base_uses_dequantized_weight_and_merges_exactly():
    linear = nn.Linear(64, 32)
    base = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    layer = _dora_layer(base)
    torch.testing.assert_close(layer.base_weight_rows(), base.dequantize(torch.float32))
    x = torch.randn(6, 64)
    out = layer(x)
    torch.testing.assert_close(out, _reference_output(layer, x), atol=1e-5, rtol=1e-5)
    out.sum().backward()  # gradients reach A, B and m through the 4-bit base
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    merged = layer.merged_base_layer(["d"])
    torch.testing.assert_close(merged(x), out, atol=1e-5, rtol=1e-5)


def test_mixed_batch_with_dora_rows_equals_each_adapter_alone():
    model = BUILDERS["gpt2"]()
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=True), adapter_name="a")
    lorakit.wrap(model, lorakit.LoraConfig(r=2, target_modules="all-linear"), adapter_name="b")
    _randomize(model)
    names = ["a", "__base__", "b", "a"]
    ids = sample_ids(batch=len(names), length=6)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with lorakit.disable_adapters(model):
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                lorakit.set_adapter(model, name)
                alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)


def test_norm_cache_follows_weight_changes():
    layer = _dora_layer(nn.Linear(16, 24))
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = layer(x)  # inference: the norm is cached
        layer.lora_B["d"].weight.mul_(2)  # an optimizer step bumps B's version: the cache must not be reused
        torch.testing.assert_close(layer(x), _reference_output(layer, x), atol=1e-5, rtol=1e-5)
        assert (layer(x) - before).abs().max() > 1e-4
    layer.lora_A["d"].weight.data.mul_(2)  # no version bump; training (grad mode) never reads the cache
    torch.testing.assert_close(layer(x), _reference_output(layer, x), atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_adapter_input_only():
    """Our documented choice: the base output is reused, dropout only feeds A (PEFT recomputes the base on it)."""
    layer = LoraLinear(nn.Linear(16, 24).requires_grad_(False))
    layer.add_adapter("d", r=4, lora_alpha=8, scaling=2.0, lora_dropout=0.5, use_dora=True)
    layer.active_adapters = ["d"]
    _randomize(layer)
    layer.train()
    x = torch.randn(5, 16)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout["d"](x)
    with torch.no_grad():
        k = layer.dora_scale("d")
        lora = layer.lora_B["d"](layer.lora_A["d"](dropped))
        expected = dora.dora_output(layer.base_layer(x), lora, k, 2.0, layer.base_layer.bias)
    torch.testing.assert_close(out, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), _reference_output(layer, x), atol=1e-5, rtol=1e-5)


def test_recipe_with_method_dora_trains_and_saves_a_dora_adapter(tmp_path):
    recipe = tiny_recipe(make_workspace(tmp_path), "adapter.method=dora", "train.max_steps=2")
    result = train(recipe, progress=False)
    tensors = load_file(result.output_dir / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert json.loads((result.output_dir / "adapter_config.json").read_text())["use_dora"] is True
