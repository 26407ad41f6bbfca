"""AdaLoRA and QR-LoRA adapter files: save, load, and the state a training checkpoint keeps.

AdaLoRA is written in PEFT's format (``peft_type: ADALORA``, keys ``base_model.model.<path>.lora_A`` / ``lora_E`` /
``lora_B`` without ``.weight``, tensors trimmed to ``rank_pattern``), so ``peft.PeftModel.from_pretrained`` loads it;
QR-LoRA in lorakit's format (``peft_type: LORAKIT_QRLORA``, keys ``<path>.qr_lambda`` / ``qr_Q`` / ``qr_RP``),
storing the frozen factors so loading needs no QR and no access to the exact base weights the factors came from.
:func:`lorakit.save_adapter` and :func:`lorakit.load_adapter` dispatch here by config type and ``peft_type``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.adalora import AdaLoraConfig, AdaLoraLinear
from lorakit.adapters.lora import ModulesToSaveWrapper, base_layer_shape
from lorakit.adapters.qrlora import QRLoraConfig, QRLoraLinear
from lorakit.errors import AdapterMismatchError, ConfigError
from lorakit.inject import (
    adapter_configs,
    adapter_state_dict,
    delete_adapter,
)
from lorakit.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    atomic_write_bytes,
    read_adapter_weights,
    read_config_json,
)
from lorakit.variants import PREFIX, activate, target_paths, variant_layers, wrap_adalora, wrap_qrlora


def adalora_state_dict(
    model: nn.Module, adapter_name: str = "default", trim: bool = True
) -> dict[str, torch.Tensor]:
    """AdaLoRA tensors under PEFT's file keys (``base_model.model.<path>.lora_A``, no ``.weight``).

    Args:
        model (nn.Module): A model with the adapter.
        adapter_name (str): Which adapter. Default ``"default"``.
        trim (bool): Keep only the components ``rank_pattern`` keeps (what PEFT saves). False: every
            component, untouched (training checkpoints). Default True.
    """
    pattern = (adapter_configs(model)[adapter_name].rank_pattern or {}) if trim else {}
    state = {}
    for path, layer in variant_layers(model):
        if not isinstance(layer, AdaLoraLinear) or adapter_name not in layer.lora_A:
            continue
        a, e, b = (layer.lora_A[adapter_name], layer.lora_E[adapter_name], layer.lora_B[adapter_name])
        keep = pattern.get(f"{path}.lora_E")
        if keep is not None and len(keep) == a.shape[0] and sum(keep) != a.shape[0]:
            index = torch.tensor(keep, device=a.device)
            a, e, b = a[index], e[index], b[:, index]
        state.update({f"{PREFIX}{path}.lora_A": a, f"{PREFIX}{path}.lora_E": e, f"{PREFIX}{path}.lora_B": b})
    return {**state, **adapter_state_dict(model, adapter_name)}  # + modules_to_save copies


def qrlora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """QR-LoRA tensors: ``<prefix><path>.qr_lambda`` [r], ``.qr_Q`` [out, r], ``.qr_RP`` [r, in]."""
    state = {}
    for path, layer in variant_layers(model):
        if isinstance(layer, QRLoraLinear) and adapter_name in layer.qr_lambda:
            factors = layer.qr_factors[adapter_name]
            state[f"{PREFIX}{path}.qr_lambda"] = layer.qr_lambda[adapter_name]
            state[f"{PREFIX}{path}.qr_Q"] = factors.Q
            state[f"{PREFIX}{path}.qr_RP"] = factors.RP
    return {**state, **adapter_state_dict(model, adapter_name)}


def _save(tensors: dict[str, torch.Tensor], config: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return path


def _config_of(model: nn.Module, adapter_name: str, cls: type):
    config = adapter_configs(model).get(adapter_name)
    if not isinstance(config, cls):
        raise ConfigError(
            f"no {cls.__name__.removesuffix('Config')} adapter named {adapter_name!r} on this model"
        )
    return config


def save_adalora(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trim: bool = True
) -> Path:
    """Save an AdaLoRA adapter in PEFT's format (``PeftModel.from_pretrained`` loads it).

    Args:
        model (nn.Module): A model with the adapter.
        path (str | PathLike): Output directory.
        adapter_name (str): Which adapter. Default ``"default"``.
        trim (bool): Drop the components ``rank_pattern`` prunes, as PEFT does. ``False`` keeps all of them
            (training checkpoints, which :func:`load_adalora` reads back exactly; PEFT does not). Default True.
    """
    config = _config_of(model, adapter_name, AdaLoraConfig)
    return _save(adalora_state_dict(model, adapter_name, trim=trim), config.to_peft_dict(), path)


def save_qrlora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Save a QR-LoRA adapter (λ and the frozen factors) in lorakit's format."""
    config = _config_of(model, adapter_name, QRLoraConfig)
    return _save(qrlora_state_dict(model, adapter_name), config.to_dict(), path)


