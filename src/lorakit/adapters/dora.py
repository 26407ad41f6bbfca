"""DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

``W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖``, with the norm taken per output row of the ``[out, in]`` weight (L2 over
``in``) and a trainable magnitude ``m ∈ R^{out}`` initialized to that norm (so ``W' = W0`` at step 0). A and B are
the LoRA factors of the same adapter (:class:`~lorakit.adapters.lora.LoraLinear` owns them).

The norm ``n`` is a constant in the gradient (paper §4.3): it is computed without grad, so A and B receive gradient
through the numerator only and no graph over an ``[out, in]`` tensor is kept. With ``k = m / n``::

    y = x W'ᵀ + b = k ⊙ (x W0ᵀ + s·B A x) + b = k ⊙ (base(x) + s·lora(x)) + (1 - k) ⊙ b

so the forward reuses the base layer's output (bias included) and never forms W' (:func:`dora_forward` folds ``k·s``
into B, leaving one elementwise pass over the output). The norm itself is computed without
forming ``B A`` either (:func:`weight_norm`)::

    n² = ‖W0‖² + Σ_j B_oj · (2s·(W0 Aᵀ)_oj + s²·(B (A Aᵀ))_oj)

``‖W0‖²`` is frozen and cached by the layer, ``W0 Aᵀ`` is one ``[out, in] × [in, r]`` product that reads W0 once, and
the rest is ``[out, r]``-sized. :func:`weight_norm_reference` forms ``W0 + s·B A`` the plain way; the tests compare
the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoraMagnitude(nn.Module):
    """The trainable magnitude ``m`` ([out], fp32) of one DoRA adapter.

    It is a module holding ``weight`` so that the parameter path is PEFT's in-memory one,
    ``<layer>.lora_magnitude_vector.<adapter>.weight``; on disk PEFT drops the ``.weight``.

    Args:
        magnitude (torch.Tensor): Initial value, ``[out]``; copied to fp32.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude.detach().to(torch.float32).clone())

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


