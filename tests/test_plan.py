"""lorakit plan: parameter counts (PEFT), the QLoRA paper's arithmetic, the activation count (autograd's saved
tensors), fits / suggestions, the CLI, bad input, and one real peak-memory measurement."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.plan import (
    ModelShape,
    PlanConfig,
    layer_activation_bytes,
    parse_size,
    plan_memory,
    quantized_bits_per_parameter,
)
from lorakit.presets import PRESETS, preset_config

ROOT = Path(__file__).resolve().parents[1]


def _meta_model(preset: str, layers: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in preset_config(preset).items() if not k.startswith("_")}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "preset, r, target, layers",
    [
        ("llama-2-7b", 16, "all", None),  # the whole model
        ("mistral-7b", 8, "attention", 2),  # the others with 2 of their decoder layers, for speed
        ("qwen2.5-7b", 64, "all", 2),
        ("llama-3-8b", 4, "mlp", 2),
        ("qwen2.5-72b", 16, "minimal", 2),
    ],
)
def test_trainable_and_total_counts_equal_peft(preset, r, target, layers):
    from peft import LoraConfig, get_peft_model

    from lorakit.plan import TARGETS

    model = _meta_model(preset, layers)
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=list(TARGETS[target])))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    shape = ModelShape.resolve(preset)
    if layers is not None:
        shape = dataclasses.replace(shape, num_layers=layers)
    plan = plan_memory(shape, method="lora", r=r, target=target)
    assert plan.trainable_params == trainable
    assert plan.total_params == total


def test_llama2_7b_r16_all_projections_is_peft_number():
    assert plan_memory("llama-2-7b", method="qlora", r=16, target="all").trainable_params == 39_976_960


def test_qlora_paper_arithmetic():
    # NF4 + double quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (QLoRA §3)
    assert quantized_bits_per_parameter(8192 * 22016) == pytest.approx(4.127, abs=5e-4)
    assert quantized_bits_per_parameter(8192 * 22016, double_quant=False) == pytest.approx(4.5, abs=1e-6)
    plan = plan_memory("llama-65b", method="qlora", r=64, batch_size=1, seq_len=512,
                       optimizer="paged_adamw_8bit", gradient_checkpointing=True, gpu_memory="48GB")  # fmt: skip
    four_bit = plan.component("base weights, 4-bit (nf4)") + plan.component("quantization constants")
    # "65B parameters at 4.127 bits take about 33.5 GB": the 64.8B decoder weights lorakit quantizes take 33.4 GB;
    # the whole model at 4.127 bits would take 33.7 GB (lorakit keeps embeddings and head in bf16: +1.05 GB).
    assert 33.3e9 < four_bit < 33.5e9
    assert plan.total_params * 4.127 / 8 == pytest.approx(33.5e9, rel=0.01)
    assert plan.fits  # a 65B QLoRA fine-tune fits a 48 GB GPU
    assert plan.peak_bytes < 48e9


def _saved_bytes_per_layer(method: str, dropout: float, kv_heads: int) -> tuple[dict[int, float], ModelShape]:
    """Bytes per token that autograd saves in each decoder layer of a tiny Llama (bf16, bf16 autocast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.quant import Linear4bit
    from lorakit.quantize import quantizable_paths
    from lorakit.walk import set_submodule

    torch.manual_seed(0)
    fields = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=kv_heads, vocab_size=512)  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.bfloat16)
    if method == "qlora":
        for path in quantizable_paths(model, set()):
            set_submodule(model, path, Linear4bit.from_linear(model.get_submodule(path)))
    if method == "full":
        model.requires_grad_(True)
    else:
        lorakit.wrap(model, lorakit.LoraConfig(r=8, target_modules="all", lora_dropout=dropout))
    model.train()
    current = [-1]
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=index: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1))
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple[int, int]] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in own and key not in seen:
            seen[key] = (current[0], t.untyped_storage().nbytes())
        return t

    B, T = 2, 64
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        model.model(input_ids=torch.randint(0, 512, (B, T)), use_cache=False)
    per_layer: dict[int, float] = {}
    for layer, nbytes in seen.values():
        per_layer[layer] = per_layer.get(layer, 0) + nbytes
    shape = ModelShape.from_config({**fields, "model_type": "llama"})
    # RoPE cos/sin belong to no layer here; per token per layer, with the adapters' bf16 weight casts (a per-step
    # constant the planner counts separately as "autocast weight copies") taken out
    casts = 0 if method == "full" else 2 * plan_memory(shape, method="lora", r=8).trainable_params // 3
    return {k: (v - casts) / (B * T) for k, v in per_layer.items() if k >= 0}, shape


