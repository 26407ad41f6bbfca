"""LoRA's training product as one autograd function: ``y = base_out + s · (drop(x) Aᵀ) Bᵀ``, fewer passes.

The reference path (``LoraLinear`` with ``fused_autograd`` off) runs it as modules: ``x`` is cast to the fp32
adapter dtype, dropped out in fp32, cast back to the autocast dtype by the ``A`` product, scaled, multiplied by
``B``, cast and added to the base output; autograd keeps every intermediate it may need. On a CPU with a bf16 base
that is five elementwise passes over ``[tokens, in]`` or ``[tokens, out]`` per projection and direction besides the
two small products (a profile of a SmolLM2 step: ``copy_`` 20% and ``mul`` 17% of the time, ``mm`` 27%).

Here, in the compute dtype (autocast's, else ``x``'s): one dropout pass (a boolean mask is kept for backward, not
a dropped copy; its ``1 / keep`` joins the scale at rank r; :func:`keep_mask` draws it), ``h = drop(x) Aᵀ · s``
at rank r, and ``base_out + h Bᵀ`` as one ``addmm``. Saved for backward: ``x`` (already alive: the base layer's
input), the mask, ``h`` ([tokens, r]) and the two factors in the compute dtype. Backward: ``gB = gᵀ h``,
``gh = g B · s``, ``gA = ghᵀ drop(x)``, ``gx = drop(gh A)``; factor gradients are returned in fp32 (the adapter
dtype). In fp32 it equals the reference to rounding
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
                flat_kept = dropped(flat, mask)
                scale = scaling / keep  # dropout's 1 / keep folded into the rank-r scale
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
            flat_kept = dropped(flat, mask)
            grad_a = (grad_hidden.T @ flat_kept).to(factor_dtype)  # [r, in]
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = grad_hidden @ a  # [N, in]
                grad_x = dropped(grad_x, mask)
                grad_x = grad_x.to(x_dtype).view(x_shape)
        return grad_x, grad_a, grad_b, grad_out, None, None, None


def dropped(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the elements where ``mask`` is False set to 0 (``x`` itself for no mask).

    ``torch.where``, not ``x * mask``: on a CPU a product of a bf16 and a bool tensor first writes the mask out as
    a bf16 copy (type promotion), a third more passes; ``where`` reads it as it is (139 vs 86 us for 4 x 99 x 576
    on this repository's EPYC, about 20 such products per layer and training step).
    """
    return x if mask is None else torch.where(mask, x, 0.0)


