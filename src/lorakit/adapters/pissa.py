"""PiSSA (Meng et al. 2024, arXiv 2404.02948): principal singular vectors as the adapter, the residual as the base.

With the SVD ``W0 = U S Vᵀ`` (fp32) and its top-r part, the adapter starts as::

    A = diag(√(S_r / s)) V_rᵀ   [r, in]        B = U_r diag(√(S_r / s))   [out, r]

so ``s·B A`` is the principal rank-r part of W0 (PEFT divides by the scale ``s``), and the frozen base weight becomes
the residual ``W_res = W0 - s·B A``: the output is unchanged at step 0, and training moves the principal directions.
``init_lora_weights="pissa_niter_<k>"`` uses the randomized ``torch.svd_lowrank`` with ``k`` subspace iterations
(fast, approximate principal part; the residual is still ``W0 - s·B A``, so ``W_res + s·B A = W0`` exactly).
The initialization itself is a LoRA layer's (:func:`~lorakit.adapters.lora.pissa_init_`); this module holds the
workflows around it, on whole models and files.

QPiSSA (4-bit base): the SVD must see the full-precision W0, and it is the residual that gets quantized; its
quantization error is smaller than W0's because the largest singular directions were moved into the adapter.
:func:`pissa_quantize` does that in one call; :func:`~lorakit.quantize.quantize_model` is the second half on its own.

A trained PiSSA adapter only fits the residual base. :func:`save_as_lora` writes it as a plain LoRA adapter for the
*original* weights, as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does:
``ΔW = s·(B' A' - B0 A0) = s·[B' | -B0] [A' ; A0]``, a rank-2r adapter with ``r`` and ``lora_alpha`` doubled
(alpha by √2 with rsLoRA) so the scale is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.lora import pissa_as_lora, pissa_factors, pissa_init_
from lorakit.config import LoraConfig, is_pissa_init
from lorakit.errors import ConfigError
from lorakit.files import read_adapter_weights, write_adapter_dir
from lorakit.inject import wrap
from lorakit.loading import load_model
from lorakit.quantize import quantize_model
from lorakit.walk import adapter_configs, adapter_state_dict


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
        quant_type, blocksize, double_quant, compute_dtype: As in :func:`~lorakit.quantize.quantize_model`.
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

    The conversion is :func:`~lorakit.adapters.lora.pissa_as_lora`. With a 4-bit residual the converted adapter on
    W0 differs from the trained model by the residual's quantization error (PEFT warns the same).

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
    start = initial if isinstance(initial, dict) else read_adapter_weights(initial)
    trained = adapter_state_dict(model, adapter_name)
    tensors, config = pissa_as_lora(trained, start, configs[adapter_name])
    return write_adapter_dir(path, tensors, config.to_peft_dict())


__all__ = [
    "initial_state",
    "pissa_factors",
    "pissa_init_",
    "pissa_quantize",
    "quantize_model",
    "save_as_lora",
]
