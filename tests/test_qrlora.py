"""QR-LoRA: the pivoted QR against its definition, rank selection, the adapter, merge, files, 4-bit, counts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
import lorakit.adapters.qrlora as qrlora_module
from lorakit.adapters.adalora import AdaLoraConfig
from lorakit.adapters.base import AdapterLinear
from lorakit.adapters.qrlora import QRLoraConfig, QRLoraLinear, pivoted_qr, qr_components, select_rank
from lorakit.errors import AdapterMismatchError, ConfigError
from lorakit.inject import trainable_parameters
from lorakit.quant import Linear4bit
from lorakit.variants import (
    count_qrlora_parameters,
    merge_and_unload_variants,
    merge_variants,
    unmerge_variants,
    variant_layers,
    wrap_adalora,
    wrap_qrlora,
)
from lorakit.variants_io import load_qrlora, save_qrlora

from tiny_models import model_output, sample_ids, tiny_gpt2, tiny_llama


def _matrix(shape: tuple[int, int], rank: int | None = None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    left = torch.randn(shape[0], rank, generator=generator, dtype=torch.float64)
    return left @ torch.randn(rank, shape[1], generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("shape, rank", [((12, 7), None), ((7, 12), None), ((10, 10), 4), ((9, 9), None)])
def test_pivoted_qr_meets_its_definition(shape, rank):
    matrix = _matrix(shape, rank)
    q, r, perm = pivoted_qr(matrix)
    k = min(shape)
    assert q.shape == (shape[0], k) and r.shape == (k, shape[1])
    assert sorted(perm.tolist()) == list(range(shape[1]))
    torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)  # orthonormal
    assert torch.equal(r, torch.triu(r))  # upper trapezoidal
    torch.testing.assert_close(q @ r, matrix[:, perm], atol=1e-12, rtol=0)  # W P = Q R
    diag = r.diagonal()
    assert torch.all(diag >= 0) and torch.all(diag[:-1] >= diag[1:] - 1e-12)  # non-negative, non-increasing
    for j in range(k):  # the pivot rule: R_jj² ≥ ‖R[j:, l]‖² for every later column l
        assert torch.all(diag[j] ** 2 >= r[j:, j:].pow(2).sum(dim=0) - 1e-10)
    if rank is not None:
        assert torch.all(diag[rank:] < 1e-10) and diag[rank - 1] > 1e-3  # reveals the rank
    else:  # an independent Householder QR of the permuted matrix gives the same factors (up to signs)
        q_ref, r_ref = torch.linalg.qr(matrix[:, perm])
        signs = torch.sign(r_ref.diagonal())
        torch.testing.assert_close(r_ref * signs[:, None], r, atol=1e-10, rtol=0)
        torch.testing.assert_close(q_ref * signs, q, atol=1e-10, rtol=0)


def test_truncated_qr_is_the_leading_part_of_the_full_one():
    matrix = _matrix((16, 11), seed=3)
    q, r, perm = pivoted_qr(matrix)
    q3, r3, perm3 = pivoted_qr(matrix, steps=3)
    torch.testing.assert_close(q3, q[:, :3], atol=1e-12, rtol=0)
    assert torch.equal(perm3[:3], perm[:3])
    # Later pivots still swap columns of finished rows, so compare the rows in W0's column order (R Pᵀ).
    rows, rows3 = torch.empty_like(r[:3]), torch.empty_like(r3)
    rows[:, perm], rows3[:, perm3] = r[:3], r3
    torch.testing.assert_close(rows3, rows, atol=1e-12, rtol=0)


def test_components_reconstruct_the_weight_in_its_own_column_order():
    weight = _matrix((12, 20), seed=4).float()
    q, rp = qr_components(weight, QRLoraConfig(r=12))
    torch.testing.assert_close(q @ rp, weight, atol=1e-5, rtol=0)  # R Pᵀ undoes the pivoting
    q4, rp4 = qr_components(weight, QRLoraConfig(r=4))
    torch.testing.assert_close(q4, q[:, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(rp4, rp[:4], atol=1e-6, rtol=0)


def test_select_rank_by_energy_of_the_diagonal():
    diag = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22: cumulative .727, .909, .955, 1
    assert select_rank(diag, 0.70, None) == 1
    assert select_rank(diag, 0.90, None) == 2
    assert select_rank(diag, 0.95, None) == 3
    assert select_rank(diag, 1.00, None) == 4
    assert select_rank(diag, 0.95, 2) == 2  # capped
    weight = _matrix((8, 8), seed=5).float()
    _, r, _ = pivoted_qr(weight)
    q, _ = qr_components(weight, QRLoraConfig(tau=0.9, max_r=None))
    assert q.shape[1] == select_rank(r.diagonal(), 0.9, None) < 8


def _randomize(model, seed=7):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in variant_layers(model):
            lam = layer.qr_lambda["default"]
            lam.copy_(torch.randn(lam.shape, generator=generator) * 0.3)


def test_init_is_identity_and_only_the_scalars_train():
    config = QRLoraConfig(r=4, target_modules="all")
    model = wrap_qrlora(tiny_llama(), config)
    ids = sample_ids()
    torch.testing.assert_close(model_output(model, ids), model_output(tiny_llama(), ids), atol=0, rtol=0)
    trainable, _ = trainable_parameters(model)
    assert (
        trainable
        == 2 * 7 * 4
        == count_qrlora_parameters(tiny_llama(), QRLoraConfig(r=4, target_modules="all"))
    )
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 14 and all(n.endswith(".default") and ".qr_lambda." in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_energy_rule_sets_each_layer_rank():
    model = wrap_qrlora(
        tiny_llama(), QRLoraConfig(tau=0.6, max_r=None, target_modules=["q_proj", "down_proj"])
    )
    for _, layer in variant_layers(model):
        _, r, _ = pivoted_qr(layer.base_weight())
        assert layer.rank("default") == select_rank(r.diagonal(), 0.6, None)
        assert 1 < layer.rank("default") < 32


def test_minus_one_with_full_rank_cancels_the_weight():
    """λ = −1/α on all components gives W0 + ΔW = 0: the factors and the pivot bookkeeping are exact."""
    model = wrap_qrlora(tiny_llama(), QRLoraConfig(r=32, alpha=2.0, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.qr_lambda["default"].fill_(-0.5)
    x = torch.randn(3, 32)
    assert layer.base_layer(x).abs().max() > 0.1
    torch.testing.assert_close(layer(x), torch.zeros(3, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("builder, targets", [(tiny_llama, "all"), (tiny_gpt2, ["c_attn", "c_fc", "c_proj"])])
def test_merge_equals_unmerged_output(builder, targets):
    model = wrap_qrlora(builder(), QRLoraConfig(r=6, alpha=1.5, target_modules=targets))
    _randomize(model)
    ids = sample_ids()
    expected = model_output(model, ids)
    assert (expected - model_output(builder(), ids)).abs().max() > 1e-3
    layer = next(layer for _, layer in variant_layers(model))
    before = layer.base_layer.weight.clone()
    merge_variants(model)
    lam = layer.qr_lambda["default"]
    dense = (
        1.5 * layer.qr_factors["default"].Q @ torch.diag(lam) @ layer.qr_factors["default"].RP
    )  # [out, in]
    delta = layer.base_layer.weight - before
    torch.testing.assert_close(delta.T if layer.fan_in_fan_out else delta, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)
    unmerge_variants(model)
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=0)
    plain = merge_and_unload_variants(model)
    assert not any(isinstance(m, AdapterLinear) for m in plain.modules())
    torch.testing.assert_close(model_output(plain, ids), expected, atol=1e-5, rtol=0)


def test_save_load_on_a_fresh_base_without_running_qr(tmp_path, monkeypatch):
    model = wrap_qrlora(tiny_llama(), QRLoraConfig(tau=0.8, max_r=5, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    ids = sample_ids()
    expected = model_output(model, ids)
    save_qrlora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAKIT_QRLORA" and config["tau"] == 0.8 and config["max_r"] == 5
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.qr_lambda"].shape == (5,)
    assert tensors[f"{key}.qr_Q"].shape == (32, 5) and tensors[f"{key}.qr_RP"].shape == (5, 32)
    assert len(tensors) == 4 * 3

    def no_qr(*args, **kwargs):
        raise AssertionError("loading must use the stored factors")

    monkeypatch.setattr(qrlora_module, "_householder_cpqr", no_qr)
    loaded = load_qrlora(tiny_llama(), tmp_path)
    torch.testing.assert_close(model_output(loaded, ids), expected, atol=1e-6, rtol=0)
    assert trainable_parameters(loaded)[0] == 0  # loaded for inference
    trainable = load_qrlora(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable_parameters(trainable)[0] == 4 * 5

    tensors[f"{key}.qr_RP"] = tensors[f"{key}.qr_RP"][:, :16].contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match="q_proj"):
        load_qrlora(tiny_llama(), tmp_path)


def _two_qrlora_adapters():
    model = wrap_qrlora(tiny_llama(), QRLoraConfig(r=2, target_modules=["q_proj"]))
    wrap_qrlora(model, QRLoraConfig(r=3, target_modules=["q_proj"]), adapter_name="other")
    return model


def test_adalora_does_not_mix_into_a_qrlora_layer():
    model = _two_qrlora_adapters()
    with pytest.raises(ConfigError, match="does not mix"):
        wrap_adalora(model, AdaLoraConfig(target_modules=["q_proj"], total_step=3), adapter_name="ada")


def test_a_second_adapter_joins_the_wrapped_layers_and_methods_do_not_mix():
    model = _two_qrlora_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.adapter_names() == ["default", "other"] and layer.active_adapters == ["default"]
    assert layer.rank("other") == 3 and not layer.qr_lambda["other"].requires_grad
    # LoRA refuses a QR-LoRA layer before wrapping anything (v_proj stays a plain Linear)
    with pytest.raises(ConfigError, match=r"q_proj already holds QRLoraLinear adapters.*does not mix"):
        lorakit.wrap(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="lora")
    assert type(model.model.layers[0].self_attn.v_proj) is torch.nn.Linear


def test_4bit_base_forward_backward_and_exact_merge():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.v_proj = Linear4bit.from_linear(layer.self_attn.v_proj, compute_dtype=torch.float32)
    wrap_qrlora(model, QRLoraConfig(r=4, target_modules=["v_proj"]))
    layer = model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, QRLoraLinear) and isinstance(layer.base_layer, Linear4bit)
    q, rp = qr_components(layer.base_layer.dequantize(torch.float32), QRLoraConfig(r=4))
    torch.testing.assert_close(layer.qr_factors["default"].Q, q, atol=0, rtol=0)  # QR of the dequantized W0
    torch.testing.assert_close(layer.qr_factors["default"].RP, rp, atol=0, rtol=0)
    ids = sample_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.qr_lambda["default"].grad.abs().sum() > 0
    _randomize(model)
    model.eval()
    expected = model_output(model, ids)
    plain = merge_and_unload_variants(copy.deepcopy(model))
    assert type(plain.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    torch.testing.assert_close(model_output(plain, ids), expected, atol=1e-5, rtol=0)


def test_a_few_steps_of_training_lower_the_loss():
    model = wrap_qrlora(tiny_llama(), QRLoraConfig(r=8, target_modules="all")).train()
    ids = sample_ids(batch=4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01


def test_parameter_count_of_a_llama_2_7b_shape_on_meta():
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert count_qrlora_parameters(model, QRLoraConfig(r=16, target_modules="all-linear")) == 32 * 7 * 16
    assert count_qrlora_parameters(model, QRLoraConfig(r=16, target_modules=["q_proj", "v_proj"])) == 1024
    with pytest.raises(ConfigError, match="fixed"):
        count_qrlora_parameters(model, QRLoraConfig(tau=0.9))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=1.5), "tau"),
        (dict(r=0), "r"),
        (dict(max_r=-1), "max_r"),
        (dict(alpha=0), "alpha"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"QRLoraConfig.{field}"):
        QRLoraConfig(**kwargs)
