"""Optimizer names usable in a recipe (``train.optimizer``) -> optimizer classes, in one visible table."""

from __future__ import annotations

from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.optim.adamw8bit import AdamW8bit, ParamsT
from lorakit.optim.paged import PagedAdamW, PagedAdamW8bit

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,  # fp32 moments in the parameter's dtype (8 bytes per fp32 element)
    "adamw_8bit": AdamW8bit,  # block-wise 8-bit moments (2.03 bytes per element)
    "paged_adamw": PagedAdamW,  # fp32 moments in pinned host memory on CUDA
    "paged_adamw_8bit": PagedAdamW8bit,  # 8-bit moments in pinned host memory on CUDA
}


def build_optimizer(
    params_or_groups: ParamsT, name: str, lr: float, weight_decay: float, **kw: Any
) -> torch.optim.Optimizer:
    """Build the optimizer a recipe names.

    Args:
        params_or_groups (iterable): Parameters, or param-group dicts (e.g. LoRA+ groups with their own ``lr``).
        name (str): ``"adamw"``, ``"adamw_8bit"``, ``"paged_adamw"`` or ``"paged_adamw_8bit"``.
        lr (float): Learning rate.
        weight_decay (float): Decoupled weight decay.
        **kw: Further keyword arguments of the optimizer class (``betas``, ``eps``, ``min_8bit_size``, ...).

    Returns:
        torch.optim.Optimizer: The optimizer.

    Raises:
        ConfigError: ``name`` is not one of :data:`OPTIMIZERS` (the message lists them), or a bad hyper-parameter.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {name!r} (train.optimizer); expected one of {', '.join(OPTIMIZERS)}"
        )
    return OPTIMIZERS[name](params_or_groups, lr=lr, weight_decay=weight_decay, **kw)
