"""PiSSA (Meng et al. 2024, arXiv 2404.02948): principal singular vectors as the adapter, the residual as the base.

With the SVD ``W0 = U S Vᵀ`` (fp32) and its top-r part, the adapter starts as::

    A = diag(√(S_r / s)) V_rᵀ   [r, in]        B = U_r diag(√(S_r / s))   [out, r]

so ``s·B A`` is the principal rank-r part of W0 (PEFT divides by the scale ``s``), and the frozen base weight becomes
the residual ``W_res = W0 - s·B A``: the output is unchanged at step 0, and training moves the principal directions.
``init_lora_weights="pissa_niter_<k>"`` uses the randomized ``torch.svd_lowrank`` with ``k`` subspace iterations
(fast, approximate principal part; the residual is still ``W0 - s·B A``, so ``W_res + s·B A = W0`` exactly).

QPiSSA (4-bit base): the SVD must see the full-precision W0, and it is the residual that gets quantized; its
quantization error is smaller than W0's because the largest singular directions were moved into the adapter.
:func:`pissa_quantize` does that in one call; :func:`quantize_model` is the second half on its own.

A trained PiSSA adapter only fits the residual base. :func:`save_as_lora` writes it as a plain LoRA adapter for the
*original* weights, as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does:
``ΔW = s·(B' A' - B0 A0) = s·[B' | -B0] [A' ; A0]``, a rank-2r adapter with ``r`` and ``lora_alpha`` doubled
(alpha by √2 with rsLoRA) so the scale is unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.config import LoraConfig, is_pissa_init
from lorakit.errors import ConfigError
from lorakit.inject import adapter_configs, adapter_state_dict, lora_layers, wrap
from lorakit.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    atomic_write_bytes,
    read_adapter_weights,
)
from lorakit.quant import Linear4bit
from lorakit.targets import head_module_path, in_head

if TYPE_CHECKING:
    from lorakit.adapters.lora import LoraLinear


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PiSSA factors of ``weight``: ``s·B A`` is its best rank-r approximation (exact SVD) or an estimate of it.

    Args:
        weight (torch.Tensor): ``W0``, ``[out, in]``, fp32.
        r (int): Rank; at most ``min(out, in)``.
        scaling (float): The adapter scale ``s``.
        niter (int | None): None: exact ``torch.linalg.svd``; an integer: ``torch.svd_lowrank`` with that many
            subspace iterations (uses the torch RNG).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``A`` ``[r, in]`` and ``B`` ``[out, r]``, fp32.
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # [out, k], [k], [k, in]
        u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(weight, q=r, niter=niter)  # [out, r], [r], [in, r]
        vh_r = v_r.T
    root = torch.sqrt(s_r / scaling)  # [r]
    return root[:, None] * vh_r, u_r * root[None, :]


@torch.no_grad()
def pissa_init_(layer: LoraLinear, name: str, init: str) -> None:
    """Initialize adapter ``name`` of ``layer`` with PiSSA and replace the base weight by the residual, in place.

    Args:
        layer (LoraLinear): The wrapper; its base must be a full-precision Linear / Conv1D.
        name (str): The adapter (its A, B, r and scaling exist already).
        init (str): ``"pissa"`` or ``"pissa_niter_<k>"``.

    Raises:
        ConfigError: The base is quantized (run PiSSA before quantizing: :func:`pissa_quantize`), its weight is not
            fp32/fp16/bf16, or ``r`` exceeds ``min(out, in)``.
    """
    base = layer.base_layer
    if not hasattr(base, "weight") or hasattr(base, "dequantize"):
        raise ConfigError(
            f"init_lora_weights={init!r} needs the full-precision base weight, but this layer's base is "
            f"{type(base).__name__}: run PiSSA before quantizing (lorakit.adapters.pissa.pissa_quantize)"
        )
    weight = base.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(
            f"init_lora_weights={init!r}: the base weight is {weight.dtype}; expected fp32/fp16/bf16"
        )
    r, scaling = layer.r[name], layer.scaling[name]
    if r > min(layer.in_features, layer.out_features):
        raise ConfigError(
            f"init_lora_weights={init!r}: r={r} exceeds min(in, out) = "
            f"{min(layer.in_features, layer.out_features)} of this layer"
        )
    rows = layer.base_weight_rows().float()  # [out, in]
    niter = int(init.rsplit("_", 1)[1]) if init != "pissa" else None
    lora_a, lora_b = pissa_factors(rows, r, scaling, niter)
    layer.lora_A[name].weight.copy_(lora_a)
    layer.lora_B[name].weight.copy_(lora_b)
    residual = rows - scaling * (lora_b @ lora_a)  # [out, in]
    weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))
    layer.clear_weight_caches()


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    keep_modules: list[str] | None = None,
) -> nn.Module:
    """Quantize every full-precision Linear / Conv1D of a wrapped model to 4 bits, in place (QLoRA layout).

    Wrapped layers keep their adapters and get a :class:`~lorakit.quant.Linear4bit` base (for PiSSA: the residual);
    other Linear layers are replaced like :func:`lorakit.load_model` would. The output head (LM or classification
    head, wrapped or not), ``modules_to_save`` copies and adapter weights stay as they are.

    Args:
        model (nn.Module): A model wrapped with :func:`lorakit.wrap`.
        quant_type (str): ``"nf4"`` (default) or ``"fp4"``.
        blocksize (int): Elements per 4-bit block. Default 64.
        double_quant (bool): Quantize the block scales too. Default True.
        compute_dtype (torch.dtype): Compute dtype of the 4-bit layers. Default bf16.
        keep_modules (list[str] | None): Linear module names (or paths) left in full precision.

    Returns:
        nn.Module: The same model.
    """
    settings = dict(
        quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
    )
    keep = set(keep_modules or [])
    head = head_module_path(model)
    for path, layer in lora_layers(model):
        if _quantizable(layer.base_layer) and not in_head(path, head) and not _kept(path, keep):
            layer.replace_base_layer(
                Linear4bit.from_linear(_as_linear(layer.base_layer), name=path, **settings)
            )
    for path, module in list(model.named_modules()):
        inside = re.search(r"\.(base_layer|lora_[A-Za-z_]+|modules_to_save|original_module)(\.|$)", path)
        if _quantizable(module) and not inside and not in_head(path, head) and not _kept(path, keep):
            parent, _, child = path.rpartition(".")
            quantized = Linear4bit.from_linear(_as_linear(module), name=path, **settings)
            setattr(model.get_submodule(parent) if parent else model, child, quantized)
    return model


def pissa_quantize(
    model: nn.Module | str | os.PathLike,
    config: LoraConfig,
    adapter_name: str = "default",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """QPiSSA in one call: PiSSA on the full-precision weights, then the residuals (and other Linears) to 4 bits.

    Args:
        model (nn.Module | str | PathLike): A full-precision model, or a model directory (loaded with
            ``quantize=None`` in ``compute_dtype``).
        config (LoraConfig): The adapter; ``init_lora_weights`` must be ``"pissa"`` or ``"pissa_niter_<k>"``.
        adapter_name (str): Name of the adapter. Default ``"default"``.
        quant_type, blocksize, double_quant, compute_dtype: As in :func:`quantize_model`.
        device (str | torch.device): Where a model loaded from a directory goes. Default ``"cpu"``.

    Returns:
        nn.Module: The wrapped model with 4-bit residual bases and a trainable PiSSA adapter.

    Raises:
        ConfigError: ``config`` is not a PiSSA config.
    """
    if not is_pissa_init(config.init_lora_weights):
        raise ConfigError(
            f"pissa_quantize needs init_lora_weights='pissa' or 'pissa_niter_<k>', got {config.init_lora_weights!r}"
        )
    if isinstance(model, (str, os.PathLike)):
        from lorakit.loading import load_model

        model = load_model(model, quantize=None, compute_dtype=compute_dtype, device=device)
    wrap(model, config, adapter_name=adapter_name)
    return quantize_model(model, quant_type, blocksize, double_quant, compute_dtype)


def initial_state(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A copy of the adapter's tensors under PEFT's file keys: take it right after the PiSSA init, before training,
    for :func:`save_as_lora` (saving the adapter to a directory at that point works too)."""
    return {key: tensor.detach().clone() for key, tensor in adapter_state_dict(model, adapter_name).items()}


