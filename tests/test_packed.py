"""Training packs: each config of a pack ends where its separate run ends; per-config early stopping, NaN, resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorakit.packed import pack_key, train_pack
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
