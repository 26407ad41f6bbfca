"""Hardening (docs/reliability.md): each defect a hostile probe found, reproduced and now refused cleanly.

Rows of issue 18: (1) YAML alias bombs, (2) --resume of a finished run, (3) two runs in one folder,
(5) tracebacks on bad model dirs / overrides / recipes / data, (6) weights that do not fit config.json,
(7) folders left by failed or early-killed starts, (8) silent default model, (11) resume housekeeping,
(12) the minor ones. The server rows (4, 9, 10) are in tests/test_serve_limits.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.bounded_yaml import MAX_YAML_DEPTH, load_yaml, shown
from lorakit.checkpoint import list_checkpoints
from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.inspect import describe
from lorakit.recipe import load_recipe
from lorakit.run_lock import LOCK_NAME, RunLock, RunLockedError
from lorakit.train import TrainingError, train
from train_fixtures import make_workspace, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def cli(*argv: str) -> tuple[int, str, str]:
    """``lorakit argv`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def assert_one_clear_error(status: int, stderr: str, *words: str) -> None:
    assert status != 0 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and len(stderr) < 2100, stderr  # one message (a bad-rows list spans lines)
    for word in words:
        assert word in stderr, stderr


# ------------------------------------------------------------------------------ (1) alias bombs, limits
def _bomb(levels: int = 9) -> str:
    """A "billion laughs" YAML: level i lists level i-1 nine times (9**levels strings once expanded)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bombs_are_refused_fast_and_small(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("model:\n  path: m\ntrain:\n  " + _bomb().replace("\n", "\n  "))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"aliases .* not allowed") as err:
            load_recipe(recipe)
        with pytest.raises(ConfigError, match=r"aliases .* not allowed"):
            load_recipe(None, ["train.lr=[&a [1, 2], [*a, *a], [*a, *a]]"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20 and len(str(err.value)) < 300


def test_yaml_limits_depth_duplicates_tags_and_echoed_values(tmp_path):
    with pytest.raises(ConfigError, match=f"deeper than {MAX_YAML_DEPTH}"):
        load_yaml("a: " + "[" * 5000 + "]" * 5000, "deep.yaml")
    blocks = (
        "".join(f"{'  ' * i}k{i}:\n" for i in range(MAX_YAML_DEPTH + 2)) + "  " * (MAX_YAML_DEPTH + 2) + "v\n"
    )
    with pytest.raises(ConfigError, match=f"line {MAX_YAML_DEPTH}: nested deeper than"):
        load_yaml(blocks, "blocks.yaml")  # block nesting: no brackets, the composer counts the levels
    with pytest.raises(ConfigError, match=r"line 3: the key 'lr' appears twice \(first on line 2\)"):
        load_yaml("train:\n  lr: 1\n  lr: 2\n", "dup.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml("!!python/object/apply:os.system ['true']", "tag.yaml")
    with pytest.raises(ConfigError, match="invalid YAML value"):
        load_yaml("r: " + "9" * 5000, "digits.yaml")
    assert len(shown(list(range(10**6)))) < 100 and len(shown("x" * 10**6)) < 100
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["train.lr=[" + ", ".join(["1"] * 20000) + "]"])
    assert len(str(err.value)) < 300


# ------------------------------------------------------------------ (5) one message, never a traceback
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("- 1\n- 2\n", ["expected a mapping of sections", "list"]),
        ("just a string\n", ["expected a mapping of sections", "str"]),
        (b"\xff\xfe model: 1", ["not UTF-8"]),
        ("model:\n  path: m\nadapter:\n  rank_pattern: hello\n", ["rank_pattern", "mapping"]),
        ("model:\n  path: m\nadapter:\n  r: " + "1" + "0" * 30 + "\n", ["adapter.r", "at most"]),
        ("model: {path: m}\ntrain: " + "[" * 200 + "]" * 200 + "\n", ["deeper than"]),
    ],
)
def test_bad_recipes_are_one_clear_error(tmp_path, text, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_clear_error(*cli("train", str(recipe), "--dry-run")[::2], *words)


@pytest.mark.parametrize(
    "override", ["train.lr=[1,2", "train.lr=!!python/name:os.system", "adapter.r={a: 1", "train.lr=*x"]
)
def test_bad_overrides_are_one_clear_error(override):
    assert_one_clear_error(*cli("train", override, "--dry-run")[::2], "override")


def test_output_dirs_that_cannot_be_written_are_one_clear_error(workspace, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, Path("/proc/lorakit-run")):
        base = [f"model.path={workspace / 'model'}", f"data.path={workspace / 'train.jsonl'}",
                "model.quantize=null", f"output_dir={out}", "--no-progress"]  # fmt: skip
        assert_one_clear_error(*cli("train", *base)[::2], "output_dir")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: m\nadapter:\n  r: 0\n")
    assert "Traceback" not in cli("train", str(recipe), "--dry-run")[2]
    assert "Traceback" in cli("--debug", "train", str(recipe), "--dry-run")[2]
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    assert "Traceback" in cli("train", str(recipe), "--dry-run")[2]


def _model_variant(workspace: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the workspace's model directory, broken as ``name`` says."""
    target = tmp_path / name
    shutil.copytree(workspace / "model", target)
    config = json.loads((target / "config.json").read_text())
    broken = {
        "garbage": "{not json", "list": "[1, 2]",
        "no_type": json.dumps({k: v for k, v in config.items() if k != "model_type"}),
        "unknown_type": json.dumps({**config, "model_type": "robotron"}),
        "deep": "[" * 100_000 + "]" * 100_000,
        "hidden": json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}),  # (6)
        "vocab": json.dumps({**config, "vocab_size": 4_000_000_000}),  # (6)
    }  # fmt: skip
    if name == "no_tokenizer":
        for path in target.glob("tokenizer*"):
            path.unlink()
    else:
        (target / "config.json").write_text(broken[name])
    return target


BROKEN_MODELS = {
    "garbage": "not valid JSON", "list": "JSON object", "no_type": "model_type", "unknown_type": "robotron",
    "deep": "not valid JSON", "no_tokenizer": "no tokenizer", "hidden": "shape", "vocab": "4000000000",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN_MODELS))
def test_broken_model_dirs_are_refused_before_any_work(workspace, tmp_path, name):
    model = _model_variant(workspace, tmp_path, name)
    out = tmp_path / "out"
    runs = {
        "generate": ["generate", "--model", str(model), "--max-new-tokens", "2", "hi"],
        "merge": ["merge", "--model", str(model), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")],
        "train": ["train", f"model.path={model}", f"data.path={workspace / 'train.jsonl'}", "model.quantize=null",
                  f"output_dir={out}", "train.max_steps=1", "--no-progress"],
    }  # fmt: skip
    for argv in runs.values():
        assert_one_clear_error(*cli(*argv)[::2], BROKEN_MODELS[name])
    assert not out.exists() and not (tmp_path / "m").exists()  # nothing half-written


def test_bad_data_rows_are_bad_rows_not_tracebacks(workspace, tmp_path):
    text = json.dumps({"text": "a good row"})
    chat = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    )
    for name, rows in {"deep": [text, "[" * 100_000 + "]" * 100_000], "surrogate": [text, '{"text": "a \\ud800"}'],
                       "robot": [chat, chat.replace('"user"', '"robot"')]}.items():  # fmt: skip
        data = tmp_path / f"{name}.jsonl"
        data.write_text("\n".join(rows) + "\n")
        status, _, err = cli("train", f"model.path={workspace / 'model'}", f"data.path={data}",
                             "model.quantize=null", f"output_dir={tmp_path / name}", "--no-progress")  # fmt: skip
        assert_one_clear_error(status, err, f"{data}:2")
        assert not (tmp_path / name).exists()
    assert "unknown role 'robot'" in err


# ----------------------------------------------------------------------------- (8) no silent defaults
def test_an_empty_recipe_or_one_without_model_path_is_an_error(tmp_path):
    empty, no_model = tmp_path / "empty.yaml", tmp_path / "no_model.yaml"
    empty.write_text("# nothing\n")
    no_model.write_text("train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_recipe(empty)
    with pytest.raises(ConfigError, match=r"model\.path is required"):
        load_recipe(no_model)
    assert load_recipe(no_model, ["model.path=/models/x"]).model.path == "/models/x"
    assert load_recipe(None).model.path.endswith("quickstart/model")  # `lorakit train`: the quickstart


# ------------------------------------------------------------------------------ (3) the run owns its folder
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(workspace, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on host"):
            train(tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=1"), progress=False)
        with pytest.raises(RunLockedError):
            RunLock(out).acquire()
    assert not out.exists()  # the lock created the folder and left it empty: nothing remains
    (out).mkdir()
    (out / LOCK_NAME).write_text("otherhost 999999 0\n")  # a stale lock file: nobody holds the flock
    result = train(tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=1"), progress=False)
    assert result.steps == 1 and not (out / LOCK_NAME).exists()


# --------------------------------------------------- (2) finished runs, (7) dead starts, (11) housekeeping
def _metrics_steps(out: Path) -> list[int]:
    """The steps of the train lines of ``metrics.jsonl``, after checking no evaluation is logged twice."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if "eval_loss" in r]
    assert len(evals) == len(set(evals)), evals
    return [r["step"] for r in records if "loss" in r]


def test_resume_of_a_finished_run_changes_nothing(workspace, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=3", "train.eval_every=3")
    first = train(recipe, progress=False)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = train(recipe, resume=True, progress=False)
    assert again.final_train_loss == first.final_train_loss and again.steps == 3
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    status, stdout, err = cli("train", str(tmp_path / "r.yaml"), "--resume", "--no-progress")
    assert status == 0 and "finished run" in stdout and "Traceback" not in err, err
    # Killed during the final writes: the last checkpoint is there, the summary is not.
    (out / "train_summary.json").unlink()
    (out / "adapter_model.safetensors").unlink()
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.final_train_loss == first.final_train_loss and resumed.eval_loss == first.eval_loss
    assert json.loads((out / "train_summary.json").read_text())["final_train_loss"] == first.final_train_loss
    assert _metrics_steps(out) == [1, 2, 3]  # no line twice


def test_a_start_that_died_before_its_first_checkpoint_is_taken_over(workspace, tmp_path):
    out = tmp_path / "run"
    nan = tiny_recipe(workspace, f"output_dir={out}", "train.lr=1e20", "train.max_grad_norm=null",
                      "train.warmup_steps=0", "train.scheduler=constant", "train.max_steps=20")  # fmt: skip
    with pytest.raises(TrainingError, match="loss became") as err:
        train(nan, progress=False)
    assert "precision=fp32" not in str(err.value)  # (12) no fp32 advice on an fp32 run
    assert not list_checkpoints(out / "checkpoints") and (out / "recipe.yaml").is_file()
    good = tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=2")
    assert train(good, progress=False).steps == 2  # a plain start takes the dead folder over
    # Killed before the first checkpoint (recipe and a metrics line written): --resume starts from step 0.
    for path in (out / "checkpoints").iterdir():
        shutil.rmtree(path)
    (out / "train_summary.json").unlink()
    again = train(good, resume=True, progress=False)
    assert again.steps == 2 and _metrics_steps(out) == [1, 2]


def test_resume_cuts_metrics_and_removes_half_written_checkpoints(workspace, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=6", "train.save_every=2",
                         "train.keep_last=5")  # fmt: skip
    full = train(recipe, progress=False)
    checkpoints = out / "checkpoints"
    # A kill after step 5's metrics line, before its checkpoint; half-written and half-deleted folders.
    shutil.rmtree(checkpoints / "step-000006")
    (out / "train_summary.json").unlink()
    shutil.copytree(checkpoints / "step-000004", checkpoints / ".tmp-step-000006")
    (checkpoints / "step-000002" / "adapter_model.safetensors").unlink()
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "loss": 1.0')  # a torn line
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000004"]
    assert describe(out)["checkpoints"] == ["step-000004"]  # never listed when incomplete
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.final_train_loss == pytest.approx(full.final_train_loss, abs=1e-6)
    assert _metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004", "step-000006"]


# ------------------------------------------------------------------------------------------ (12) minor
def test_integer_adapter_tensors_are_refused(workspace, tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(workspace, f"output_dir={out}", "train.max_steps=1"), progress=False)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v.to(torch.int32) for k, v in weights.items()}, out / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="int32; adapter weights are floating point"):
        describe(out)
    status, _, err = cli("generate", "--model", str(workspace / "model"), "--adapter", str(out),
                         "--max-new-tokens", "2", "hi")  # fmt: skip
    assert_one_clear_error(status, err, "int32")


def test_the_generate_hint_after_a_chat_run_uses_the_chat_template(workspace, tmp_path):
    from lorakit.cli import _print_result
    from lorakit.train import TrainResult

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")  # fmt: skip
    recipe = tiny_recipe(workspace, f"data.path={chat}", "data.val_path=null")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _print_result(TrainResult(output_dir=tmp_path, steps=0, final_train_loss=None), recipe)
    assert "--template chat" in out.getvalue() and "final train loss: n/a" in out.getvalue()
    assert issubclass(RunLockedError, LorakitError)
