"""Load a local Hugging Face model directory, quantizing every Linear to 4 bits as its weight streams in.

The model is built on the meta device (no memory), then the safetensors files are read tensor by tensor
with plain file reads (no memory map, whose touched pages would count toward the process's RSS). Each Linear
weight is quantized as soon as it arrives and its full-precision copy is dropped, so the peak is the 4-bit
model plus about one full-precision tensor, never the whole full-precision model. Embeddings, the output
head and norms stay in the compute dtype unless asked otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lorakit.errors import AdapterFileError, ConfigError, QuantizationError
from lorakit.gguf_read import check_tokenizer, gguf_config, gguf_path, is_gguf, open_gguf, stream_gguf
from lorakit.hardware import DTYPE_NAMES, resolve_dtype
from lorakit.model_dir import check_model_dir, load_model_config
from lorakit.model_dir import load_tokenizer as load_directory_tokenizer
from lorakit.quant import QUANT_TYPES, Linear4bit
from lorakit.quantize import quantizable_paths
from lorakit.targets import head_module_path, in_head
from lorakit.walk import set_submodule

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory (sharded or not), in index order.

    Raises:
        AdapterFileError: No safetensors weights, or a shard named by the index is missing.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise AdapterFileError(f"{index} is not a valid safetensors index: {err}") from None
        files = [path / name for name in names]
        for file in files:
            if not file.is_file():
                raise AdapterFileError(f"{file} is missing: {index.name} names it as a shard of this model")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    hint = (
        " (pickled .bin weights are never loaded: convert them to safetensors)"
        if any(path.glob("*.bin"))
        else ""
    )
    raise AdapterFileError(f"{path} holds no model.safetensors or model.safetensors.index.json{hint}")


def stream_safetensors(file: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a safetensors file one tensor at a time, with plain reads.

    Raises:
        AdapterFileError: The file is truncated or its header is not valid (sizes, offsets, shapes and dtypes
            are checked against the file before anything is allocated).
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise AdapterFileError(f"{file} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise AdapterFileError(f"{file} has a corrupt safetensors header: {header_len} bytes long")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, RecursionError) as err:
            raise AdapterFileError(f"{file} has a corrupt safetensors header: {err}") from None
        base = 8 + header_len
        for name, (start, stop, dtype, shape) in _header_entries(file, header, size - base):
            buffer = bytearray(stop - start)
            handle.seek(base + start)
            if handle.readinto(buffer) != len(buffer):
                raise AdapterFileError(f"{file} is truncated: tensor {name!r} is incomplete")
            tensor = (
                torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
            )
            yield name, tensor.view(dtype).reshape(shape)


def _header_entries(file: Path, header: Any, data_bytes: int) -> list[tuple[str, tuple]]:
    """The tensors a safetensors header lists, ``(name, (start, stop, dtype, shape))`` in file order, each
    checked: known dtype, offsets inside the data, ``prod(shape) * itemsize == stop - start``."""
    if not isinstance(header, dict):
        raise AdapterFileError(f"{file} has a corrupt safetensors header: not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape, dtype = [int(n) for n in info["shape"]], _DTYPES.get(info["dtype"])
            ok = isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= data_bytes
        except (TypeError, KeyError, ValueError):
            raise AdapterFileError(f"{file}: tensor {name!r} has a corrupt header entry") from None
        if dtype is None:
            raise AdapterFileError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']!r:.40}")
        if not ok or min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize != stop - start:
            raise AdapterFileError(f"{file}: tensor {name!r}: shape {shape} and offsets do not fit the file")
        entries.append((name, (start, stop, dtype, shape)))
    return sorted(entries, key=lambda entry: entry[1][0])


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _materialize_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers not stored in checkpoints (rotary ``inv_freq``, position ids) are recomputed by the model's
    own ``_init_weights`` (as transformers does after a meta-device load); parameters are left untouched."""
    owners = {}
    for module_path, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
                owners[module_path] = module
    init = getattr(model, "_init_weights", None)
    for module in owners.values():
        saved = dict(module._parameters)
        if callable(init):
            with torch.no_grad():
                init(module)
        module._parameters.update(saved)


