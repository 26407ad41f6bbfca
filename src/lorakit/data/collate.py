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

Padding-free batches (``padding_free=True``, the training default where the model takes ``position_ids``): the
batch's items are concatenated into one row ``[1, sum of lengths]`` with per-sample ``position_ids``, so no
pad token costs a FLOP. The loss is the unpadded batch's: every sample's first label is -100, so no target
crosses a boundary, and the attention is the packed rows' (exact, ``tests/test_data.py``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lorakit.attention import enable_segment_attention
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


def real_token_count(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of a collated batch that are not padding.

    Padded batches say it in their 2-D ``attention_mask``; padding-free rows hold no pad at all. Packed rows
    padded to a common length (``packing`` without ``padding_free``) count their end padding too.
    """
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


class Collator:
    """Pads a list of dataset items into a batch, or concatenates them into one padding-free row.

    Args:
        pad_token_id (int): Id written into padding positions (their labels are -100 and they are masked).
        packed_attention (str): For packed rows, ``"mask"`` (default: 4-D block-diagonal boolean
            ``attention_mask`` plus ``position_ids``) or ``"position_ids"`` (``position_ids`` only).
        padding_free (bool): Concatenate the items (samples or packed rows) into one ``[1, sum of lengths]``
            row with per-sample ``position_ids`` (attention as ``packed_attention`` says). Default False.

    Returns (from ``__call__``):
        dict[str, torch.Tensor]: ``input_ids`` ``[B, T]`` int64, ``labels`` ``[B, T]`` int64 (-100 on
        padding), and either ``attention_mask`` ``[B, T]`` int64 (unpacked) or ``position_ids`` ``[B, T]``
        int64 with, under ``"mask"``, ``attention_mask`` ``[B, 1, T, T]`` bool (packed). ``T`` is the longest
        item in the batch.
    """

    def __init__(self, pad_token_id: int, packed_attention: str = "mask", padding_free: bool = False) -> None:
        if packed_attention not in PACKED_ATTENTION:
            raise ConfigError(
                f"packed_attention: expected one of {PACKED_ATTENTION}, got {packed_attention!r}"
            )
        self.pad_token_id = pad_token_id
        self.packed_attention = packed_attention
        self.padding_free = padding_free

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return self._one_row(items)
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
        return self._with_positions(batch, mask_or_positions)

    def _one_row(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The items end to end in one row: ``[1, N]`` ids, labels and positions (restarting per sample)."""
        positions = [
            item["position_ids"] if "position_ids" in item else torch.arange(len(item["input_ids"]))
            for item in items
        ]
        batch = {key: torch.cat([item[key] for item in items])[None] for key in ("input_ids", "labels")}
        return self._with_positions(batch, torch.cat(positions)[None])

    def _with_positions(
        self, batch: dict[str, torch.Tensor], positions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch["position_ids"] = positions  # [B, T]
        if self.packed_attention == "mask":
            batch["attention_mask"] = block_causal_mask(positions)  # [B, 1, T, T]
        return batch


def make_collator(tokenizer: Any, packed_attention: str = "mask", padding_free: bool = False) -> Collator:
    """A :class:`Collator` padding with the tokenizer's pad token (EOS when it has none; pads are masked).

    Args:
        tokenizer (PreTrainedTokenizerBase): The tokenizer.
        packed_attention (str): ``"mask"`` or ``"position_ids"``, see :class:`Collator`. Default ``"mask"``.
        padding_free (bool): One row per batch, no padding (see :class:`Collator`). Default False.

    Returns:
        Collator: The collator.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("tokenizer: expected a pad_token or an eos_token to pad with, got neither")
    return Collator(pad, packed_attention, padding_free)


def supports_padding_free(model: Any) -> bool:
    """Whether ``model`` keeps the samples of a padding-free row apart when told by ``position_ids`` alone.

    Checked, not assumed (transformers 5 finds packed samples from position resets in most decoders, not
    necessarily in all, nor in custom code): one forward of two rows that share their second sample and differ in
    the first, ``[a b c | d e]`` and ``[x y z | d e]`` with positions ``0 1 2 0 1``, in eval mode without grad. The
    second sample's logits are the same in both rows only if nothing crosses the boundary.
    """
    forward = getattr(model, "forward", None)
    try:
        if forward is None or "position_ids" not in inspect.signature(forward).parameters:
            return False
    except (TypeError, ValueError):
        return False
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 6, 7]], device=device)
    positions = torch.tensor([[0, 1, 2, 0, 1]] * 2, device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 3:].float()
    finally:
        model.train(training)
    return bool((logits[0] - logits[1]).abs().max() <= 1e-4 * logits.abs().max().clamp(min=1e-6))


def training_collator(tokenizer: Any, model: Any, padding_free: bool = True) -> Collator:
    """The training loop's collator: padding-free rows where ``padding_free`` and the model allows them (samples
    kept apart through ``position_ids``), else padded batches (packed rows with the 4-D mask). With padding-free
    rows the model is also switched to attention per sample of a row where that equals SDPA's
    (:func:`lorakit.attention.enable_segment_attention`): the batches and the attention that reads them are
    chosen together, for training, a pack and their evaluations alike.

    Args:
        tokenizer (PreTrainedTokenizerBase): The tokenizer.
        model (nn.Module): The model being trained.
        padding_free (bool): The recipe's ``data.padding_free``. Default True.

    Returns:
        Collator: The collator.
    """
    if padding_free and supports_padding_free(model):
        enable_segment_attention(model)
        return make_collator(tokenizer, "position_ids", padding_free=True)
    return make_collator(tokenizer)


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
