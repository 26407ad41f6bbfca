"""The LoRA layer and the model-level API: forward math, dtypes, merge, adapters, unload."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.adapters.lora import LoraLinear
from lorakit.adapters.lora_fn import keep_mask, lora_product, packed_lora_product

from tiny_models import BUILDERS, model_output, sample_ids


def _randomize(model: nn.Module, adapter: str = "default", seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_A.{adapter}." in name or f"lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_forward_is_base_plus_scaled_low_rank():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=4, lora_alpha=8, scaling=2.0, init_lora_weights=False)
    layer.active_adapters = ["a"]
    x = torch.randn(3, 5, 16)
    expected = base(x) + 2.0 * (x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T)
    torch.testing.assert_close(layer(x), expected)


def test_default_init_leaves_output_unchanged_and_matches_kaiming_bound():
    model = BUILDERS["llama"]()
    ids = sample_ids()
    before = model_output(model, ids)
    lorakit.wrap(model, lorakit.LoraConfig(r=8, target_modules="all-linear"))
    torch.testing.assert_close(model_output(model, ids), before)
    layer = model.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.lora_A["default"].weight.abs().max() <= bound
    assert layer.lora_A["default"].weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_gaussian_init_std():
    layer = LoraLinear(nn.Linear(512, 512))
    layer.add_adapter("g", r=4, lora_alpha=4, scaling=1.0, init_lora_weights="gaussian")
    assert abs(layer.lora_A["g"].weight.std().item() - 1 / 4) < 0.01


def test_scaling_alpha_over_r_and_rslora():
    model = lorakit.wrap(
        BUILDERS["llama"](), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"])
    )
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0
    model = lorakit.wrap(
        BUILDERS["llama"](),
        lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"], use_rslora=True),
    )
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 8.0


def test_dropout_only_on_adapter_path():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8))
    layer.add_adapter("d", r=2, lora_alpha=2, scaling=1.0, lora_dropout=0.5, init_lora_weights=True)
    layer.active_adapters = ["d"]
    layer.train()
    x = torch.randn(4, 8)
    # B is zero at init: whatever dropout does to the adapter input, the base path sees the clean x.
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert isinstance(layer.lora_dropout["d"], nn.Dropout)


def test_bf16_base_fp32_adapter_casts_both_ways():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = model(input_ids=sample_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_only_adapter_weights_are_trainable():
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_exact_in_fp32(arch):
    ids = sample_ids()
    model = lorakit.wrap(BUILDERS[arch](), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    _randomize(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = model_output(model, ids)
    lorakit.merge(model)
    torch.testing.assert_close(model_output(model, ids), unmerged, atol=1e-5, rtol=0)
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert changed  # the deltas really went into the base weights
    lorakit.unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(model_output(model, ids), unmerged, atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite():
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("inf"))
        layer.lora_A["default"].weight.fill_(1.0)
    with pytest.raises(lorakit.MergeError, match="NaN or Inf"):
        lorakit.merge(model, safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_merge_and_unload_gives_plain_transformers_model(tmp_path):
    ids = sample_ids()
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    _randomize(model)
    expected = model_output(model, ids)
    base = lorakit.merge_and_unload(model)
    assert base is model
    assert not any(isinstance(m, LoraLinear) for m in base.modules())
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear
    base.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded, ids), expected, atol=1e-5, rtol=0)


def test_unload_restores_base_without_merging():
    ids = sample_ids()
    model = BUILDERS["gpt2"]()
    base_out = model_output(model, ids)
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    _randomize(model)
    lorakit.merge(model)
    lorakit.unload(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    torch.testing.assert_close(model_output(model, ids), base_out, atol=1e-5, rtol=0)


def test_two_adapters_set_and_disable():
    ids = sample_ids()
    model = BUILDERS["qwen2"]()
    base_out = model_output(model, ids)
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear"), adapter_name="one")
    lorakit.wrap(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="two")
    _randomize(model, "one", seed=1)
    _randomize(model, "two", seed=2)
    assert lorakit.active_adapters(model) == ["one"]
    out_one = model_output(model, ids)
    lorakit.set_adapter(model, "two")
    out_two = model_output(model, ids)
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"two"}
    lorakit.set_adapter(model, ["one", "two"])
    out_both = model_output(model, ids)
    assert not torch.allclose(out_one, out_two) and not torch.allclose(out_both, out_one)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model_output(model, ids), base_out)
    torch.testing.assert_close(model_output(model, ids), out_both)
    # Deltas add: (one + two) - base == (one - base) + (two - base) on the first layer's q_proj.
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    lorakit.set_adapter(model, "one")
    d1 = q(x) - q.base_layer(x)
    lorakit.set_adapter(model, "two")
    d2 = q(x) - q.base_layer(x)
    lorakit.set_adapter(model, ["one", "two"])
    torch.testing.assert_close(q(x) - q.base_layer(x), d1 + d2)


def test_duplicate_adapter_name_refused():
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="already"):
        lorakit.wrap(model, lorakit.LoraConfig(target_modules=["v_proj"]))


def test_delete_adapter_frees_weights():
    model = lorakit.wrap(
        BUILDERS["llama"](), lorakit.LoraConfig(target_modules="all-linear"), adapter_name="x"
    )
    lorakit.wrap(model, lorakit.LoraConfig(target_modules=["q_proj"]), adapter_name="y")
    lorakit.delete_adapter(model, "x")
    assert not any(".lora_A.x." in n for n, _ in model.named_parameters())
    assert lorakit.inject.adapter_configs(model).keys() == {"y"}


def test_layers_to_transform_and_exclude():
    model = lorakit.wrap(
        BUILDERS["llama"](),
        lorakit.LoraConfig(
            target_modules=["q_proj", "v_proj"], layers_to_transform=[1], exclude_modules=["v_proj"]
        ),
    )
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped == ["model.layers.1.self_attn.q_proj"]


def test_regex_target_and_rank_alpha_pattern():
    cfg = lorakit.LoraConfig(
        r=4,
        target_modules=r".*layers\.0\.self_attn\.(q|k)_proj",
        rank_pattern={"k_proj": 2},
        alpha_pattern={"q_proj": 16},
    )
    model = lorakit.wrap(BUILDERS["llama"](), cfg)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert set(wrapped) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    assert wrapped["model.layers.0.self_attn.k_proj"].r["default"] == 2
    assert wrapped["model.layers.0.self_attn.q_proj"].scaling["default"] == 4.0


def test_all_linear_skips_output_head():
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(target_modules="all-linear"))
    assert type(model.lm_head) is nn.Linear
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 14


def test_trainer_style_backward_and_generate_still_work():
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    ids = sample_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    out = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_adapter_added_in_eval_mode_has_no_active_dropout():
    model = BUILDERS["llama"]()  # eval mode
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5))
    assert not any(m.training for m in model.modules())
    _randomize(model)
    ids = sample_ids()
    torch.testing.assert_close(model_output(model, ids), model_output(model, ids))


def _loss_and_grads(model, batch, fused: bool, dtype=None):
    LoraLinear.fused_autograd = fused
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(**batch).loss
        return loss, torch.autograd.grad(loss, params)
    finally:
        LoraLinear.fused_autograd = True


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear and Conv1D bases
def test_fused_lora_product_gives_the_reference_loss_and_gradients(arch):
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = lorakit.wrap(BUILDERS[arch](), config)  # eval mode: GPT-2's own dropout off
    ids = sample_ids(batch=2, length=9)
    batch = {"input_ids": ids, "labels": ids}
    ref_loss, ref_grads = _loss_and_grads(model, batch, fused=False)
    loss, grads = _loss_and_grads(model, batch, fused=True)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # bf16 autocast (the fast path's reason to exist): the same up to bf16 rounding
    bf16_loss, bf16_grads = _loss_and_grads(model, batch, fused=True, dtype=torch.bfloat16)
    torch.testing.assert_close(bf16_loss, ref_loss, atol=5e-2, rtol=2e-2)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in bf16_grads)


def test_fused_lora_product_dropout_keeps_the_mask_for_backward():
    layer = LoraLinear(nn.Linear(16, 8))
    layer.add_adapter("default", r=4, lora_alpha=4, scaling=1.0, lora_dropout=0.5, init_lora_weights=False)
    layer.active_adapters = ["default"]
    layer.train()
    x = torch.randn(3, 16, requires_grad=True)
    torch.manual_seed(0)
    out = layer(x)
    out.sum().backward()
    # The dropped input is x times a 0/2 mask; A's gradient sees it, and x's adapter gradient is zero where dropped.
    base_grad = layer.base_layer.weight.sum(0)  # d(sum of base out)/dx
    adapter_grad = x.grad - base_grad  # [3, 16]
    dropped = adapter_grad.abs() < 1e-7
    assert dropped.any() and (~dropped).any()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    kept = (~dropped).float() * 2  # the mask as the function used it
    expected_a = b.sum(0)[:, None] * (x.detach() * kept).sum(0)[None, :]  # sum over rows of g B ⊗ drop(x)
    torch.testing.assert_close(a.grad, expected_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.05, 0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_the_stated_probability(dropout):
    torch.manual_seed(0)
    n = 1 << 20
    mask, keep = keep_mask(torch.Size([n // 64, 64]), dropout, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (n // 64, 64)
    assert keep == pytest.approx(1 - dropout, abs=1 / 65536)  # the 16-bit threshold
    tolerance = 5 * math.sqrt(keep * (1 - keep) / (n // 4))  # 5 sigma of each quarter's mean
    flat = mask.flatten().float()
    for lane in range(4):  # each 16-bit quarter of the 64-bit words is uniform, the sign bits too
        assert float(flat[lane::4].mean()) == pytest.approx(keep, abs=tolerance)
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size([n // 64, 64]), dropout, torch.device("cpu"))[0], mask)  # seeded


def test_packed_lora_product_gives_each_block_its_own_adapters_product_and_gradients():
    torch.manual_seed(0)
    ranks, scales, n, d_in, d_out = [2, 4, 3], [0.5, 2.0, 1.0], 5, 12, 7
    factors = [
        (torch.randn(r, d_in, requires_grad=True), torch.randn(d_out, r, requires_grad=True)) for r in ranks
    ]
    x = torch.randn(len(ranks) * n, 3, d_in, requires_grad=True)  # K blocks of n rows, 3 tokens each
    base = torch.randn(len(ranks) * n, 3, d_out, requires_grad=True)
    weights = [t for pair in factors for t in pair]
    out = packed_lora_product(x, base, factors, scales, [0.0] * 3, training=True)
    grads = torch.autograd.grad(
        (out * out).sum(), [x, base, *weights]
    )  # a loss that mixes the blocks' values
    ref = torch.cat([
        lora_product(x[k * n : (k + 1) * n], a, b, base[k * n : (k + 1) * n], s)
        for k, ((a, b), s) in enumerate(zip(factors, scales))
    ])  # fmt: skip
    ref_grads = torch.autograd.grad((ref * ref).sum(), [x, base, *weights])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, ref_grads):  # unequal ranks: the padding adds nothing and gets no gradient
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_packed_lora_product_drops_each_block_with_its_own_probability():
    torch.manual_seed(0)
    n, d = 64, 32
    factors = [(torch.randn(4, d), torch.randn(d, 4, requires_grad=True)) for _ in range(2)]
    x = torch.randn(2 * n, d, requires_grad=True)
    out = packed_lora_product(x, torch.zeros(2 * n, d), factors, [1.0, 1.0], [0.0, 0.5], training=True)
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    dropped = grad_x.abs() < 1e-7  # an input element without adapter gradient was dropped
    assert not dropped[:n].any()  # block 0: p = 0
    assert 0.4 < dropped[n:].float().mean() < 0.6  # block 1: p = 0.5
    kept = ~dropped[n:]  # and the kept elements are scaled by 1 / keep = 2, as the block's own product does
    expected = lora_product(x[n:] * kept, *factors[1], torch.zeros(n, d), 1.0) * 2
    torch.testing.assert_close(out[n:], expected, atol=1e-4, rtol=1e-4)


def test_packed_lora_product_in_bf16_equals_each_blocks_own_product():
    """Under bf16 autocast each block's output and factor gradients are its own ``lora_product``'s, bit for bit:
    the scales (here 1/3 and 4/3, not bf16 numbers) stay fp32 and each rank-r product is rounded once."""
    torch.manual_seed(0)
    n, d, r, scales = 16, 64, 4, [1 / 3, 16 / 12]
    factors = [(torch.randn(r, d, requires_grad=True), torch.randn(d, r, requires_grad=True)) for _ in scales]
    x, base = torch.randn(2 * n, d).bfloat16(), torch.randn(2 * n, d).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = packed_lora_product(x, base, factors, scales, [0.0, 0.0], False)
        alone = [lora_product(x[k * n : (k + 1) * n], *factors[k], base[k * n : (k + 1) * n], s) for k, s in
                 enumerate(scales)]  # fmt: skip
    assert torch.equal(packed, torch.cat(alone))
    flat = [t for pair in factors for t in pair]
    grad_out = torch.randn_like(packed)
    ours = torch.autograd.grad(packed, flat, grad_out)
    theirs = torch.autograd.grad(torch.cat(alone), flat, grad_out)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
