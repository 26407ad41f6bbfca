"""The training loop: accumulation, determinism, resume after SIGKILL, NaN stop, outputs, early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.data import load_dataset, make_collator
from lorakit.train import TrainingError, accumulate_gradients, load_base, lr_lambda, train
from train_fixtures import make_workspace, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_accumulated_gradient_equals_large_batch_gradient(workspace):
    recipe = tiny_recipe(workspace, "adapter.lora_dropout=0.0", "adapter.init_lora_weights=false")
    tokenizer, model = load_base(recipe)
    lorakit.wrap(model, recipe.adapter.lora_config())
    data, _, _ = load_dataset(recipe.data, tokenizer)
    collate = make_collator(tokenizer)
    items = [data[i] for i in range(6)]
    # Uneven micro-batches (1 and 5 samples) make a mean of per-batch means differ from the large-batch mean.
    micro = [collate(items[:1]), collate(items[1:])]
    params = [p for p in model.parameters() if p.requires_grad]

    loss_accum = accumulate_gradients(model, micro, torch.device("cpu"), "fp32")
    grads_accum = [p.grad.clone() for p in params]
    model.zero_grad()
    loss_big = accumulate_gradients(model, [collate(items)], torch.device("cpu"), "fp32")
    assert loss_accum == pytest.approx(loss_big, abs=1e-5)
    for a, b in zip(grads_accum, [p.grad for p in params]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # And it equals transformers' own mean loss over the large batch.
    batch = collate(items)
    with torch.no_grad():
        reference = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert loss_big == pytest.approx(reference.item(), abs=1e-5)


def test_lr_schedule_shapes():
    assert lr_lambda(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_lambda(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_lambda(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_lambda(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_lambda(90, 100, 10, "constant") == 1.0


def test_run_writes_everything_and_loss_goes_down(workspace, tmp_path):
    out = tmp_path / "run"
    result = train(
        tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=12", "train.eval_every=4"),
        progress=False,
    )
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.jsonl", "loss.png",
            "tokenizer.json", "best", "checkpoints"} <= names  # fmt: skip
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert [r["step"] for r in lines if "eval_loss" in r] == [4, 8, 12]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved adapter reproduces the trained model.
    tokenizer, base = load_base(tiny_recipe(workspace))
    lorakit.load_adapter(base, out)
    _, val, _ = load_dataset(tiny_recipe(workspace).data, tokenizer)
    from lorakit.evaluate import evaluate_loss

    reloaded = evaluate_loss(
        base, val, make_collator(tokenizer), tiny_recipe(workspace).train, torch.device("cpu")
    )
    assert reloaded == pytest.approx(result.eval_loss, abs=1e-5)


def test_fixed_seed_gives_identical_runs(workspace, tmp_path):
    a = train(tiny_recipe(workspace, f"output_dir={tmp_path / 'a'}", "train.max_steps=4"), progress=False)
    b = train(tiny_recipe(workspace, f"output_dir={tmp_path / 'b'}", "train.max_steps=4"), progress=False)
    c = train(
        tiny_recipe(workspace, f"output_dir={tmp_path / 'c'}", "train.max_steps=4", "train.seed=7"),
        progress=False,
    )
    assert [h.get("loss") for h in a.history] == [h.get("loss") for h in b.history]
    assert [h.get("loss") for h in a.history] != [h.get("loss") for h in c.history]


def test_existing_output_dir_is_refused_then_overwritten(workspace, tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=1"), progress=False)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds another run; nothing was overwritten"):
        train(tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=2"), progress=False)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    train(tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=2", "overwrite=true"), progress=False)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


def test_a_start_that_fails_on_bad_data_leaves_nothing_that_blocks_the_fixed_run(workspace, tmp_path):
    from lorakit.errors import LorakitError

    out = tmp_path / "run"
    with pytest.raises(LorakitError, match=r"missing\.jsonl"):
        train(
            tiny_recipe(workspace, f"output_dir={out}", f"data.path={tmp_path / 'missing.jsonl'}"),
            progress=False,
        )
    assert not out.exists() or not any(out.iterdir())
    train(tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=1"), progress=False)
    assert (out / "adapter_model.safetensors").is_file()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workspace, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(
        workspace, f"output_dir={out}", "train.lr=1e20", "train.max_grad_norm=null", "train.save_every=1",
        "train.warmup_steps=0", "train.scheduler=constant", "train.max_steps=20",
    )  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"loss became (nan|inf).*last good checkpoint is .*step-0000\d\d"
    ):
        train(recipe, progress=False)
    assert list((out / "checkpoints").glob("step-*"))


def test_early_stopping_when_eval_loss_stops_improving(workspace, tmp_path):
    recipe = tiny_recipe(
        workspace, f"output_dir={tmp_path / 'run'}", "train.lr=1e-30", "train.eval_every=1",
        "train.early_stopping_patience=2", "train.max_steps=8", "train.scheduler=constant",
    )  # fmt: skip
    result = train(recipe, progress=False)
    assert result.stopped_early
    assert len([h for h in result.history if "eval_loss" in h]) == 3  # best, then two without improvement


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    # this tree's src first: the interpreter's own lorakit may be another checkout (an editable install elsewhere)
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def test_resume_after_sigkill_reaches_the_same_final_loss(workspace, tmp_path):
    common = ["train.max_steps=10", "train.save_every=1", "train.keep_last=3", "adapter.lora_dropout=0.1",
              "--no-progress"]  # fmt: skip
    base = [a for a in _recipe_cli(workspace) if not a.startswith("output_dir")]
    full = _cli("train", *base, f"output_dir={tmp_path / 'full'}", *common)
    assert full.wait(timeout=300) == 0, full.stdout.read()

    killed_dir = tmp_path / "killed"
    run = _cli("train", *base, f"output_dir={killed_dir}", *common)
    deadline = time.time() + 240
    while (
        not (killed_dir / "checkpoints" / "step-000004").exists()
        and run.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed_dir / "train_summary.json").exists()  # it really died mid-run
    resumed = _cli("train", *base, f"output_dir={killed_dir}", *common, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output

    final = json.loads((tmp_path / "full" / "train_summary.json").read_text())["final_train_loss"]
    again = json.loads((killed_dir / "train_summary.json").read_text())["final_train_loss"]
    assert abs(final - again) < 1e-4
    from safetensors.torch import load_file

    for key, value in load_file(tmp_path / "full" / "adapter_model.safetensors").items():
        torch.testing.assert_close(
            load_file(killed_dir / "adapter_model.safetensors")[key], value, atol=1e-5, rtol=0
        )


def _recipe_cli(root: Path) -> list[str]:
    return [
        f"model.path={root / 'model'}", "model.quantize=null", "model.compute_dtype=float32",
        f"data.path={root / 'train.jsonl'}", f"data.val_path={root / 'val.jsonl'}",
        "train.batch_size=4", "train.grad_accum=2", "train.lr=5e-3", "train.precision=fp32", "train.warmup_steps=2",
        f"output_dir={root / 'out'}",
    ]  # fmt: skip


def test_tensorboard_logging(workspace, tmp_path):
    out = tmp_path / "run"
    train(
        tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=2", "train.tensorboard=true"),
        progress=False,
    )
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_stack_on_trains_new_adapter_on_top_of_frozen_ones(workspace, tmp_path):
    first = train(
        tiny_recipe(workspace, f"output_dir={tmp_path / 'first'}", "train.max_steps=3"), progress=False
    )
    second = train(
        tiny_recipe(workspace, f"output_dir={tmp_path / 'second'}", "train.max_steps=3",
                    f"adapter.stack_on=[{first.output_dir}]"),
        progress=False,
    )  # fmt: skip
    tokenizer, model = load_base(tiny_recipe(workspace))
    lorakit.load_adapter(model, first.output_dir, adapter_name="old")
    lorakit.load_adapter(model, second.output_dir, adapter_name="new")
    _, val, _ = load_dataset(tiny_recipe(workspace).data, tokenizer)
    from lorakit.evaluate import evaluate_loss

    def loss_with(names):
        lorakit.set_adapter(model, names)
        return evaluate_loss(
            model, val, make_collator(tokenizer), tiny_recipe(workspace).train, torch.device("cpu")
        )

    # The second run's final eval loss was measured with both adapters active, the first one unchanged (its
    # original weights from disk reproduce that loss, so it did not train).
    assert loss_with(["old", "new"]) == pytest.approx(second.eval_loss, abs=1e-5)
    assert loss_with(["new"]) != pytest.approx(second.eval_loss, abs=1e-4)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_recipe_optimizer_trains_and_resumes_exactly(workspace, tmp_path, optimizer, monkeypatch):
    import lorakit.train as train_module
    from lorakit.optim import OPTIMIZERS

    built = []
    monkeypatch.setattr(
        train_module,
        "make_optimizer",
        lambda *a, **k: built.append(OPTIMIZERS[a[1]](*a[:1], **k)) or built[-1],
    )
    recipe = tiny_recipe(
        workspace, f"output_dir={tmp_path / 'run'}", f"train.optimizer={optimizer}", "train.max_steps=6",
        "train.save_every=3", "train.keep_last=5", "adapter.lora_dropout=0.1",
    )  # fmt: skip
    full = train(recipe, progress=False)
    losses = [h["loss"] for h in full.history if "loss" in h]
    assert losses[-1] < losses[0]
    from safetensors.torch import load_file

    weights = load_file(full.output_dir / "adapter_model.safetensors")
    assert [type(o) for o in built] == [OPTIMIZERS[optimizer]]
    again = train(recipe, resume=str(full.output_dir / "checkpoints" / "step-000003"), progress=False)
    assert again.final_train_loss == pytest.approx(full.final_train_loss, abs=1e-6)
    for key, value in load_file(again.output_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, weights[key], atol=0, rtol=0)


@pytest.mark.parametrize("lean", [False, True])
def test_lean_cpu_heap_changes_the_allocator_only_when_asked(workspace, tmp_path, monkeypatch, lean):
    calls = []
    monkeypatch.setattr("lorakit.train.return_freed_memory_to_os", lambda *a, **k: calls.append(a) or True)
    recipe = tiny_recipe(
        workspace, "train.max_steps=1", f"output_dir={tmp_path / 'run'}", f"train.lean_cpu_heap={lean}"
    )
    train(recipe, progress=False)
    assert len(calls) == int(lean)