def _copy_tensors(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy file tensors into the model's, refusing unknown, missing or mis-shaped keys (first mismatch)."""
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise AdapterMismatchError(
            f"{source}: tensor {unknown[0]!r} has no place in this model (is it the base model the adapter was "
            f"trained on?); the model's adapter keys look like {next(iter(sorted(expected)), '(none)')!r}"
        )
    for key in sorted(expected):
        if key not in weights:
            raise AdapterMismatchError(f"{source}: tensor {key!r} is missing from the adapter file")
        if tuple(expected[key].shape) != tuple(weights[key].shape):
            raise AdapterMismatchError(
                f"{source}: {key!r} has shape {tuple(weights[key].shape)} but this model expects "
                f"{tuple(expected[key].shape)}"
            )
        with torch.no_grad():
            expected[key].copy_(weights[key].to(device=expected[key].device, dtype=expected[key].dtype))


@contextlib.contextmanager
def _removed_on_mismatch(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Delete the just-added adapter again if its file does not fit the model (as ``lorakit.load_adapter``)."""
    try:
        yield
    except AdapterMismatchError:
        delete_adapter(model, adapter_name)
        raise


def _finish_load(model: nn.Module, adapter_name: str, is_trainable: bool, activate_it: bool) -> nn.Module:
    """Activate the loaded adapter, or leave the active adapters as they were (as ``lorakit.load_adapter``:
    the first adapter wrapped on a model would otherwise be active)."""
    if activate_it:
        activate(model, adapter_name, trainable=is_trainable)
        return model
    for _, layer in variant_layers(model):
        if adapter_name in layer.adapter_names():
            layer.active_adapters = [name for name in layer.active_adapters if name != adapter_name]
            layer.set_trainable(adapter_name, is_trainable)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            if module.active_adapter == adapter_name:
                module.active_adapter = None
            module.modules_to_save[adapter_name].requires_grad_(is_trainable)
    return model


def load_adalora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    activate: bool = True,
) -> nn.Module:
    """Load an AdaLoRA adapter saved by lorakit or PEFT (ranks per matrix as in the file).

    Raises:
        AdapterFileError: Missing or corrupt files.
        ConfigError: Not an AdaLoRA adapter.
        AdapterMismatchError: The tensors do not fit the model (first mismatch).
    """
    source = Path(path) / WEIGHTS_NAME
    config = AdaLoraConfig.from_peft_dict(read_config_json(path), source=str(Path(path) / CONFIG_NAME))
    weights = read_adapter_weights(path)
    ranks = {
        key[len(PREFIX) : -len(".lora_A")]: int(value.shape[0])
        for key, value in weights.items()
        if key.startswith(PREFIX) and key.endswith(".lora_A")
    }
    wrap_adalora(model, config, adapter_name, ranks=ranks, strict=False)
    with _removed_on_mismatch(model, adapter_name):
        _copy_tensors(adalora_state_dict(model, adapter_name, trim=False), weights, source)
    return _finish_load(model, adapter_name, is_trainable, activate)


def load_qrlora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    activate: bool = True,
) -> nn.Module:
    """Load a QR-LoRA adapter: λ and the stored factors (no QR runs).

    Raises:
        AdapterFileError: Missing or corrupt files.
        ConfigError: Not a QR-LoRA adapter.
        AdapterMismatchError: A target's factors are missing or do not fit the model.
    """
    source = Path(path) / WEIGHTS_NAME
    config = QRLoraConfig.from_dict(read_config_json(path), source=str(Path(path) / CONFIG_NAME))
    weights = read_adapter_weights(path)
    factors = {}
    for target in target_paths(model, config, strict=False):
        q, rp = weights.get(f"{PREFIX}{target}.qr_Q"), weights.get(f"{PREFIX}{target}.qr_RP")
        if q is None or rp is None:
            raise AdapterMismatchError(
                f"{source}: the factors of {target!r} are missing from the adapter file"
            )
        module = model.get_submodule(target)
        in_features, out_features = base_layer_shape(getattr(module, "base_layer", module))
        if rp.ndim != 2 or rp.shape[1] != in_features or q.shape != (out_features, rp.shape[0]):
            raise AdapterMismatchError(
                f"{source}: {target} has factors qr_Q {tuple(q.shape)} and qr_RP {tuple(rp.shape)}, but the layer needs "
                f"[{out_features}, r] and [r, {in_features}]"
            )
        factors[target] = (q, rp)
    wrap_qrlora(model, config, adapter_name, factors=factors, strict=False)
    with _removed_on_mismatch(model, adapter_name):
        _copy_tensors(qrlora_state_dict(model, adapter_name), weights, source)
    return _finish_load(model, adapter_name, is_trainable, activate)


# What io.load_adapter dispatches to, by the file's peft_type.
LOADERS = {"ADALORA": load_adalora, "LORAKIT_QRLORA": load_qrlora}


def save_variant(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trim: bool = True
) -> Path:
    """Save an AdaLoRA or QR-LoRA adapter in its format (``trim``: see :func:`save_adalora`).

    Raises:
        ConfigError: ``adapter_name`` is not an AdaLoRA or QR-LoRA adapter of ``model``.
    """
    config = adapter_configs(model).get(adapter_name)
    if isinstance(config, AdaLoraConfig):
        return save_adalora(model, path, adapter_name, trim=trim)
    if isinstance(config, QRLoraConfig):
        return save_qrlora(model, path, adapter_name)
    raise ConfigError(f"{adapter_name!r} is not an AdaLoRA or QR-LoRA adapter of this model")


def checkpoint_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``adapter_name`` under its file key, untrimmed (what a checkpoint restores)."""
    config = adapter_configs(model).get(adapter_name)
    if isinstance(config, AdaLoraConfig):
        return adalora_state_dict(model, adapter_name, trim=False)
    if isinstance(config, QRLoraConfig):
        return qrlora_state_dict(model, adapter_name)
    return adapter_state_dict(model, adapter_name)


def load_variant(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    activate: bool = True,
) -> nn.Module:
    """Load an AdaLoRA or QR-LoRA adapter, by the ``peft_type`` of its ``adapter_config.json``.

    Raises:
        ConfigError: The directory holds another kind of adapter.
    """
    peft_type = read_config_json(path).get("peft_type")
    if peft_type not in LOADERS:
        raise ConfigError(
            f"{Path(path) / CONFIG_NAME}: peft_type {peft_type!r} is not one of {sorted(LOADERS)}"
        )
    return LOADERS[peft_type](model, path, adapter_name, is_trainable=is_trainable, activate=activate)


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