def keep_mask(shape: torch.Size, dropout: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask: each element kept with probability ``1 - dropout``; and that probability, exactly.

    On a CPU, ``bernoulli_`` draws one random number per element (~1 ms for 340 x 576 on this repository's EPYC,
    6-15% of a SmolLM2 LoRA step); here four 16-bit draws come from each 64-bit random word (3x faster), and an
    element is dropped when its draw falls below ``round(dropout · 65536)``: ``dropout`` to within 1/65536, and the
    returned keep probability is the exact one the draws give, so ``mask / keep`` stays unbiased. Elsewhere
    (CUDA's fast generator) ``rand >= dropout``.

    Args:
        shape (torch.Size): The mask's shape.
        dropout (float): The drop probability, in (0, 1).
        device (torch.device): Where the mask lives.

    Returns:
        tuple[Tensor, float]: A bool mask of ``shape`` (True = kept) and the keep probability.
    """
    mask, keep = keep_masks(torch.Size([1, *shape]), [dropout], device)
    return mask[0], float(keep[0])


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


class PackedLoraProduct(torch.autograd.Function):
    """:class:`LoraProduct` for the ``K`` equal blocks of rows of a training pack (:mod:`lorakit.packed`), each with
    its own adapter, as batched products: ``[K, n, in] @ [K, in, r] -> [K, n, r] @ [K, r, out]``.

    A pack repeats one micro-batch once per config, so block ``k`` is rows ``[k·n, (k+1)·n)`` and goes through
    adapter ``k`` alone. Per-block ``mm`` calls made a pack of 4 SmolLM2 configs at 1 x 50 tokens spend a third of
    its step in small products and weight casts (6 products, 4 casts per block and layer); here each layer makes
    6 batched ones and casts every factor once. Ranks may differ: factors are zero-padded to the largest rank
    (padded rows of ``A`` and columns of ``B`` add nothing to the output, and their gradients are dropped).
    Dropout is per block (its own probability; one draw shared by the blocks, :func:`keep_masks`); ``1 / keep``
    joins each block's scale, as in :class:`LoraProduct`.
    """

    @staticmethod
    def forward(ctx, x, base_out, scales, dropouts, training, *factors):
        # x: [K·n, in]; base_out: [K·n, out]; factors: A_0 [r_0, in], B_0 [out, r_0], A_1, B_1, ... (fp32)
        blocks = len(scales)
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(blocks, -1, x.shape[-1]).to(dtype)  # [K, n, in]
            a, b, ranks = _stack_factors(factors, dtype)  # [K, r, in], [K, out, r]
            # fp32 scales, each product rounded once to the compute dtype: a scalar's product in LoraProduct
            scale, mask = torch.tensor(scales, dtype=torch.float32, device=x.device)[:, None, None], None
            if training and any(p > 0 for p in dropouts):
                mask, keep = keep_masks(flat.shape, dropouts, flat.device)  # [K, n, in] bool, [K]
                scale = scale / keep.to(x.device)[:, None, None]
            flat_kept = dropped(flat, mask)
            hidden = (torch.bmm(flat_kept, a.transpose(1, 2)) * scale).to(dtype)  # [K, n, r]
            out = base_out.reshape(blocks, -1, base_out.shape[-1]).to(dtype)  # [K, n, out]
            out = torch.baddbmm(out, hidden, b.transpose(1, 2)).to(base_out.dtype)
        ctx.save_for_backward(flat, mask, hidden, a, b, scale)
        ctx.meta = (ranks, x.shape, x.dtype, factors[0].dtype)
        return out.view(*base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat, mask, hidden, a, b, scale = ctx.saved_tensors
        ranks, x_shape, x_dtype, factor_dtype = ctx.meta
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(len(ranks), -1, grad_out.shape[-1]).to(a.dtype)  # [K, n, out]
            grad_b = torch.bmm(g.transpose(1, 2), hidden)  # [K, out, r]
            grad_hidden = (torch.bmm(g, b) * scale).to(g.dtype)  # [K, n, r]
            flat_kept = dropped(flat, mask)
            grad_a = torch.bmm(grad_hidden.transpose(1, 2), flat_kept)  # [K, r, in]
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(grad_hidden, a)  # [K, n, in]
                grad_x = dropped(grad_x, mask)
                grad_x = grad_x.to(x_dtype).view(x_shape)
            grads = []
            for k, r in enumerate(ranks):  # each block's own factors, without the padding
                grads += [grad_a[k, :r].to(factor_dtype), grad_b[k, :, :r].to(factor_dtype)]
        return grad_x, grad_out, None, None, None, *grads


def _stack_factors(factors: tuple[torch.Tensor, ...], dtype: torch.dtype):
    """``A_k`` and ``B_k`` as ``[K, r_max, in]`` and ``[K, out, r_max]`` in ``dtype``, zero-padded; and the ranks."""
    pairs = list(zip(factors[::2], factors[1::2]))
    ranks = [a.shape[0] for a, _ in pairs]
    if len(set(ranks)) == 1:
        return (
            torch.stack([a for a, _ in pairs]).to(dtype),
            torch.stack([b for _, b in pairs]).to(dtype),
            ranks,
        )
    rank = max(ranks)
    a = factors[0].new_zeros(len(pairs), rank, factors[0].shape[1], dtype=dtype)
    b = factors[1].new_zeros(len(pairs), factors[1].shape[0], rank, dtype=dtype)
    for k, (a_k, b_k) in enumerate(pairs):
        a[k, : a_k.shape[0]], b[k, :, : b_k.shape[1]] = a_k, b_k
    return a, b, ranks


def keep_masks(
    shape: torch.Size, dropouts: list[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`keep_mask` for a ``[K, ...]`` stack of blocks, block ``k`` with drop probability ``dropouts[k]`` (0
    keeps everything); returns the bool mask and the ``[K]`` fp32 keep probabilities.

    One draw of ``shape[1:]`` serves every block, against each block's own threshold: each block's mask has the
    distribution of its separate run's; the blocks' masks are correlated (common random numbers: if anything, the
    configs of a pack are compared with less noise). The draw is a quarter of the work for a pack of 4 (it was 5%
    of a SmolLM2 pack step).
    """
    per_block = (-1, *[1] * (len(shape) - 1))
    if device.type != "cpu":
        drop = torch.tensor(dropouts, device=device)
        return torch.rand(shape[1:], device=device) >= drop.view(per_block), 1 - drop
    thresholds = torch.tensor([min(65535, round(p * 65536)) if p > 0 else 0 for p in dropouts])  # [K]
    n = math.prod(shape[1:])
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    draws = words.view(torch.int16)[:n].view(shape[1:])  # uniform over int16's 65,536 values
    mask = draws >= (thresholds - 32768).to(torch.int16).view(per_block)  # [K, ...]
    return mask, 1 - thresholds.float() / 65536


def packed_lora_product(
    x: torch.Tensor,
    base_out: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    scales: list[float],
    dropouts: list[float],
    training: bool,
) -> torch.Tensor:
    """``base_out + s_k · (dropout_k(x) @ A_kᵀ) @ B_kᵀ`` on block ``k`` of ``K`` equal blocks of rows, through
    :class:`PackedLoraProduct`.

    Args:
        x (torch.Tensor): ``[K·n, ..., in]`` the layer input, block ``k`` = rows ``[k·n, (k+1)·n)``.
        base_out (torch.Tensor): ``[K·n, ..., out]`` the frozen base layer's output for ``x``.
        factors (list[tuple[Tensor, Tensor]]): ``(A_k [r_k, in], B_k [out, r_k])`` per block (fp32).
        scales (list[float]): Each block's adapter scale ``s_k``.
        dropouts (list[float]): Each block's dropout probability.
        training (bool): Apply the dropout.

    Returns:
        torch.Tensor: ``[K·n, ..., out]`` in ``base_out``'s dtype.
    """
    flat = [t for pair in factors for t in pair]
    return PackedLoraProduct.apply(x, base_out, list(scales), list(dropouts), training, *flat)


__all__ = [
    "LoraProduct",
    "PackedLoraProduct",
    "compute_dtype",
    "dropped",
    "keep_mask",
    "keep_masks",
    "lora_product",
    "packed_lora_product",
]
