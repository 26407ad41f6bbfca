"""Quantize a model's linear layers to 4 bits: which layers (one rule), and a whole wrapped model at once.

One rule says which layers a QLoRA model stores in 4 bits (:func:`quantizable_paths`): every ``nn.Linear`` /
GPT-2 ``Conv1D`` except the output head (LM or classification head) and the modules the caller keeps.
:func:`lorakit.load_model` applies it while the weights stream in; :func:`quantize_model` applies it to a model
that is already in memory and possibly wrapped (QPiSSA: the PiSSA residuals are quantized after the SVD). Quantizing
is always an explicit call, never a side effect of ``.to()``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.base import is_quantized
from lorakit.quant import Linear4bit
from lorakit.targets import head_module_path, in_head, wrapper_parts
from lorakit.walk import adapter_layers, set_submodule


def _is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not is_quantized(module)


def _kept(path: str, keep: set[str]) -> bool:
    """``path`` is a kept name or path, or lies inside a kept module path."""
    return path in keep or path.rsplit(".", 1)[-1] in keep or any(path.startswith(k + ".") for k in keep)


def quantizable_paths(model: nn.Module, keep: set[str] | None = None) -> set[str]:
    """Paths of the full-precision Linear / Conv1D layers to store in 4 bits: all but the output head, the
    modules in ``keep`` (names or paths) and anything inside an adapter wrapper (base layers, adapter weights,
    ``modules_to_save`` copies)."""
    keep = keep or set()
    head = head_module_path(model)
    return {
        path
        for path, module in model.named_modules()
        if _is_float_linear(module)
        and not wrapper_parts(path)
        and not in_head(path, head)
        and not _kept(path, keep)
    }


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` (GPT-2 Conv1D stores ``W^T``; the 4-bit layer is an ordinary linear)."""
    if isinstance(module, nn.Linear):
        return module
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().T, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    keep_modules: list[str] | None = None,
) -> nn.Module:
    """Quantize every full-precision Linear / Conv1D of a (wrapped) model to 4 bits, in place (QLoRA layout).

    Wrapped layers keep their adapters and get a :class:`~lorakit.quant.Linear4bit` base (for PiSSA: the residual);
    other Linear layers are replaced as :func:`lorakit.load_model` would. The output head (LM or classification
    head, wrapped or not), ``modules_to_save`` copies and adapter weights stay as they are.

    Args:
        model (nn.Module): A model, wrapped with :func:`lorakit.wrap` or not.
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
    for path, layer in adapter_layers(model):
        if _is_float_linear(layer.base_layer) and not in_head(path, head) and not _kept(path, keep):
            layer.replace_base_layer(
                Linear4bit.from_linear(as_linear(layer.base_layer), name=path, **settings)
            )
    for path in sorted(quantizable_paths(model, keep)):
        quantized = Linear4bit.from_linear(as_linear(model.get_submodule(path)), name=path, **settings)
        set_submodule(model, path, quantized)
    return model


__all__ = ["as_linear", "quantizable_paths", "quantize_model"]
