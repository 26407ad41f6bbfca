"""One optimizer step's pieces: the micro-batch order of an epoch, autocast, and gradient accumulation normalized
by target tokens (used by :mod:`lorakit.train`, :mod:`lorakit.packed` and the benchmarks)."""

from __future__ import annotations

import torch

from lorakit.loss import causal_lm_loss_sum, target_count


def epoch_micro_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches: a permutation fixed by (seed, epoch), so a resumed run sees the same order."""
    order = torch.randperm(
        n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    ).tolist()
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


def autocast_for(precision: str, device: torch.device):
    """Autocast for ``precision`` (bf16 / fp16), or a disabled one for fp32."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    precision: str = "bf16",
    chunked: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    n_targets: float | None = None,
) -> float:
    """Forward and backward over the micro-batches of one optimizer step; returns the step's loss.

    Each micro-batch's summed token loss is divided by the number of target tokens of *all* micro-batches,
    so the accumulated gradient equals the gradient of one large batch (not a mean of per-batch means, which
    over-weights short batches: transformers PR #34191). ``n_targets`` (default: counted here) is that number
    when the step has more micro-batches than these: on every rank of a data-parallel run, all ranks' count.
    """
    n_targets = n_targets or max(1, sum(target_count(b) for b in micro_batches))
    loss_total = 0.0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(precision, device):
            loss_sum, _ = causal_lm_loss_sum(model, batch, chunked=chunked)
        loss = loss_sum / n_targets
        (scaler.scale(loss) if scaler else loss).backward()
        loss_total += loss.item()
    return loss_total
