"""The bundled quickstart: its assets and recipe, a short run through the real CLI path, then generate and
merge on the result. The full run, with the gain it must show, is the slow test at the end."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.data import format_alpaca_prompt
from lorakit.generate import SamplingConfig, generate_text
from lorakit.loading import load_model
from lorakit.recipe import QUICKSTART_DIR, load_recipe

MODEL_DIR = QUICKSTART_DIR / "model"
TRAIN_FILE = QUICKSTART_DIR / "data" / "train.jsonl"
EVAL_FILE = QUICKSTART_DIR / "data" / "eval.jsonl"
MAX_BYTES = 20 * 10**6  # the model directory, weights and tokenizer together


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_cli(args: list[str]) -> tuple[int, str]:
    """``lorakit ARGS`` in-process; returns the exit status and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(args)
    return status, printed.getvalue()


def test_recipe_is_the_default_and_points_into_the_package():
    recipe = load_recipe(None)
    assert recipe.model.path == str(MODEL_DIR) and recipe.model.quantize == "nf4"
    assert recipe.data.path == str(TRAIN_FILE) and recipe.data.val_path == str(EVAL_FILE)
    assert recipe.train.eval_generate >= 50, "the before/after report needs enough held-out rows"
    status, printed = run_cli(["train", "--dry-run"])
    assert status == 0 and "quantize: nf4" in printed and str(EVAL_FILE) in printed


def test_model_is_small_and_plain_transformers_loads_it():
    files = [p for p in MODEL_DIR.iterdir() if p.is_file()]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token_id == model.config.eos_token_id and tokenizer.pad_token_id is not None
    text = "July 4, 2031 -> 07/04/2031"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_data_is_the_task_and_the_eval_rows_are_held_out():
    train, held_out = read_rows(TRAIN_FILE), read_rows(EVAL_FILE)
    assert len(train) >= 500 and len(held_out) >= 50
    for row in train + held_out:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) and v for v in row.values())
        day = datetime.datetime.strptime(row["input"], "%B %d, %Y")  # "July 4, 2031"
        assert row["output"] == day.date().isoformat()  # "2031-07-04"
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}


def test_the_base_model_cannot_do_the_task():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    rows = read_rows(EVAL_FILE)[:16]
    prompts = [format_alpaca_prompt(r["instruction"], r["input"]) for r in rows]
    answers = generate_text(model, tokenizer, prompts, SamplingConfig(max_new_tokens=12))
    assert sum(a.strip() == r["output"] for a, r in zip(answers, rows)) == 0, answers


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """``lorakit train`` on the quickstart recipe, cut to 3 steps and 8 report rows."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    status, printed = run_cli(
        ["train", f"output_dir={out}", "train.max_steps=3", "train.eval_every=3", "train.eval_generate=8",
         "--no-progress"]
    )  # fmt: skip
    assert status == 0
    return out, printed


def test_short_run_reports_before_and_after(short_run):
    out, printed = short_run
    summary = json.loads((out / "train_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["n"] == after["n"] == 8 and before["exact_match"] == 0
    assert math.isfinite(before["eval_loss"]) and math.isfinite(after["eval_loss"])
    assert after["eval_loss"] < before["eval_loss"]  # three steps at the quickstart's lr already help
    assert f"{before['eval_loss']:.4f}" in printed and f"{after['eval_loss']:.4f}" in printed
    table = printed[printed.index("input  ") :]
    for row in read_rows(EVAL_FILE)[:8]:
        assert row["input"] in table and row["output"] in table
    assert f"lorakit generate --model {MODEL_DIR} --adapter {out}" in printed
    assert f"lorakit merge --model {MODEL_DIR} --adapter {out}" in printed
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_generate_uses_the_trained_adapter_on_a_4bit_base(short_run):
    out, _ = short_run
    row = read_rows(EVAL_FILE)[0]
    status, printed = run_cli(
        ["generate", "--model", str(MODEL_DIR), "--adapter", str(out), "--greedy", "--max-new-tokens", "12",
         "--input", row["input"], row["instruction"]]
    )  # fmt: skip
    assert status == 0
    model = load_model(MODEL_DIR, quantize="nf4", compute_dtype="auto")  # as generate: nf4 (recipe.yaml), auto
    lorakit.load_adapter(model, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = format_alpaca_prompt(row["instruction"], row["input"])
    (expected,) = generate_text(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=12))
    assert printed == expected + "\n"


def test_merge_writes_a_model_plain_transformers_loads(short_run, tmp_path):
    out, merged_dir = short_run[0], tmp_path / "merged"
    status, printed = run_cli(
        ["merge", "--model", str(MODEL_DIR), "--adapter", str(out), "--out", str(merged_dir),
         "--dtype", "float32"]
    )  # fmt: skip
    assert status == 0 and str(merged_dir) in printed
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    model = load_model(MODEL_DIR, quantize="nf4", compute_dtype=torch.float32).eval()  # the trained-on base
    prompt = format_alpaca_prompt("Write the date.", "July 4, 2031")
    ids = AutoTokenizer.from_pretrained(merged_dir)(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
        lorakit.load_adapter(model, out)
        adapted = model(ids).logits
        scale = float(adapted.abs().max())
        # merge computes in fp32 and saves fp32 here; the adapter ran in fp32 too: equal up to summation order.
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4 * scale, rtol=0)
    assert float((adapted - base).abs().max()) > 0.02 * scale, "the adapter must change what the model says"


def test_the_same_recipe_runs_on_another_local_model(tmp_path):
    """``model.path=...`` swaps the base: here a tiny Qwen2 with the quickstart's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    # A few rows of the bundled data keep it fast.
    for name, source, n in (("train.jsonl", TRAIN_FILE, 16), ("eval.jsonl", EVAL_FILE, 4)):
        (tmp_path / name).write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    status, printed = run_cli(
        ["train", f"model.path={tmp_path / 'qwen2'}", f"data.path={tmp_path / 'train.jsonl'}",
         f"data.val_path={tmp_path / 'eval.jsonl'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
         "train.eval_generate=2", "train.max_new_tokens=4", "--no-progress"]
    )  # fmt: skip
    assert status == 0 and "exact match" in printed
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "qwen2")
    assert set(saved["target_modules"]) == {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")}


@pytest.mark.slow
def test_full_quickstart_shows_a_large_gain(tmp_path):
    """``lorakit train`` as ``make demo`` runs it: exact match from about 0 to at least 80%."""
    out = tmp_path / "run"
    status, printed = run_cli(["train", f"output_dir={out}", "--no-progress"])
    assert status == 0
    summary = json.loads((out / "train_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["exact_match"] <= 0.05 and after["exact_match"] >= 0.8, printed
    assert after["eval_loss"] < before["eval_loss"] / 4
    row = read_rows(EVAL_FILE)[-1]
    status, answer = run_cli(
        ["generate", "--model", str(MODEL_DIR), "--adapter", str(out), "--greedy", "--input", row["input"],
         row["instruction"]]
    )  # fmt: skip
    assert status == 0 and answer.strip() == row["output"]
    merged = tmp_path / "merged"
    assert run_cli(["merge", "--model", str(MODEL_DIR), "--adapter", str(out), "--out", str(merged)])[0] == 0
    shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = format_alpaca_prompt(row["instruction"], row["input"])
    (plain,) = generate_text(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=16))
    assert plain == row["output"]
