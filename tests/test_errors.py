"""Bad input: each error names the problem and the fix."""

from __future__ import annotations

import json
import re

import pytest

import lorakit
from lorakit.methods import METHODS

from tiny_models import BUILDERS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(r=0), "r"),
        (dict(r=-2), "r"),
        (dict(r=2.5), "r"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_alpha=-1), "lora_alpha"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(init_lora_weights="nope"), "init_lora_weights"),
        (dict(bias="all"), "bias"),
        (dict(target_modules=3), "target_modules"),
        (dict(target_modules="(unclosed"), "target_modules"),
        (dict(rank_pattern={"q": 0}), "rank_pattern"),
        (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform"),
    ],
)
def test_invalid_config_fields_name_the_field(kwargs, field):
    with pytest.raises(lorakit.ConfigError, match=rf"LoraConfig\.{field}"):
        lorakit.LoraConfig(**kwargs)


def test_unknown_target_lists_linear_module_names():
    with pytest.raises(lorakit.TargetModuleError) as info:
        lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(target_modules=["q_proj", "qkv"]))
    message = str(info.value)
    assert "'qkv'" in message
    for name in ("q_proj", "k_proj", "gate_proj", "down_proj", "lm_head"):
        assert name in message


def test_regex_matching_nothing_is_an_error():
    with pytest.raises(lorakit.TargetModuleError, match="matches no linear module"):
        lorakit.wrap(BUILDERS["gpt2"](), lorakit.LoraConfig(target_modules=r".*\.nothing"))


def _saved(tmp_path, arch="llama", **cfg):
    model = lorakit.wrap(BUILDERS[arch](), lorakit.LoraConfig(r=4, **cfg))
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def test_adapter_for_other_architecture_names_first_mismatch(tmp_path):
    path = _saved(tmp_path, target_modules=["q_proj"])
    with pytest.raises(lorakit.AdapterMismatchError, match=r"layers\.0\.self_attn\.q_proj"):
        lorakit.load_adapter(BUILDERS["qwen2"]().model.layers[0], path)  # wrong root: paths differ


def test_adapter_shape_mismatch_is_reported(tmp_path):
    path = _saved(tmp_path, target_modules=["q_proj"])
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    )
    with pytest.raises(
        lorakit.AdapterMismatchError, match=r"shape \(4, 32\) but this model expects \(4, 64\)"
    ):
        lorakit.load_adapter(wider, path)
    # The failed load left no half-made adapter behind.
    assert lorakit.inject.adapter_configs(wider) == {}


def test_missing_adapter_files(tmp_path):
    with pytest.raises(lorakit.AdapterFileError, match=r"adapter_config\.json not found"):
        lorakit.load_adapter(BUILDERS["llama"](), tmp_path / "nope")
    path = _saved(tmp_path, target_modules=["q_proj"])
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(lorakit.AdapterFileError, match="never loaded"):
        lorakit.load_adapter(BUILDERS["llama"](), path)


def test_corrupt_adapter_files(tmp_path):
    path = _saved(tmp_path, target_modules=["q_proj"])
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(lorakit.AdapterFileError, match="corrupt"):
        lorakit.load_adapter(BUILDERS["llama"](), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lorakit.AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(BUILDERS["llama"](), path)


def test_missing_tensor_in_file(tmp_path):
    path = _saved(tmp_path, target_modules=["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterMismatchError, match=r"v_proj\.lora_A\.weight' is missing"):
        lorakit.load_adapter(BUILDERS["llama"](), path)


def test_unsupported_peft_features_refused(tmp_path):
    path = _saved(tmp_path, target_modules=["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_bias"] = True
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.ConfigError, match="lora_bias"):
        lorakit.load_adapter(BUILDERS["llama"](), path)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_adapter_type_lorakit_does_not_read_is_named(tmp_path, method):
    path = _saved(tmp_path, target_modules=["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.ConfigError, match=r"peft_type is 'IA3'; lorakit reads LORA ") as err:
        lorakit.load_adapter(BUILDERS["llama"](), path)
    # every method the table holds is listed: its peft_type, then its title among that type's methods
    record = METHODS[method]
    assert re.search(rf"{re.escape(record.peft_type)} \([^)]*{re.escape(record.title)}[,)]", str(err.value))


def test_save_is_atomic_and_keeps_old_files_on_failure(tmp_path, monkeypatch):
    path = _saved(tmp_path, target_modules=["q_proj"])
    before = (path / "adapter_model.safetensors").read_bytes()
    model = lorakit.wrap(BUILDERS["llama"](seed=5), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lorakit.files, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
