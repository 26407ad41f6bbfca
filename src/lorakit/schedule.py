"""How long a run is and how its learning rate moves: steps from the data size, warmup, and the schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.recipe import TrainSection


def lr_lambda(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine / linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def run_length(cfg: TrainSection, n_items: int) -> tuple[int, int]:
    """Optimizer steps of a run over ``n_items`` training samples, and its warmup steps."""
    steps_per_epoch = math.ceil(math.ceil(n_items / cfg.batch_size) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total)
    return total, warmup


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainSection, total: int, warmup: int):
    """The ``LambdaLR`` of :func:`lr_lambda` for ``cfg.scheduler``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total, warmup, cfg.scheduler))


__all__ = ["lr_lambda", "lr_schedule", "run_length"]
