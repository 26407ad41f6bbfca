"""Write GGUF files for llama.cpp, Ollama and LM Studio: a merged model, or a LoRA adapter (``--lora``).

Both are written with the ``gguf`` package's ``GGUFWriter`` (no hand-written binary format), through a
temporary file and a rename (:func:`lorakit.files.atomic_file`).

* A model (:func:`write_model_gguf`): llama metadata (``llama.block_count`` ...), the tokenizer with its chat
  template, and every tensor under llama.cpp's name, q / k rows permuted to llama.cpp's rotary layout
  (:func:`lorakit.gguf_read.permute_qk`). Matrices are stored as f16, bf16 or Q8_0; 1-D tensors (norms,
  biases) as f32, as llama.cpp's ``convert_hf_to_gguf.py`` does.
* A LoRA adapter (:func:`write_lora_gguf`), the format of llama.cpp's ``convert_lora_to_gguf.py``:
  ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per target
  ``blk.N.attn_q.weight.lora_a`` [r, in] and ``.lora_b`` [out, r] (numpy order; ggml lists them reversed).
  llama.cpp applies ``W + (alpha / r) * B @ A``, PEFT's scale; B's rows of q / k are permuted like the base's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.files import atomic_file
from lorakit.gguf_read import GGUF_ARCHITECTURES, GgufFile, import_gguf, permute_qk, qk_heads, tensor_name_map

GGUF_QUANTS = ("f16", "bf16", "q8_0")  # what `lorakit export --format gguf --quant` writes


def check_architecture(config: Any) -> str:
    """The GGUF architecture name for a transformers config.

    Raises:
        ConfigError: Not an architecture lorakit writes as GGUF, or rope scaling it does not map.
    """
    arch = {v: k for k, v in GGUF_ARCHITECTURES.items()}.get(getattr(config, "model_type", None))
    if arch is None:
        raise ConfigError(
            f"GGUF export supports model_type {', '.join(GGUF_ARCHITECTURES.values())}; this model is "
            f"{getattr(config, 'model_type', None)!r} (export --format safetensors and convert with llama.cpp)"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export: rope_type {rope.get('rope_type')!r} is not supported yet")
    return arch


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_arch_metadata(writer: Any, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def copy_tokenizer_fields(writer: Any, source: GgufFile) -> None:
    """Copy every ``tokenizer.*`` key of a GGUF file (vocabulary, merges, special ids, chat template) as is."""
    gguf = import_gguf()
    for key, field in source.reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def add_hf_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """A transformers byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model (+ chat template).

    Raises:
        ConfigError: Another kind of tokenizer (SentencePiece / WordPiece ...): export from a GGUF base, or
            convert with llama.cpp.
    """
    gguf = import_gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ConfigError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style) from a Hugging Face "
            f"directory; this one is {model.get('type')!r} (export from the GGUF base, or use llama.cpp's converter)"
        )
    kinds = gguf.TokenType
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(kinds.UNUSED)
        else:
            tokens.append(token)
            special = added.get(token)
            types.append(
                kinds.NORMAL if special is None else kinds.CONTROL if special else kinds.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    # Does plain encoding prepend BOS (a Llama post-processor)? llama.cpp reads it from the file.
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _encode(gguf: Any, value: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """A float32 tensor in the stored type: (data, raw_dtype for the writer, None for plain numpy types)."""
    kind = gguf.GGMLQuantizationType
    if value.ndim < 2:
        return value, None  # norms and biases stay f32, as llama.cpp's converter keeps them
    if quant == "q8_0" and value.shape[-1] % gguf.GGML_QUANT_SIZES[kind.Q8_0][0] == 0:
        return gguf.quantize(value, kind.Q8_0), kind.Q8_0
    if quant == "bf16":
        return gguf.quantize(value, kind.BF16), kind.BF16
    return value.astype(np.float16), None  # f16, and q8_0 rows not a multiple of 32 (as llama.cpp falls back)


def write_model_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    quant: str = "f16",
    tokenizer: Any = None,
    tokenizer_source: GgufFile | None = None,
    name: str | None = None,
) -> Path:
    """Write a (merged, unwrapped) transformers Llama-family model as one GGUF file.

    Args:
        model (nn.Module): A plain transformers model (no adapter layers: :func:`lorakit.merge_and_unload`).
        path (str | PathLike): The ``.gguf`` file to write (atomically).
        quant (str): ``"f16"`` (default), ``"bf16"`` or ``"q8_0"`` for the matrices; 1-D tensors stay f32.
        tokenizer: A transformers tokenizer, written as llama.cpp's ``gpt2`` tokenizer with its chat template.
        tokenizer_source (GgufFile | None): A GGUF file whose ``tokenizer.*`` keys are copied instead (the base
            the model was loaded from).
        name (str | None): ``general.name``. Default: the file's stem.

    Returns:
        Path: The file written.

    Raises:
        ConfigError: An unsupported architecture or ``quant``, adapter layers left in the model, or no tokenizer.
    """
    gguf = import_gguf()
    if quant not in GGUF_QUANTS:
        raise ConfigError(f"--quant: expected one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    if tokenizer is None and tokenizer_source is None:
        raise ConfigError("GGUF export needs the tokenizer (llama.cpp reads it from the file)")
    config, path = model.config, Path(path)
    arch = check_architecture(config)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and config.tie_word_embeddings)
    }
    names = tensor_name_map(list(state), config.num_hidden_layers)
    unnamed = sorted(set(state) - set(names))
    if unnamed:
        raise ConfigError(
            f"GGUF export: no llama.cpp name for {unnamed[0]!r} (merge adapters first: lorakit merge)"
        )
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}  # fmt: skip
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or path.stem)
        _add_arch_metadata(writer, config)
        writer.add_file_type(file_types[quant])
        if tokenizer_source is not None:
            copy_tokenizer_fields(writer, tokenizer_source)
        else:
            add_hf_tokenizer(writer, tokenizer, config.vocab_size)
        for key, tensor in state.items():
            value = tensor.detach().to(torch.float32)
            heads = qk_heads(key, config)
            if heads is not None:
                value = permute_qk(value, heads)
            data, raw = _encode(gguf, value.numpy(), quant)
            writer.add_tensor(names[key], data, raw_dtype=raw)
        _finish(writer)
    return path


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lora_alpha_for_gguf(config: LoraConfig) -> float:
    """The ``adapter.lora.alpha`` that makes llama.cpp's ``alpha / r`` equal the adapter's scale.

    Raises:
        ConfigError: The adapter is not one llama.cpp's LoRA format holds (DoRA, per-module ranks / alphas,
            extra trained modules).
    """
    if getattr(config, "use_dora", False):
        raise ConfigError("GGUF LoRA export: DoRA adapters have no llama.cpp format; export the merged model")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ConfigError(
            "GGUF LoRA export: per-module ranks or alphas are not expressible (one alpha per file)"
        )
    if getattr(config, "modules_to_save", None):
        raise ConfigError(
            "GGUF LoRA export: modules_to_save are fully trained modules; export the merged model"
        )
    # rsLoRA scales by alpha / sqrt(r): the same scale under llama.cpp's alpha / r is alpha * sqrt(r).
    return float(config.lora_alpha * math.sqrt(config.r) if config.use_rslora else config.lora_alpha)


def write_lora_gguf(
    tensors: dict[str, torch.Tensor], config: LoraConfig, model_config: Any, path: str | os.PathLike
) -> Path:
    """Write a PEFT-format LoRA adapter as a llama.cpp GGUF LoRA file (``llama-cli --lora``).

    Args:
        tensors (dict[str, Tensor]): The adapter file's tensors (``base_model.model.<path>.lora_A.weight`` ...).
        config (LoraConfig): Its config (rank, alpha, rsLoRA).
        model_config: The base model's transformers config (architecture, layer and head counts).
        path (str | PathLike): The ``.gguf`` file to write (atomically).

    Returns:
        Path: The file written.

    Raises:
        ConfigError: An adapter or architecture the format cannot hold, or a target with no llama.cpp name.
    """
    gguf = import_gguf()
    arch = check_architecture(model_config)
    alpha = lora_alpha_for_gguf(config)
    pairs = {}
    for key, value in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ConfigError(f"GGUF LoRA export: tensor {key!r} is not a LoRA factor")
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        pairs.setdefault(module, {})["a" if ".lora_A." in key else "b"] = value.detach().to(torch.float32)
    names = tensor_name_map([f"{m}.weight" for m in pairs], model_config.num_hidden_layers)
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(path.stem)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, pair in sorted(pairs.items()):
            name = names.get(f"{module}.weight")
            if name is None or pair.keys() != {"a", "b"}:
                raise ConfigError(
                    f"GGUF LoRA export: {module!r} has no llama.cpp tensor name or misses a factor"
                )
            b = pair["b"]  # [out, r]: rows follow the base weight's rows, permuted alike for q / k
            heads = qk_heads(f"{module}.weight", model_config)
            if heads is not None:
                b = permute_qk(b, heads)
            writer.add_tensor(f"{name}.lora_a", pair["a"].numpy())  # [r, in]
            writer.add_tensor(f"{name}.lora_b", b.contiguous().numpy())  # [out, r]
        _finish(writer)
    return path


__all__ = [
    "GGUF_QUANTS",
    "add_hf_tokenizer",
    "check_architecture",
    "copy_tokenizer_fields",
    "lora_alpha_for_gguf",
    "write_lora_gguf",
    "write_model_gguf",
]
