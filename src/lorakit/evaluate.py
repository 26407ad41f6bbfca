"""Evaluation: validation loss / perplexity, and exact match of greedy answers on alpaca or chat rows."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data import Collator, TokenizedDataset
from lorakit.data.formats import read_rows
from lorakit.distributed import Ranks
from lorakit.generate import SamplingConfig, generate_text
from lorakit.inject import batch_adapters
from lorakit.loss import causal_lm_loss_sums


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
    return evaluate_losses(model, dataset, collator, train_cfg, device, ranks=ranks)[0]


@torch.no_grad()
def evaluate_losses(
    model: nn.Module, dataset: TokenizedDataset, collator: Collator, train_cfg, device,
    adapters: list[str] | None = None, ranks: Ranks | None = None,
) -> list[float]:  # fmt: skip
    """:func:`evaluate_loss` of each of ``adapters`` at once (a training pack, :mod:`lorakit.packed`): each batch
    repeated once per adapter, each copy through its own adapter over one pass of the shared base. None: the
    active adapter(s), one value."""
    model.eval()
    ranks = ranks or Ranks()
    blocks = len(adapters) if adapters else 1
    totals, count = [0.0] * blocks, 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg.precision)
    for start in ranks.mine(list(range(0, len(dataset), train_cfg.batch_size))):
        first = start or 0  # None: FSDP's padding, a forward pass every rank runs the same number of
        batch = collator([dataset[i] for i in range(first, min(first + train_cfg.batch_size, len(dataset)))])
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
        if start is not None:
            totals, count = [t + float(v) for t, v in zip(totals, sums)], count + n
    *totals, count = ranks.sum([*totals, count])
    return [t / max(1, count) for t in totals]


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
    """Answer each row greedily and score exact match: an alpaca row against its ``output`` (alpaca prompt),
    a chat row (``messages`` ending in an assistant turn) against that turn, the rest in the chat template.

    Under torchrun (``ranks``) with ddp each rank answers its share of the rows and the answers are gathered;
    under FSDP every rank answers every row (a sharded model needs the same forward passes on all ranks).

    Returns:
        dict: ``exact_match`` (fraction in [0, 1]), ``n``, and ``answers`` (instruction, input, expected, got).
    """
    ranks = ranks or Ranks()
    rows = [_as_prompt_row(r, tokenizer) for r in rows]
    share = rows if ranks.sharded else ranks.mine(rows)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    mine = generate_text(model, tokenizer, [r["prompt"] for r in share], sampling) if share else []
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


def _as_prompt_row(row: dict, tokenizer) -> dict[str, str]:
    """``instruction``, ``input``, ``output`` and the rendered ``prompt`` of an alpaca or a chat row."""
    from lorakit.data import format_alpaca_prompt
    from lorakit.data.formats import chat_messages

    if "instruction" in row:
        return {**row, "prompt": format_alpaca_prompt(row["instruction"], row.get("input", ""))}
    messages = chat_messages(row)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return {"instruction": messages[-2]["content"], "output": messages[-1]["content"], "prompt": prompt}


def _is_report_row(value) -> bool:
    if not isinstance(value, dict):
        return False
    if {"instruction", "output"} <= value.keys():
        return True
    turns = value.get("messages") or value.get("conversations")
    return isinstance(turns, list) and len(turns) >= 2  # the last turn is the expected answer


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped to stay finite."""
    return math.exp(min(loss, 50.0))


def report_rows(val_path: str | Path | None, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` alpaca rows (``instruction`` + ``output``) or chat rows of a validation file, for
    :func:`exact_match_report`; none without a validation file."""
    if val_path is None:
        return []
    parsed, _ = read_rows(Path(val_path))
    rows = [r.value for r in parsed if _is_report_row(r.value)]
    return rows[:limit]
