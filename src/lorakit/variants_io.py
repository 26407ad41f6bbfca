"""Deprecated: AdaLoRA and QR-LoRA files now go through ``lorakit.save_adapter`` / ``lorakit.load_adapter``.

Each name here warns (``DeprecationWarning``) and calls its replacement; they will be removed in a later release.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit import io, walk
from lorakit.adapters.adalora import AdaLoraConfig
from lorakit.adapters.qrlora import QRLoraConfig
from lorakit.errors import ConfigError


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"lorakit.variants_io.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _check(model: nn.Module, adapter_name: str, cls: type) -> None:
    if not isinstance(walk.adapter_configs(model).get(adapter_name), cls):
        raise ConfigError(
            f"no {cls.__name__.removesuffix('Config')} adapter named {adapter_name!r} on this model"
        )


def adalora_state_dict(
    model: nn.Module, adapter_name: str = "default", trim: bool = True
) -> dict[str, torch.Tensor]:
    """Deprecated: use ``lorakit.walk.adapter_state_dict``."""
    _deprecated("adalora_state_dict", "lorakit.walk.adapter_state_dict")
    return walk.adapter_state_dict(model, adapter_name, trim=trim)


def qrlora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Deprecated: use ``lorakit.walk.adapter_state_dict``."""
    _deprecated("qrlora_state_dict", "lorakit.walk.adapter_state_dict")
    return walk.adapter_state_dict(model, adapter_name)


def checkpoint_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Deprecated: use ``lorakit.walk.adapter_state_dict(model, name, trim=False)``."""
    _deprecated("checkpoint_state_dict", "lorakit.walk.adapter_state_dict(..., trim=False)")
    return walk.adapter_state_dict(model, adapter_name, trim=False)


def save_adalora(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trim: bool = True
) -> Path:
    """Deprecated: use ``lorakit.save_adapter``."""
    _deprecated("save_adalora", "lorakit.save_adapter")
    _check(model, adapter_name, AdaLoraConfig)
    return io.save_adapter(model, path, adapter_name, trim=trim)


def save_qrlora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Deprecated: use ``lorakit.save_adapter``."""
    _deprecated("save_qrlora", "lorakit.save_adapter")
    _check(model, adapter_name, QRLoraConfig)
    return io.save_adapter(model, path, adapter_name)


def save_variant(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trim: bool = True
) -> Path:
    """Deprecated: use ``lorakit.save_adapter`` (every method)."""
    _deprecated("save_variant", "lorakit.save_adapter")
    return io.save_adapter(model, path, adapter_name, trim=trim)


def load_variant(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    activate: bool = True,
) -> nn.Module:
    """Deprecated: use ``lorakit.load_adapter`` (every method)."""
    _deprecated("load_variant", "lorakit.load_adapter")
    return io.load_adapter(model, path, adapter_name, is_trainable=is_trainable, activate=activate)


load_adalora = load_variant
load_qrlora = load_variant
LOADERS = {"ADALORA": load_variant, "LORAKIT_QRLORA": load_variant}

__all__ = [
    "LOADERS",
    "adalora_state_dict",
    "checkpoint_state_dict",
    "load_adalora",
    "load_qrlora",
    "load_variant",
    "qrlora_state_dict",
    "save_adalora",
    "save_qrlora",
    "save_variant",
]
