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

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.files import (
    CONFIG_NAME,
    INT8_FORMAT,
    INT8_FORMAT_KEY,
    INT8_SCALE_SUFFIX,
    INT8_WEIGHTS_NAME,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    dequantize_rows,
    read_adapter_weights,
    read_config_json,
    read_int8_weights,
    write_config_json,
)
from lorakit.methods import method_of, require_lora_factors
from lorakit.walk import adapter_configs, adapter_state_dict

FORMAT = INT8_FORMAT
FORMAT_KEY = INT8_FORMAT_KEY
SCALE_SUFFIX = INT8_SCALE_SUFFIX


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
    write_config_json(out, {**config, FORMAT_KEY: FORMAT})
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
    require_lora_factors(
        model, [adapter_name], "save_adapter_int8: int8 files", "save it with lorakit.save_adapter"
    )
    config = configs[adapter_name]
    return _write(adapter_state_dict(model, adapter_name), method_of(config).to_file(config), path)


def compress(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a PEFT-format adapter directory ``path`` into an int8 adapter directory ``out`` (no model needed).

    Raises:
        AdapterFileError: Missing or corrupt input files, or ``out`` holds an fp32 adapter.
    """
    path = Path(path)
    return _write(read_adapter_weights(path), read_config_json(path), out)


def decompress(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert an int8 adapter directory ``path`` into an ordinary PEFT-format directory ``out`` (fp32 weights,
    the config without the ``lorakit_compression`` key): PEFT, vLLM and TGI load the result.

    Raises:
        AdapterFileError: Missing or corrupt input files.
    """
    path, out = Path(path), Path(out)
    config = read_config_json(path)
    config.pop(FORMAT_KEY, None)
    atomic_save_safetensors(read_int8_weights(path), out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_config_json(out, config)
    return out


__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "compress",
    "decompress",
    "dequantize_rows",
    "quantize_rows",
    "read_int8_weights",
    "save_adapter_int8",
]
