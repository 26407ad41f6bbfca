"""Training packs: each config of a pack ends where its separate run ends; per-config early stopping, NaN, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.methods import METHODS
from lorakit.packed import pack_key, train_pack, why_not_packable
from lorakit.run_lock import RunLock, RunLockedError
from lorakit.train import train
from train_fixtures import make_workspace, tiny_recipe

# Four LoRA configs of different rank and learning rate (the done-when); no dropout, so bit-level
# reproducibility is up to float rounding only.
CONFIGS = [
    ("adapter.r=4", "train.lr=5e-3"),
    ("adapter.r=8", "train.lr=1e-3"),
    ("adapter.r=4", "train.lr=2e-2"),
    ("adapter.r=16", "train.lr=5e-3", "train.scheduler=constant"),
]
COMMON = ("adapter.lora_dropout=0.0", "train.eval_every=4")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_each_packed_config_ends_with_the_adapter_of_its_separate_run(workspace, tmp_path):
    packed = [
        tiny_recipe(workspace, *c, *COMMON, f"output_dir={tmp_path / 'pack' / str(i)}")
        for i, c in enumerate(CONFIGS)
    ]
    results = train_pack(packed, progress=False)
    assert len({pack_key(r) for r in packed}) == 1
    for i, config in enumerate(CONFIGS):
        alone = train(
            tiny_recipe(workspace, *config, *COMMON, f"output_dir={tmp_path / 'alone' / str(i)}"),
            progress=False,
        )
        got, expected = _adapter(tmp_path / "pack" / str(i)), _adapter(tmp_path / "alone" / str(i))
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)
        assert results[i].final_train_loss == pytest.approx(alone.final_train_loss, abs=1e-4)
        assert results[i].eval_loss == pytest.approx(alone.eval_loss, abs=1e-4)
        # a complete run directory: recipe, metrics, curve, summary, best adapter, checkpoints
        out = tmp_path / "pack" / str(i)
        for name in (
            "recipe.yaml",
            "metrics.jsonl",
            "loss.png",
            "train_summary.json",
            "best/adapter_model.safetensors",
        ):
            assert (out / name).is_file(), name
        assert list((out / "checkpoints").glob("step-*"))
    # the configs really differ (the routing does not hand one adapter's rows to another)
    ranks = {
        _adapter(tmp_path / "pack" / str(i))[k].shape
        for i in range(4)
        for k in _adapter(tmp_path / "pack" / str(i))
        if k.endswith("lora_A.weight")
    }
    assert len(ranks) >= 3


DORA = ("adapter.method=dora", "adapter.use_rslora=true", "train.loraplus_ratio=4", "train.lr=2e-3")


def test_a_dora_config_packs_exactly_and_a_pack_resumes_from_its_checkpoints(workspace, tmp_path):
    extra = (*COMMON, "train.save_every=4", "train.keep_last=5")
    recipes = [
        tiny_recipe(workspace, *CONFIGS[0], *extra, f"output_dir={tmp_path / '0'}"),
        tiny_recipe(workspace, *DORA, *extra, f"output_dir={tmp_path / '1'}"),
    ]
    train_pack(recipes, progress=False)
    train(tiny_recipe(workspace, *DORA, *extra, f"output_dir={tmp_path / 'alone'}"), progress=False)
    expected = _adapter(tmp_path / "alone")
    assert any("lora_magnitude_vector" in key for key in expected)
    for key, value in expected.items():  # DoRA + rsLoRA + LoRA+ in a pack: its separate run's adapter
        torch.testing.assert_close(_adapter(tmp_path / "1")[key], value, atol=1e-4, rtol=0)
    finished = [_adapter(tmp_path / str(i)) for i in range(2)]
    for i in range(2):  # as if killed after the step-4 checkpoint
        out = tmp_path / str(i)
        shutil.rmtree(out / "checkpoints" / "step-000008")
        (out / "train_summary.json").unlink()
        (out / "adapter_model.safetensors").unlink()
    train_pack(recipes, resume=True, progress=False)
    for i in range(2):
        resumed = _adapter(tmp_path / str(i))
        for key, value in finished[i].items():
            torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0)


def test_configs_that_cannot_share_a_pack_are_refused(workspace, tmp_path):
    with pytest.raises(ConfigError, match="cannot share a pack"):
        train_pack([tiny_recipe(workspace), tiny_recipe(workspace, "train.batch_size=2")], progress=False)
    assert "PiSSA" in why_not_packable(tiny_recipe(workspace, "adapter.init_lora_weights=pissa"))
    with pytest.raises(ConfigError, match="share an output_dir"):
        train_pack([tiny_recipe(workspace), tiny_recipe(workspace, "adapter.r=4")], progress=False)


def test_a_pack_refuses_a_config_directory_another_run_holds(workspace, tmp_path):
    recipes = [tiny_recipe(workspace, f"output_dir={tmp_path / name}") for name in ("a", "b")]
    with RunLock(tmp_path / "b"), pytest.raises(RunLockedError, match=str(tmp_path / "b")):
        train_pack(recipes, progress=False)
    assert not (
        tmp_path / "a"
    ).exists()  # refused before any work: nothing written for the free config either


@pytest.mark.parametrize("method", list(METHODS))
def test_a_method_packs_when_its_row_has_lora_factors(workspace, method):
    recipe = tiny_recipe(workspace, f"adapter.method={method}", *(DORA[1:] if method == "dora" else ()))
    if METHODS[method].lora_factors:
        assert why_not_packable(recipe) is None
        return
    assert f"method={method}" in why_not_packable(recipe)
    with pytest.raises(ConfigError, match=f"method={method}"):
        train_pack([tiny_recipe(workspace), recipe], progress=False)


def test_a_config_whose_loss_diverges_leaves_the_pack_and_the_others_finish(workspace, tmp_path):
    recipes = [
        tiny_recipe(workspace, "train.max_steps=4", f"output_dir={tmp_path / 'ok'}"),
        tiny_recipe(
            workspace,
            "train.max_steps=4",
            "train.lr=1e30",
            "train.max_grad_norm=null",
            f"output_dir={tmp_path / 'nan'}",
        ),
    ]
    ok, bad = train_pack(recipes, progress=False)
    assert ok.steps == 4 and (tmp_path / "ok" / "adapter_model.safetensors").is_file()
    assert bad.final_train_loss != bad.final_train_loss  # NaN
    summary = json.loads((tmp_path / "nan" / "train_summary.json").read_text())
    assert "loss became" in summary["error"] and not (tmp_path / "nan" / "adapter_model.safetensors").exists()
