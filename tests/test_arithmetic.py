"""Adapter arithmetic: parity with PEFT's add_weighted_adapter, exactness of cat and full-rank svd, PEFT format."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import lorakit
from lorakit.arithmetic import add_weighted_adapter
from lorakit.inject import adapter_configs, list_adapters, lora_layers

from tiny_models import BUILDERS, model_output, sample_ids

# PEFT adapters of different ranks and scales (one rsLoRA), random A and B so every one changes the output.
# Names avoid letters of PEFT's "lora_" prefix (PEFT warns about such names).
SOURCES = {
    "p": dict(r=4, lora_alpha=8),
    "q": dict(r=4, lora_alpha=3),
    "s": dict(r=2, lora_alpha=5, use_rslora=True),
}
CASES = {
    "linear": (["p", "q"], [0.7, -0.4]),  # linear needs equal ranks
    "cat": (["p", "q", "s"], [0.7, -0.4, 1.3]),
    "svd": (["p", "q", "s"], [0.7, -0.4, 1.3]),
}
# Logit tolerance against PEFT: linear and cat do the same float operations (bit-equal in practice); svd runs
# torch.linalg.svd on the same matrix but PEFT asks for full matrices and transposes Conv1D deltas first, which
# changes the last bits of a few factors (max seen: 1.0e-5 on GPT-2 logits of size ~1).
ATOL = {"linear": 1e-6, "cat": 1e-6, "svd": 1e-4}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def peft_adapters(request, tmp_path_factory):
    """``(arch, dir)``: PEFT adapters ``p``, ``q``, ``s`` on the tiny model, saved under ``dir/<name>``."""
    arch, root = request.param, tmp_path_factory.mktemp(f"peft_{request.param}")
    model = None
    for name, kwargs in SOURCES.items():
        config = peft.LoraConfig(target_modules="all-linear", init_lora_weights=False, **kwargs)
        if model is None:
            model = peft.get_peft_model(BUILDERS[arch](), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.save_pretrained(root)
    return arch, root


def _peft_model(arch, root):
    model = peft.PeftModel.from_pretrained(BUILDERS[arch](), root / "p", adapter_name="p")
    for name in ("q", "s"):
        model.load_adapter(root / name, adapter_name=name)
    return model.eval()


def _lorakit_model(arch, root):
    model = BUILDERS[arch]()
    for name in SOURCES:
        lorakit.load_adapter(model, root / name, adapter_name=name)
    return model


@pytest.mark.parametrize("combination", list(CASES))
def test_same_logits_as_peft_add_weighted_adapter(peft_adapters, combination):
    arch, root = peft_adapters
    names, weights = CASES[combination]
    ids = sample_ids()
    theirs_model = _peft_model(arch, root)
    theirs_model.add_weighted_adapter(names, weights, "mix", combination_type=combination)
    theirs_model.set_adapter("mix")
    theirs = model_output(theirs_model, ids)

    ours_model = _lorakit_model(arch, root)
    add_weighted_adapter(ours_model, names, weights, "mix", combination=combination)
    lorakit.set_adapter(ours_model, "mix")
    ours = model_output(ours_model, ids)
    torch.testing.assert_close(ours, theirs, atol=ATOL[combination], rtol=0)
    with lorakit.disable_adapters(ours_model):
        assert (model_output(ours_model, ids) - ours).abs().max() > 1e-2  # the combination does something
    # Same rank and scale as PEFT's config (r = lora_alpha = new rank).
    peft_config = theirs_model.peft_config["mix"]
    row = next(r for r in list_adapters(ours_model) if r["name"] == "mix")
    assert (row["r"], row["lora_alpha"]) == (peft_config.r, peft_config.lora_alpha)


def _random_adapters(model, specs):
    for name, kwargs in specs.items():
        lorakit.wrap(model, lorakit.LoraConfig(init_lora_weights=False, **kwargs), adapter_name=name)


# Different ranks, scales, targets (some layers hold only some adapters) and a per-layer rank.
MIXED = {
    "one": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "two": dict(r=2, lora_alpha=3, target_modules="minimal", use_rslora=True),
    "three": dict(r=3, lora_alpha=6, target_modules="attention", rank_pattern={"o_proj": 5, "c_proj": 5}),
}


def _weighted_delta(layer, names, weights):
    return sum(w * layer.delta_weight(n) for n, w in zip(names, weights) if n in layer.lora_A)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cat_delta_is_exactly_the_weighted_sum_of_deltas(arch):
    model = BUILDERS[arch]()
    _random_adapters(model, MIXED)
    names, weights = list(MIXED), [0.5, -1.5, 2.0]
    add_weighted_adapter(model, names, weights, "mix", combination="cat")
    ranks = []
    for _, layer in lora_layers(model):
        torch.testing.assert_close(
            layer.delta_weight("mix"), _weighted_delta(layer, names, weights), atol=1e-6, rtol=0
        )
        ranks.append(sum(layer.r[n] for n in names if n in layer.r))
    # One rank for the adapter (the largest per-layer sum); the other layers are zero-padded.
    assert {layer.r["mix"] for _, layer in lora_layers(model)} == {max(ranks)}
    # Inactive and frozen until set_adapter names it, as in PEFT.
    row = next(r for r in list_adapters(model) if r["name"] == "mix")
    assert not row["active"] and not row["trainable"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_svd_is_exact_at_full_rank_and_the_best_approximation_below(arch):
    model = BUILDERS[arch]()
    _random_adapters(model, MIXED)
    names, weights = list(MIXED), [0.5, -1.5, 2.0]
    add_weighted_adapter(model, names, weights, "full", combination="svd", svd_rank=4 + 2 + 5)
    add_weighted_adapter(model, names, weights, "low", combination="svd", svd_rank=2)
    add_weighted_adapter(model, names, weights, "default_rank", combination="svd")
    for _, layer in lora_layers(model):
        exact = _weighted_delta(layer, names, weights)
        torch.testing.assert_close(layer.delta_weight("full"), exact, atol=1e-5, rtol=0)
        # Eckart-Young: the rank-2 error is the norm of the dropped singular values.
        tail = torch.linalg.svdvals(exact)[2:]
        error = torch.linalg.matrix_norm(layer.delta_weight("low") - exact)
        torch.testing.assert_close(error, tail.norm(), atol=1e-5, rtol=1e-4)
    assert {layer.r["default_rank"] for _, layer in lora_layers(model)} == {5}  # the largest source rank


def test_one_adapter_svd_recompresses_to_a_lower_rank():
    model = BUILDERS["llama"]()
    _random_adapters(model, {"big": dict(r=8, lora_alpha=16, target_modules="all-linear")})
    add_weighted_adapter(model, ["big"], [1.0], "small", combination="svd", svd_rank=3)
    for _, layer in lora_layers(model):
        assert layer.r["small"] == 3
        exact = layer.delta_weight("big")
        tail = torch.linalg.svdvals(exact)[3:]
        error = torch.linalg.matrix_norm(layer.delta_weight("small") - exact)
        torch.testing.assert_close(error, tail.norm(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("combination", list(CASES))
def test_result_saves_in_peft_format_and_peft_loads_it(peft_adapters, combination, tmp_path):
    arch, root = peft_adapters
    names, weights = CASES[combination]
    ids = sample_ids()
    model = _lorakit_model(arch, root)
    add_weighted_adapter(model, names, weights, "mix", combination=combination)
    lorakit.set_adapter(model, "mix")
    ours = model_output(model, ids)
    lorakit.save_adapter(model, tmp_path, adapter_name="mix")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    theirs = model_output(peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval(), ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    back = model_output(lorakit.load_adapter(BUILDERS[arch](), tmp_path), ids)
    torch.testing.assert_close(back, ours, atol=1e-6, rtol=0)


def test_combined_targets_are_the_union_of_the_sources():
    model = BUILDERS["llama"]()
    _random_adapters(
        model,
        {
            "qv": dict(r=2, target_modules=["q_proj", "v_proj"]),
            "layer0": dict(r=2, target_modules=["o_proj"], layers_to_transform=[0]),
        },
    )
    add_weighted_adapter(model, ["qv", "layer0"], [1.0, 1.0], "mix", combination="cat")
    # o_proj only in layer 0: suffix names would also select layer 1, so the exact paths are written.
    targets = adapter_configs(model)["mix"].target_modules
    assert "model.layers.0.self_attn.o_proj" in targets and "model.layers.1.self_attn.o_proj" not in targets
    assert sorted(p for p, layer in lora_layers(model) if "mix" in layer.lora_A) == sorted(targets)
    add_weighted_adapter(model, ["qv"], [2.0], "qv2", combination="linear")
    assert adapter_configs(model)["qv2"].target_modules == ["q_proj", "v_proj"]


def _four_and_eight():
    model = BUILDERS["llama"]()
    _random_adapters(
        model,
        {"four": dict(r=4, target_modules="all-linear"), "eight": dict(r=8, target_modules="all-linear")},
    )
    return model


def _assert_refused(model, kwargs, message):
    kwargs = {"adapter_name": "mix", **kwargs}
    with pytest.raises(lorakit.ConfigError, match=message):
        add_weighted_adapter(model, **kwargs)
    assert "mix" not in adapter_configs(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(adapters=["four", "nope"], weights=[1, 1]),
            r"no adapter named 'nope' on this model; present: \['eight', 'four'\]",
        ),
        (
            dict(adapters=["four", "eight"], weights=[1, 1], combination="linear"),
            r"equal rank.*'four' has r=4 and adapter 'eight' has r=8.*'cat'",
        ),
        (dict(adapters=["four", "eight"], weights=[1.0]), r"1 weights for 2 adapters"),
        (dict(adapters=["four"], weights=[1.0], adapter_name="eight"), r"'eight' is already on this model"),
        (
            dict(adapters=["four"], weights=[1.0], combination="ties"),
            r"combination must be one of linear, cat, svd",
        ),
        (
            dict(adapters=["four"], weights=[1.0], combination="cat", svd_rank=2),
            r"svd_rank is only used with",
        ),
        (dict(adapters=["four"], weights=[1.0], svd_rank=0), r"svd_rank must be a positive integer"),
        (dict(adapters=["four"], weights=[float("nan")]), r"weights must be finite numbers"),
        (dict(adapters=[], weights=[]), r"adapters is empty"),
    ],
)
def test_clear_errors(kwargs, message):
    _assert_refused(_four_and_eight(), kwargs, message)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(adapters=["four", "nope"], weights=[1, 1]),
            r"no adapter named 'nope' on this model; present: \['dora', 'eight', 'four'\]",
        ),
        (dict(adapters=["dora"], weights=[1.0]), r"'dora' is a DoRA adapter"),
    ],
    ids=["listed", "refused"],
)
def test_clear_errors_with_a_dora_adapter(kwargs, message):
    model = _four_and_eight()
    _random_adapters(model, {"dora": dict(r=2, use_dora=True)})
    _assert_refused(model, kwargs, message)
