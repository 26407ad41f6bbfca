"""Mixed-adapter batches: row ``t`` uses adapter ``a_t`` (S-LoRA, Sheng et al. 2023, arXiv 2311.03285; Punica, Chen et al. 2023, arXiv 2310.18547).

``y_t = x_t W0ᵀ + s_{a_t} B_{a_t} A_{a_t} x_t``: the wrapper runs the base GEMM once for the whole batch; this module
adds every row's low-rank part at once, never merging and never looping over rows.

Each layer keeps the batch's adapters stacked (``Aᵀ`` as ``[k + 1, in, r]``, ``(s·B)ᵀ`` as ``[k + 1, r, out]``, ranks
zero-padded, the last slot all zeros for base rows); a :class:`RowPlan`, made once per forward and shared by every
layer, says which rows use which slot. Two layouts compute the same products; each layer takes the one that moves
fewer bytes:

- **grouped** (SGMV-style, decode): the rows sorted by adapter into ``k`` groups of ``m`` slots (shorter groups
  padded with a zero row), two batched GEMMs ``[k, m·T, in] @ [k, in, r] @ [k, r, out]``, each slot's output added
  to its row. Moves the activations (``k·m·T`` rows); the weights are used in place.
- **per row** (BGMV, prefill): each row's ``A`` and ``B`` gathered, ``[B, T, in] @ [B, in, r] @ [B, r, out]``.
  Moves the weights (``B·r`` rows of ``in + out``); better once a row has more tokens than the rank.

Reference: :func:`bgmv_reference`, vLLM's pure-torch BGMV (``torch_ops/lora_ops.py``): gather each row's ``A`` and
``B`` and contract. The tests check both layouts against it and against running each adapter alone.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError

BASE = "__base__"  # the row name for "no adapter"


class RowPlan:
    """Which rows use which adapter; computed once per forward and shared by every layer.

    Args:
        rows (list[str]): One adapter name per batch row, or :data:`BASE`.
        per_block (bool): Training packs (:mod:`lorakit.packed`): the rows come in one contiguous block per
            adapter, and each layer runs every block through that adapter's own forward (dropout, DoRA, rsLoRA: the
            exact computation of a run with that adapter alone), instead of the stacked low-rank products.
            Default False.

    Attributes:
        rows (tuple[str, ...]): As given.
        adapters (tuple[str, ...]): The distinct adapters used, sorted: the order of every layer's stacked weights.
        slots (list[int]): Per row, its adapter's index in ``adapters``; ``len(adapters)`` for base rows.
        groups (list[list[int]]): Per adapter, its rows in batch order.
        width (int): ``m``, the slots per group (the largest group).
        padded (bool): Some group is shorter than ``m`` (its spare slots read a zero row).
        in_order (bool): No padding, no base rows and the rows already sorted by adapter: nothing to gather.
        blocks (list[tuple[str, int, int]]): With ``per_block``: ``(adapter, first row, end row)`` per block.
    """

    def __init__(self, rows: list[str], per_block: bool = False) -> None:
        self.rows = tuple(rows)
        self.adapters = tuple(sorted({name for name in rows if name != BASE}))
        slot = {name: i for i, name in enumerate(self.adapters)}
        self.slots = [slot.get(name, len(self.adapters)) for name in rows]
        self.groups: list[list[int]] = [[] for _ in self.adapters]
        for row, s in enumerate(self.slots):
            if s < len(self.adapters):
                self.groups[s].append(row)
        self.width = max((len(group) for group in self.groups), default=0)
        self.adapter_rows = sum(len(group) for group in self.groups)
        self.padded = self.width * len(self.groups) > self.adapter_rows
        order = [row for group in self.groups for row in group]
        self.in_order = not self.padded and order == list(range(len(rows)))
        self.per_block = per_block
        self.blocks: list[tuple[str, int, int]] = []
        for row, name in enumerate(rows):
            if self.blocks and self.blocks[-1][0] == name:
                self.blocks[-1] = (name, self.blocks[-1][1], row + 1)
            else:
                self.blocks.append((name, row, row + 1))
        if per_block and len(self.blocks) != len(set(rows)):
            raise ConfigError(f"per_block rows must come in one contiguous block per adapter, got {rows}")
        self._indices: dict[torch.device, tuple] = {}

    def grouped(self, tokens: int, rank: int) -> bool:
        """Use the grouped layout: its gathered activations (``k·m·T`` rows) are fewer than the per-row layout's
        gathered weights (``B·r`` rows)."""
        return len(self.groups) * self.width * tokens <= len(self.rows) * rank

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Index tensors on ``device`` (made once per plan and device).

        Returns:
            tuple: ``slots`` [B] (each row's adapter index, ``k`` for the base); ``gather`` [k·m] (the row each
            group slot reads; ``B`` = the appended zero row for padding); ``scatter`` [k·m] (the row each slot adds
            to; padding adds its exact zero to the group's first row).
        """
        cached = self._indices.get(device)
        if cached is None:
            gather, scatter = [], []
            for group in self.groups:
                spare = self.width - len(group)
                gather += group + [len(self.rows)] * spare
                scatter += group + group[:1] * spare
            cached = (
                torch.tensor(self.slots, device=device),
                torch.tensor(gather, dtype=torch.long, device=device),
                torch.tensor(scatter, dtype=torch.long, device=device),
            )
            self._indices[device] = cached
        return cached


