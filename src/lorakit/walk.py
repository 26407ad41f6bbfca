"""Read a model that holds adapter layers: its layers, the configs it keeps, its adapters' tensors; swap a module.

Everything above the layers starts here: :mod:`lorakit.inject` (wrap, activate, merge), :mod:`lorakit.io` (files),
the training hooks. The adapter configs are kept on the model as ``model.lorakit_configs`` (name -> config of
any method), so a wrapped transformers model stays a transformers model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import AdapterLinear, ModulesToSaveWrapper
from lorakit.adapters.lora import LoraLinear

CONFIGS_ATTR = "lorakit_configs"
FILE_PREFIX = "base_model.model."  # PEFT's file keys: base_model.model.<module path>.<tensor name>


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """The adapters on ``model``, name -> config (empty if it was never wrapped)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def _wrappers(
    module: nn.Module, kinds: tuple[type, ...], prefix: str = "", seen: set | None = None
) -> Iterator:
    """``(path, module)`` for every module of ``kinds``, in ``named_modules`` order, without walking inside them.

    Inside a wrapper are one small module per adapter (``lora_A[name]``, ``lora_B[name]``, dropout): with many
    adapters they are most of the model's modules, and ``named_modules`` would visit them on every mixed-batch
    forward.
    """
    if seen is None:
        if isinstance(module, kinds):
            yield "", module
            return
        seen = {id(module)}
    for name, child in module._modules.items():
        if child is None or id(child) in seen:
            continue
        seen.add(id(child))
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, kinds):
            yield path, child
        else:
            yield from _wrappers(child, kinds, path, seen)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """Every ``(path, layer)`` holding adapters of any method (an :class:`AdapterLinear`), in module order."""
    return _wrappers(model, (AdapterLinear,))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """Every ``(path, LoraLinear)`` in ``model``, in ``named_modules`` order."""
    return _wrappers(model, (LoraLinear,))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """Every ``(path, ModulesToSaveWrapper)`` (the ``modules_to_save`` copies), in module order."""
    return _wrappers(model, (ModulesToSaveWrapper,))


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in ``model`` (``""`` is not a path: a model cannot replace itself)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def adapter_state_dict(model: nn.Module, adapter_name: str, trim: bool = True) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under PEFT's file keys: ``base_model.model.<path>.<name>``.

    Each layer names its own tensors (:meth:`~lorakit.adapters.base.AdapterLinear.file_tensors`: LoRA's
    ``lora_A.weight``, a DoRA magnitude as ``lora_magnitude_vector``, AdaLoRA's ``lora_E`` ...); the
    ``modules_to_save`` copies follow under their module paths.

    Args:
        model (nn.Module): The wrapped model.
        adapter_name (str): Which adapter.
        trim (bool): Keep only the components the config keeps (AdaLoRA's rank pattern, what PEFT saves). False:
            every component, untouched (training checkpoints). Default True.
    """
    config = adapter_configs(model).get(adapter_name)
    state = {}
    for path, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names():
            keep = layer.kept_components(config, path) if trim else None
            for key, tensor in layer.file_tensors(adapter_name, keep).items():
                state[f"{FILE_PREFIX}{path}.{key}"] = tensor
    for path, module in saved_modules(model):
        if adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                state[f"{FILE_PREFIX}{path}.{key}"] = tensor
    return state


def layer_file_tensors(weights: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file that belong to the layer at ``path``, keyed by their names in the layer."""
    prefix = f"{FILE_PREFIX}{path}."
    return {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}


__all__ = [
    "CONFIGS_ATTR",
    "FILE_PREFIX",
    "adapter_configs",
    "adapter_layers",
    "adapter_state_dict",
    "layer_file_tensors",
    "lora_layers",
    "saved_modules",
    "set_submodule",
]
