"""Mixed-adapter batches: every row's output equals running its adapter alone."""

from __future__ import annotations

import pytest
import torch

import lorakit

from tiny_models import BUILDERS, sample_ids

NAMES = ["a", "__base__", "c", "b", "a"]


def _three_adapters(arch: str):
    model = BUILDERS[arch]()
    for i, name in enumerate("abc"):
        cfg = lorakit.LoraConfig(
            r=2 + 2 * i, lora_alpha=4 + i, target_modules="all-linear", init_lora_weights=False
        )
        lorakit.wrap(model, cfg, adapter_name=name)
    return model


def _alone(model, name, fn):
    if name == "__base__":
        with lorakit.disable_adapters(model):
            return fn()
    lorakit.set_adapter(model, name)
    return fn()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_mixed_forward_equals_each_adapter_alone(arch):
    model = _three_adapters(arch)
    ids = sample_ids(batch=len(NAMES), length=8)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            alone = _alone(model, name, lambda row=row: model(input_ids=ids[row : row + 1]).logits)
            torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)
    # outside the call nothing is left behind
    assert all(layer.row_adapters is None for _, layer in lorakit.inject.lora_layers(model))


def test_mixed_generate_equals_each_adapter_alone():
    model = _three_adapters("llama")
    ids = sample_ids(batch=len(NAMES), length=6)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, adapter_names=NAMES, pad_token_id=0)
    for row, name in enumerate(NAMES):
        alone = _alone(
            model, name,
            lambda row=row: model.generate(ids[row : row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0),
        )  # fmt: skip
        assert torch.equal(out[row], alone[0])


def test_mixed_batch_matches_peft_adapter_names(tmp_path):
    import peft

    model = _three_adapters("llama")
    for name in "abc":
        lorakit.save_adapter(model, tmp_path / name, adapter_name=name)
    peft_model = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.load_adapter(tmp_path / "c", adapter_name="c")
    ids = sample_ids(batch=len(NAMES), length=8)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, adapter_names=NAMES).logits
        ours = model(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_mixed_batch_errors():
    model = _three_adapters("llama")
    ids = sample_ids(batch=2, length=4)
    with pytest.raises(lorakit.ConfigError, match=r"unknown adapter\(s\) \['zzz'\]"):
        model(input_ids=ids, adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="one name per row"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    lorakit.merge(model)
    with pytest.raises(lorakit.ConfigError, match="unmerge"):
        model(input_ids=ids, adapter_names=["a", "b"])