def load_model(
    path: str | os.PathLike,
    quantize: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = "auto",
    blocksize: int = 64,
    keep_modules: list[str] | None = None,
    device: str | torch.device = "cpu",
    model_class: type | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> nn.Module:
    """Load a local Hugging Face model directory or GGUF file, streaming its weights and quantizing Linears to 4 bits.

    Args:
        path (str | PathLike): Directory with ``config.json`` and ``*.safetensors`` (sharded or not), or a
            ``.gguf`` file (llama.cpp's format, Llama family: :mod:`lorakit.gguf_read`), whose block-quantized
            weights are dequantized one tensor at a time.
        quantize (str | None): ``"nf4"`` (default), ``"fp4"``, or ``None`` to load in ``compute_dtype``.
        double_quant (bool): Quantize the block scales too (4.127 bits/param). Default True.
        compute_dtype (torch.dtype | str): Dtype of non-quantized weights and of 4-bit matmuls, or a name
            (``"bfloat16"``, ``"float16"``, ``"float32"``). Default ``"auto"``: bf16 on a GPU that supports it
            (else fp16), bf16 on a CPU with native bf16 matmul (AMX / AVX512_BF16), else fp32
            (:mod:`lorakit.hardware`).
        blocksize (int): 4-bit block size. Default 64.
        keep_modules (list[str] | None): Linear module names (or paths) kept in ``compute_dtype``; the output
            head is always kept.
        device (str | torch.device): Where the weights go. Default ``"cpu"``.
        model_class (type | None): A transformers auto class or model class; default AutoModelForCausalLM.
        trust_remote_code (bool): Allow the checkpoint's own model code. Default False.
        gguf_file (str | None): A GGUF file inside directory ``path`` (as in transformers'
            ``from_pretrained(path, gguf_file=...)``). Default None.

    Returns:
        nn.Module: The model in eval mode, all parameters frozen.

    Raises:
        AdapterFileError: Missing config, missing shard, or corrupt files.
        QuantizationError: A weight has NaN/Inf or cannot be quantized (names the tensor).
        ConfigError: An unknown ``quantize`` value or missing weights for the model's parameters.
    """
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ConfigError(f"quantize: expected one of {', '.join(QUANT_TYPES)} or None, got {quantize!r}")
    path = Path(path)
    gguf = open_gguf(gguf_path(path, gguf_file)) if is_gguf(path, gguf_file) else None
    files = weight_files(path) if gguf is None else [gguf.path]
    # readable, known model_type (lorakit.model_dir); a GGUF file's from its header
    config = load_model_config(path, trust_remote_code) if gguf is None else gguf_config(gguf)
    cls = model_class or AutoModelForCausalLM
    device = torch.device(device)
    compute_dtype = resolve_dtype(compute_dtype, device)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # an auto class
            model = cls.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config, dtype=compute_dtype)
    targets = quantizable_paths(model, set(keep_modules or [])) if quantize else set()
    settings = (quantize, double_quant, compute_dtype, blocksize, device)
    pending_bias: dict[str, torch.Tensor] = {}  # biases that arrived before their weight (any shard)
    for file in files:
        tensors = stream_safetensors(file) if gguf is None else stream_gguf(gguf, model)
        _stream_into(model, tensors, targets, settings, pending_bias, file)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    _check_complete(model, model_class is not None, device, path)
    _materialize_non_persistent_buffers(model, device)
    model.requires_grad_(False)
    return model.eval()


def check_model_source(
    path: str | os.PathLike, trust_remote_code: bool = False, tokenizer: bool = True
) -> None:
    """Before any work: a GGUF file's header (and tokenizer), or a model directory's config, ``model_type`` and
    (``tokenizer=True``) tokenizer files (:func:`lorakit.model_dir.check_model_dir`).

    Raises:
        AdapterFileError / ConfigError: What is missing or unreadable, named with its file.
    """
    if not is_gguf(path):
        check_model_dir(path, trust_remote_code, tokenizer)
    elif tokenizer:
        check_tokenizer(open_gguf(gguf_path(path)))
    else:
        open_gguf(gguf_path(path))