def save_as_lora(
    model: nn.Module,
    path: str | os.PathLike,
    initial: dict[str, torch.Tensor] | str | os.PathLike,
    adapter_name: str = "default",
) -> Path:
    """Save a trained PiSSA adapter as a plain rank-2r LoRA adapter for the original (pre-PiSSA) base weights.

    ``ΔW = s·(B A - B0 A0)`` is written as ``A'' = [A ; A0]`` ``[2r, in]`` and ``B'' = [B | -B0]`` ``[out, 2r]``, with
    ``r``, ``lora_alpha`` (√2 with rsLoRA), ``rank_pattern`` and ``alpha_pattern`` doubled and
    ``init_lora_weights=True`` (PEFT's ``subtract_mutated_init``). With a 4-bit residual the converted adapter on W0
    differs from the trained model by the residual's quantization error (PEFT warns the same).

    Args:
        model (nn.Module): The model with the trained PiSSA adapter.
        path (str | PathLike): Output directory.
        initial (dict | str | PathLike): The adapter at init: :func:`initial_state`, or a directory it was saved to.
        adapter_name (str): The adapter. Default ``"default"``.

    Returns:
        Path: The directory written.

    Raises:
        ConfigError: No such adapter, a DoRA adapter (its update is not low-rank), rsLoRA with rank/alpha patterns
            (as PEFT), or ``initial`` does not match the adapter.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r} to convert; present: {sorted(configs)}")
    config = copy.deepcopy(configs[adapter_name])
    if config.use_dora:
        raise ConfigError(
            "save_as_lora: a DoRA adapter's update is not low-rank and cannot be written as LoRA"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "save_as_lora: rsLoRA with rank_pattern / alpha_pattern cannot be converted (as in PEFT)"
        )
    start = initial if isinstance(initial, dict) else read_adapter_weights(initial)
    trained = adapter_state_dict(model, adapter_name)
    tensors = {}
    for key, value in trained.items():
        value = value.detach().cpu()
        if key.endswith("lora_A.weight") or key.endswith("lora_B.weight"):
            if key not in start or start[key].shape != value.shape:
                raise ConfigError(
                    f"save_as_lora: the initial adapter has no tensor {key!r} of shape {tuple(value.shape)}"
                )
            first = start[key].to(value)
            value = (
                torch.cat([value, first], 0)
                if key.endswith("lora_A.weight")
                else torch.cat([value, -first], 1)
            )
        tensors[key] = value.contiguous()
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
    config.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    config.alpha_pattern = {key: 2 * value for key, value in config.alpha_pattern.items()}
    path = Path(path)
    atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path / CONFIG_NAME, text.encode())
    return path


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not hasattr(module, "dequantize")


def _kept(path: str, keep: set[str]) -> bool:
    """``path`` is a kept name or path, or lies inside a kept module path."""
    return path in keep or path.rsplit(".", 1)[-1] in keep or any(path.startswith(k + ".") for k in keep)


def _as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` (GPT-2 Conv1D stores ``W^T``; the 4-bit layer is an ordinary linear)."""
    if isinstance(module, nn.Linear):
        return module
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().T, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


__all__ = [
    "initial_state",
    "pissa_factors",
    "pissa_init_",
    "pissa_quantize",
    "quantize_model",
    "save_as_lora",
]
