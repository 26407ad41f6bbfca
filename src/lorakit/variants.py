"""Model-level entry points for AdaLoRA and QR-LoRA: wrap, activate, merge, count (files: :mod:`lorakit.variants_io`).

Targets are found with :func:`lorakit.targets.resolve_targets` (PEFT's matching rules), each target is wrapped
with its method's layer, base weights are frozen, and the config is kept in ``model.lorakit_configs`` like a
LoRA adapter's. Files: AdaLoRA in PEFT's format (``peft_type: ADALORA``, keys
``base_model.model.<path>.lora_A`` / ``lora_E`` / ``lora_B`` without ``.weight``, tensors trimmed to
``rank_pattern``), so ``peft.PeftModel.from_pretrained`` loads them; QR-LoRA in lorakit's format
(``peft_type: LORAKIT_QRLORA``, keys ``<path>.qr_lambda`` / ``qr_Q`` / ``qr_RP``), storing the frozen factors
so loading needs no QR and no access to the exact base weights the factors came from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.adalora import AdaLoraConfig, AdaLoraLinear
from lorakit.adapters.base import AdapterLinear
from lorakit.adapters.lora import LoraLinear, ModulesToSaveWrapper, base_layer_shape
from lorakit.adapters.qrlora import QRLoraConfig, QRLoraLinear
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.inject import (
    _infer_task_type,
    _set_submodule,
    _wrap_modules_to_save,
    adapter_configs,
    wrap,
)
from lorakit.targets import resolve_targets

PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------- walking
def variant_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """Every ``(path, layer)`` of an AdaLoRA or QR-LoRA wrapper in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def target_paths(model: nn.Module, config, strict: bool) -> list[str]:
    # resolve_targets sees through LoraLinear and AdapterLinear wrappers: a second adapter finds the same paths
    return resolve_targets(model, config, strict=strict)


def _begin(model: nn.Module, config, adapter_name: str) -> bool:
    """Check the adapter name, fill in task type and base name; returns whether this is the first adapter."""
    configs = adapter_configs(model)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name or "") or adapter_name == "__base__":
        raise ConfigError(
            f"adapter_name must be letters, digits, '_' or '-' (not '__base__'), got {adapter_name!r}"
        )
    if adapter_name in configs:
        raise ConfigError(
            f"an adapter named {adapter_name!r} is already on this model; pick another name (present: {sorted(configs)})"
        )
    if config.task_type is None:
        config.task_type = _infer_task_type(model)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if not configs:
        model.requires_grad_(False)
    return not configs


def _wrapper_at(model: nn.Module, path: str, cls: type[AdapterLinear]) -> AdapterLinear:
    module = model.get_submodule(path)
    if isinstance(module, cls):
        return module
    if isinstance(module, (LoraLinear, AdapterLinear)):
        raise ConfigError(
            f"{path} already holds {type(module).__name__} adapters; lorakit does not mix adapter methods on one "
            "layer: merge the other adapter first (merge_and_unload) or target other modules"
        )
    layer = cls(module)
    _set_submodule(model, path, layer)
    return layer


def _finish(model: nn.Module, config, adapter_name: str, first: bool) -> nn.Module:
    _wrap_modules_to_save(model, config, adapter_name, trainable=first)
    adapter_configs(model)[adapter_name] = config
    if first:
        activate(model, adapter_name, trainable=True)
    return model


def activate(model: nn.Module, adapter_name: str, trainable: bool = True) -> None:
    """Make ``adapter_name`` the one active variant adapter (and its ``modules_to_save`` copies).

    Args:
        model (nn.Module): A model wrapped with :func:`wrap_adalora` / :func:`wrap_qrlora`.
        adapter_name (str): The adapter to use.
        trainable (bool): Its weights get ``requires_grad``; every other adapter's are frozen. Default True.
    """
    for _, layer in variant_layers(model):
        layer.active_adapters = [adapter_name] if adapter_name in layer.adapter_names() else []
        for name in layer.adapter_names():
            layer.set_trainable(name, trainable and name == adapter_name)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.active_adapter = adapter_name if adapter_name in module.modules_to_save else None
            for name, copy in module.modules_to_save.items():
                copy.requires_grad_(trainable and name == adapter_name)


