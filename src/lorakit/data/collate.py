"""Batches: dynamic padding to the longest item, and attention masks for packed rows.

Unpacked batches are padded on the right to the longest sequence in the batch (not to ``max_length``), with a
2-D ``attention_mask``. Packed rows (items with ``position_ids``) must not attend across samples. Two ways to
say so, both exact (``tests/test_data.py`` checks them against running each sample alone):

* ``packed_attention="mask"``: ``attention_mask`` is a 4-D boolean block-diagonal causal mask
  ``[B, 1, T, T]``; transformers 5 passes a 4-D mask through unchanged (``masking_utils``), and SDPA takes
  booleans (True = may attend). Eager attention adds the mask to the scores, so it needs
  :func:`additive_mask`.
* ``packed_attention="position_ids"``: no ``attention_mask``; transformers 5 finds the sample boundaries from
  the ``position_ids`` resets (``find_packed_sequence_indices``, used when there is no mask and no KV cache,
  so call the model with ``use_cache=False``), which is also what flash-attention varlen kernels use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lorakit.data.encode import IGNORE_INDEX
from lorakit.errors import ConfigError

PACKED_ATTENTION = ("mask", "position_ids")


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed rows: causal inside each sample, nothing across samples.

    Args:
        position_ids (torch.Tensor): ``[B, T]`` int positions that restart at 0 at every sample start.

    Returns:
        torch.Tensor: ``[B, 1, T, T]`` bool, True where query ``q`` (dim 2) may attend to key ``k`` (dim 3).
    """
    segment = (position_ids == 0).cumsum(-1)  # [B, T] sample number of each token
    same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()  # [T, T]
    return (same & causal)[:, None]  # [B, 1, T, T]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean attention mask as the additive form eager attention expects (0 attend, dtype-min not).

    Args:
        mask (torch.Tensor): ``[B, 1, T, T]`` bool, True = may attend.
        dtype (torch.dtype): The model's compute dtype. Default float32.

    Returns:
        torch.Tensor: ``[B, 1, T, T]`` of ``dtype``.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class Collator:
    """Pads a list of dataset items into a batch.

    Args:
        pad_token_id (int): Id written into padding positions (their labels are -100 and they are masked).
        packed_attention (str): For packed rows, ``"mask"`` (default: 4-D block-diagonal boolean
            ``attention_mask`` plus ``position_ids``) or ``"position_ids"`` (``position_ids`` only).

    Returns (from ``__call__``):
        dict[str, torch.Tensor]: ``input_ids`` ``[B, T]`` int64, ``labels`` ``[B, T]`` int64 (-100 on
        padding), and either ``attention_mask`` ``[B, T]`` int64 (unpacked) or ``position_ids`` ``[B, T]``
        int64 with, under ``"mask"``, ``attention_mask`` ``[B, 1, T, T]`` bool (packed). ``T`` is the longest
        item in the batch.
    """

    def __init__(self, pad_token_id: int, packed_attention: str = "mask") -> None:
        if packed_attention not in PACKED_ATTENTION:
            raise ConfigError(
                f"packed_attention: expected one of {PACKED_ATTENTION}, got {packed_attention!r}"
            )
        self.pad_token_id = pad_token_id
        self.packed_attention = packed_attention

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch_size, length = len(items), max(len(item["input_ids"]) for item in items)
        packed = "position_ids" in items[0]
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.int64)  # [B, T]
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.int64)  # [B, T]
        mask_or_positions = torch.zeros(batch_size, length, dtype=torch.int64)  # [B, T]
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[b, :n] = item["input_ids"]
            labels[b, :n] = item["labels"]
            if packed:
                # Padding continues as one more "sample" (0, 1, ...): it attends only to itself, so no row
                # of the mask is empty (an all-False row would give NaN in softmax).
                mask_or_positions[b, :n] = item["position_ids"]
                mask_or_positions[b, n:] = torch.arange(length - n)
            else:
                mask_or_positions[b, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        if not packed:
            batch["attention_mask"] = mask_or_positions
            return batch
        batch["position_ids"] = mask_or_positions
        if self.packed_attention == "mask":
            batch["attention_mask"] = block_causal_mask(mask_or_positions)
        return batch


def make_collator(tokenizer: Any, packed_attention: str = "mask") -> Collator:
    """A :class:`Collator` padding with the tokenizer's pad token (EOS when it has none; pads are masked).

    Args:
        tokenizer (PreTrainedTokenizerBase): The tokenizer.
        packed_attention (str): ``"mask"`` or ``"position_ids"``, see :class:`Collator`. Default ``"mask"``.

    Returns:
        Collator: The collator.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("tokenizer: expected a pad_token or an eos_token to pad with, got neither")
    return Collator(pad, packed_attention)


def make_dataloader(
    dataset: Dataset, collator: Collator, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over a tokenized dataset; with ``shuffle``, the order is fixed by ``seed``.

    Args:
        dataset (Dataset): A :class:`~lorakit.data.TokenizedDataset`.
        collator (Collator): Builds the batches.
        batch_size (int): Items (samples, or packed rows) per batch.
        shuffle (bool): Reshuffle every epoch. Default False.
        seed (int): Seed of the shuffle. Default 0.

    Returns:
        DataLoader: Batches as :class:`Collator` describes.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator
    )
