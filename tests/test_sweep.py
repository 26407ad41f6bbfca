"""``lorakit sweep``: axes, stages, packs by planned memory, the staged run end to end, results, resume."""

from __future__ import annotations

import csv
import json

import pytest

import lorakit.sweep as sweep_module
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.recipe import load_recipe
from lorakit.sweep import SweepOptions, _packs, split_packs
from lorakit.sweep_space import config_name, grid, parse_axes, parse_stages, split_values
from train_fixtures import make_workspace, tiny_recipe


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_axes_grid_and_stages():
    assert split_values("all,[q_proj,v_proj]") == ["all", "[q_proj,v_proj]"]
    axes = parse_axes(
        ["adapter.r=8,16", "train.lr=1e-4,2e-4,5e-4", "adapter.target_modules=all,[q_proj,v_proj]"]
    )
    assert [a.short for a in axes] == ["r", "lr", "target_modules"]
    assert len(grid(axes)) == 12
    assert grid(axes[:1], ("train.lr=1e-3",)) == [
        ("train.lr=1e-3", "adapter.r=8"),
        ("train.lr=1e-3", "adapter.r=16"),
    ]
    stages = parse_stages(
        "r,target_modules:lr:lora_alpha,lora_dropout", axes
    )  # keys without an axis are skipped
    assert [[a.short for a in s] for s in stages] == [["r", "target_modules"], ["lr"]]
    assert (
        config_name(("adapter.r=8", "adapter.target_modules=[q_proj,v_proj]"))
        == "r=8_target_modules=q_proj-v_proj"
    )
    with pytest.raises(ConfigError, match="in none"):
        parse_stages("r", axes)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_axes(["adapter.rank_typo=8,16"])
    with pytest.raises(ConfigError, match="twice"):
        parse_axes(["adapter.r=8,16", "adapter.r=32,64"])


def test_packs_follow_the_shared_base_and_the_planned_memory(workspace, tmp_path):
    recipes = [
        tiny_recipe(workspace, f"adapter.r={r}", f"output_dir={tmp_path / str(r)}") for r in (4, 8, 16)
    ]
    assert split_packs(recipes, budget=10**12, max_pack=8) == [[0, 1, 2]]
    assert split_packs(recipes, budget=10**12, max_pack=2) == [[0, 1], [2]]
    assert split_packs(recipes, budget=1, max_pack=8) == [[0], [1], [2]]  # nothing fits twice: one at a time
    # a different batch size is another base step: no pack (which methods can join one: tests/test_packed.py)
    other = [*recipes, tiny_recipe(workspace, "train.batch_size=2", f"output_dir={tmp_path / 'b2'}")]
    assert _packs(other, SweepOptions(memory_budget=10**12)) == [[0, 1, 2], [3]]
    assert _packs(recipes, SweepOptions(pack=False)) == [[0], [1], [2]]


def test_staged_sweep_writes_results_and_the_best_recipe_and_resumes(
    workspace, tmp_path, monkeypatch, capsys
):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe(workspace, "adapter.lora_dropout=0.0", "train.eval_every=2").to_yaml())
    out = tmp_path / "sweep"
    argv = ["sweep", str(recipe), "adapter.r=4,8", "train.lr=1e-3,2e-2", "train.max_steps=4", "--stages",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["configs"]
    assert len(rows) == 4  # 2 ranks, then 2 learning rates at the best rank
    stage1 = [r for r in rows if r["stage"] == 1]
    best_r = min(stage1, key=lambda r: r["eval_loss"])["overrides"]["adapter.r"]
    stage2 = [r for r in rows if r["stage"] == 2]
    assert {r["overrides"]["adapter.r"] for r in stage2} == {best_r}  # stage 2 fixed stage 1's best
    assert all(r["pack"] == [x["config"] for x in stage2] for r in stage2)  # each stage trained as one pack
    best = min(rows, key=lambda r: r["eval_loss"])
    assert results["best"] == best["config"]
    written = load_recipe(out / "best_recipe.yaml")
    assert written.adapter.r == best["overrides"]["adapter.r"] and written.train.max_steps == 4
    with open(out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (out / "eval_curves.png").stat().st_size > 0
    for row in rows:
        assert (out / "configs" / row["config"] / "adapter_model.safetensors").is_file()
        assert row["peak_memory_mb"] > 0 and row["tokens_per_s"] > 0
    assert "* " + best["config"] in capsys.readouterr().out
    # the same command again: every config is finished, nothing trains, the same results
    monkeypatch.setattr(sweep_module, "train_pack", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("trained again"))
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["best"] == results["best"]
