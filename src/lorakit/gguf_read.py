"""Read a GGUF model file (llama.cpp's format) as a transformers model, one tensor at a time.

A GGUF file holds the architecture as metadata (``llama.block_count``, ``llama.embedding_length`` ...), the
tokenizer (``tokenizer.ggml.*``, with its chat template) and every weight under llama.cpp's names
(``blk.0.attn_q.weight``), most of them block-quantized (Q4_1, Q8_0, ...). :func:`open_gguf` checks the file
(a supported architecture, every tensor inside the file), :func:`gguf_config` turns the metadata into a
transformers config, and :func:`stream_gguf` yields ``(transformers name, dequantized tensor)`` pairs read
with plain file reads, so :func:`lorakit.loading.load_model` can quantize each weight to 4 bits as it
arrives (the full-precision model never exists at once). The names come from the ``gguf`` package's own
table (``gguf.get_tensor_name_map``), which is what llama.cpp's ``convert_hf_to_gguf.py`` writes with.

Llama-family files only (``general.architecture: llama``, which covers Llama 1-3, Mistral, SmolLM, TinyLlama):
llama.cpp stores their q and k projections with rows permuted for its rotary layout (:func:`permute_qk`),
which is undone here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import AdapterFileError, ConfigError

# GGUF architectures lorakit reads and writes: general.architecture -> transformers model_type.
GGUF_ARCHITECTURES = {"llama": "llama"}
GGUF_INSTALL_HINT = "GGUF files need the gguf package: pip install 'lorakit[gguf]' (or gguf==0.19.0)"


def import_gguf():
    """The ``gguf`` package (llama.cpp's reader/writer), or a clear error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(GGUF_INSTALL_HINT) from None
    return gguf


def is_gguf(path: str | os.PathLike, gguf_file: str | None = None) -> bool:
    """Whether ``path`` (or ``path/gguf_file``) names a GGUF file rather than a model directory."""
    return gguf_file is not None or str(path).lower().endswith(".gguf")


def gguf_path(path: str | os.PathLike, gguf_file: str | None = None) -> Path:
    """``path/gguf_file`` as transformers spells it (``from_pretrained(dir, gguf_file=...)``), else ``path``."""
    return Path(path) / gguf_file if gguf_file is not None else Path(path)


@dataclass
class GgufFile:
    """An opened, checked GGUF file: its path, the ``gguf.GGUFReader`` and the architecture name."""

    path: Path
    reader: Any
    arch: str

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, number, or list), or ``default`` when the file has no such key."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    @property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}


def open_gguf(path: str | os.PathLike) -> GgufFile:
    """Open a GGUF model file and check it before anything is built from it.

    Raises:
        AdapterFileError: The file is missing, not GGUF, or truncated (names the first tensor past the end).
        ConfigError: The architecture is not one lorakit reads (:data:`GGUF_ARCHITECTURES`), or the file
            is a LoRA adapter rather than a model.
    """
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} not found: expected a .gguf model file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, EOFError, UnicodeDecodeError, struct.error) as err:
        raise AdapterFileError(
            f"{path} is not a complete GGUF file: truncated (an interrupted download or copy?) or another "
            f"format ({type(err).__name__}: {err})"
        ) from None
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise AdapterFileError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte {end} but the file has {size} bytes"
            )
    found = GgufFile(path, reader, "")
    arch = found.field("general.architecture")
    if found.field("general.type") == "adapter":
        raise ConfigError(f"{path} is a GGUF LoRA adapter (general.type: adapter), not a model")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{path}: general.architecture is {arch!r}; lorakit reads GGUF models of architecture "
            f"{', '.join(GGUF_ARCHITECTURES)} (convert others with llama.cpp or load the Hugging Face checkpoint)"
        )
    found.arch = arch
    return found


def check_tokenizer(file: GgufFile) -> None:
    """Raise if the file carries no tokenizer (``tokenizer.ggml.model`` and ``tokenizer.ggml.tokens``).

    Raises:
        AdapterFileError: No tokenizer in the file.
    """
    if file.field("tokenizer.ggml.model") is None or "tokenizer.ggml.tokens" not in file.reader.fields:
        raise AdapterFileError(
            f"{file.path} has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens metadata); "
            "re-export it with its tokenizer (llama.cpp's convert_hf_to_gguf.py or `lorakit export`)"
        )


