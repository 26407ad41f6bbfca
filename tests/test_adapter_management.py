"""Many adapters on one base (bf16 and 4-bit): list, activate, disable, delete and free; continual learning."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import lorakit
import lorakit.train
from lorakit.arithmetic import add_weighted_adapter, stack_adapters
from lorakit.inject import list_adapters, lora_layers, mark_trainable
from train_fixtures import make_workspace, tiny_recipe

from tiny_models import BUILDERS, model_output, sample_ids, write_causal_lm_dir
from tokenizer_factory import build_tokenizer

ADAPTERS = {
    "math": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "code": dict(r=8, lora_alpha=16, target_modules="attention"),
    "chat": dict(r=2, lora_alpha=4, target_modules="minimal", rank_pattern={"v_proj": 3}),
}
QUANTIZE = {"bf16": None, "nf4": "nf4"}


def _randomize(model, name, scale=0.1):
    """Random A and B for adapter ``name`` (B starts at zero otherwise), so it changes the output."""
    generator = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_A:
                for weight in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """``root/model`` (a tiny Llama with a tokenizer) and the adapters ``root/<name>`` of :data:`ADAPTERS`."""
    root = tmp_path_factory.mktemp("management")
    write_causal_lm_dir(root / "model", build_tokenizer())
    for name, kwargs in ADAPTERS.items():
        model = lorakit.load_model(root / "model", quantize=None, compute_dtype=torch.float32)
        lorakit.wrap(model, lorakit.LoraConfig(**kwargs), adapter_name=name)
        _randomize(model, name)
        lorakit.save_adapter(model, root / name, adapter_name=name)
    return root


def _base(root, kind):
    return lorakit.load_model(root / "model", quantize=QUANTIZE[kind], compute_dtype=torch.bfloat16)


def _only(root, kind, names):
    """Logits of a fresh base with just ``names`` loaded and active."""
    model = _base(root, kind)
    for name in names:
        lorakit.load_adapter(model, root / name, adapter_name=name)
    lorakit.set_adapter(model, names)
    return model_output(model, sample_ids())


def _weights(model, name):
    return [
        w
        for _, layer in lora_layers(model)
        if name in layer.lora_A
        for w in (layer.lora_A[name].weight, layer.lora_B[name].weight)
    ]


@pytest.mark.parametrize("kind", list(QUANTIZE))
def test_many_adapters_on_one_base(workspace, kind):
    ids = sample_ids()
    model = _base(workspace, kind)
    bare = model_output(model, ids)
    for name in ADAPTERS:
        lorakit.load_adapter(model, workspace / name, adapter_name=name, activate=False)

    rows = {row["name"]: row for row in list_adapters(model)}
    assert list(rows) == list(ADAPTERS)
    for name, row in rows.items():
        layers = [layer for _, layer in lora_layers(model) if name in layer.lora_A]
        assert row["parameters"] == sum(
            layer.r[name] * (layer.in_features + layer.out_features) for layer in layers
        )
        assert row["layers"] == len(layers) and not row["trainable"] and not row["merged"]
        assert (row["r"], row["lora_alpha"]) == (ADAPTERS[name]["r"], ADAPTERS[name]["lora_alpha"])
    assert [rows[n]["layers"] for n in ADAPTERS] == [14, 8, 4] and rows["chat"]["ranks"] == [2, 3]

    # One adapter, then several at once: each equals a fresh base holding only those adapters.
    lorakit.set_adapter(model, "code")
    assert [row["active"] for row in list_adapters(model)] == [False, True, False]
    torch.testing.assert_close(model_output(model, ids), _only(workspace, kind, ["code"]), atol=0, rtol=0)
    lorakit.set_adapter(model, ["math", "chat"])
    assert [row["active"] for row in list_adapters(model)] == [True, False, True]
    both = model_output(model, ids)
    torch.testing.assert_close(both, _only(workspace, kind, ["math", "chat"]), atol=0, rtol=0)
    assert (both - _only(workspace, kind, ["math"])).abs().max() > 1e-2
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model_output(model, ids), bare, atol=0, rtol=0)

    # Delete: gone from the listing and the state dict, its tensors freed (also the stacked copy a mixed batch
    # caches), the others untouched.
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["code", "math"])
    total = lorakit.trainable_parameters(model)[1]
    refs = [weakref.ref(w) for w in _weights(model, "code")]
    lorakit.delete_adapter(model, "code")
    gc.collect()
    assert [row["name"] for row in list_adapters(model)] == ["math", "chat"]
    assert lorakit.trainable_parameters(model)[1] == total - rows["code"]["parameters"]
    assert refs and all(ref() is None for ref in refs)
    assert not any(".code." in key for key in model.state_dict())
    lorakit.set_adapter(model, "math")
    torch.testing.assert_close(model_output(model, ids), _only(workspace, kind, ["math"]), atol=0, rtol=0)
    with pytest.raises(lorakit.ConfigError, match="no adapter named 'code'"):
        lorakit.delete_adapter(model, "code")


@pytest.mark.parametrize("kind", list(QUANTIZE))
def test_cat_of_loaded_adapters_equals_running_them_together(workspace, kind):
    """Arithmetic on a bf16 or 4-bit base: ``cat`` with weights 1 is the sum of the deltas, as two active adapters."""
    ids = sample_ids()
    model = _base(workspace, kind)
    for name in ("math", "code"):
        lorakit.load_adapter(model, workspace / name, adapter_name=name)
    add_weighted_adapter(model, ["math", "code"], [1.0, 1.0], "both", combination="cat")
    lorakit.set_adapter(model, ["math", "code"])
    together = model_output(model, ids)
    lorakit.set_adapter(model, "both")
    # Two adapter outputs rounded to bf16 one after the other versus one: a few bf16 steps of the logits apart
    # (the exact fp32 identity is in test_arithmetic.py).
    ulp = torch.finfo(torch.bfloat16).eps * together.abs().max()
    torch.testing.assert_close(model_output(model, ids), together, atol=4 * ulp.item(), rtol=0)


@pytest.mark.parametrize("kind", list(QUANTIZE))
def test_mixed_batch_on_a_bf16_or_4bit_base_equals_each_adapter_alone(workspace, kind):
    model = _base(workspace, kind)
    for name in ("math", "code", "chat"):
        lorakit.load_adapter(model, workspace / name, adapter_name=name, activate=False)
    rows = ["code", "math", "__base__", "chat", "code"]
    ids = sample_ids(batch=len(rows))
    with torch.no_grad():
        bare = model(input_ids=ids).logits  # loaded with activate=False: no adapter is active
        mixed = model(input_ids=ids, adapter_names=rows).logits
        for row, name in enumerate(rows):
            lorakit.set_adapter(model, [] if name == "__base__" else name)
            alone = model(input_ids=ids[row : row + 1]).logits[0]
            # bf16 activations: the grouped products round in another order than one adapter's; a bf16 step or
            # two of the logits apart at most (the fp32 identity is tests/test_mixed_batch.py)
            ulp = torch.finfo(torch.bfloat16).eps * alone.abs().max().item()
            torch.testing.assert_close(mixed[row], alone, atol=4 * ulp, rtol=0)
            if name != "__base__":
                assert (alone - bare[row]).abs().max() > 8 * ulp  # each adapter really changes the logits


def test_list_adapters_reports_trainable_dora_and_merged():
    model = BUILDERS["llama"]()
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="first")
    lorakit.wrap(
        model, lorakit.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True), adapter_name="dora"
    )
    rows = {row["name"]: row for row in list_adapters(model)}
    assert rows["first"]["active"] and rows["first"]["trainable"] and not rows["first"]["use_dora"]
    assert not rows["dora"]["active"] and not rows["dora"]["trainable"] and rows["dora"]["use_dora"]
    assert rows["dora"]["parameters"] == 2 * (2 * (32 + 32) + 32)  # A, B and the magnitude, in 2 layers
    assert rows["first"]["target_modules"] == ["q_proj"]
    lorakit.merge(model)
    assert next(r for r in list_adapters(model) if r["name"] == "first")["merged"]


def test_active_adapters_lists_adapters_that_skip_the_first_layer():
    model = BUILDERS["llama"]()
    lorakit.wrap(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="q_only")
    lorakit.wrap(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="v_only")
    lorakit.set_adapter(model, ["q_only", "v_only"])
    # merge_and_unload() merges active_adapters(model) by default, so today it silently drops v_only.
    assert lorakit.active_adapters(model) == ["q_only", "v_only"]


def test_load_adapter_without_activate_leaves_a_bare_model_inactive(workspace):
    model = _base(workspace, "bf16")
    lorakit.load_adapter(model, workspace / "math", adapter_name="math", activate=False)
    assert not list_adapters(model)[0]["active"]


# ------------------------------------------------------------------------------------- continual learning
def _old_and_new():
    model = BUILDERS["llama"]()
    config = dict(r=4, target_modules="all-linear", lora_dropout=0.1)
    lorakit.wrap(model, lorakit.LoraConfig(init_lora_weights=False, **config), adapter_name="old")
    lorakit.wrap(model, lorakit.LoraConfig(**config), adapter_name="new")  # B = 0: starts as a no-op
    return model


def test_new_adapter_trains_on_top_of_frozen_ones():
    ids = sample_ids()
    model = _old_and_new()
    stack_adapters(model, frozen=["old"], trainable="new")
    rows = {row["name"]: row for row in list_adapters(model)}
    assert rows["old"]["active"] and not rows["old"]["trainable"]
    assert rows["new"]["active"] and rows["new"]["trainable"]
    old_before = [w.clone() for w in _weights(model, "old")]
    new_before = [w.clone() for w in _weights(model, "new")]

    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(w.grad is None for w in _weights(model, "old"))
    assert any(w.grad is not None and w.grad.abs().sum() > 0 for w in _weights(model, "new"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(_weights(model, "old"), old_before))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(model, "new"), new_before))

    # The frozen adapter is part of the function (active in eval too) and runs without dropout in training.
    model.eval()
    both = model_output(model, ids)
    lorakit.set_adapter(model, "new")
    assert (both - model_output(model, ids)).abs().max() > 1e-2
    assert all(isinstance(layer.lora_dropout["old"], torch.nn.Identity) for _, layer in lora_layers(model))
    assert all(isinstance(layer.lora_dropout["new"], torch.nn.Dropout) for _, layer in lora_layers(model))


def test_plain_api_does_the_same_but_set_adapter_unfreezes():
    model = _old_and_new()
    lorakit.set_adapter(model, ["old", "new"])
    mark_trainable(model, "old", False)
    assert [row["trainable"] for row in list_adapters(model)] == [False, True]
    lorakit.set_adapter(model, ["old", "new"])  # makes every active adapter trainable again
    assert [row["trainable"] for row in list_adapters(model)] == [True, True]


def test_stack_adapters_errors():
    model = _old_and_new()
    with pytest.raises(lorakit.ConfigError, match="'new' is listed both in frozen"):
        stack_adapters(model, frozen=["old", "new"], trainable="new")
    with pytest.raises(lorakit.ConfigError, match="no adapter named 'nope'"):
        stack_adapters(model, frozen=["nope"], trainable="new")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def stacked_recipe(tmp_path_factory):
    """A training recipe with ``adapter.stack_on=[first]``, ``first`` an adapter with dropout 0.1."""
    root = make_workspace(tmp_path_factory.mktemp("stack_on"))
    _, model = lorakit.train.load_base(tiny_recipe(root))
    lorakit.wrap(
        model, lorakit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False)
    )
    lorakit.save_adapter(model, root / "first")
    return lambda out: tiny_recipe(root, f"output_dir={out}", f"adapter.stack_on=[{root / 'first'}]")


def _model_when_training_starts(recipe, monkeypatch):
    """The model exactly as ``lorakit.train.train`` hands it to the optimizer (then stop: no steps are run)."""
    seen = {}

    def build_optimizer(model, recipe):
        seen["model"] = model
        raise _Stop

    monkeypatch.setattr(lorakit.train, "build_optimizer", build_optimizer)
    with pytest.raises(_Stop):
        lorakit.train.train(recipe, progress=False)
    return seen["model"]


def test_training_with_stack_on_keeps_earlier_adapters_active_and_frozen(
    stacked_recipe, tmp_path, monkeypatch
):
    model = _model_when_training_starts(stacked_recipe(tmp_path / "out"), monkeypatch)
    rows = {row["name"]: row for row in list_adapters(model)}
    assert rows["stacked_0"]["active"] and not rows["stacked_0"]["trainable"]
    assert rows["default"]["active"] and rows["default"]["trainable"]
    assert lorakit.trainable_parameters(model)[0] == rows["default"]["parameters"]


def test_training_with_stack_on_runs_frozen_adapters_without_dropout(stacked_recipe, tmp_path, monkeypatch):
    model = _model_when_training_starts(stacked_recipe(tmp_path / "out"), monkeypatch)
    assert all(
        isinstance(layer.lora_dropout["stacked_0"], torch.nn.Identity)
        for _, layer in lora_layers(model)
        if "stacked_0" in layer.lora_dropout
    )
