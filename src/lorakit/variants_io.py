"""Deprecated: AdaLoRA and QR-LoRA files now go through ``lorakit.save_adapter`` / ``lorakit.load_adapter``.

Each name here warns (``DeprecationWarning``) and calls its replacement; they will be removed in a later release.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

from lorakit import io, walk
from lorakit.adapters.adalora import AdaLoraConfig
from lorakit.adapters.qrlora import QRLoraConfig
from lorakit.errors import ConfigError


def _alias(
    old: str, new: Callable, new_name: str, config_cls: type | None = None, name_at: int = 1, **fixed
) -> Callable:
    """``new`` under the old name ``old``: warns, checks the adapter's method (``config_cls``), passes ``fixed``.

    ``name_at``: where ``adapter_name`` stands among the positional arguments after ``model``; when it is not
    given, ``"default"`` is passed, as the old functions did.
    """

    @functools.wraps(new)
    def deprecated(model, *args, **kwargs):
        warnings.warn(
            f"lorakit.variants_io.{old} is deprecated; use {new_name}", DeprecationWarning, stacklevel=2
        )
        if len(args) <= name_at:
            kwargs.setdefault("adapter_name", "default")
        name = kwargs["adapter_name"] if len(args) <= name_at else args[name_at]
        if config_cls is not None and not isinstance(walk.adapter_configs(model).get(name), config_cls):
            raise ConfigError(
                f"no {config_cls.__name__.removesuffix('Config')} adapter named {name!r} on this model"
            )
        return new(model, *args, **{**kwargs, **fixed})

    deprecated.__name__ = deprecated.__qualname__ = old
    return deprecated


_STATE = "lorakit.walk.adapter_state_dict"
adalora_state_dict = _alias("adalora_state_dict", walk.adapter_state_dict, _STATE, AdaLoraConfig, name_at=0)
qrlora_state_dict = _alias("qrlora_state_dict", walk.adapter_state_dict, _STATE, QRLoraConfig, name_at=0)
checkpoint_state_dict = _alias(
    "checkpoint_state_dict", walk.adapter_state_dict, f"{_STATE}(..., trim=False)", name_at=0, trim=False
)
save_adalora = _alias("save_adalora", io.save_adapter, "lorakit.save_adapter", AdaLoraConfig)
save_qrlora = _alias("save_qrlora", io.save_adapter, "lorakit.save_adapter", QRLoraConfig)
save_variant = _alias("save_variant", io.save_adapter, "lorakit.save_adapter")
load_variant = _alias("load_variant", io.load_adapter, "lorakit.load_adapter")
load_adalora = _alias("load_adalora", io.load_adapter, "lorakit.load_adapter")
load_qrlora = _alias("load_qrlora", io.load_adapter, "lorakit.load_adapter")
LOADERS = {"ADALORA": load_adalora, "LORAKIT_QRLORA": load_qrlora}

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
