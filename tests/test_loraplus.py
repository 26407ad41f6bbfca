"""LoRA+: parameter groups equal PEFT's create_loraplus_optimizer; a recipe with train.loraplus_ratio trains."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import lorakit
from lorakit.optim.loraplus import create_loraplus_optimizer, loraplus_param_groups
from lorakit.train import build_optimizer, load_base, train
from train_fixtures import make_workspace, tiny_recipe

from tiny_models import BUILDERS

SETTINGS = dict(lr=1e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)


def _named_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "") -> list[tuple]:
    """Each group as (sorted parameter names without ``prefix``, lr, weight_decay)."""
    names = {id(p): n.removeprefix(prefix) for n, p in model.named_parameters()}
    return [
        (sorted(names[id(p)] for p in group["params"]), group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
    ]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_groups_equal_peft_s_on_the_same_model_settings(method):
    # GPT-2: a LayerNorm trained in full (no decay), Conv1D targets and, with DoRA, its magnitudes (1-D).
    use_dora = method == "dora"
    kwargs = dict(r=4, target_modules=["c_attn", "c_fc"], use_dora=use_dora, modules_to_save=["ln_f"])
    ours = lorakit.wrap(BUILDERS["gpt2"](), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(BUILDERS["gpt2"](), peft.LoraConfig(**kwargs))
    ours_groups = _named_groups(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **SETTINGS))
    peft_optimizer = peft_loraplus(theirs, torch.optim.AdamW, **SETTINGS)
    assert ours_groups == _named_groups(theirs, peft_optimizer, prefix="base_model.model.")
    lrs = [group[1] for group in ours_groups]
    assert lrs == [1e-4, 1e-6, pytest.approx(1.6e-3), pytest.approx(1.6e-3)]
    if use_dora:
        assert any("lora_magnitude_vector" in n for n in ours_groups[2][0] + ours_groups[3][0])
    assert any("ln_f.modules_to_save" in n for n in ours_groups[3][0])  # LayerNorm: B-rate, no decay
    assert all(
        "lora_B" in n or "magnitude" in n or "ln_f" in n for n in ours_groups[2][0] + ours_groups[3][0]
    )


def test_embedding_adapters_get_their_own_lr():
    """lorakit has no embedding adapters; on a PEFT model that has one, our groups equal PEFT's."""
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    model = peft.get_peft_model(BUILDERS["llama"](), config)
    expected = _named_groups(model, peft_loraplus(model, torch.optim.AdamW, **SETTINGS))
    groups = loraplus_param_groups(model, 1e-4, 16, weight_decay=0.1)
    assert _named_groups(model, torch.optim.AdamW(groups)) == expected
    assert expected[1][0] and all("lora_embedding" in n for n in expected[1][0])


def test_recipe_with_loraplus_ratio_trains_end_to_end(tmp_path):
    workspace = make_workspace(tmp_path)
    recipe = tiny_recipe(workspace, "train.loraplus_ratio=16", "train.max_steps=2", "train.weight_decay=0.01")
    _, model = load_base(recipe)
    lorakit.wrap(model, recipe.adapter.lora_config())
    optimizer = build_optimizer(model, recipe)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-3, 1e-6, 5e-3 * 16, 5e-3 * 16]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    assert sizes[0] == sizes[2] > 0 and sizes[1] == sizes[3] == 0  # one A and one B per wrapped layer

    result = train(recipe, progress=False)
    assert result.final_train_loss is not None and math.isfinite(result.final_train_loss)
    assert (result.output_dir / "adapter_model.safetensors").is_file()
