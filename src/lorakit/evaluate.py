"""Evaluation: validation loss / perplexity, and exact match of greedy answers on alpaca rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data import Collator, TokenizedDataset
from lorakit.data.formats import read_rows
from lorakit.distributed import Ranks
from lorakit.generate import SamplingConfig, generate_text
from lorakit.loss import causal_lm_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: TokenizedDataset,
    collator: Collator,
    train_cfg,
    device,
    ranks: Ranks | None = None,
) -> float:
    """Mean next-token loss over all target tokens of ``dataset`` (eval mode, no dropout).

    Under torchrun (``ranks``, :mod:`lorakit.distributed`) each rank evaluates its share of the batches and the
    loss sums and token counts are summed over ranks: every rank returns the loss of the whole set.
    """
    model.eval()
    ranks = ranks or Ranks()
    total, count = 0.0, 0
    starts = list(range(0, len(dataset), train_cfg.batch_size))
    for start in ranks.mine(starts):
        stop = min((start or 0) + train_cfg.batch_size, len(dataset))
        batch = collator([dataset[i] for i in range(start or 0, stop)])
        batch = {k: v.to(device) for k, v in batch.items()}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg.precision)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss_sum, n = causal_lm_loss_sum(model, batch, chunked=train_cfg.chunked_loss)
        if start is not None:  # None: FSDP's padding, a forward pass every rank runs the same number of
            total, count = total + float(loss_sum), count + n
    total, count = ranks.sum([total, count])
    return total / max(1, count)


def normalize_answer(text: str) -> str:
    """Exact match compares answers with surrounding whitespace removed."""
    return text.strip()


def exact_match_report(
    model: nn.Module,
    tokenizer,
    rows: list[dict[str, str]],
    max_new_tokens: int = 64,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Answer each alpaca row greedily and score exact match against its ``output``.

    Under torchrun (``ranks``) with ddp each rank answers its share of the rows and the answers are gathered;
    under FSDP every rank answers every row (a sharded model needs the same forward passes on all ranks).

    Returns:
        dict: ``exact_match`` (fraction in [0, 1]), ``n``, and ``answers`` (instruction, input, expected, got).
    """
    from lorakit.data import format_alpaca_prompt

    ranks = ranks or Ranks()
    share = rows if ranks.sharded else ranks.mine(rows)
    prompts = [format_alpaca_prompt(r["instruction"], r.get("input", "")) for r in share]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    mine = generate_text(model, tokenizer, prompts, sampling) if prompts else []
    if ranks.sharded:
        got = mine
    else:  # row i was answered by rank i % world_size, as its (i // world_size)-th
        shares = ranks.gather(mine)
        got = [shares[i % ranks.world_size][i // ranks.world_size] for i in range(len(rows))]
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
