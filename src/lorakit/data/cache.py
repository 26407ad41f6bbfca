"""On-disk cache of tokenized files: safetensors arrays plus JSON metadata, no pickle.

The key hashes everything the encoded samples depend on: the data file's bytes, the tokenizer (its full
``tokenizer.json``, chat template and special tokens), and the encoding settings. A file is written to a
temporary name and moved into place with ``os.replace``, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

# Bump when the encoding changes (template, masking, EOS rules): old entries then miss instead of lying.
CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides how a tokenizer encodes: vocabulary, merges, normalizer, template, specials.

    Args:
        tokenizer (PreTrainedTokenizerFast): A fast tokenizer.

    Returns:
        str: A hex sha256 digest.
    """
    identity = {
        "class": type(tokenizer).__name__,
        "backend": tokenizer.backend_tokenizer.to_str(),
        "chat_template": tokenizer.chat_template,
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_key(path: Path, tokenizer_hash: str, settings: dict[str, Any]) -> str:
    """The cache key of one data file encoded with one tokenizer and settings.

    Args:
        path (Path): The data file (its bytes are hashed, not its name or time).
        tokenizer_hash (str): :func:`tokenizer_fingerprint` of the tokenizer.
        settings (dict[str, Any]): JSON-serializable encoding settings.

    Returns:
        str: A hex sha256 digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    header = json.dumps(
        {"version": CACHE_VERSION, "tokenizer": tokenizer_hash, "settings": settings}, sort_keys=True
    )
    digest.update(header.encode())
    return digest.hexdigest()


def save_entry(cache_dir: Path, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write a cache entry atomically.

    Args:
        cache_dir (Path): The cache directory (created if missing).
        key (str): :func:`cache_key`.
        tensors (dict[str, torch.Tensor]): Flat arrays.
        metadata (dict[str, Any]): JSON-serializable facts (counts, format, messages).

    Returns:
        Path: The entry's file.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"{key}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key[:16]}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"lorakit": json.dumps(metadata)}
        )
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final


def load_entry(cache_dir: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Read a cache entry.

    Args:
        cache_dir (Path): The cache directory.
        key (str): :func:`cache_key`.

    Returns:
        tuple[dict[str, torch.Tensor], dict[str, Any]] | None: Tensors and metadata, or None on a miss (an
        unreadable entry counts as a miss, with a warning, and is rewritten).
    """
    path = cache_dir / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads(f.metadata()["lorakit"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:
        logger.warning("ignoring unreadable cache entry %s (%s); re-tokenizing", path, e)
        return None
    return tensors, metadata
