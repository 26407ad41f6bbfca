"""The causal-LM loss, summed over target tokens, without materializing the full fp32 logits.

transformers computes ``[batch, seq, vocab]`` logits and then the mean cross-entropy; with a 128k vocabulary
that tensor (and its fp32 copy and gradient) dominates training memory. Here the decoder's hidden states are
gathered at target positions only (prompt and padding tokens are dropped *before* the output projection),
and the projection + cross-entropy run a chunk of tokens at a time under activation checkpointing, so at most
one chunk of logits is alive in forward and in backward (torchtune's ``LinearCrossEntropyLoss`` idea).

The loss is returned as a *sum* with the number of target tokens, so gradient accumulation can normalize by
the total target count of all accumulated micro-batches (the large-batch loss; transformers PR #34191).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.attention import KEYWORD as SEGMENTS_KEYWORD
from lorakit.attention import segment_spans, uses_segment_attention

IGNORE_INDEX = -100
# 256 tokens x a 32k vocabulary: 33 MB of fp32 logits per chunk (1024 peaked ~160 MB higher: docs/memory.md)
CHUNK_TOKENS = 256


def _supports_hidden_path(model: nn.Module) -> bool:
    """The output head is a plain projection: no logit soft-capping or scaling after it."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)):
        return False
    if model.get_output_embeddings() is None:
        return False
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return False
    return getattr(config, "model_type", "") not in ("gemma2", "gemma3", "cohere", "cohere2", "granite")


def _decoder(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _head_ce_sums(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, block_ids: torch.Tensor, blocks: int
) -> torch.Tensor:
    """The summed cross-entropy of each block's tokens in this chunk: ``[blocks]`` fp32."""
    logits = head(hidden).float()  # [n, vocab] in fp32 for a stable log-softmax
    if blocks == 1:
        return F.cross_entropy(logits, targets, reduction="sum")[None]
    losses = F.cross_entropy(logits, targets, reduction="none")  # [n]
    return losses.new_zeros(blocks).index_add(0, block_ids, losses)


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of ``batch`` that carry a loss: ``labels`` [B, T] other than -100 from position 1 on (the label of
    position t + 1 is the target of position t)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True, chunk_tokens: int = CHUNK_TOKENS
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens, and their count.

    Args:
        model (nn.Module): A Hugging Face causal LM (possibly wrapped with adapters).
        batch (dict[str, Tensor]): ``input_ids`` [B, T], ``labels`` [B, T] (-100 = no loss), optional
            ``attention_mask`` ([B, T] or a 4-D packed mask) and ``position_ids`` [B, T].
        chunked (bool): Use the memory-lean path when the head allows it. Default True.
        chunk_tokens (int): Target tokens per projection chunk. Default 256.

    Returns:
        tuple[Tensor, int]: The fp32 loss sum (a scalar with grad) and the number of target tokens.
    """
    sums, count = causal_lm_loss_sums(model, batch, 1, chunked, chunk_tokens)
    return sums[0], count


def causal_lm_loss_sums(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    blocks: int,
    chunked: bool = True,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, int]:
    """:func:`causal_lm_loss_sum` per block of rows: the batch is ``blocks`` equal contiguous blocks holding the same
    samples (a training pack, :mod:`lorakit.packed`: one block per adapter config).

    Each token's loss is what a separate run computes for it (a chunk's rows are independent), added to its own
    block's sum: a block's sum equals that run's loss up to float summation order. Chunks of ``chunk_tokens`` run
    across the blocks, so the blocks share the output head's products.

    Returns:
        tuple[Tensor, int]: The fp32 loss sums ``[blocks]`` (with grad) and the target tokens of one block.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]  # [B, T-1]: token t+1 is the target of position t
    mask = targets != IGNORE_INDEX
    count = int(mask.sum()) // blocks  # every block holds the same samples
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    inputs["use_cache"] = False  # no KV cache in training (packed rows are detected from position resets)
    if "attention_mask" not in inputs and "position_ids" in inputs and uses_segment_attention(model):
        spans = segment_spans(inputs["position_ids"])  # padding-free rows: attention per sample, sum(length²)
        if spans is not None:
            inputs[SEGMENTS_KEYWORD] = spans
    if not chunked or count == 0 or not _supports_hidden_path(model):  # no target: still a graph to backward
        logits = model(**inputs).logits[:, :-1]  # [B, T-1, V]
        rows = logits.shape[0] // blocks
        losses = [
            F.cross_entropy(
                logits[k * rows : (k + 1) * rows].float().flatten(0, 1),
                targets[k * rows : (k + 1) * rows].flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            for k in range(blocks)
        ]
        return torch.stack(losses), count
    hidden = _decoder(model)(**inputs).last_hidden_state[:, :-1]  # [B, T-1, H]
    hidden, flat_targets = (
        hidden[mask],
        targets[mask],
    )  # [N, H], [N]: rows in order, so block k is [k·n, (k+1)·n)
    head = model.get_output_embeddings()
    # Chunks run across the blocks: a pack's blocks share each output-head product (4 configs x 28 targets: one
    # product of 112 rows, 18 ms, instead of 4 of 28, 29 ms, each three times a step); each token's loss is added to
    # its own block's sum.
    block_ids = torch.arange(blocks, device=hidden.device).repeat_interleave(count)  # [N]
    sums = hidden.new_zeros(blocks, dtype=torch.float32)
    for start in range(0, blocks * count, chunk_tokens):
        stop = min(start + chunk_tokens, blocks * count)
        # Recompute the chunk's logits in backward instead of keeping them: one chunk alive at a time.
        sums = sums + checkpoint(
            _head_ce_sums, hidden[start:stop], flat_targets[start:stop], head, block_ids[start:stop], blocks,
            use_reentrant=False,
        )  # fmt: skip
    return sums, count
