"""Parity with the real peft package: file format, logits and parameter counts, per architecture."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit

from tiny_models import BUILDERS, model_output, sample_ids

ARCHS = ["llama", "qwen2", "gpt2", "bert"]
CONFIGS = {
    "all-linear": dict(target_modules="all-linear"),
    "attention-rslora": dict(target_modules="attention", use_rslora=True),
    "minimal-rank-pattern": dict(
        target_modules="minimal", rank_pattern={"v_proj": 2, "value": 2, "c_attn": 6}
    ),
}


def _randomize_adapter(model: torch.nn.Module) -> None:
    """Give B non-zero values so the adapter changes the output (B starts at zero)."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_peft_loads_lorakit_adapter_with_same_logits(arch, case, tmp_path):
    ids = sample_ids()
    model = BUILDERS[arch]()
    lorakit.wrap(model, lorakit.LoraConfig(r=4, lora_alpha=8, **CONFIGS[case]))
    _randomize_adapter(model)
    ours = model_output(model, ids)
    lorakit.save_adapter(model, tmp_path)

    peft_model = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    theirs = model_output(peft_model, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # The adapter really does something (the comparison is not base == base).
    with lorakit.disable_adapters(model):
        assert (model_output(model, ids) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_lorakit_loads_peft_adapter_with_same_logits(arch, tmp_path):
    ids = sample_ids()
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = peft.get_peft_model(BUILDERS[arch](), peft_cfg).eval()
    theirs = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path)

    model = lorakit.load_adapter(BUILDERS[arch](), tmp_path)
    torch.testing.assert_close(model_output(model, ids), theirs, atol=1e-5, rtol=0)


def test_saved_file_uses_peft_key_names_and_config(tmp_path):
    model = BUILDERS["llama"]()
    lorakit.wrap(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
        for i in range(2)
        for p in ("q_proj", "v_proj")
        for ab in "AB"
    )
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 8)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    # PEFT's own config class accepts every key we write.
    peft.LoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", ["all-linear", "minimal", "attention", "all"])
def test_trainable_counts_equal_peft(arch, target):
    ours = lorakit.wrap(BUILDERS[arch](), lorakit.LoraConfig(r=4, target_modules=target))
    resolved = lorakit.inject.adapter_configs(ours)["default"].target_modules
    theirs = peft.get_peft_model(BUILDERS[arch](), peft.LoraConfig(r=4, target_modules=resolved))
    assert lorakit.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert lorakit.trainable_parameters(ours)[0] > 0


def test_print_trainable_parameters_is_peft_line(capsys):
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.print_trainable_parameters(model)
    ours = capsys.readouterr().out
    peft_model = peft.get_peft_model(
        BUILDERS["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    peft_model.print_trainable_parameters()
    assert ours == capsys.readouterr().out
    assert ours.startswith("trainable params: 1,024 || all params: ")


def test_llama2_7b_shape_on_meta_device():
    """r=16 on all seven projections of Llama-2-7B: 39,976,960 trainable parameters, without memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lorakit.wrap(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 39_976_960
    assert total == 6_738_415_616 + trainable


def test_modules_to_save_round_trip_with_peft(tmp_path):
    ids = sample_ids()
    model = BUILDERS["llama"]()
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _randomize_adapter(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ours = model_output(model, ids)
    lorakit.save_adapter(model, tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    theirs = model_output(peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path), ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    back = model_output(lorakit.load_adapter(BUILDERS["llama"](), tmp_path), ids)
    torch.testing.assert_close(back, ours, atol=1e-5, rtol=0)
