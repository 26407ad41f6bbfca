"""LoRA's training product as one autograd function: ``y = base_out + s · (drop(x) Aᵀ) Bᵀ``, fewer passes.

The reference path (``LoraLinear`` with ``fused_autograd`` off) runs it as modules: ``x`` is cast to the fp32
adapter dtype, dropped out in fp32, cast back to the autocast dtype by the ``A`` product, scaled, multiplied by
``B``, cast and added to the base output; autograd keeps every intermediate it may need. On a CPU with a bf16 base
that is five elementwise passes over ``[tokens, in]`` or ``[tokens, out]`` per projection and direction besides the
two small products (a profile of a SmolLM2 step: ``copy_`` 20% and ``mul`` 17% of the time, ``mm`` 27%).

Here, in the compute dtype (autocast's, else ``x``'s): one dropout pass (a boolean mask is kept for backward, not
a dropped copy; its ``1 / keep`` joins the scale at rank r; :func:`keep_mask` draws it), ``h = drop(x) Aᵀ · s`` at rank r, and ``base_out + h Bᵀ`` as one ``addmm``. Saved for
backward: ``x`` (already alive: the base layer's input), the mask, ``h`` ([tokens, r]) and the two factors in the
compute dtype. Backward: ``gB = gᵀ h``, ``gh = g B · s``, ``gA = ghᵀ drop(x)``, ``gx = drop(gh A)``; factor
gradients are returned in fp32 (the adapter dtype). In fp32 it equals the reference to rounding
(``tests/test_lora.py``); with dropout the mask comes from another draw of the RNG than ``nn.Dropout``'s.
"""

from __future__ import annotations

import math

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's where it is on for ``x``'s device, else ``x``'s own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class LoraProduct(torch.autograd.Function):
    """``base_out + scaling · (dropout(x) @ Aᵀ) @ Bᵀ`` with a lean backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, base_out, scaling: float, dropout: float, training: bool):
        # x: [..., in]; weight_a: [r, in] fp32; weight_b: [out, r] fp32; base_out: [..., out]
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)  # [N, in]
            a, b = weight_a.to(dtype), weight_b.to(dtype)  # [r, in], [out, r]
            mask, scale = None, scaling
            if dropout > 0 and training:
                mask, keep = keep_mask(flat.shape, dropout, flat.device)  # [N, in] bool
                flat_kept, scale = (
                    flat * mask,
                    scaling / keep,
                )  # dropout's 1 / keep folded into the rank-r scale
            else:
                flat_kept = flat
            hidden = (flat_kept @ a.T) * scale  # [N, r]
            out = base_out.reshape(-1, base_out.shape[-1])
            out = torch.addmm(out.to(dtype), hidden, b.T).to(base_out.dtype)  # [N, out]
        ctx.save_for_backward(flat, mask, hidden, a, b)
        ctx.scale = (scale, x.shape, x.dtype, weight_a.dtype)
        return out.view(*base_out.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, mask, hidden, a, b = ctx.saved_tensors
        scale, x_shape, x_dtype, factor_dtype = ctx.scale
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)  # [N, out]
            grad_b = (g.T @ hidden).to(factor_dtype)  # [out, r]
            grad_hidden = (g @ b) * scale  # [N, r]
            flat_kept = flat if mask is None else flat * mask
            grad_a = (grad_hidden.T @ flat_kept).to(factor_dtype)  # [r, in]
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = grad_hidden @ a  # [N, in]
                if mask is not None:
                    grad_x = grad_x * mask
                grad_x = grad_x.to(x_dtype).view(x_shape)
        return grad_x, grad_a, grad_b, grad_out, None, None, None


def keep_mask(shape: torch.Size, dropout: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask: each element kept with probability ``1 - dropout``; and that probability, exactly.

    On a CPU, ``bernoulli_`` draws one random number per element (~1 ms for 340 x 576 on this repository's EPYC,
    6-15% of a SmolLM2 LoRA step); here four 16-bit draws come from each 64-bit random word (3x faster), and an
    element is dropped when its draw falls below ``round(dropout · 65536)``: ``dropout`` to within 1/65536, and the
    returned keep probability is the exact one the draws give, so ``mask / keep`` stays unbiased. Elsewhere
    (CUDA's fast generator) ``bernoulli_``.

    Args:
        shape (torch.Size): The mask's shape.
        dropout (float): The drop probability, in (0, 1).
        device (torch.device): Where the mask lives.

    Returns:
        tuple[Tensor, float]: A bool mask of ``shape`` (True = kept) and the keep probability.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - dropout), 1 - dropout
    n = math.prod(shape)
    threshold = min(65535, max(1, round(dropout * 65536)))  # draws below it are dropped
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)  # 64 random bits each
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over int16's 65,536 values
    return draws >= threshold - 32768, 1 - threshold / 65536


def lora_product(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    base_out: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``base_out + scaling · (dropout(x) @ weight_aᵀ) @ weight_bᵀ`` through :class:`LoraProduct`.

    Args:
        x (torch.Tensor): ``[..., in]`` the layer input.
        weight_a (torch.Tensor): ``[r, in]`` (fp32 adapter weight).
        weight_b (torch.Tensor): ``[out, r]``.
        base_out (torch.Tensor): ``[..., out]`` the frozen base layer's output for ``x``.
        scaling (float): The adapter scale ``s``.
        dropout (float): Dropout probability on the adapter input. Default 0.
        training (bool): Apply the dropout. Default False.

    Returns:
        torch.Tensor: ``[..., out]`` in ``base_out``'s dtype.
    """
    return LoraProduct.apply(x, weight_a, weight_b, base_out, scaling, dropout, training)


__all__ = ["LoraProduct", "compute_dtype", "keep_mask", "lora_product"]
