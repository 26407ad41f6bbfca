"""An adapter directory on disk: file names, atomic writes, and reading what is there (never unpickling).

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout), or, for
lorakit's int8 adapters (:mod:`lorakit.compress`), ``adapter_model.int8.safetensors``. Every write goes through a
temporary file in the same directory and a rename, so a reader sees the old file or the new one, never half of one.
This module knows file formats only; which tensors an adapter has is :mod:`lorakit.walk`'s and the methods' business.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorakit.errors import AdapterFileError, AdapterPathError, ConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INT8_WEIGHTS_NAME = "adapter_model.int8.safetensors"  # lorakit's int8 adapters (lorakit.compress)
INT8_FORMAT = "int8-rowwise-v1"  # the int8 layout written into the config and the safetensors metadata
INT8_FORMAT_KEY = "lorakit_compression"
INT8_SCALE_SUFFIX = ".scale"


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


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer library to fill; renamed to ``path`` on success,
    removed on any error, so ``path`` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def write_adapter_dir(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Write an adapter directory: ``tensors`` (copied to CPU) as ``adapter_model.safetensors`` and ``config``
    as ``adapter_config.json`` (sorted keys), each atomically. Returns the directory."""
    path = Path(path)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    write_config_json(path, config)
    return path


def write_config_json(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``adapter_config.json`` into directory ``path`` (indented, sorted keys, atomically)."""
    atomic_write_bytes(
        Path(path) / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    )


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


def weights_file(path: str | os.PathLike) -> Path:
    """The weights file an adapter directory is read from: the fp32 file, else the int8 one (for messages)."""
    path = Path(path)
    return path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else path / INT8_WEIGHTS_NAME


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (never a pickled ``.bin``), or else lorakit's int8
    ``adapter_model.int8.safetensors`` dequantized to fp32 (:func:`read_int8_weights`).

    Raises:
        AdapterFileError: Missing, or not a readable safetensors file.
    """
    weights_path = Path(path) / WEIGHTS_NAME
    if not weights_path.is_file() and (Path(path) / INT8_WEIGHTS_NAME).is_file():
        return read_int8_weights(path)
    if not weights_path.is_file():
        hint = (
            " (a pickled adapter_model.bin is never loaded: convert it to safetensors)"
            if (Path(path) / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFileError(f"{weights_path} not found{hint}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{weights_path} is corrupt or not a safetensors file: {err}") from None
    return _floating(weights, weights_path)


def _floating(weights: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """``weights``, if every tensor is floating point (an adapter's are; integer ones would be cast silently)."""
    for key, tensor in weights.items():
        if not tensor.is_floating_point():
            raise AdapterFileError(
                f"{file}: tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}; adapter weights are "
                "floating point (float32, bfloat16 or float16)"
            )
    return weights


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes`` [rows, cols] int8 times ``scale`` [rows] fp32: the fp32 weight [rows, cols]."""
    return codes.float() * scale.float()[:, None]


def read_int8_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.int8.safetensors`` and dequantize it: PEFT-keyed fp32 tensors.

    Raises:
        AdapterFileError: Missing, unreadable, not marked ``int8-rowwise-v1``, or a code tensor without its scale.
    """
    file = Path(path) / INT8_WEIGHTS_NAME
    if not file.is_file():
        raise AdapterFileError(f"{file} not found")
    try:
        with safe_open(str(file), framework="pt") as handle:
            found = (handle.metadata() or {}).get(INT8_FORMAT_KEY)
            stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file} is corrupt or not a safetensors file: {err}") from None
    if found != INT8_FORMAT:
        raise AdapterFileError(
            f"{file}: safetensors metadata {INT8_FORMAT_KEY}={found!r}, expected {INT8_FORMAT!r} (written by a newer "
            "lorakit, or not a lorakit int8 adapter)"
        )
    weights = {}
    for key, tensor in stored.items():
        if key.endswith(INT8_SCALE_SUFFIX):
            continue
        if tensor.dtype != torch.int8:
            weights[key] = tensor
            continue
        scale = stored.get(key + INT8_SCALE_SUFFIX)
        if scale is None or scale.shape != (tensor.shape[0],):
            raise AdapterFileError(
                f"{file}: int8 tensor {key!r} {tuple(tensor.shape)} needs {key + INT8_SCALE_SUFFIX!r} of shape "
                f"({tensor.shape[0]},), got {None if scale is None else tuple(scale.shape)}"
            )
        weights[key] = dequantize_rows(tensor, scale)
    return _floating(weights, file)


def resolve_adapter_path(root: str | Path | None, path: str) -> Path:
    """The adapter directory ``path`` names, confined to ``root``.

    Relative paths are taken from ``root``; absolute ones must lie inside it. ``..`` components are refused
    outright, and the resolved path (symlinks followed) must still be inside the resolved root.

    Raises:
        AdapterPathError: The path leaves the root.
        ConfigError: The path is empty or not a directory.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ConfigError(f"adapter path: expected a non-empty directory name, got {path!r}")
    candidate = Path(path)
    if root is None:
        resolved = candidate.resolve()
    else:
        if ".." in candidate.parts:
            raise AdapterPathError(
                f"adapter path {path!r}: '..' is not allowed; give a path inside the adapter root"
            )
        base = Path(root).resolve()
        resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
        if not resolved.is_relative_to(base):
            raise AdapterPathError(f"adapter path {path!r} resolves outside the adapter root {str(base)!r}")
    if not resolved.is_dir():
        raise ConfigError(f"adapter path {path!r}: no such directory")
    return resolved
