"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): the B matrices learn ``ratio`` times faster than the A matrices.

Only the learning rates change, through optimizer parameter groups built exactly as PEFT's
``create_loraplus_optimizer`` builds them (parameters matched by name, so the same rules work on a lorakit
model and on a PEFT model)::

    group            members                                            lr              weight_decay
    groupA           every other trainable parameter (lora_A, full      lr              weight_decay
                     modules_to_save weights ...)
    embedding        adapter weights of a layer whose base is an        lr_embedding    weight_decay
                     nn.Embedding
    groupB           lora_B weights and 1-D trainable parameters        lr * ratio      weight_decay
                     (DoRA magnitudes, biases) in the decay set
    groupB_no_decay  the same, outside the decay set                    lr * ratio      0.0

The decay set is transformers' ``Trainer`` rule (:func:`decay_parameter_names`). The paper suggests a ratio
of 2^4 = 16 with A's lr about half a usual LoRA lr.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

GROUPS = ("groupA", "embedding", "groupB", "groupB_no_decay")


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: transformers' ``Trainer`` rule, as PEFT uses it.

    Parameters not inside a layer of ``ALL_LAYERNORM_LAYERS`` (``[nn.LayerNorm]``: RMSNorm weights *do* decay) and
    without ``"bias"`` in their name.
    """
    names = get_parameter_names(model, ALL_LAYERNORM_LAYERS)
    return {name for name in names if "bias" not in name}


def loraplus_named_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """The trainable parameters of ``model`` sorted into LoRA+'s groups, by name (see the module docstring).

    Args:
        model (nn.Module): A wrapped model (lorakit or PEFT).

    Returns:
        dict[str, dict[str, nn.Parameter]]: Group name (:data:`GROUPS`) -> parameter name -> parameter.
    """
    decay = decay_parameter_names(model)
    groups: dict[str, dict[str, nn.Parameter]] = {group: {} for group in GROUPS}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Adapter weights live in name-keyed dicts under the adapter layer (``<layer>.lora_A.<adapter>.weight``);
        # PEFT strips the last two parts of the name to find that layer.
        layer_name = ".".join(name.split(".")[:-2])
        layer = model.get_submodule(layer_name) if layer_name else None
        if isinstance(getattr(layer, "base_layer", None), nn.Embedding):
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["groupB" if name in decay else "groupB_no_decay"][name] = param
        else:
            groups["groupA"][name] = param
    return groups


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+, in PEFT's order (A, embedding, B, B without decay).

    Args:
        model (nn.Module): A wrapped model; only parameters with ``requires_grad`` are taken.
        lr (float): Learning rate of the A group (``η_A``).
        ratio (float): ``η_B / η_A`` (PEFT's ``loraplus_lr_ratio``; no default there either), ≥ 1 in the paper.
        lr_embedding (float): Learning rate of embedding adapters. Default 1e-6 (PEFT's).
        weight_decay (float): Weight decay of every group but ``groupB_no_decay`` (PEFT's
            ``loraplus_weight_decay``). Default 0.

    Returns:
        list[dict]: Four ``{"params", "lr", "weight_decay"}`` dicts for any ``torch.optim`` optimizer.
    """
    named = loraplus_named_groups(model)
    settings = {
        "groupA": (lr, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "groupB": (lr * ratio, weight_decay),
        "groupB_no_decay": (lr * ratio, 0.0),
    }
    return [
        {"params": list(named[group].values()), "lr": settings[group][0], "weight_decay": settings[group][1]}
        for group in GROUPS
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """PEFT's ``create_loraplus_optimizer`` for a lorakit (or PEFT) model: ``optimizer_cls`` over the LoRA+ groups.

    Args:
        model (nn.Module): The wrapped model.
        optimizer_cls (type[Optimizer]): E.g. ``torch.optim.AdamW`` or a :mod:`lorakit.optim` class.
        lr (float): ``η_A``.
        loraplus_lr_ratio (float): ``η_B / η_A``.
        loraplus_lr_embedding (float): Learning rate of embedding adapters. Default 1e-6.
        loraplus_weight_decay (float): Weight decay of the decaying groups. Default 0.
        **kwargs: Other optimizer arguments (``betas``, ``eps`` ...).

    Returns:
        torch.optim.Optimizer: The optimizer.
    """
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, loraplus_weight_decay)
    return optimizer_cls(groups, lr=lr, **kwargs)


__all__ = [
    "GROUPS",
    "create_loraplus_optimizer",
    "decay_parameter_names",
    "loraplus_named_groups",
    "loraplus_param_groups",
]
