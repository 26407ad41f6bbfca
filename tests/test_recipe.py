"""Recipes: every shipped recipe loads and validates; overrides; unknown keys suggest the closest one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.recipe import QUICKSTART_DIR, RECIPES_DIR, Recipe, apply_overrides, load_recipe, recipe_from_dict

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))


def _recipe_id(path: Path) -> str:
    """The recipe's name and its adapter method (``multilingual-dora``): testing it tests that method too."""
    method = (yaml.safe_load(path.read_text()).get("adapter") or {}).get("method", "lora")
    return f"{path.stem}-{method}"


def test_the_four_seed_recipes_ship():
    assert {p.stem for p in SHIPPED} >= {
        "qlora_alpaca",
        "domain_adaptation",
        "instruction_tuning",
        "multilingual",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=_recipe_id)
def test_every_shipped_recipe_loads_and_round_trips(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    recipe.adapter.lora_config()  # the adapter section is a valid LoraConfig


@pytest.mark.parametrize("path", SHIPPED, ids=_recipe_id)
def test_shipped_recipes_let_the_hardware_choose_precision(path):
    # a pinned bf16 would run ~70x slower on a CPU without native bf16 (docs/precision.md)
    recipe = load_recipe(path)
    assert (recipe.model.compute_dtype, recipe.train.precision) == ("auto", "auto")


def test_seed_recipe_values():
    qlora = load_recipe(RECIPES_DIR / "qlora_alpaca.yaml")
    assert (qlora.adapter.r, qlora.adapter.lora_alpha, qlora.adapter.lora_dropout) == (16, 32, 0.05)
    assert len(qlora.adapter.target_modules) == 7 and qlora.model.quantize == "nf4"
    assert (qlora.train.lr, qlora.train.epochs, qlora.train.batch_size, qlora.train.grad_accum) == (
        2e-4,
        3,
        4,
        4,
    )
    assert (qlora.train.warmup_ratio, qlora.train.scheduler, qlora.train.optimizer) == (
        0.03,
        "cosine",
        "paged_adamw_8bit",
    )
    domain = load_recipe(RECIPES_DIR / "domain_adaptation.yaml")
    assert (domain.adapter.r, domain.adapter.lora_alpha, domain.adapter.lora_dropout, domain.train.lr) == (
        32,
        64,
        0.1,
        1e-4,
    )
    assert domain.train.epochs == 5 and domain.adapter.target_modules == "all"
    instruct = load_recipe(RECIPES_DIR / "instruction_tuning.yaml")
    assert (instruct.adapter.r, instruct.adapter.lora_alpha, instruct.train.loraplus_ratio) == (8, 16, 16)
    assert instruct.adapter.target_modules == "minimal"


def test_seed_recipe_values_multilingual_dora():
    multi = load_recipe(RECIPES_DIR / "multilingual.yaml")
    assert (multi.adapter.method, multi.adapter.r, multi.adapter.lora_alpha) == ("dora", 64, 128)
    assert (multi.train.lr, multi.train.warmup_ratio, multi.adapter.target_modules) == (
        5e-5,
        0.1,
        "attention",
    )


def test_quickstart_is_the_default():
    recipe = load_recipe(None)
    assert recipe.model.path == str(QUICKSTART_DIR / "model")
    assert recipe.data.path == str(QUICKSTART_DIR / "data" / "train.jsonl")


def test_dotted_overrides_change_fields_with_types():
    recipe = load_recipe(None, ["train.lr=1e-3", "adapter.r=32", "model.quantize=null", "data.packing=true",
                                "adapter.target_modules=[q_proj,v_proj]", "output_dir=/tmp/x"])  # fmt: skip
    assert recipe.train.lr == 1e-3 and isinstance(recipe.train.lr, float)
    assert recipe.adapter.r == 32 and recipe.model.quantize is None and recipe.data.packing is True
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"] and recipe.output_dir == "/tmp/x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1e-3", r"unknown key 'train\.lrr'; did you mean 'lr'\?"),
        ("adapter.rank=4", r"unknown key 'adapter\.rank'; did you mean 'r'\?"),
        ("trian.lr=1", r"did you mean 'train'\?"),
        ("train.lr", "expected key=value"),
        ("adapter.r=0", r"adapter\.r must be a positive integer"),
        ("train.optimizer=sgd", r"train\.optimizer: expected one of adamw, adamw_8bit"),
        ("model.quantize=int3", r"model\.quantize: expected nf4, fp4 or null"),
        ("data.train_on=everything", r"data\.train_on"),
        ("train.warmup_ratio=1.5", r"train\.warmup_ratio"),
    ],
)
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [override])


@pytest.mark.parametrize("method", ["adalora", "qrlora"])
def test_loraplus_needs_a_method_with_b_matrices(method):
    with pytest.raises(
        ConfigError, match=rf"train\.loraplus_ratio .* adapter\.method={method} does not have"
    ):
        # From the dataclass defaults, not the quickstart recipe (whose LoRA fields QR-LoRA would refuse first).
        recipe_from_dict(apply_overrides({}, [f"adapter.method={method}", "train.loraplus_ratio=16"]))


def test_loraplus_takes_a_dora_adapter():
    assert load_recipe(None, ["adapter.method=dora", "train.loraplus_ratio=16"]).train.loraplus_ratio == 16


def test_unknown_key_in_file_suggests(tmp_path):
    path = Path(tmp_path) / "r.yaml"
    path.write_text("model:\n  quantise: nf4\n")
    with pytest.raises(
        ConfigError, match=r"r\.yaml: unknown key 'model\.quantise'; did you mean 'quantize'\?"
    ):
        load_recipe(path)
    path.write_text("trainn: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_recipe(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipes_ship_inside_the_package_and_load_by_name():
    import tomllib

    import lorakit

    package = Path(lorakit.__file__).parent
    assert RECIPES_DIR.parent == package and SHIPPED  # package data, so an installed wheel has them
    data = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())
    assert "recipes/*.yaml" in data["tool"]["setuptools"]["package-data"]["lorakit"]
    by_name = load_recipe("qlora_alpaca")
    assert by_name == load_recipe(RECIPES_DIR / "qlora_alpaca.yaml")
