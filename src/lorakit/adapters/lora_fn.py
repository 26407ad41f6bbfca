"""LoRA's training product as one autograd function: ``y = base_out + s · (drop(x) Aᵀ) Bᵀ``, fewer passes.

The reference path (``LoraLinear`` with ``fused_autograd`` off) runs it as modules: ``x`` is cast to the fp32
adapter dtype, dropped out in fp32, cast back to the autocast dtype by the ``A`` product, scaled, multiplied by
``B``, cast and added to the base output; autograd keeps every intermediate it may need. On a CPU with a bf16 base
that is five elementwise passes over ``[tokens, in]`` or ``[tokens, out]`` per projection and direction besides the
two small products (a profile of a SmolLM2 step: ``copy_`` 20% and ``mul`` 17% of the time, ``mm`` 27%).

Here, in the compute dtype (autocast's, else ``x``'s): one dropout pass (a boolean mask is kept for backward, not
a dropped copy and a scale), ``h = drop(x) Aᵀ · s`` at rank r, and ``base_out + h Bᵀ`` as one ``addmm``. Saved for
backward: ``x`` (already alive: the base layer's input), the mask, ``h`` ([tokens, r]) and the two factors in the
compute dtype. Backward: ``gB = gᵀ h``, ``gh = g B · s``, ``gA = ghᵀ drop(x)``, ``gx = drop(gh A)``; factor
gradients are returned in fp32 (the adapter dtype). In fp32 it equals the reference to rounding
(``tests/test_lora.py``); with dropout the mask comes from another draw of the RNG than ``nn.Dropout``'s.
"""

from __future__ import annotations

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
            mask = None
            if dropout > 0 and training:
                mask = torch.empty(flat.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - dropout)
                dropped = flat * mask * (1 / (1 - dropout))  # [N, in]
            else:
                dropped = flat
            hidden = (dropped @ a.T) * scaling  # [N, r]
            out = base_out.reshape(-1, base_out.shape[-1])
            out = torch.addmm(out.to(dtype), hidden, b.T).to(base_out.dtype)  # [N, out]
        ctx.save_for_backward(flat, mask, hidden, a, b)
        ctx.scale = (scaling, dropout, x.shape, x.dtype, weight_a.dtype)
        return out.view(*base_out.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, mask, hidden, a, b = ctx.saved_tensors
        scaling, dropout, x_shape, x_dtype, factor_dtype = ctx.scale
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)  # [N, out]
            grad_b = (g.T @ hidden).to(factor_dtype)  # [out, r]
            grad_hidden = (g @ b) * scaling  # [N, r]
            dropped = flat if mask is None else flat * mask * (1 / (1 - dropout))
            grad_a = (grad_hidden.T @ dropped).to(factor_dtype)  # [r, in]
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = grad_hidden @ a  # [N, in]
                if mask is not None:
                    grad_x = grad_x * mask * (1 / (1 - dropout))
                grad_x = grad_x.to(x_dtype).view(x_shape)
        return grad_x, grad_a, grad_b, grad_out, None, None, None


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


__all__ = ["LoraProduct", "compute_dtype", "lora_product"]
