"""Check a Hugging Face model directory before any work: a readable ``config.json`` naming a known
``model_type``, transformers able to read it, and (when asked) a tokenizer. The tensor shapes are checked
against the config as the weights stream in (:func:`lorakit.loading.load_model`).

transformers' own errors on such directories are tracebacks from deep inside it (``KeyError: 'model_type'``,
``ValueError: Unrecognized model``, a JSON error without the file): here each one is an
:class:`~lorakit.errors.AdapterFileError` or :class:`~lorakit.errors.ConfigError` naming the file, the field and
the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.bounded_yaml import cut, shown
from lorakit.errors import AdapterFileError, ConfigError

MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_model_config(path: str | os.PathLike, trust_remote_code: bool = False) -> dict[str, Any]:
    """The raw ``config.json`` of a model directory, checked to be an object with a known ``model_type``.

    Raises:
        AdapterFileError: Not a directory, no ``config.json``, unreadable, not JSON, or not an object.
        ConfigError: No ``model_type``, or one transformers does not know (and no remote code allowed).
    """
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise AdapterFileError(
            f"model directory {path} not found (expected config.json, *.safetensors, tokenizer)"
        )
    if not file.is_file():
        raise AdapterFileError(f"{file} not found: expected a Hugging Face model directory")
    try:
        with open(file, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterFileError(f"{file} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a model config")
        config = json.loads(raw.decode("utf-8"))
    except OSError as err:
        raise AdapterFileError(f"{file}: cannot read it ({err.strerror})") from None
    except (ValueError, RecursionError) as err:  # JSON, UTF-8, a >4300-digit number, deep nesting
        raise AdapterFileError(f"{file} is not valid JSON: {cut(str(err), 200)}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, got a {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(
            f'{file}: model_type: expected the architecture\'s name (e.g. "llama"), got {shown(model_type)}'
        )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in config):
        raise ConfigError(
            f"{file}: model_type {shown(model_type)} is not an architecture this transformers knows; "
            "check the name, upgrade transformers, or (for a model shipping its own code) allow "
            "trust_remote_code"
        )
    return config


def load_model_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """transformers' config object of a model directory, after :func:`read_model_config`'s checks.

    Raises:
        AdapterFileError / ConfigError: As :func:`read_model_config`, or transformers refusing a field
            (the message names the file and transformers' reason).
    """
    read_model_config(path, trust_remote_code)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as err:  # transformers raises many kinds on bad field values
        raise ConfigError(
            f"{Path(path) / 'config.json'}: transformers cannot read it: {type(err).__name__}: "
            f"{cut(str(err), 300)}"
        ) from None


def check_tokenizer_files(path: str | os.PathLike) -> None:
    """A tokenizer is saved in ``path`` (``tokenizer.json``, ``tokenizer_config.json`` or ``tokenizer.model``).

    Raises:
        AdapterFileError: None of them is there.
    """
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise AdapterFileError(
            f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the base model's tokenizer files "
            "into it (tokenizer.save_pretrained)"
        )


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(path)`` offline, with its files checked first and its errors named.

    Raises:
        AdapterFileError: No tokenizer files, or transformers cannot read them.
    """
    check_tokenizer_files(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as err:  # a corrupt tokenizer.json raises from the tokenizers library
        raise AdapterFileError(
            f"{path}: the tokenizer cannot be loaded: {type(err).__name__}: {cut(str(err), 300)}"
        ) from None


def check_model_dir(path: str | os.PathLike, trust_remote_code: bool = False, tokenizer: bool = True):
    """Everything :func:`load_model_config` and (``tokenizer=True``) :func:`check_tokenizer_files` check;
    returns the config object."""
    config = load_model_config(path, trust_remote_code)
    if tokenizer:
        check_tokenizer_files(path)
    return config


__all__ = [
    "check_model_dir",
    "check_tokenizer_files",
    "load_model_config",
    "load_tokenizer",
    "read_model_config",
]