@pytest.mark.parametrize(
    "method, dropout, kv_heads",
    [("full", 0.0, 4), ("full", 0.0, 2), ("lora", 0.0, 4), ("lora", 0.05, 2), ("qlora", 0.05, 4)],
)
def test_activation_count_equals_autograd_saved_tensors(method, dropout, kv_heads):
    measured, shape = _saved_bytes_per_layer(method, dropout, kv_heads)
    kwargs = dict(method=method, r=8) if method == "full" else dict(method=method, r=8, lora_dropout=dropout)
    config = PlanConfig(**kwargs)
    assert measured[1] == pytest.approx(layer_activation_bytes(shape, config), abs=0.5)
    assert measured[2] == pytest.approx(layer_activation_bytes(shape, config), abs=0.5)
    rope = 2 * 64 * shape.head_width * 2 / (2 * 64)  # cos / sin [T, head_dim] bf16, first saved in layer 0
    first = layer_activation_bytes(shape, config, first=method != "full")
    # lorakit's LoraProduct keeps its factors' bf16 casts in layer 0 too (the module path dropped q/k/v's there)
    assert measured[0] == pytest.approx(first + rope, abs=0.5)


def test_fits_and_suggestions():
    base = dict(method="qlora", r=16, batch_size=6, seq_len=512)  # batch 4 fits since LoraProduct saves less
    plan = plan_memory("llama-2-7b", gpu_memory="24GB", **base)
    assert plan.fits is False
    text = " ".join(plan.suggestions)
    assert "--gradient-checkpointing" in text and "--batch" in text
    ckpt = plan_memory("llama-2-7b", gpu_memory="24GB", gradient_checkpointing=True, **base)
    assert ckpt.fits and not ckpt.suggestions
    assert plan_memory("llama-2-7b", **base).fits is None
    full = plan_memory("llama-2-7b", method="full", batch_size=1, gpu_memory="24GB")
    assert not full.fits and any("--method qlora" in s for s in full.suggestions)
    hopeless = plan_memory("llama-3-70b", method="full", gpu_memory="8GB")
    assert hopeless.suggestions and hopeless.suggestions[0].startswith("does not fit even with")


def test_components_and_peak_phases():
    lora = plan_memory("mistral-7b", method="lora", r=16, optimizer="adamw")
    assert lora.component("base weights (bfloat16)") == lora.total_params * 2
    assert lora.component("gradients") == lora.trainable_params * 4
    assert lora.component("optimizer states") == lora.trainable_params * 8
    assert lora.peak_bytes == lora.phase_bytes("always") + max(lora.phase_bytes("forward/backward"),
                                                               lora.phase_bytes("step"))  # fmt: skip
    eight = plan_memory("mistral-7b", method="lora", r=16, optimizer="adamw_8bit")
    assert eight.component("optimizer states") < lora.component("optimizer states") / 3.5
    paged = plan_memory("mistral-7b", method="lora", r=16, optimizer="paged_adamw_8bit")
    assert paged.component("optimizer states (host, paged)") > 0  # off the GPU
    ckpt = plan_memory("mistral-7b", method="lora", r=16, gradient_checkpointing=True)
    assert ckpt.component("activations") < lora.component("activations") / 5
    unchunked = plan_memory("mistral-7b", method="lora", r=16, chunked_loss=False, batch_size=8)
    assert unchunked.component("logits / loss") == 8 * 511 * 32000 * 12
    cpu = plan_memory("mistral-7b", method="qlora", device="cpu")
    assert cpu.component("dequantization buffer") == 4096 * 14336 * 2
    assert (
        "lean_cpu_heap" in cpu.table()
        and "lean_cpu_heap" not in plan_memory("mistral-7b", method="qlora").table()
    )


def test_bad_input_messages():
    with pytest.raises(ConfigError, match=r"known presets: .*llama-2-7b"):
        plan_memory("llama-9b")
    with pytest.raises(ConfigError, match="r <= min"):
        plan_memory("llama-2-7b", r=5000)
    with pytest.raises(ConfigError, match="seq_len"):
        plan_memory("llama-2-7b", seq_len=0)
    with pytest.raises(ConfigError, match="unknown module 'foo'"):
        plan_memory("llama-2-7b", target="q_proj,foo")
    with pytest.raises(ConfigError, match="4-bit weights cannot be trained"):
        plan_memory("llama-2-7b", method="full", quant_type="nf4")
    with pytest.raises(ConfigError, match="method"):
        plan_memory("llama-2-7b", method="dora")
    with pytest.raises(ConfigError, match="24GB"):
        parse_size("lots")
    assert parse_size("24GB") == 24 * 10**9 and parse_size("24GiB") == 24 * 2**30


