"""Deployment files from a base model and trained adapters (docs/export.md).

One function per target, all written atomically:

* :func:`export_peft`: the adapter alone in PEFT's format (vLLM, TGI, PEFT and lorakit load it on the base).
* :func:`export_merged`: the base with the adapters merged in, a plain Hugging Face directory (``lorakit merge``).
* :func:`export_gguf`: the merged model as one GGUF file (llama.cpp, Ollama, LM Studio).
* :func:`export_gguf_adapter`: the adapter as a GGUF LoRA file (``llama-cli -m base.gguf --lora adapter.gguf``).

Merging reuses :func:`lorakit.merge_and_unload` on a base loaded in float32 (a 4-bit base, as the adapter was
trained on, is dequantized once), so every merged target is the base the adapter saw plus the adapter, rounded
once to the saved dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError


def base_quantize(choice: str | None, adapters: list[str]) -> str | None:
    """The base's quantization as the adapter was trained (its recipe.yaml) unless ``choice`` says (``"none"``)."""
    if choice is not None:
        return None if choice == "none" else choice
    import yaml

    for adapter in adapters:
        recipe = Path(adapter) / "recipe.yaml"
        if recipe.is_file():
            return (yaml.safe_load(recipe.read_text()) or {}).get("model", {}).get("quantize")
    return None


def checkpoint_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype a model directory's config.json says its weights are stored in (float32 if none, or GGUF)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    named = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return named if named in ("bfloat16", "float16", "float32") else "float32"


def load_with_adapters(model_path: str, adapters: list[str], quantize: str | None, dtype: str = "auto"):
    """The base (a directory or a ``.gguf`` file) with ``adapters`` loaded and all active, and its tokenizer
    (the first adapter's when it saved one, else the base's).

    Returns:
        tuple: ``(model, tokenizer)``.
    """
    import lorakit
    from lorakit.loading import check_model_source, load_model, load_tokenizer

    has_own = bool(adapters) and (Path(adapters[0]) / "tokenizer_config.json").is_file()
    check_model_source(model_path, tokenizer=not has_own)  # before any work
    tokenizer = load_tokenizer(adapters[0] if has_own else model_path)
    model = load_model(model_path, quantize=quantize, compute_dtype=dtype)
    names = []
    for i, adapter in enumerate(adapters):
        lorakit.load_adapter(model, adapter, adapter_name=f"adapter_{i}", activate=False)
        names.append(f"adapter_{i}")
    if names:
        lorakit.set_adapter(model, names)
    return model, tokenizer


def merged_model(model_path: str, adapters: list[str], quantize: str | None):
    """The base plus ``adapters``, merged and unwrapped, in float32, and the tokenizer."""
    import lorakit

    model, tokenizer = load_with_adapters(model_path, adapters, quantize, "float32")
    return lorakit.merge_and_unload(model), tokenizer


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing, non-empty ``--out`` unless ``overwrite``.

    Raises:
        ConfigError: ``out`` exists (a non-empty directory or a file) and ``overwrite`` is False.
    """
    taken = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if taken and not overwrite:
        raise ConfigError(
            f"--out {out} already exists and is not empty; pass --overwrite or choose another path"
        )


def export_merged(
    model_path: str, adapters: list[str], out: str | os.PathLike, quantize: str | None, dtype: str = "auto"
) -> str:
    """Write the merged model as a Hugging Face directory (safetensors + tokenizer); returns the saved dtype."""
    import torch

    out = Path(out)
    merged, tokenizer = merged_model(model_path, adapters, quantize)
    dtype = checkpoint_dtype(model_path) if dtype == "auto" else dtype
    merged = merged.to(getattr(torch, dtype))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return dtype


def export_gguf(
    model_path: str, adapters: list[str], out: str | os.PathLike, quantize: str | None, quant: str = "f16"
) -> Path:
    """Write the merged model as one GGUF file (``quant``: f16, bf16 or q8_0 matrices).

    A GGUF base passes its own tokenizer metadata through unchanged; a directory base's tokenizer is converted.
    """
    from lorakit.gguf_read import is_gguf, open_gguf
    from lorakit.gguf_write import check_architecture, write_model_gguf

    source = open_gguf(model_path) if is_gguf(model_path) else None
    if source is None:
        check_architecture(_base_config(model_path))  # before the (long) load and merge
    merged, tokenizer = merged_model(model_path, adapters, quantize)
    return write_model_gguf(merged, out, quant=quant, tokenizer=tokenizer, tokenizer_source=source)


def _base_config(model_path: str) -> Any:
    """The base's config: a GGUF file's from its header, a directory's checked by lorakit.model_dir."""
    from lorakit.gguf_read import gguf_config, is_gguf, open_gguf
    from lorakit.model_dir import load_model_config

    if is_gguf(model_path):
        return gguf_config(open_gguf(model_path))
    return load_model_config(model_path)


def export_gguf_adapter(model_path: str, adapter: str, out: str | os.PathLike) -> Path:
    """Write one LoRA adapter as a llama.cpp GGUF LoRA file; only the base's config is read, not its weights.

    Raises:
        ConfigError: Not a plain LoRA adapter, or an architecture llama.cpp's LoRA format is not written for.
    """
    from lorakit.config import LoraConfig
    from lorakit.files import read_adapter_weights
    from lorakit.gguf_write import write_lora_gguf
    from lorakit.io import read_config

    config = read_config(adapter)
    if type(config) is not LoraConfig:
        raise ConfigError(
            f"{adapter}: GGUF LoRA export writes LoRA adapters; this one is {type(config).__name__} "
            "(export the merged model with --format gguf instead)"
        )
    return write_lora_gguf(read_adapter_weights(adapter), config, _base_config(model_path), out)


def export_peft(adapter: str, out: str | os.PathLike) -> Path:
    """Copy an adapter in its method's file format (PEFT's for LoRA / DoRA / AdaLoRA), int8 files widened to
    fp32, with the tokenizer when the run saved one."""
    from lorakit.files import read_adapter_weights, write_adapter_dir
    from lorakit.io import read_config
    from lorakit.methods import method_of

    config = read_config(adapter)
    path = write_adapter_dir(out, read_adapter_weights(adapter), method_of(config).to_file(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(adapter) / name).is_file():
            shutil.copyfile(Path(adapter) / name, Path(path) / name)
    return Path(path)


__all__ = [
    "base_quantize",
    "check_out",
    "checkpoint_dtype",
    "export_gguf",
    "export_gguf_adapter",
    "export_merged",
    "export_peft",
    "load_with_adapters",
    "merged_model",
]
