"""Evaluation: validation loss / perplexity, and exact match of greedy answers on alpaca rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data import Collator, TokenizedDataset
from lorakit.data.formats import read_rows
from lorakit.generate import SamplingConfig, generate_text
from lorakit.loss import causal_lm_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, dataset: TokenizedDataset, collator: Collator, train_cfg, device
) -> float:
    """Mean next-token loss over all target tokens of ``dataset`` (eval mode, no dropout)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), train_cfg.batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + train_cfg.batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg.precision)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss_sum, n = causal_lm_loss_sum(model, batch, chunked=train_cfg.chunked_loss)
        total, count = total + float(loss_sum), count + n
    return total / max(1, count)


def normalize_answer(text: str) -> str:
    """Exact match compares answers with surrounding whitespace removed."""
    return text.strip()


def exact_match_report(
    model: nn.Module, tokenizer, rows: list[dict[str, str]], max_new_tokens: int = 64
) -> dict[str, Any]:
    """Answer each alpaca row greedily and score exact match against its ``output``.

    Returns:
        dict: ``exact_match`` (fraction in [0, 1]), ``n``, and ``answers`` (instruction, input, expected, got).
    """
    from lorakit.data import format_alpaca_prompt

    prompts = [format_alpaca_prompt(r["instruction"], r.get("input", "")) for r in rows]
    got = generate_text(model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, greedy=True))
    answers = [
        {"instruction": r["instruction"], "input": r.get("input", ""), "expected": r["output"], "got": g}
        for r, g in zip(rows, got)
    ]
    hits = sum(normalize_answer(a["got"]) == normalize_answer(a["expected"]) for a in answers)
    return {"exact_match": hits / max(1, len(rows)), "n": len(rows), "answers": answers}


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped to stay finite."""
    return math.exp(min(loss, 50.0))


def report_rows(val_path: str | Path | None, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` alpaca rows (``instruction`` + ``output``) of a validation file, for
    :func:`exact_match_report`; none without a validation file."""
    if val_path is None:
        return []
    parsed, _ = read_rows(Path(val_path))
    rows = [
        r.value for r in parsed if isinstance(r.value, dict) and {"instruction", "output"} <= r.value.keys()
    ]
    return rows[:limit]