# ------------------------------------------------------------------------------------------------- wrapping
def wrap_adalora(
    model: nn.Module,
    config: AdaLoraConfig,
    adapter_name: str = "default",
    ranks: dict[str, int] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Add an AdaLoRA adapter to ``model`` in place (the first adapter is active and trainable).

    Args:
        model (nn.Module): Any Hugging Face (or plain torch) model.
        config (AdaLoraConfig): The adapter's configuration.
        adapter_name (str): Unique name. Default ``"default"``.
        ranks (dict[str, int] | None): Module path -> rank, for loading pruned adapters; default ``init_r``.
            The scale always divides by ``init_r`` (PEFT's ``ranknum``).
        strict (bool): Refuse listed target names that match nothing. Default True.

    Returns:
        nn.Module: The same ``model``. Train it with :class:`lorakit.adapters.rank_allocator.AdaLoraController`.
    """
    first = _begin(model, config, adapter_name)
    paths = target_paths(model, config, strict)
    config.fan_in_fan_out = any(isinstance(model.get_submodule(p), Conv1D) for p in paths)
    for path in paths:
        layer = _wrapper_at(model, path, AdaLoraLinear)
        r = (ranks or {}).get(path, config.init_r)
        alpha, dropout, init = config.lora_alpha, config.lora_dropout, config.init_lora_weights
        layer.add_adapter(adapter_name, r, alpha, dropout, init, ranknum=config.init_r)
        layer.set_trainable(adapter_name, first)
    return _finish(model, config, adapter_name, first)


def wrap_qrlora(
    model: nn.Module,
    config: QRLoraConfig,
    adapter_name: str = "default",
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Add a QR-LoRA adapter to ``model`` in place: a pivoted QR of each target's base weight, λ = 0.

    Args:
        model (nn.Module): Any Hugging Face (or plain torch) model.
        config (QRLoraConfig): The adapter's configuration.
        adapter_name (str): Unique name. Default ``"default"``.
        factors (dict[str, tuple[Tensor, Tensor]] | None): Module path -> ``(Q_r [out, r], (R Pᵀ)_r [r, in])``
            to use instead of computing the QR (loading). Default None.
        strict (bool): Refuse listed target names that match nothing. Default True.

    Returns:
        nn.Module: The same ``model``.
    """
    first = _begin(model, config, adapter_name)
    for path in target_paths(model, config, strict):
        layer = _wrapper_at(model, path, QRLoraLinear)
        if factors is None:
            layer.init_from_base(adapter_name, config)
        else:
            layer.add_adapter(adapter_name, *factors[path], config.alpha)
        layer.set_trainable(adapter_name, first)
    return _finish(model, config, adapter_name, first)


def wrap_adapter(
    model: nn.Module,
    config: LoraConfig | AdaLoraConfig | QRLoraConfig,
    adapter_name: str = "default",
    strict: bool = True,
) -> nn.Module:
    """Add an adapter of the method ``config`` describes: :func:`lorakit.wrap` (LoRA, DoRA, PiSSA),
    :func:`wrap_adalora` or :func:`wrap_qrlora`.

    Raises:
        ConfigError: ``config`` is none of the three config classes.
    """
    if isinstance(config, AdaLoraConfig):
        return wrap_adalora(model, config, adapter_name, strict=strict)
    if isinstance(config, QRLoraConfig):
        return wrap_qrlora(model, config, adapter_name, strict=strict)
    if isinstance(config, LoraConfig):
        return wrap(model, config, adapter_name, strict=strict)
    raise ConfigError(f"expected a LoraConfig, AdaLoraConfig or QRLoraConfig, got {type(config).__name__}")


def count_qrlora_parameters(model: nn.Module, config: QRLoraConfig) -> int:
    """Trainable parameters of a QR-LoRA adapter with a fixed ``r``: ``Σ min(r, out, in)`` over its targets.

    Needs only module shapes, so it works on a model built on the meta device (where no QR can run).

    Raises:
        ConfigError: ``config.r`` is not set (the energy rule needs the weights).
    """
    if config.r is None:
        raise ConfigError("count_qrlora_parameters needs a fixed QRLoraConfig.r; tau needs the real weights")
    shapes = [base_layer_shape(model.get_submodule(p)) for p in target_paths(model, config, strict=True)]
    return sum(min(config.r, *shape) for shape in shapes)


# ---------------------------------------------------------------------------------------------------- merge
def merge_variants(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Merge the active (or named) variant adapters into the float base weights, reversibly."""
    for _, layer in variant_layers(model):
        layer.merge(adapter_names, safe_merge=True)


def unmerge_variants(model: nn.Module) -> None:
    """Undo :func:`merge_variants`."""
    for _, layer in variant_layers(model):
        layer.unmerge()


def merge_and_unload_variants(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge the active (or named) variant adapters and remove every wrapper: a plain model.

    A 4-bit base is dequantized once into ``nn.Linear`` in its compute dtype and merged exactly.
    """
    layers = list(variant_layers(model))
    if adapter_names is None:
        adapter_names = list(layers[0][1].active_adapters) if layers else []
    for path, layer in layers:
        _set_submodule(model, path, layer.merged_base_layer(adapter_names))
    keep = adapter_names[0] if adapter_names else None
    for path, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            inner = module.modules_to_save[keep] if keep in module.modules_to_save else module.original_module  # noqa: SIM401
            _set_submodule(model, path, inner)
    adapter_configs(model).clear()
    return model


__all__ = [
    "activate",
    "count_qrlora_parameters",
    "merge_and_unload_variants",
    "merge_variants",
    "target_paths",
    "unmerge_variants",
    "variant_layers",
    "wrap_adalora",
    "wrap_adapter",
    "wrap_qrlora",
]
