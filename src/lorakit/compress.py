"""int8 adapter files: LoRA factors stored as int8 per row with an fp32 scale per row.

Files are 3.1x / 3.5x / 3.9x smaller than fp32 at r = 8 / 16 / 64 on Llama-2-7B shapes: the fp32 scale of each
row of B (r codes per row) is the overhead (docs/adapters.md has the measurements).

Every row of ``lora_A`` ([r, in]) and of ``lora_B`` ([out, r]) is quantized symmetrically on its own:
``scale = max|row| / 127``, ``q = round(row / scale)`` in int8, and ``row ≈ q · scale`` on load. DoRA magnitudes
and ``modules_to_save`` copies stay fp32 (they are small, or not low-rank).

The directory holds ``adapter_config.json`` (PEFT's, plus ``"lorakit_compression": "int8-rowwise-v1"``) and
``adapter_model.int8.safetensors``: each quantized tensor under its PEFT key (int8) plus ``<key>.scale``
(fp32 [rows]); the safetensors metadata also says ``lorakit_compression``. There is no
``adapter_model.safetensors``, so PEFT refuses the directory (no weights file; PEFT 0.21.2 then raises a
``ValueError`` about the hub repo id) instead of loading int8 codes as weights; :func:`decompress` writes an ordinary PEFT directory. :func:`lorakit.load_adapter`
reads both kinds, dequantizing to fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.inject import adapter_configs, adapter_state_dict, require_lora
from lorakit.io import (
    CONFIG_NAME,
    INT8_WEIGHTS_NAME,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    atomic_write_bytes,
    read_adapter_weights,
)

FORMAT = "int8-rowwise-v1"
FORMAT_KEY = "lorakit_compression"
SCALE_SUFFIX = ".scale"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``weight`` [rows, cols].

    Returns:
        tuple[Tensor, Tensor]: codes [rows, cols] int8 in ``[-127, 127]`` and scales [rows] fp32 with
        ``weight ≈ codes · scales[:, None]`` (error at most ``scale / 2`` per element; all-zero rows: scale 0).
    """
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127  # [rows]
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row quantizes to zeros
    codes = torch.round(weight / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes`` [rows, cols] int8 times ``scale`` [rows] fp32: the fp32 weight [rows, cols]."""
    return codes.float() * scale.float()[:, None]


def _is_factor(key: str) -> bool:
    return key.endswith(("lora_A.weight", "lora_B.weight"))


def compress_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT-keyed adapter tensors -> the int8 file's tensors (factors as int8 + ``.scale``, the rest fp32)."""
    out = {}
    for key, tensor in tensors.items():
        if _is_factor(key):
            out[key], out[key + SCALE_SUFFIX] = quantize_rows(tensor)
        else:
            out[key] = tensor.detach().float()
    return {key: value.to("cpu").contiguous() for key, value in out.items()}


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
            found = (handle.metadata() or {}).get(FORMAT_KEY)
            stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file} is corrupt or not a safetensors file: {err}") from None
    if found != FORMAT:
        raise AdapterFileError(
            f"{file}: safetensors metadata {FORMAT_KEY}={found!r}, expected {FORMAT!r} (written by a newer "
            "lorakit, or not a lorakit int8 adapter)"
        )
    weights = {}
    for key, tensor in stored.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype != torch.int8:
            weights[key] = tensor
            continue
        scale = stored.get(key + SCALE_SUFFIX)
        if scale is None or scale.shape != (tensor.shape[0],):
            raise AdapterFileError(
                f"{file}: int8 tensor {key!r} {tuple(tensor.shape)} needs {key + SCALE_SUFFIX!r} of shape "
                f"({tensor.shape[0]},), got {None if scale is None else tuple(scale.shape)}"
            )
        weights[key] = dequantize_rows(tensor, scale)
    return weights


def _write(tensors: dict[str, torch.Tensor], config: dict, out: str | os.PathLike) -> Path:
    """Write an int8 adapter directory from PEFT-keyed fp32 ``tensors`` and an ``adapter_config.json`` dict."""
    out = Path(out)
    if (out / WEIGHTS_NAME).exists():
        raise AdapterFileError(
            f"{out / WEIGHTS_NAME} exists: an int8 adapter next to an fp32 one would be ambiguous (the fp32 file "
            "wins on load); write the int8 adapter to another directory"
        )
    metadata = {"format": "pt", FORMAT_KEY: FORMAT}
    atomic_save_safetensors(compress_tensors(tensors), out / INT8_WEIGHTS_NAME, metadata=metadata)
    config = {**config, FORMAT_KEY: FORMAT}
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out


def save_adapter_int8(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Save adapter ``adapter_name`` as an int8 adapter directory (see the module docstring for the format).

    Args:
        model (nn.Module): A model wrapped with :func:`lorakit.wrap`.
        path (str | PathLike): Output directory (created if missing; must not hold an fp32 adapter).
        adapter_name (str): Which adapter. Default ``"default"``.

    Returns:
        Path: The directory written.

    Raises:
        ConfigError: No adapter of that name, or an AdaLoRA / QR-LoRA adapter (int8 files hold LoRA factors).
        AdapterFileError: ``path`` already holds ``adapter_model.safetensors``.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r} to save; present: {sorted(configs)}")
    require_lora(model, [adapter_name], "save_adapter_int8: int8 files", "save it with lorakit.save_adapter")
    return _write(adapter_state_dict(model, adapter_name), configs[adapter_name].to_peft_dict(), path)


def _read_config(path: Path) -> dict:
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{path / CONFIG_NAME} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path / CONFIG_NAME} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path / CONFIG_NAME} must hold a JSON object, got {type(data).__name__}")
    return data


def compress(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a PEFT-format adapter directory ``path`` into an int8 adapter directory ``out`` (no model needed).

    Raises:
        AdapterFileError: Missing or corrupt input files, or ``out`` holds an fp32 adapter.
    """
    path = Path(path)
    return _write(read_adapter_weights(path), _read_config(path), out)


def decompress(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert an int8 adapter directory ``path`` into an ordinary PEFT-format directory ``out`` (fp32 weights,
    the config without the ``lorakit_compression`` key): PEFT, vLLM and TGI load the result.

    Raises:
        AdapterFileError: Missing or corrupt input files.
    """
    path, out = Path(path), Path(out)
    config = _read_config(path)
    config.pop(FORMAT_KEY, None)
    atomic_save_safetensors(read_int8_weights(path), out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out


__all__ = [
    "FORMAT",
    "compress",
    "decompress",
    "dequantize_rows",
    "quantize_rows",
    "read_int8_weights",
    "save_adapter_int8",
]
