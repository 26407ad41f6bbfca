"""int8 adapter files: format, transparent loading, logit deviation from fp32, file size, decompress for PEFT.

``pytest tests/test_compress.py -k measured -s`` prints the size ratio and logit deviation quoted in
docs/adapters.md.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.compress import (
    FORMAT,
    compress,
    decompress,
    dequantize_rows,
    quantize_rows,
    read_int8_weights,
    save_adapter_int8,
)
from lorakit.errors import AdapterFileError
from lorakit.inject import lora_layers
from lorakit.io import INT8_WEIGHTS_NAME, WEIGHTS_NAME

from tiny_models import BUILDERS, model_output, sample_ids


def _shrink_b(model, factor: float = 0.25) -> None:
    """Random A and B (``init_lora_weights=False``) with B scaled down: an adapter that moves the logits by about
    half their range, like a strong fine-tune (unscaled random factors move them by more than their range)."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_B:
                layer.lora_B[name].weight.mul_(factor)


def _adapted(arch="llama", **config):
    model = BUILDERS[arch]()
    lorakit.wrap(model, lorakit.LoraConfig(init_lora_weights=False, **{"r": 8, "lora_alpha": 16, **config}))
    _shrink_b(model)
    return model


def _deviation(ours: torch.Tensor, reference: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    """Max abs logit difference, relative to the logit range and to the adapter's own effect on the logits."""
    diff = (ours - reference).abs().max().item()
    return {
        "max_abs": diff,
        "rel_range": diff / (reference.max() - reference.min()).item(),
        "rel_effect": diff / (reference - base).abs().max().item(),
    }


def test_rows_round_trip_within_half_a_step():
    weight = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different sizes
    weight[2] = 0
    codes, scale = quantize_rows(weight)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert codes.abs().max() == 127 and codes[2].eq(0).all() and scale[2] == 0
    error = (dequantize_rows(codes, scale) - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-12).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_adapter_loads_transparently_with_small_logit_deviation(arch, tmp_path):
    ids = sample_ids()
    model = _adapted(arch, target_modules="all-linear")
    reference = model_output(model, ids)
    with lorakit.disable_adapters(model):
        base = model_output(model, ids)
    save_adapter_int8(model, tmp_path)

    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lorakit_compression"] == FORMAT
    with safe_open(str(tmp_path / INT8_WEIGHTS_NAME), framework="pt") as handle:
        assert handle.metadata()["lorakit_compression"] == FORMAT
    stored = load_file(tmp_path / INT8_WEIGHTS_NAME)
    key = next(k for k in stored if k.endswith("lora_B.weight"))
    assert stored[key].dtype == torch.int8 and stored[key + ".scale"].shape == (stored[key].shape[0],)

    loaded = model_output(lorakit.load_adapter(BUILDERS[arch](), tmp_path), ids)
    deviation = _deviation(loaded, reference, base)
    assert deviation["rel_range"] < 1e-2 and deviation["rel_effect"] < 1e-2, deviation
    assert deviation["max_abs"] > 0  # it really went through int8


def test_measured_size_ratio_and_logit_deviation(tmp_path):
    """A 1024-wide 2-layer Llama, r=16 on all linear layers: the numbers in docs/adapters.md."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    lorakit.wrap(
        model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    _shrink_b(model)
    ids = sample_ids()
    reference = model_output(model, ids)
    with lorakit.disable_adapters(model):
        base = model_output(model, ids)
    lorakit.save_adapter(model, tmp_path / "fp32")
    save_adapter_int8(model, tmp_path / "int8")
    ratio = (tmp_path / "fp32" / WEIGHTS_NAME).stat().st_size / (
        tmp_path / "int8" / INT8_WEIGHTS_NAME
    ).stat().st_size
    lorakit.load_adapter(model, tmp_path / "int8", adapter_name="int8")
    deviation = _deviation(model_output(model, ids), reference, base)
    print(f"\nint8 adapter: file size ratio fp32/int8 = {ratio:.2f}; logit deviation {deviation}")
    # Per-row scales cost 4 bytes per row of A and of B: 4·r·(in+out) / (r·(in+out) + 4·(r+out)) ≈ 3.5 here.
    assert 3.3 < ratio < 4.0
    assert deviation["rel_range"] < 1e-2 and deviation["rel_effect"] < 1e-2, deviation


def test_decompress_gives_a_peft_adapter_with_the_int8_logits(tmp_path):
    ids = sample_ids()
    save_adapter_int8(_adapted(target_modules="all-linear"), tmp_path / "int8")
    int8 = model_output(lorakit.load_adapter(BUILDERS["llama"](), tmp_path / "int8"), ids)
    decompress(tmp_path / "int8", tmp_path / "plain")

    assert "lorakit_compression" not in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    theirs = model_output(peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "plain").eval(), ids)
    torch.testing.assert_close(theirs, int8, atol=1e-5, rtol=0)
    # PEFT never reads the int8 directory as weights: it finds no adapter_model.safetensors and refuses.
    with pytest.raises(ValueError):
        peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "int8")


def test_compress_a_directory_equals_saving_from_the_model(tmp_path):
    model = _adapted(target_modules="attention")
    lorakit.save_adapter(model, tmp_path / "plain")
    save_adapter_int8(model, tmp_path / "from_model")
    compress(tmp_path / "plain", tmp_path / "from_dir")
    ours, theirs = (
        load_file(tmp_path / "from_model" / INT8_WEIGHTS_NAME),
        load_file(tmp_path / "from_dir" / INT8_WEIGHTS_NAME),
    )
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dora_magnitude_and_modules_to_save_stay_fp32(tmp_path):
    model = _adapted(target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"])
    save_adapter_int8(model, tmp_path)
    stored = load_file(tmp_path / INT8_WEIGHTS_NAME)
    assert stored["base_model.model.lm_head.weight"].dtype == torch.float32
    magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    torch.testing.assert_close(stored[magnitude], read_int8_weights(tmp_path)[magnitude], atol=0, rtol=0)
    loaded = lorakit.load_adapter(BUILDERS["llama"](), tmp_path)
    original = model.get_submodule("model.layers.0.self_attn.q_proj").lora_magnitude_vector["default"].weight
    again = loaded.get_submodule("model.layers.0.self_attn.q_proj").lora_magnitude_vector["default"].weight
    assert torch.equal(original, again)


def test_errors_name_the_file(tmp_path):
    model = _adapted()
    lorakit.save_adapter(model, tmp_path / "plain")
    with pytest.raises(AdapterFileError, match="would be ambiguous"):
        save_adapter_int8(model, tmp_path / "plain")
    with pytest.raises(lorakit.ConfigError, match="no adapter named 'other'"):
        save_adapter_int8(model, tmp_path / "x", adapter_name="other")

    save_adapter_int8(model, tmp_path / "int8")
    file = tmp_path / "int8" / INT8_WEIGHTS_NAME
    tensors = load_file(file)
    save_file(tensors, file, metadata={"format": "pt"})  # the format marker is gone
    with pytest.raises(AdapterFileError, match="lorakit_compression=None, expected 'int8-rowwise-v1'"):
        lorakit.load_adapter(BUILDERS["llama"](), tmp_path / "int8")
    key = next(k for k in tensors if k.endswith(".scale"))
    del tensors[key]
    save_file(tensors, file, metadata={"format": "pt", "lorakit_compression": FORMAT})
    with pytest.raises(AdapterFileError, match=r"needs '.*\.scale'"):
        lorakit.load_adapter(BUILDERS["llama"](), tmp_path / "int8")
    file.write_bytes(b"not safetensors")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.int8\.safetensors is corrupt"):
        lorakit.load_adapter(BUILDERS["llama"](), tmp_path / "int8")
