"""The built wheel is self-contained: shipped recipes and the quickstart run from an install, not from the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built into a wheel from a copy of its sources, then installed (no deps) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)], check=True
    )
    (wheel,) = (tmp / "dist").glob("lorakit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lorakit/recipes/qlora_alpaca.yaml" in names and "lorakit/quickstart/recipe.yaml" in names
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def run_lorakit(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_recipe_by_name_trains_from_the_installed_wheel(installed, tmp_path):
    # run outside the repository: the recipe, its model and its data must all come from the install
    where = run_lorakit(installed, tmp_path, "env", "--json")
    assert where.returncode == 0, where.stderr
    dry = run_lorakit(installed, tmp_path, "train", "qlora_alpaca", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"path: {installed}/lorakit/quickstart/model" in dry.stdout
    assert f"path: {installed}/lorakit/quickstart/data/train.jsonl" in dry.stdout
    out = tmp_path / "run"
    overrides = ["train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "data.max_length=128"]
    run = run_lorakit(installed, tmp_path, "train", "qlora_alpaca", *overrides, f"output_dir={out}")
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2
    assert (out / "adapter_model.safetensors").is_file()
