"""A tiny model directory + alpaca data on disk, and a recipe over them, for training tests."""

from __future__ import annotations

from pathlib import Path

from lorakit.recipe import Recipe, apply_overrides, recipe_from_dict

from tiny_models import write_alpaca, write_causal_lm_dir
from tokenizer_factory import build_tokenizer


def make_workspace(root: Path) -> Path:
    """``root/model`` (tiny Llama + tokenizer), ``root/train.jsonl`` (48 rows), ``root/val.jsonl`` (8 rows)."""
    if not (root / "model" / "config.json").is_file():
        write_causal_lm_dir(root / "model", build_tokenizer())
        write_alpaca(root / "train.jsonl", 48, seed=0)
        write_alpaca(root / "val.jsonl", 8, seed=1)
    return root


def tiny_recipe(root: Path, *overrides: str) -> Recipe:
    """A fast recipe on the workspace: fp32 base, 8 steps of batch 4 x accum 2."""
    base = [
        f"model.path={root / 'model'}", "model.quantize=null", "model.compute_dtype=float32",
        f"data.path={root / 'train.jsonl'}", f"data.val_path={root / 'val.jsonl'}",
        "train.max_steps=8", "train.batch_size=4", "train.grad_accum=2", "train.lr=5e-3",
        "train.precision=fp32", "train.warmup_steps=2", f"output_dir={root / 'out'}",
    ]  # fmt: skip
    # Built from the dataclass defaults, not the bundled quickstart recipe, so quickstart tuning never leaks here.
    return recipe_from_dict(apply_overrides({}, [*base, *overrides]), source="test recipe")