def gguf_config(file: GgufFile) -> Any:
    """The transformers config the file's metadata describes (a ``LlamaConfig``).

    Raises:
        ConfigError: A required key is missing, or the file uses rope scaling lorakit does not map.
    """
    from transformers import LlamaConfig

    def need(key: str) -> Any:
        value = file.arch_field(key)
        if value is None:
            raise ConfigError(f"{file.path}: metadata key {file.arch}.{key} is missing")
        return value

    scaling = file.arch_field("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in file.tensor_names:
        raise ConfigError(f"{file.path}: rope scaling ({scaling}) is not supported for GGUF models yet")
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = file.reader.fields.get("tokenizer.ggml.tokens")
    vocab = file.arch_field("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise ConfigError(f"{file.path}: neither {file.arch}.vocab_size nor tokenizer.ggml.tokens is present")
    names = file.tensor_names
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(file.arch_field("attention.head_count_kv", heads)),
        head_dim=int(file.arch_field("rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(file.arch_field("context_length", 2048)),
        rms_norm_eps=float(file.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(file.arch_field("rope.freq_base", 10000.0)),
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=file.field("tokenizer.ggml.bos_token_id"),
        eos_token_id=file.field("tokenizer.ggml.eos_token_id"),
        pad_token_id=file.field("tokenizer.ggml.padding_token_id"),
    )


def tensor_name_map(state_keys: list[str], num_layers: int) -> dict[str, str]:
    """transformers state-dict key -> GGUF tensor name, from the ``gguf`` package's table (llama)."""
    gguf = import_gguf()
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    names = {}
    for key in state_keys:
        module, _, suffix = key.rpartition(".")
        name = table.get_name(module)
        if name is not None:
            names[key] = f"{name}.{suffix}"
    return names


def permute_qk(weight: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's row order for the q / k projections (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``).

    transformers rotates the two halves of each head (``rotate_half``); llama.cpp rotates adjacent pairs, so
    its converter interleaves each head's halves. ``inverse=True`` undoes it. Works on [out, ...] tensors:
    weights, biases, and a LoRA B factor [out, r].
    """
    shape = weight.shape
    if inverse:  # [heads, 2 pairs-halves, d/2] <- [heads, d/2, 2]
        return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def qk_heads(key: str, config: Any) -> int | None:
    """How many heads to permute over for a q (attention heads) or k (key/value heads) tensor, else None."""
    if ".q_proj." in key:
        return config.num_attention_heads
    if ".k_proj." in key:
        return config.num_key_value_heads
    return None


def read_tensor(handle, tensor: Any) -> np.ndarray:
    """One GGUF tensor dequantized to float32 (or as stored, for integer types), numpy shape [rows..., cols].

    Plain reads, no memory map: only this tensor's bytes are resident, and only until the caller drops them.
    """
    gguf = import_gguf()
    handle.seek(tensor.data_offset)
    buffer = bytearray(tensor.n_bytes)  # writable, so torch.from_numpy shares it without a warning
    if handle.readinto(buffer) != len(buffer):
        raise AdapterFileError(f"{handle.name} is truncated: tensor {tensor.name!r} is incomplete")
    raw = np.frombuffer(buffer, dtype=np.uint8)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest dimension first
    qtype = tensor.tensor_type
    kind = gguf.GGMLQuantizationType
    if qtype in (kind.I8, kind.I16, kind.I32, kind.I64, kind.F64):
        return raw.view(_NUMPY_TYPES[qtype.name]).reshape(shape)
    data = raw.reshape(gguf.quant_shape_to_byte_shape(shape, qtype)).reshape(-1, raw.size // _rows(shape))
    # Row chunks: numpy's dequantization makes several temporaries the size of its input in float32; on the
    # embedding (the largest tensor) that would be the load's peak.
    out = np.empty((_rows(shape), shape[-1]), dtype=np.float32)
    for start in range(0, out.shape[0], DEQUANT_ROWS):
        out[start : start + DEQUANT_ROWS] = gguf.dequantize(data[start : start + DEQUANT_ROWS], qtype)
    return out.reshape(shape)


DEQUANT_ROWS = 1024  # rows dequantized at a time (a 4096-wide row: 16 KiB in float32)


def _rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


_NUMPY_TYPES = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "F64": np.float64}


def stream_gguf(file: GgufFile, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(state-dict key of model, float32 tensor)`` for every GGUF tensor the model has, one at a time.

    q / k weights come back in transformers' row order (:func:`permute_qk` undone). Tensors the model has no
    place for are skipped.
    """
    state_keys = list(model.state_dict().keys())
    by_gguf = {v: k for k, v in tensor_name_map(state_keys, model.config.num_hidden_layers).items()}
    with open(file.path, "rb") as handle:
        for tensor in sorted(file.reader.tensors, key=lambda t: t.data_offset):
            key = by_gguf.get(tensor.name)
            if key is None:
                continue
            value = torch.from_numpy(read_tensor(handle, tensor))
            heads = qk_heads(key, model.config)
            if heads is not None:
                value = permute_qk(value, heads, inverse=True)
            yield key, value


__all__ = [
    "GGUF_ARCHITECTURES",
    "GgufFile",
    "check_tokenizer",
    "gguf_config",
    "gguf_path",
    "import_gguf",
    "is_gguf",
    "open_gguf",
    "permute_qk",
    "stream_gguf",
    "tensor_name_map",
]
