"""QLoRA: streaming 4-bit loading, LoRA on 4-bit layers, training, exact merge, memory of the load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.adapters.lora import LoraLinear
from lorakit.errors import AdapterFileError, QuantizationError
from lorakit.quant import Linear4bit

from tiny_models import sample_ids, write_alpaca, write_causal_lm_dir
from tokenizer_factory import build_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    write_causal_lm_dir(root / "model", build_tokenizer(), hidden=64)
    write_alpaca(root / "train.jsonl", 64)
    write_alpaca(root / "val.jsonl", 8, seed=1)
    return root


def _dequantized_reference(model_dir, quantized):
    """transformers' own model with every 4-bit weight replaced by its dequantized fp32 value."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            reference.get_submodule(name).weight.data = module.dequantize(torch.float32)
    return reference


def test_load_quantizes_every_linear_but_the_head(model_dir):
    model = lorakit.load_model(model_dir / "model", quantize="nf4", compute_dtype=torch.bfloat16)
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 14  # 2 layers x 7 projections
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())


def test_loaded_model_equals_dequantized_reference(model_dir):
    model = lorakit.load_model(model_dir / "model", quantize="nf4", compute_dtype=torch.float32)
    reference = _dequantized_reference(model_dir / "model", model)
    ids = sample_ids(batch=2, length=10)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_unquantized_load_equals_transformers(model_dir):
    ours = lorakit.load_model(model_dir / "model", quantize=None, compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir / "model", dtype=torch.float32).eval()
    ids = sample_ids()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=0, rtol=0)


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    model = lorakit.load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    shards[1].unlink()
    with pytest.raises(AdapterFileError, match=rf"{shards[1].name} is missing"):
        lorakit.load_model(tmp_path)


def test_nan_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_causal_lm_dir(tmp_path, build_tokenizer())
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        lorakit.load_model(tmp_path)


def test_lora_on_4bit_layers_backward_and_prepare(model_dir):
    model = lorakit.load_model(model_dir / "model", quantize="nf4")
    lorakit.prepare_for_kbit_training(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, Linear4bit)
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    logical = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    assert total == sum(p.numel() for p in model.parameters()) + logical  # 4-bit weights counted at full size
    model.train()
    ids = sample_ids(batch=2, length=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )


def test_qlora_training_loss_goes_down(model_dir, tmp_path):
    from lorakit.recipe import apply_overrides, recipe_from_dict
    from lorakit.train import train

    recipe = recipe_from_dict(apply_overrides({}, [
        f"model.path={model_dir / 'model'}", "model.quantize=nf4", "model.compute_dtype=bfloat16",
        f"data.path={model_dir / 'train.jsonl'}", f"data.val_path={model_dir / 'val.jsonl'}",
        "train.max_steps=24", "train.batch_size=8", "train.grad_accum=1", "train.lr=5e-3", "train.precision=bf16",
        "train.warmup_steps=2", f"output_dir={tmp_path / 'run'}", "train.eval_every=24",
    ]))  # fmt: skip
    result = train(recipe, progress=False)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


def test_exact_merge_of_4bit_base(model_dir, tmp_path):
    model = lorakit.load_model(model_dir / "model", quantize="nf4", compute_dtype=torch.float32)
    reference = _dequantized_reference(model_dir / "model", model)
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = sample_ids()
    expected = model(ids).logits
    merged = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, (Linear4bit, LoraLinear)) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
    # merged weight == dequantized base + s * B A, and the export loads in plain transformers
    merged.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(reference(ids).logits, expected, atol=1e-3)  # the adapter did change the output


def test_requantized_merge_warns_and_stays_close(model_dir):
    model = lorakit.load_model(model_dir / "model", quantize="nf4", compute_dtype=torch.float32)
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = sample_ids()
    expected = model(ids).logits
    with pytest.warns(UserWarning, match="rounds them"):
        lorakit.merge_and_requantize(model)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    deviation = (model(ids).logits - expected).abs().max().item()
    assert 0 < deviation < 0.5 * expected.abs().max().item()


_PEAK_PROBE = textwrap.dedent(
    """
    import json, sys, psutil, torch
    import lorakit
    from lorakit.quant import Linear4bit
    # The architecture's Python code (~90 MiB of modules, the same for any model size) is imported before the
    # baseline: the budget is about the weights' memory during the load.
    import transformers.models.llama.modeling_llama
    torch.set_num_threads(2)
    before = psutil.Process().memory_info().rss
    model = lorakit.load_model(sys.argv[1], quantize="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    # VmHWM is this process's own peak RSS (ru_maxrss would carry over the parent's peak across fork + exec).
    status = open("/proc/self/status").read()
    peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"before": before, "peak": peak, "model_bytes": size,
                      "linear4bit": sum(isinstance(m, Linear4bit) for m in model.modules())}))
    """
)


def test_streaming_load_peak_rss_of_a_300m_model(tmp_path):
    """The rise of peak RSS during the load stays within 1.3x (4-bit model + one full-precision layer)."""
    from safetensors.torch import save_file

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    n_params = sum(s.numel() for s in shapes.values())
    assert n_params >= 300_000_000
    config.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    layer_bytes, weight_map = 0, {}
    for layer in range(-1, config.num_hidden_layers):  # one shard per decoder layer, embeddings + head apart
        names = (
            [k for k in shapes if f"layers.{layer}." in k]
            if layer >= 0
            else [k for k in shapes if ".layers." not in k]
        )
        file = f"model-{layer + 1:05d}.safetensors"
        weight_map.update(dict.fromkeys(names, file))
        tensors = {k: (torch.randn(shapes[k], generator=generator) * 0.02).to(torch.bfloat16) for k in names}
        if layer >= 0:
            layer_bytes = max(layer_bytes, sum(t.numel() * 2 for t in tensors.values()))
        save_file(tensors, tmp_path / file, metadata={"format": "pt"})
        del tensors
    assert len(weight_map) == len(shapes)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(tmp_path)], capture_output=True, text=True, check=True
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    rise = probe["peak"] - probe["before"]
    budget = 1.3 * (probe["model_bytes"] + layer_bytes)
    assert probe["linear4bit"] == 24 * 7
    assert rise <= budget, f"peak rose by {rise / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB"
    # And far below the full-precision model (bf16 bytes).
    assert rise < 0.6 * n_params * 2
