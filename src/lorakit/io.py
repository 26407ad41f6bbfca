"""Adapter files, for every method: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA and DoRA adapters are written in PEFT's format, tensor keys ``base_model.model.<module path>.lora_A.weight``
with the adapter name stripped, so PEFT, vLLM and TGI load what lorakit writes, and lorakit loads what PEFT
writes; AdaLoRA in PEFT's AdaLoRA format (trimmed to its rank pattern); QR-LoRA in lorakit's
(``peft_type: LORAKIT_QRLORA``, its frozen factors stored so loading runs no QR). Which method a directory holds
is its ``peft_type``, looked up in :data:`lorakit.methods.METHODS`. Files are written atomically (temporary file,
then rename), and only safetensors is read: nothing is ever unpickled (:mod:`lorakit.files`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterMismatchError, ConfigError
from lorakit.files import (
    CONFIG_NAME,
    INT8_WEIGHTS_NAME,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    atomic_write_bytes,
    read_adapter_weights,
    read_config_json,
    weights_file,
    write_adapter_dir,
)
from lorakit.inject import delete_adapter, mark_trainable, set_adapter, wrap
from lorakit.methods import method_for_file, method_of
from lorakit.walk import adapter_configs, adapter_state_dict, layer_file_tensors


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trim: bool = True
) -> Path:
    """Save one adapter in its method's format into directory ``path``.

    Args:
        model (nn.Module): A model wrapped with :func:`lorakit.wrap`.
        path (str | PathLike): Output directory (created if missing).
        adapter_name (str): Which adapter to save. Default ``"default"``.
        trim (bool): AdaLoRA: drop the components its rank pattern prunes, as PEFT does. ``False`` keeps every
            component (training checkpoints, which :func:`load_adapter` reads back exactly). Default True.

    Returns:
        Path: The directory written.

    Raises:
        ConfigError: The model has no adapter of that name.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r} to save; present: {sorted(configs)}")
    config = configs[adapter_name]
    tensors = adapter_state_dict(model, adapter_name, trim=trim)
    return write_adapter_dir(path, tensors, method_of(config).to_file(config))


def read_config(path: str | os.PathLike) -> Any:
    """Read ``adapter_config.json`` from an adapter directory (lorakit's or PEFT's) into its method's config.

    Raises:
        AdapterFileError: The file is missing or is not valid JSON.
        ConfigError: The config describes something lorakit cannot load.
    """
    source = str(Path(path) / CONFIG_NAME)
    data = read_config_json(path)
    return method_for_file(data, source).from_file(data, source=source)


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """Read ``adapter_config.json`` from a LoRA (or DoRA) adapter directory, lorakit's or PEFT's.

    Raises:
        AdapterFileError: The file is missing or is not valid JSON.
        ConfigError: The config describes something other than a LoRA adapter, or a field is invalid.
    """
    return LoraConfig.from_peft_dict(read_config_json(path), source=str(Path(path) / CONFIG_NAME))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    activate: bool = True,
) -> nn.Module:
    """Load an adapter saved by lorakit or PEFT onto ``model`` under ``adapter_name``.

    Args:
        model (nn.Module): The base model (wrapped or not). Must have the architecture the adapter was
            trained on.
        path (str | PathLike): Adapter directory (any method; fp32 or lorakit's int8 weights).
        adapter_name (str): Name to give the adapter on this model. Default ``"default"``.
        is_trainable (bool): Leave its weights trainable (to continue training). Default False.
        activate (bool): Make it the active adapter. Default True. With False the active adapters stay as they
            were (none on a model that had no adapter) and the new one is inactive.

    Returns:
        nn.Module: The same ``model``.

    Raises:
        AdapterFileError: Missing or corrupt files.
        ConfigError: A ``peft_type`` or field lorakit does not read.
        AdapterMismatchError: The adapter's module paths or shapes do not fit the model (first mismatch).
    """
    config = read_config(path)
    weights = read_adapter_weights(path)
    layer = method_of(config).layer
    source = weights_file(path)
    had = set(adapter_configs(model))

    def init(module_path: str, base: nn.Module):
        return layer.file_init(module_path, base, layer_file_tensors(weights, module_path))

    try:
        # strict=False: configs in the wild list names for several architectures; the key check below is exact.
        wrap(model, config, adapter_name=adapter_name, strict=False, init=init)
    except AdapterMismatchError as err:
        raise AdapterMismatchError(f"{source}: {err}") from None
    try:
        copy_weights(adapter_state_dict(model, adapter_name, trim=False), weights, source)
    except AdapterMismatchError:
        if adapter_name not in had:
            delete_adapter(model, adapter_name)
        raise
    if activate:
        set_adapter(model, adapter_name)
    elif not had:
        set_adapter(model, [])  # wrap() activates a model's first adapter; activate=False means none
    mark_trainable(model, adapter_name, is_trainable)
    return model


def copy_weights(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy file tensors into the model's (both under file keys), refusing unknown, missing or mis-shaped keys.

    Raises:
        AdapterMismatchError: The first mismatch, with the file and the key.
    """
    for key in sorted(weights):
        if key not in expected:
            raise AdapterMismatchError(
                f"{source}: tensor {key!r} has no place in this model (is it the base model the adapter "
                f"was trained on?); the model's adapter keys look like {next(iter(sorted(expected)), '(none)')!r}"
            )
    for key in sorted(expected):
        if key not in weights:
            raise AdapterMismatchError(f"{source}: tensor {key!r} is missing from the adapter file")
        target, value = expected[key], weights[key]
        if tuple(target.shape) != tuple(value.shape):
            raise AdapterMismatchError(
                f"{source}: {key!r} has shape {tuple(value.shape)} but this model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value.to(device=target.device, dtype=target.dtype))


__all__ = [
    "CONFIG_NAME",
    "INT8_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "copy_weights",
    "load_adapter",
    "read_adapter_config",
    "read_adapter_weights",
    "read_config",
    "read_config_json",
    "save_adapter",
]
