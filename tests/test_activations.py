"""Per-layer activation checkpointing and host offload (lorakit.activations): same gradients, fewer saved bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.activations import (
    HostOffload,
    decoder_layers,
    disable_checkpointing,
    enable_checkpointing,
)
from lorakit.errors import ConfigError
from lorakit.loss import causal_lm_loss_sum
from lorakit.recipe import recipe_from_dict

from tiny_models import VOCAB, tiny_llama


def _batch(seq: int = 24, batch: int = 2, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # a prompt without loss
    return {"input_ids": ids, "labels": labels}


def _model(kind: str) -> nn.Module:
    model = tiny_llama()
    if kind == "lora":  # dropout > 0: the recompute must draw the same masks (RNG state restored)
        lorakit.wrap(model, lorakit.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear"))
    return model.train()


def _grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks in every run
    loss, count = causal_lm_loss_sum(model, batch)
    (loss / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return grads


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages autograd saves for backward while active (all alive until backward)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_checkpointed_gradients_equal_plain(kind):
    batch = _batch()
    model = _model(kind)
    plain = _grads(model, batch)
    layers = enable_checkpointing(model)
    assert len(layers) == 2 and all(layer.gradient_checkpointing for layer in layers)
    checkpointed = _grads(model, batch)
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_forced_offload_moves_layer_inputs_and_keeps_gradients():
    """HostOffload(copy_host_tensors=True) takes the offload path on CPU: layer inputs copied out and back."""
    batch = _batch()
    model = _model("lora")
    plain = _grads(model, batch)
    hooks = HostOffload(copy_host_tensors=True)
    enable_checkpointing(model, offload=hooks)
    offloaded = _grads(model, batch)
    hidden = model.config.hidden_size
    # exactly one tensor per decoder layer, the layer's input hidden states [B, T, H] in fp32
    assert hooks.tensors == 2
    assert hooks.bytes == 2 * batch["input_ids"].numel() * hidden * 4
    for name, grad in plain.items():
        torch.testing.assert_close(offloaded[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_offload_on_cpu_warns_and_still_checkpoints():
    batch = _batch()
    model = _model("lora")
    plain = _grads(model, batch)
    with pytest.warns(UserWarning, match="nothing to offload"):
        layers = enable_checkpointing(model, offload=True)
    assert len(layers) == 2
    meter = SavedBytes()
    with meter:
        loss, count = causal_lm_loss_sum(model, batch)
    (loss / count).backward()
    assert meter.total < 30_000  # checkpointed: the layer inputs and the loss chunk only (plain: ~100 KB)
    model.zero_grad(set_to_none=True)
    for name, grad in _grads(model, batch).items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _deep_model() -> LlamaForCausalLM:
    """Long sequence, wide MLP, several layers: where the saved activations dominate."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    lorakit.wrap(model, lorakit.LoraConfig(r=8, lora_dropout=0.0, target_modules="all-linear"))
    return model.train()


def _saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    meter = SavedBytes()
    with meter:
        loss, count = causal_lm_loss_sum(model, batch)
    (loss / count).backward()
    return meter.total


def test_checkpointing_saves_far_fewer_activation_bytes():
    model = _deep_model()
    batch = _batch(seq=192, batch=2)
    plain = _saved_bytes(model, batch)
    enable_checkpointing(model)
    checkpointed = _saved_bytes(model, batch)
    layer_input = batch["input_ids"].numel() * model.config.hidden_size * 4  # [B, T, H] fp32
    # 6 layer inputs plus the final norm and the loss chunk's inputs, against every layer's intermediates
    assert checkpointed <= 6 * layer_input + 4 * layer_input, checkpointed
    assert plain >= 8 * checkpointed, (plain, checkpointed)
    disable_checkpointing(model)
    assert _saved_bytes(model, batch) == plain


