"""Optimizer names usable in a recipe (``train.optimizer``) -> optimizer classes, in one visible table."""

from __future__ import annotations

from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.optim.adamw8bit import AdamW8bit, ParamsT
from lorakit.optim.paged import PagedAdamW, PagedAdamW8bit

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,  # fp32 moments in the parameter's dtype (8 bytes per fp32 element); fused kernel
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
    params_or_groups = [_listed(g) for g in params_or_groups]  # generators read once, here
    if name == "adamw" and "fused" not in kw and "foreach" not in kw and _fusable(params_or_groups):
        kw["fused"] = True
    return OPTIMIZERS[name](params_or_groups, lr=lr, weight_decay=weight_decay, **kw)


def _listed(group: Any) -> Any:
    """A param group with its ``params`` as a list (a generator or a single tensor read here, once)."""
    if isinstance(group, dict):
        params = group["params"]
        return {**group, "params": [params] if isinstance(params, torch.Tensor) else list(params)}
    return group


def _fusable(params_or_groups: list) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain floating tensors (not FSDP's DTensors) on
    CPU or CUDA, one device type.

    On a CPU torch's default AdamW is a loop over parameters (several elementwise passes each); the fused kernel
    updates each parameter in one pass: 5.6 vs 21.3 ms a step for SmolLM2's 420 LoRA factors at r=16 on this
    repository's EPYC (2 threads, benchmarks/adamw_step.py), 2-3% of a training step, and one step per config of a
    training pack.
    """
    params = [p for g in params_or_groups for p in (g["params"] if isinstance(g, dict) else [g])]
    devices = {p.device.type for p in params}
    plain = all(type(p.data) is torch.Tensor and p.is_floating_point() for p in params)
    return bool(params) and plain and len(devices) == 1 and devices <= {"cpu", "cuda"}