@torch.no_grad()
def weight_norm_reference(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``‖W0 + s·B A‖`` per output row, by forming the ``[out, in]`` sum in fp32 (PEFT's way; the reference).

    Args:
        weight (torch.Tensor): ``W0``, ``[out, in]``, any float dtype.
        lora_A (torch.Tensor): ``[r, in]``.
        lora_B (torch.Tensor): ``[out, r]``.
        scaling (float): ``s``.

    Returns:
        torch.Tensor: ``[out]`` fp32, no grad.
    """
    with torch.autocast(weight.device.type, enabled=False):
        full = weight.float() + scaling * (lora_B.float() @ lora_A.float())  # [out, in]
        return torch.linalg.vector_norm(full, dim=1)


@torch.no_grad()
def row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """``‖W0‖²`` per output row: ``[out, in]`` (any float dtype) -> ``[out]`` fp32."""
    with torch.autocast(weight.device.type, enabled=False):
        return weight.float().square().sum(dim=1)


@torch.no_grad()
def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    base_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W0 + s·B A‖`` per output row without forming ``B A`` (same value as :func:`weight_norm_reference`).

    Cost: one ``[out, in] × [in, r]`` product (``W0 Aᵀ``) plus ``O((out + in)·r²)``; memory ``O(out·r)`` beyond an
    fp32 view of W0 (a copy only when W0 is not fp32).

    Args:
        weight (torch.Tensor): ``W0``, ``[out, in]``, any float dtype (a transposed view is fine).
        lora_A (torch.Tensor): ``[r, in]``.
        lora_B (torch.Tensor): ``[out, r]``.
        scaling (float): ``s``.
        base_sq_norm (torch.Tensor | None): ``‖W0‖²`` per row, ``[out]`` fp32 (the layer caches it); computed
            here when None.

    Returns:
        torch.Tensor: ``[out]`` fp32, no grad.
    """
    with torch.autocast(weight.device.type, enabled=False):
        weight = weight.float()
        a, b = lora_A.float(), lora_B.float()  # [r, in], [out, r]
        if base_sq_norm is None:
            base_sq_norm = weight.square().sum(dim=1)
        w_a = weight @ a.T  # [out, r]: rowsum(W0 ⊙ B A) = rowsum((W0 Aᵀ) ⊙ B)
        b_g = b @ (a @ a.T)  # [out, r]: rowsum((B A) ⊙ (B A)) = rowsum((B A Aᵀ) ⊙ B)
        cross = torch.add(w_a, b_g, alpha=scaling / 2)  # W0 Aᵀ + (s/2)·B A Aᵀ
        sq = base_sq_norm + 2 * scaling * (b * cross).sum(dim=1)  # [out]
        # Rounding can push a (near) zero row slightly negative; sqrt must not see it.
        return sq.clamp_min(0).sqrt()


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``k = m / n`` per output row (``[out]``). A zero row of ``W0 + s·B A`` has ``n = 0`` and a zero output
    whatever ``k`` is; ``n`` is clamped to the smallest normal float so that ``k`` stays finite there."""
    return magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def dora_forward(
    result: torch.Tensor,
    hidden: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One DoRA adapter on top of the base output, with one elementwise pass over ``[..., out]``.

    ``k ⊙ (result + s·B h) + (1 - k) ⊙ b`` is computed as ``k ⊙ result + (h (k s ⊙ B)ᵀ + (1 - k) ⊙ b)``: the
    per-row factor ``k·s`` is folded into the small ``B`` ([out, r]) and ``(1 - k) ⊙ b`` becomes the bias of that
    product, so what remains is one ``addcmul``. Autograd saves ``result`` for ``∂L/∂k = Σ g ⊙ (result - b + s·B h)``.
    Same value as :func:`dora_output` (the plain formula, which the tests compare against).

    Args:
        result (torch.Tensor): The base layer's output (bias included), ``[..., out]``.
        hidden (torch.Tensor): ``A(dropout(x))``, ``[..., r]``, in the adapter dtype.
        lora_B (torch.Tensor): ``B``, ``[out, r]``.
        scale (torch.Tensor): ``k = m / n``, ``[out]`` fp32 (gradient flows to ``m``).
        scaling (float): ``s``.
        bias (torch.Tensor | None): The base bias ``[out]``, or None.

    Returns:
        torch.Tensor: ``[..., out]`` in ``result``'s dtype.
    """
    scaled_b = lora_B * (scale * scaling)[:, None]  # [out, r]
    shift = None if bias is None else ((1 - scale) * bias).to(scaled_b.dtype)  # [out]
    lora = F.linear(hidden, scaled_b, shift)  # [..., out] = k ⊙ s·B h + (1 - k) ⊙ b
    return torch.addcmul(lora, result, scale).to(result.dtype)


def dora_output(
    result: torch.Tensor,
    lora_out: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One DoRA adapter on top of the base output, the plain way: ``k ⊙ (result + s·lora) + (1 - k) ⊙ b``.

    With ``result = x W0ᵀ + b`` this is ``k ⊙ (x W0ᵀ + s·B A x) + b`` (PEFT's
    ``result + (k - 1)·(result - b) + k·s·lora``). Used for mixed-adapter batches (a different ``k`` per row) and as
    the reference of :func:`dora_forward`.

    Args:
        result (torch.Tensor): The base layer's output (bias included), ``[..., out]``.
        lora_out (torch.Tensor): ``B(A(dropout(x)))`` without the scale, ``[..., out]``.
        scale (torch.Tensor): ``k = m / n``, ``[out]`` (or broadcastable, e.g. ``[B, 1, out]`` for a mixed batch).
        scaling (float): ``s``.
        bias (torch.Tensor | None): The base bias ``[out]``, or None.

    Returns:
        torch.Tensor: ``[..., out]`` in ``result``'s dtype.
    """
    combined = torch.add(result, lora_out, alpha=scaling)  # [..., out], fp32 when lora_out is
    if bias is None:
        return (combined * scale).to(result.dtype)
    return torch.addcmul((1 - scale) * bias, combined, scale).to(result.dtype)


def merged_weight(
    weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor, fan_in_fan_out: bool
) -> torch.Tensor:
    """``k ⊙ (W + ΔW)`` per output row, for merging; ``W`` and ``ΔW`` fp32 in the base's storage layout.

    Args:
        weight (torch.Tensor): ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``).
        delta (torch.Tensor): ``s·B A`` in the same layout.
        factor (torch.Tensor): ``k = m / n``, ``[out]``.
        fan_in_fan_out (bool): The weight is stored transposed (GPT-2 Conv1D).
    """
    return _per_output(factor, fan_in_fan_out) * (weight + delta)


def unmerged_weight(
    weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor, fan_in_fan_out: bool
) -> torch.Tensor:
    """Inverse of :func:`merged_weight`: ``W_merged / k - ΔW`` (``k`` from the norm cached at merge time)."""
    return weight / _per_output(factor, fan_in_fan_out) - delta


def _per_output(vector: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return vector[None, :] if fan_in_fan_out else vector[:, None]


__all__ = [
    "DoraMagnitude",
    "dora_forward",
    "dora_output",
    "magnitude_scale",
    "merged_weight",
    "row_sq_norm",
    "unmerged_weight",
    "weight_norm",
    "weight_norm_reference",
]