def test_checkpointing_is_inert_without_grad_or_in_eval():
    model = _deep_model()
    batch = _batch(seq=32)
    enable_checkpointing(model)
    with torch.no_grad():
        expected = model(batch["input_ids"]).logits
    model.eval()
    meter = SavedBytes()
    with meter:
        logits = model(batch["input_ids"]).logits
    torch.testing.assert_close(logits, expected)
    layer_input = batch["input_ids"].numel() * model.config.hidden_size * 4
    assert meter.total > 6 * layer_input  # eval mode keeps the layers' activations (no checkpoint)


def test_checkpointing_needs_decoder_layers():
    with pytest.raises(ConfigError, match="no transformers decoder layers"):
        enable_checkpointing(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="offload"):
        enable_checkpointing(tiny_llama(), offload="yes")
    assert len(decoder_layers(tiny_llama())) == 2


def test_recipe_activation_offload_field():
    recipe = recipe_from_dict({"train": {"activation_offload": True}})
    assert recipe.train.activation_offload is True
    assert recipe_from_dict({}).train.activation_offload is False
    with pytest.raises(ConfigError, match=r"train\.activation_offload: expected true or false"):
        recipe_from_dict({"train": {"activation_offload": "yes"}})


def test_train_refuses_offload_without_checkpointing():
    from lorakit.train import load_base

    recipe = recipe_from_dict(
        {"model": {"gradient_checkpointing": False}, "train": {"activation_offload": True}}
    )
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing=true"):
        load_base(recipe)


_HEAP_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from lorakit.activations import return_freed_memory_to_os

    def rss():
        status = open("/proc/self/status").read()
        return int(next(l for l in status.splitlines() if l.startswith("VmRSS:")).split()[1]) * 1024

    applied = return_freed_memory_to_os() if sys.argv[1] == "fixed" else None
    big = torch.ones(30 << 18)  # 30 MB: freeing it raises glibc's dynamic mmap threshold to 30 MB
    del big
    kept, dropped = [], []
    for i in range(64):  # 64 x 1 MB, every other one freed: holes the heap cannot trim
        (kept if i % 2 else dropped).append(torch.ones(1 << 18))
    before = rss()
    dropped.clear()
    print(json.dumps({"applied": applied, "released": before - rss()}))
    """
)


def _heap_probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc are Linux-only")
def test_return_freed_memory_to_os_releases_freed_tensors():
    fixed, dynamic = _heap_probe("fixed"), _heap_probe("dynamic")
    assert fixed["applied"] is True
    assert fixed["released"] >= 24 << 20, fixed  # the 32 freed 1 MB tensors went back to the OS
    assert dynamic["released"] < 8 << 20, dynamic  # glibc's default keeps them in the heap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_moves_layer_inputs_to_pinned_host_memory():
    batch = {k: v.cuda() for k, v in _batch(seq=64).items()}
    model = _model("lora").cuda()
    plain = _grads(model, batch)
    hooks = HostOffload()
    packed: list[torch.Tensor] = []
    original_pack = hooks._pack

    def spy(tensor):
        device, host = original_pack(tensor)
        packed.append(host)
        return device, host

    hooks.pack_hook = spy
    enable_checkpointing(model, offload=hooks)
    offloaded = _grads(model, batch)
    assert hooks.tensors == 2 and len(packed) == 2
    assert all(t.device.type == "cpu" and t.is_pinned() for t in packed)
    for name, grad in plain.items():
        torch.testing.assert_close(offloaded[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_lowers_gpu_memory_held_between_forward_and_backward():
    def held_after_forward(offload: bool) -> int:
        model = _deep_model().cuda()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # on CUDA, offload=True must not warn
            enable_checkpointing(model, offload=offload)
        batch = {k: v.cuda() for k, v in _batch(seq=256, batch=8).items()}
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        loss, count = causal_lm_loss_sum(model, batch)
        held = torch.cuda.memory_allocated() - start
        (loss / count).backward()
        torch.cuda.synchronize()
        return held

    layer_input = 8 * 256 * 64 * 4  # [B, T, H] fp32
    # offloaded, the six layer inputs are no longer held on the GPU between forward and backward
    assert held_after_forward(False) - held_after_forward(True) >= 5 * layer_input