def test_config_dir_and_file(tmp_path):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    by_dir = plan_memory(tmp_path, method="lora", r=4)
    by_file = plan_memory(tmp_path / "config.json", method="lora", r=4)
    assert by_dir.peak_bytes == by_file.peak_bytes
    # per layer: q, o 4 x (64 + 64); k, v 4 x (64 + 32); gate, up, down 4 x (64 + 176); 2 layers
    assert by_dir.trainable_params == 2 * (2 * 4 * 128 + 2 * 4 * 96 + 3 * 4 * 240) == 9344
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": None}))
    with pytest.raises(ConfigError, match="hidden_size"):
        plan_memory(tmp_path)


def test_presets_are_complete():
    assert {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b",
            "qwen2.5-72b"} <= set(PRESETS)  # fmt: skip
    sizes = {name: ModelShape.resolve(name).num_parameters() / 1e9 for name in PRESETS}
    assert sizes["llama-2-7b"] == pytest.approx(6.74, abs=0.01)
    assert sizes["llama-3-8b"] == pytest.approx(8.03, abs=0.01)
    assert sizes["qwen2.5-72b"] == pytest.approx(72.7, abs=0.1)
    assert ModelShape.resolve("Llama2-7B") == ModelShape.resolve("llama-2-7b")


def test_cli_plan(capsys):
    code = main(
        ["plan", "--model", "llama-2-7b", "--method", "qlora", "--gpu-memory", "24GB", "--batch", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0
    for word in ("base weights, 4-bit (nf4)", "quantization constants", "adapters (fp32)", "gradients",
                 "optimizer states", "activations", "logits / loss", "peak", "fits"):  # fmt: skip
        assert word in out
    assert main(["plan", "--model", "llama-2-7b", "--method", "lora", "--gpu-memory", "16GB"]) == 1
    assert "--gradient-checkpointing" in capsys.readouterr().out
    assert main(["plan", "--model", "mistral-7b", "--method", "full", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable_params"] == data["total_params"] and data["peak_bytes"] > 0
    assert main(["plan", "--model", "nope"]) == 2
    assert "known presets" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--seq", "0"]) == 2


@pytest.mark.slow  # ~15 s alone, minutes on a loaded 2-core machine; the benchmark covers larger models
def test_measured_peak_of_a_small_lora_step(tmp_path):
    """One real measurement: a 45M-parameter Llama, LoRA, in a subprocess; the peak RSS of the training steps
    agrees with the plan within 15% (benchmarks/plan_validation.py does this for larger models)."""
    fields = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000)  # fmt: skip
    code = (
        "import sys, json, torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
        "m = LlamaForCausalLM._from_config(LlamaConfig(**json.loads(sys.argv[1])), dtype=torch.bfloat16)\n"
        "m.save_pretrained(sys.argv[2])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(fields), str(tmp_path)], check=True, capture_output=True
    )
    spec = dict(dir=str(tmp_path), method="lora", r=16, target="all", batch_size=2, seq_len=256,
                optimizer="adamw", gradient_checkpointing=False, lora_dropout=0.05, chunked_loss=True)  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"
    }  # the worker sets it as train does
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_validation.py"), "--worker",
                             json.dumps(spec)], capture_output=True, text=True, env=env, check=True)  # fmt: skip
    measured = json.loads(result.stdout.strip().splitlines()[-1])["step_peak"]
    fields_plan = {k: spec[k] for k in spec if k not in ("dir",)}
    predicted = plan_memory(tmp_path, device="cpu", **fields_plan).peak_bytes
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_per_device_plan_on_several_gpus():
    """``--gpus N``: ddp adds the all-reduce bucket (the adapter's gradients in fp32) and nothing else, the
    micro-batch per device is unchanged; fsdp divides parameters, gradients and optimizer states by N, keeps
    4-bit weights whole and adds the gathered layers."""
    one = plan_memory("llama-2-13b", method="lora")
    ddp = plan_memory("llama-2-13b", method="lora", gpus=4)
    assert ddp.component("gradient all-reduce bucket") == one.component("gradients") == 4 * one.trainable_params
    assert ddp.component("activations") == one.component("activations")
    fsdp = plan_memory("llama-2-13b", method="lora", gpus=4, strategy="fsdp")
    for name in ("base weights (bfloat16)", "adapters (fp32)", "optimizer states", "gradients"):
        assert fsdp.component(name) == pytest.approx(one.component(name) / 4, abs=1)
    assert fsdp.component("FSDP gathered parameters") > 0 and fsdp.peak_bytes < ddp.peak_bytes
    qlora = plan_memory("llama-2-7b", method="qlora", gpus=2, strategy="fsdp")
    assert qlora.component("base weights, 4-bit (nf4)") == plan_memory("llama-2-7b").component(
        "base weights, 4-bit (nf4)"
    )
    tight = plan_memory("llama-2-13b", method="lora", gpus=4, gpu_memory="48GB")
    assert any("--strategy fsdp" in s for s in tight.suggestions)
    with pytest.raises(ConfigError, match="strategy: expected ddp / fsdp"):
        plan_memory("llama-2-7b", strategy="zero3")
