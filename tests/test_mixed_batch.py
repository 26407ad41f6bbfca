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
    assert all(layer.row_plan is None for _, layer in lorakit.inject.lora_layers(model))


def test_every_row_on_one_adapter_equals_that_adapter_active():
    """One adapter for the whole batch (a server's prefill) takes the plain product, nothing stacked."""
    model = _three_adapters("llama")
    ids = sample_ids(batch=3, length=6)
    with torch.no_grad():
        named = model(input_ids=ids, adapter_names=["b"] * 3).logits
        lorakit.set_adapter(model, "b")
        torch.testing.assert_close(named, model(input_ids=ids).logits, atol=0, rtol=0)
    assert all(layer._stack_cache is None for _, layer in lorakit.inject.lora_layers(model))


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


# ------------------------------------------------------------------------- grouped products vs the reference
@pytest.mark.parametrize(
    ("rows", "tokens", "grouped"),
    [
        (["a", "b", "c", "a", "b", "c"], 3, True),  # equal groups, unsorted rows: gather + scatter
        (["a", "a", "b", "b"], 2, True),  # already grouped: nothing to gather (in_order)
        (["c", "__base__", "a", "c", "c", "__base__"], 4, True),  # uneven groups, base rows: zero-row padding
        (["b", "__base__", "a"], 1, True),  # decode: one token per row
        (["a"] * 7 + ["b", "c"], 5, False),  # padding would cost more than gathering weights: per row
        (["a", "b", "__base__", "a"], 8, False),  # more tokens than the rank (prefill): per row, a base row
    ],
)
def test_both_layouts_equal_the_bgmv_reference(rows, tokens, grouped):
    from lorakit.adapters.mixed import RowPlan, add_rows, bgmv_reference

    generator = torch.Generator().manual_seed(0)
    size_in, size_out, ranks = 12, 10, {"a": 2, "b": 4, "c": 3}
    scale = torch.tensor([0.5, 2.0, -1.0])
    # every adapter zero-padded to rank 4: A [3, 4, in], B [3, out, 4]
    weights_a, weights_b = torch.zeros(3, 4, size_in), torch.zeros(3, size_out, 4)
    for i, r in enumerate(ranks.values()):
        weights_a[i, :r] = torch.randn(r, size_in, generator=generator)
        weights_b[i, :, :r] = torch.randn(size_out, r, generator=generator)
    x = torch.randn(len(rows), tokens, size_in, generator=generator)
    result = torch.randn(len(rows), tokens, size_out, generator=generator)
    index = torch.tensor([list(ranks).index(n) if n in ranks else -1 for n in rows])

    plan = RowPlan(rows)  # the layer's layout: the plan's adapters then a zero slot, Aᵀ and (s·B)ᵀ
    slots = torch.tensor([list(ranks).index(n) for n in plan.adapters])
    stack_a = torch.cat([weights_a[slots], torch.zeros(1, 4, size_in)]).transpose(1, 2)  # [k + 1, in, 4]
    stack_b = torch.cat([weights_b[slots] * scale[slots, None, None], torch.zeros(1, size_out, 4)])
    stack_b = stack_b.transpose(1, 2)  # [k + 1, 4, out]
    assert plan.grouped(tokens, 4) == grouped
    for t in (tokens, 1) if tokens > 1 else (1,):  # also [B, 1, in] and 2-D [B, in] inputs
        expected = result[:, :t] + bgmv_reference(x[:, :t], weights_a, weights_b, scale, index)
        got = add_rows(result[:, :t], x[:, :t], stack_a, stack_b, plan)  # autograd on: out of place
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # in place on the base output
            got = add_rows(result[:, :t].clone(), x[:, :t], stack_a, stack_b, plan)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            flat = add_rows(result[:, 0].clone(), x[:, 0], stack_a, stack_b, plan)
            torch.testing.assert_close(flat, expected[:, 0], atol=1e-5, rtol=1e-5)


def test_stacked_weights_follow_weight_changes_and_adapter_changes():
    """The stacked-weights cache is rebuilt after an in-place update, a ``.data`` swap, a new or deleted adapter."""
    model = _three_adapters("llama")
    ids = sample_ids(batch=3, length=5)
    names = ["a", "b", "__base__"]

    def check():
        with torch.no_grad():
            mixed = model(input_ids=ids, adapter_names=names).logits
            for row, name in enumerate(names):
                alone = _alone(model, name, lambda row=row: model(input_ids=ids[row : row + 1]).logits)
                torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)

    check()
    layer = next(layer for _, layer in lorakit.inject.lora_layers(model))
    with torch.no_grad():
        layer.lora_B["a"].weight.mul_(3.0)  # in place: a new version
    check()
    layer.lora_A["b"].weight.data = layer.lora_A["b"].weight.data * -1  # new storage, same version
    check()
    lorakit.delete_adapter(model, "b")
    lorakit.wrap(model, lorakit.LoraConfig(r=3, target_modules="all-linear", init_lora_weights=False), "b")
    check()
