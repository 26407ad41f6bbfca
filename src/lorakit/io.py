"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` with the adapter name stripped, so
PEFT, vLLM and TGI load what lorakit writes, and lorakit loads what PEFT writes. Files are written
atomically (temporary file, then rename), and only safetensors is read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, AdapterMismatchError, ConfigError
from lorakit.inject import adapter_configs, adapter_state_dict, mark_trainable, set_adapter, wrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INT8_WEIGHTS_NAME = "adapter_model.int8.safetensors"  # lorakit's int8 adapters (lorakit.compress)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Save one adapter in PEFT's format into directory ``path``.

    Args:
        model (nn.Module): A model wrapped with :func:`lorakit.wrap`.
        path (str | PathLike): Output directory (created if missing).
        adapter_name (str): Which adapter to save. Default ``"default"``.

    Returns:
        Path: The directory written.

    An AdaLoRA adapter is written in PEFT's AdaLoRA format (trimmed to its rank pattern), a QR-LoRA adapter
    in lorakit's (:mod:`lorakit.variants`).

    Raises:
        ConfigError: The model has no adapter of that name.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r} to save; present: {sorted(configs)}")
    if not isinstance(configs[adapter_name], LoraConfig):
        from lorakit.variants_io import save_variant  # variants_io builds on this module: import it here

        return save_variant(model, path, adapter_name)
    path = Path(path)
    tensors = {
        key: tensor.detach().to("cpu").contiguous().clone()
        for key, tensor in adapter_state_dict(model, adapter_name).items()
    }
    atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    config = configs[adapter_name].to_peft_dict()
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_config_json(path: str | os.PathLike) -> dict:
    """The raw ``adapter_config.json`` of an adapter directory (any method).

    Raises:
        AdapterFileError: Missing, not JSON, or not an object.
    """
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(
            f"{config_path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """Read ``adapter_config.json`` from a LoRA adapter directory (lorakit's or PEFT's).

    Raises:
        AdapterFileError: The file is missing or is not valid JSON.
        ConfigError: The config describes something lorakit cannot load.
    """
    return LoraConfig.from_peft_dict(read_config_json(path), source=str(Path(path) / CONFIG_NAME))


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (never a pickled ``.bin``), or else lorakit's int8
    ``adapter_model.int8.safetensors`` dequantized to fp32 (:mod:`lorakit.compress`).

    Raises:
        AdapterFileError: Missing, or not a readable safetensors file.
    """
    weights_path = Path(path) / WEIGHTS_NAME
    if not weights_path.is_file() and (Path(path) / INT8_WEIGHTS_NAME).is_file():
        from lorakit.compress import read_int8_weights  # compress builds on this module: import it here

        return read_int8_weights(path)
    if not weights_path.is_file():
        hint = (
            " (a pickled adapter_model.bin is never loaded: convert it to safetensors)"
            if (Path(path) / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFileError(f"{weights_path} not found{hint}")
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{weights_path} is corrupt or not a safetensors file: {err}") from None


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
        path (str | PathLike): Adapter directory.
        adapter_name (str): Name to give the adapter on this model. Default ``"default"``.
        is_trainable (bool): Leave its weights trainable (to continue training). Default False.
        activate (bool): Make it the active adapter. Default True. With False the active adapters stay as they
            were (none on a model that had no adapter) and the new one is inactive.

    Returns:
        nn.Module: The same ``model``.

    AdaLoRA (``peft_type: ADALORA``, lorakit's or PEFT's) and QR-LoRA (``LORAKIT_QRLORA``) directories are
    loaded by :mod:`lorakit.variants_io`.

    Raises:
        AdapterFileError: Missing or corrupt files.
        AdapterMismatchError: The adapter's module paths or shapes do not fit the model (first mismatch).
    """
    from lorakit.variants_io import LOADERS  # variants_io builds on this module: import it here

    loader = LOADERS.get(read_config_json(path).get("peft_type"))
    if loader is not None:
        return loader(model, path, adapter_name, is_trainable=is_trainable, activate=activate)
    config = read_adapter_config(path)
    weights = read_adapter_weights(path)
    had = set(adapter_configs(model))
    # strict=False: configs in the wild list names for several architectures; the key check below is exact.
    wrap(model, config, adapter_name=adapter_name, strict=False)
    try:
        name = WEIGHTS_NAME if (Path(path) / WEIGHTS_NAME).is_file() else INT8_WEIGHTS_NAME
        _copy_weights(model, adapter_name, weights, Path(path) / name)
    except AdapterMismatchError:
        from lorakit.inject import delete_adapter

        if adapter_name not in had:
            delete_adapter(model, adapter_name)
        raise
    if activate:
        set_adapter(model, adapter_name)
    elif not had:
        set_adapter(model, [])  # wrap() activates a model's first adapter; activate=False means none
    mark_trainable(model, adapter_name, is_trainable)
    return model


def _copy_weights(
    model: nn.Module, adapter_name: str, weights: dict[str, torch.Tensor], source: Path
) -> None:
    expected = adapter_state_dict(model, adapter_name)
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
