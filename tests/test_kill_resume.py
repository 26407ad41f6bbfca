"""SIGKILL at any moment, then ``--resume``: the run ends with the uninterrupted run's final loss and adapter
(docs/reliability.md). A kill before the first checkpoint and one during the final writes, in one chain of runs on
one folder (tests/test_train.py kills mid-run); the slow version kills 20 times at seeded random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import train
from train_fixtures import make_workspace, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
COMMON = [f"train.max_steps={STEPS}", "train.save_every=2", "train.keep_last=2", "adapter.lora_dropout=0.1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _start(workspace: Path, out: Path, resume: bool) -> subprocess.Popen:
    """``lorakit train recipe.yaml output_dir=out [--resume]`` in a subprocess running this tree's code."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "lorakit.cli", "train", str(workspace / "recipe.yaml"), f"output_dir={out}",
            "--no-progress"]  # fmt: skip
    return subprocess.Popen([*argv, *(["--resume"] if resume else [])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """The uninterrupted run (in this process, one thread as the subprocesses) and its recipe file."""
    out = tmp_path_factory.mktemp("full") / "run"
    recipe = tiny_recipe(workspace, *COMMON, f"output_dir={out}")
    (workspace / "recipe.yaml").write_text(recipe.to_yaml())
    return train(recipe, progress=False), out


def _kill_when(run: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL ``run`` as soon as ``ready()``; False when it exited first."""
    deadline = time.monotonic() + timeout
    while not ready() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    killed = run.poll() is None
    run.send_signal(signal.SIGKILL)
    run.wait()
    return killed


def _finish_and_compare(workspace: Path, out: Path, reference) -> None:
    result, full = reference
    resumed = _start(workspace, out, resume=True)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "Traceback" not in output, output
    summary = json.loads((out / "train_summary.json").read_text())
    assert abs(summary["final_train_loss"] - result.final_train_loss) < 1e-4, output
    expected = load_file(full / "adapter_model.safetensors")
    for key, value in load_file(out / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if "eval_loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # no step lost or twice
    assert len(evals) == len(set(evals))


def test_kills_before_the_first_checkpoint_and_during_the_final_writes(
    workspace, reference, tmp_path
):
    out = tmp_path / "run"
    moments = [
        lambda: (out / "recipe.yaml").exists(),  # model and data loaded, no checkpoint yet
        lambda: (out / "adapter_model.safetensors").exists(),  # the final writes have begun
    ]
    for i, ready in enumerate(moments):
        _kill_when(_start(workspace, out, resume=i > 0), ready)
        assert not (out / "train_summary.json").exists() or i == 1
    _finish_and_compare(workspace, out, reference)


@pytest.mark.slow
def test_twenty_kills_at_random_moments_then_resume(workspace, reference, tmp_path):
    out, rng = tmp_path / "run", random.Random(20)
    run = _start(workspace, out, resume=False)
    started = time.monotonic()
    run.wait()  # one whole run, to learn how long one takes here
    span = time.monotonic() - started
    shutil.rmtree(out)
    for i in range(20):
        run = _start(workspace, out, resume=i > 0)
        _kill_when(run, lambda: False, timeout=rng.uniform(0.3, 1.0) * span)
        if (out / "train_summary.json").exists():  # it finished before the kill: start the chain over
            shutil.rmtree(out)
    _finish_and_compare(workspace, out, reference)