def add_rows(
    result: torch.Tensor, x: torch.Tensor, stack_a: torch.Tensor, stack_b: torch.Tensor, plan: RowPlan
) -> torch.Tensor:
    """``result`` plus each row's adapter output, the adapters stacked in ``plan.adapters`` order.

    Args:
        result (torch.Tensor): The base output ``[B, ..., out]`` (any float dtype; the sum is rounded to it). Updated
            in place when autograd is off (it is the base layer's fresh output).
        x (torch.Tensor): The layer input ``[B, ..., in]``.
        stack_a (torch.Tensor): ``Aᵀ`` per adapter plus a zero slot, ``[k + 1, in, r]`` (ranks zero-padded to ``r``).
        stack_b (torch.Tensor): ``(s·B)ᵀ`` per adapter plus a zero slot, ``[k + 1, r, out]`` (the scale folded in).
        plan (RowPlan): The batch's rows; ``k == len(plan.adapters)``.

    Returns:
        torch.Tensor: ``[B, ..., out]`` in ``result``'s dtype; base rows are ``result`` unchanged.
    """
    rows, size_in, size_out = x.shape[0], x.shape[-1], result.shape[-1]
    x3 = x.reshape(rows, -1, size_in).to(stack_a.dtype)  # [B, T, in]
    out3 = result.reshape(rows, -1, size_out)  # [B, T, out]
    tokens, k, m = x3.shape[1], len(plan.groups), plan.width
    slots, gather, scatter = plan.indices(x.device)
    in_place = not torch.is_grad_enabled()
    if not plan.grouped(tokens, stack_a.shape[-1]):  # per row: move the weights
        delta = torch.bmm(torch.bmm(x3, stack_a[slots]), stack_b[slots])  # [B, T, r] -> [B, T, out]
        delta = delta.to(out3.dtype)  # rounded first, as one adapter's output is
        out3 = out3.add_(delta) if in_place else out3 + delta
        return out3.reshape(result.shape)
    if plan.in_order:
        grouped = x3.reshape(k, m * tokens, size_in)  # [k, m·T, in]: a view, the rows are already grouped
    else:
        if plan.padded:
            x3 = torch.cat([x3, x3.new_zeros(1, tokens, size_in)])  # [B + 1, T, in]: row B is the padding
        grouped = x3.index_select(0, gather).reshape(k, m * tokens, size_in)  # [k, m·T, in]
    delta = torch.bmm(torch.bmm(grouped, stack_a[:k]), stack_b[:k])  # [k, m·T, r] -> [k, m·T, out]
    delta = delta.reshape(k * m, tokens, size_out).to(out3.dtype)  # [k·m, T, out]
    if plan.in_order:
        out3 = out3.add_(delta) if in_place else out3 + delta
    else:
        out3 = out3.index_add_(0, scatter, delta) if in_place else out3.index_add(0, scatter, delta)
    return out3.reshape(result.shape)


def bgmv_reference(
    x: torch.Tensor,
    weights_a: torch.Tensor,
    weights_b: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Each row's adapter output the plain way (vLLM's pure-torch BGMV): gather per row, contract.

    Args:
        x (torch.Tensor): ``[B, T, in]``.
        weights_a (torch.Tensor): ``A`` per adapter ``[n, r, in]``.
        weights_b (torch.Tensor): ``B`` per adapter ``[n, out, r]``.
        scale (torch.Tensor): ``s`` per adapter ``[n]``.
        index (torch.Tensor): Each row's adapter ``[B]`` (long); ``-1`` means no adapter (zero output).

    Returns:
        torch.Tensor: ``s_{a_t} B_{a_t} A_{a_t} x_t`` per row, ``[B, T, out]``.
    """
    use = index >= 0
    safe = index.clamp(min=0)
    shrink = torch.einsum("bti,bri->btr", x, weights_a[safe])  # [B, T, r]
    expand = torch.einsum("btr,bor->bto", shrink, weights_b[safe])  # [B, T, out]
    return expand * (scale[safe] * use)[:, None, None]


__all__ = ["BASE", "RowPlan", "add_rows", "bgmv_reference"]
