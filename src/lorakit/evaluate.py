"""Evaluation: validation loss / perplexity, and exact match of greedy answers on alpaca rows."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data import Collator, TokenizedDataset
from lorakit.data.formats import read_rows
from lorakit.generate import SamplingConfig, generate_text
from lorakit.inject import batch_adapters
from lorakit.loss import causal_lm_loss_sums


def evaluate_loss(
    model: nn.Module, dataset: TokenizedDataset, collator: Collator, train_cfg, device
) -> float:
    """Mean next-token loss over all target tokens of ``dataset`` (eval mode, no dropout)."""
    return evaluate_losses(model, dataset, collator, train_cfg, device)[0]


@torch.no_grad()
def evaluate_losses(
    model: nn.Module, dataset: TokenizedDataset, collator: Collator, train_cfg, device,
    adapters: list[str] | None = None,
) -> list[float]:  # fmt: skip
    """:func:`evaluate_loss` of each of ``adapters`` at once (a training pack, :mod:`lorakit.packed`): each batch
    repeated once per adapter, each copy through its own adapter over one pass of the shared base. None: the
    active adapter(s), one value."""
    model.eval()
    blocks = len(adapters) if adapters else 1
    totals, count = [0.0] * blocks, 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg.precision)
    for start in range(0, len(dataset), train_cfg.batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + train_cfg.batch_size, len(dataset)))])
        rows = len(batch["input_ids"])
        batch = {k: v.to(device) for k, v in batch.items()}
        if blocks > 1:
            batch = {k: v.repeat(blocks, *[1] * (v.dim() - 1)) for k, v in batch.items()}  # [K·B, ...]
        routing = (
            batch_adapters(model, [a for a in adapters for _ in range(rows)], True)
            if adapters
            else nullcontext()
        )
        with routing, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            sums, n = causal_lm_loss_sums(model, batch, blocks, chunked=train_cfg.chunked_loss)
        totals, count = [t + float(v) for t, v in zip(totals, sums)], count + n
    return [t / max(1, count) for t in totals]


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
