"""Deprecated: AdaLoRA and QR-LoRA now go through the common stack (``lorakit.wrap``, ``lorakit.merge_and_unload`` ...).

Each name here warns (``DeprecationWarning``) and calls its replacement; they will be removed in a later release.
The methods, and which operation takes which, are listed in :data:`lorakit.methods.METHODS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from lorakit import inject, targets
from lorakit.adapters.adalora import AdaLoraConfig
from lorakit.adapters.base import AdapterLinear
from lorakit.adapters.lora import LoraLinear
from lorakit.adapters.qrlora import QRLoraConfig
from lorakit.walk import FILE_PREFIX, adapter_layers

PREFIX = FILE_PREFIX


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"lorakit.variants.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def variant_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """Deprecated: every AdaLoRA / QR-LoRA layer; use ``lorakit.walk.adapter_layers`` (all methods)."""
    _deprecated("variant_layers", "lorakit.walk.adapter_layers")
    return ((p, layer) for p, layer in adapter_layers(model) if not isinstance(layer, LoraLinear))


def target_paths(model: nn.Module, config, strict: bool) -> list[str]:
    """Deprecated: use ``lorakit.targets.resolve_targets``."""
    _deprecated("target_paths", "lorakit.targets.resolve_targets")
    return targets.resolve_targets(model, config, strict=strict)


def activate(model: nn.Module, adapter_name: str, trainable: bool = True) -> None:
    """Deprecated: use ``lorakit.set_adapter`` (and ``lorakit.inject.mark_trainable``)."""
    _deprecated("activate", "lorakit.set_adapter")
    inject.set_adapter(model, adapter_name)
    inject.mark_trainable(model, adapter_name, trainable)


def wrap_adalora(
    model: nn.Module,
    config: AdaLoraConfig,
    adapter_name: str = "default",
    ranks: dict[str, int] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Deprecated: use ``lorakit.wrap(model, AdaLoraConfig(...))`` (``load_adapter`` reads pruned ranks)."""
    _deprecated("wrap_adalora", "lorakit.wrap")
    init = (lambda path, base: ranks.get(path)) if ranks else None
    return inject.wrap(model, config, adapter_name, strict=strict, init=init)


def wrap_qrlora(
    model: nn.Module,
    config: QRLoraConfig,
    adapter_name: str = "default",
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Deprecated: use ``lorakit.wrap(model, QRLoraConfig(...))`` (``load_adapter`` reads stored factors)."""
    _deprecated("wrap_qrlora", "lorakit.wrap")
    init = (lambda path, base: factors[path]) if factors is not None else None
    return inject.wrap(model, config, adapter_name, strict=strict, init=init)


def wrap_adapter(model: nn.Module, config, adapter_name: str = "default", strict: bool = True) -> nn.Module:
    """Deprecated: ``lorakit.wrap`` takes every method's config."""
    _deprecated("wrap_adapter", "lorakit.wrap")
    return inject.wrap(model, config, adapter_name, strict=strict)


def count_qrlora_parameters(model: nn.Module, config: QRLoraConfig) -> int:
    """Deprecated: use ``lorakit.targets.count_parameters`` (every method)."""
    _deprecated("count_qrlora_parameters", "lorakit.targets.count_parameters")
    return targets.count_parameters(model, config)


def merge_variants(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Deprecated: use ``lorakit.merge``."""
    _deprecated("merge_variants", "lorakit.merge")
    inject.merge(model, adapter_names)


def unmerge_variants(model: nn.Module) -> None:
    """Deprecated: use ``lorakit.unmerge``."""
    _deprecated("unmerge_variants", "lorakit.unmerge")
    inject.unmerge(model)


def merge_and_unload_variants(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Deprecated: use ``lorakit.merge_and_unload``."""
    _deprecated("merge_and_unload_variants", "lorakit.merge_and_unload")
    return inject.merge_and_unload(model, adapter_names)


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