def load_tokenizer(
    path: str | os.PathLike, gguf_file: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The tokenizer (with its chat template) of a model directory or of a GGUF file, offline.

    A GGUF file's tokenizer (``tokenizer.ggml.*``) is converted by transformers to a fast tokenizer.

    Raises:
        AdapterFileError: A GGUF file without a tokenizer, or one transformers cannot convert.
    """
    from transformers import AutoTokenizer

    if not is_gguf(path, gguf_file):
        return load_directory_tokenizer(path, trust_remote_code)  # files checked, errors named
    file = gguf_path(path, gguf_file)
    check_tokenizer(open_gguf(file))
    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise AdapterFileError(f"{file}: its tokenizer could not be converted ({err})") from None


def _stream_into(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    targets: set[str],
    settings: tuple,
    pending_bias: dict[str, torch.Tensor],
    file: Path,
) -> None:
    """Read one file's (``file``) ``(name, tensor)`` stream into the meta-device ``model``, quantizing the weights of
    ``targets`` as they come.

    ``settings``: ``(quant_type, double_quant, compute_dtype, blocksize, device)``; ``pending_bias``: biases of
    ``targets`` read before their weight, kept across the files of a sharded checkpoint.
    """
    quantize, double_quant, compute_dtype, blocksize, device = settings
    expected = {key: value.shape for key, value in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}."
    for name, tensor in tensors:
        key = name if name in expected else prefix + name if prefix + name in expected else None
        if key is None:
            continue  # checkpoint extras (e.g. old rotary buffers) that the model does not use
        if tensor.shape != expected[key]:  # weights of another config: refuse before computing nonsense
            raise AdapterFileError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json makes it "
                f"{tuple(expected[key])}; the weights and the config are of different models"
            )
        module_path, _, leaf = key.rpartition(".")
        if module_path in targets:
            if leaf == "weight":
                _quantize_into(model, module_path, tensor, pending_bias.pop(module_path, None), quantize,
                               double_quant, compute_dtype, blocksize, device, key)  # fmt: skip
            elif model.get_submodule(module_path).bias.is_meta:  # the weight has not arrived yet
                pending_bias[module_path] = tensor.to(device=device, dtype=compute_dtype)
            else:  # the weight came first (zero bias placeholder): overwrite it
                model.get_submodule(module_path).bias.data.copy_(tensor)
        else:
            dtype = compute_dtype if tensor.is_floating_point() else tensor.dtype
            _set_tensor(model, key, tensor.to(device=device, dtype=dtype))  # shares the read buffer: no copy


def _check_complete(model: nn.Module, task_class: bool, device: torch.device, path: Path) -> None:
    """Every parameter and persistent buffer was loaded; a task class's new head is initialized instead.

    Raises:
        ConfigError: The checkpoint has no tensor for a parameter (names the first).
    """
    persistent = dict(model.named_parameters())
    persistent.update((k, v) for k, v in model.state_dict(keep_vars=True).items() if k not in persistent)
    missing = sorted(k for k, v in persistent.items() if v.is_meta)
    head = head_module_path(model)
    if missing and task_class and all(in_head(k.rpartition(".")[0], head) for k in missing):
        _init_fresh_head(model, head, missing, device, path)
        missing = []
    if missing:
        raise ConfigError(
            f"{path}: the checkpoint has no tensor for {missing[0]!r} ({len(missing)} missing in all)"
        )


def _init_fresh_head(
    model: nn.Module, head: str, missing: list[str], device: torch.device, path: Path
) -> None:
    """A base checkpoint under a task class (e.g. a sequence classifier): initialize its new head as transformers does."""
    module = model.get_submodule(head)
    module.to_empty(device=device)
    for sub in module.modules():
        model._init_weights(sub)
    logger.warning(
        "%s has no weights for the %s head (%s): they are newly initialized; train them in full, e.g. "
        "modules_to_save=[%r]",
        path, head, ", ".join(missing), head.rsplit(".", 1)[-1],
    )  # fmt: skip


def _quantize_into(
    model: nn.Module,
    module_path: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    blocksize: int,
    device: torch.device,
    key: str,
) -> None:
    meta = model.get_submodule(module_path)
    if not weight.is_floating_point():
        raise QuantizationError(f"{key}: cannot quantize a {weight.dtype} tensor to 4 bits")
    if isinstance(meta, Conv1D):
        weight = (
            weight.T
        )  # GPT-2 Conv1D stores W^T [in, out]; the 4-bit layer is an ordinary [out, in] linear
    out_features, in_features = weight.shape
    has_bias = meta.bias is not None
    linear = nn.Linear(in_features, out_features, bias=has_bias, device="meta")
    linear.weight = nn.Parameter(weight.to(device), requires_grad=False)  # one full-precision layer, briefly
    if has_bias:
        # A bias stored after its weight arrives later and overwrites this zero placeholder.
        placeholder = (
            bias if bias is not None else torch.zeros(out_features, device=device, dtype=compute_dtype)
        )
        linear.bias = nn.Parameter(placeholder, requires_grad=False)
    try:
        quantized = Linear4bit.from_linear(
            linear,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
    except QuantizationError as err:
        raise QuantizationError(f"{key}: {err}") from None
    set_submodule(model, module_path, quantized)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    upcast_norms: bool | None = None,
) -> nn.Module:
    """Get a (4-bit) model ready for adapter training, in place.

    1. Freezes every base parameter.
    2. Norm weights to fp32 where it matters for stability: with fp16 weights (whose range is small); with
       bf16, transformers' norms already compute in fp32 and an fp32 weight would turn their bf16 output
       into fp32 activations for every later layer, so they stay bf16 unless ``upcast_norms=True``.
       Unlike PEFT's version, embeddings and the output head stay in the compute dtype (no fp32 copies).
    3. With gradient checkpointing: turns it on (non-reentrant by default, which needs no input gradients);
       with ``use_reentrant=True`` the input embeddings are made to require grad so the recomputed
       segments have a gradient path (the classic "element 0 of tensors does not require grad" error).

    Args:
        model (nn.Module): A Hugging Face model, e.g. from :func:`load_model`.
        use_gradient_checkpointing (bool): Turn on gradient checkpointing. Default True.
        gradient_checkpointing_kwargs (dict | None): Passed on; default ``{"use_reentrant": False}``.
        upcast_norms (bool | None): Force (True) or skip (False) the fp32 norms; None decides by dtype.

    Returns:
        nn.Module: The same model.
    """
    model.requires_grad_(False)
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if upcast_norms is None:
        upcast_norms = torch.float16 in floating
    if upcast_norms:
        for module in model.modules():
            if _is_norm(module):
                module.float()
    can_checkpoint = any(
        callable(getattr(model, name, None))
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    )
    if use_gradient_checkpointing and can_checkpoint:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"] and callable(getattr(model, "enable_input_require_grads", None)):
            model.enable_input_require_grads()
        if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers' new name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


__all__ = [
    "DTYPE_NAMES",
    "check_model_source",
    "load_model",
    "load_tokenizer",
    "prepare_for_kbit_training",
    "stream_safetensors",
    "weight_files",
]
