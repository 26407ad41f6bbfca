"""Attention over padding-free rows, one sample at a time.

A padding-free batch (:mod:`lorakit.data.collate`) is one row ``[1, sum of lengths]`` whose ``position_ids``
restart at every sample. transformers' SDPA keeps the samples apart with a block-diagonal mask over the whole
row, so attention costs ``(sum of lengths)²`` instead of ``sum(length²)``: with 8 samples of equal length, 8x the
work, most of it masked out (on the quickstart model that was 47% of a training step). Here each sample's span
runs through the same SDPA call transformers makes, causal and without a mask: ``sum(length²)`` work.

How it reaches the model: :func:`enable_segment_attention` registers ``"lorakit_segments"`` with transformers'
public ``AttentionInterface`` / ``AttentionMaskInterface`` (the mask side is SDPA's own) and switches a model
from ``"sdpa"`` to it after checking one forward against SDPA. The loss (:mod:`lorakit.loss`) passes the spans
as the ``lorakit_segments`` keyword (:func:`segment_spans`), which transformers forwards to every attention
call (its ``**kwargs`` path, as for flash-attention's ``cu_seq_lens``). Without the keyword, or where a span
would not be plain causal attention (a sliding window shorter than the span, soft-capping, a KV cache), the call
is exactly transformers' ``sdpa_attention_forward`` with its mask: the reference the tests compare against.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

NAME = "lorakit_segments"
KEYWORD = "lorakit_segments"  # the forward keyword that carries the spans: tuple[tuple[int, int], ...]
# The keyword's value for SDPA's mask over the whole row, with the spans' precision inside (the enable check).
WHOLE_ROW = "whole_row"
_CALLS = {"per_sample": 0, "whole_row": 0}  # which path the attention calls took (read by the enable check)


def segment_spans(position_ids: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
    """The ``(start, stop)`` span of each sample in rows whose ``position_ids`` restart at 0 per sample.

    Args:
        position_ids (torch.Tensor): ``[B, T]`` int positions; every row must hold the same layout (a padding-free
            row, or a training pack's copies of it).

    Returns:
        tuple[tuple[int, int], ...] | None: The spans in order (one for a single sample: it still gets the fp32
        inside on CPU), or None when the rows differ or a row does not start at position 0.
    """
    first = position_ids[0]  # [T]
    if len(position_ids) > 1 and not bool((position_ids == first).all()):
        return None
    starts = (first == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    return tuple(zip(starts, [*starts[1:], len(first)]))


def segment_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: SDPA per sample span when the call carries ``lorakit_segments``.

    Args:
        module (nn.Module): The attention module (``is_causal``, ``num_key_value_groups`` are read by SDPA).
        query (torch.Tensor): ``[B, H, T, D]``.
        key (torch.Tensor): ``[B, H_kv, T, D]``.
        value (torch.Tensor): ``[B, H_kv, T, D]``.
        attention_mask (torch.Tensor | None): SDPA's mask (block-diagonal over the row); used only on the fallback.
        **kwargs: ``lorakit_segments`` (the spans), plus what transformers passes (``dropout``, ``scaling``,
            ``sliding_window``, ``position_ids`` ...).

    Returns:
        tuple[Tensor, None]: The attention output ``[B, T, H, D]`` and no weights.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = kwargs.pop(KEYWORD, None)
    if spans is None or (spans != WHOLE_ROW and not _plain_causal(module, query, key, spans, kwargs)):
        _CALLS["whole_row"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _CALLS["per_sample"] += spans != WHOLE_ROW
    dtype, device = query.dtype, query.device.type
    fp32 = device == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if fp32:
        # PyTorch's CPU flash kernel runs its backward ~2x slower in bf16 than in fp32 at head size 64 (both
        # directions with the casts: 0.84 vs 1.70 ms for 9 heads x 84 tokens, docs/performance.md): fp32 inside,
        # autocast off (it would cast SDPA's inputs back to bf16)
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast(device, enabled=False) if fp32 else nullcontext():
        if spans == WHOLE_ROW:  # the enable check's reference: SDPA's own mask, the same precision inside
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0].to(
                dtype
            ), None
        outputs = []
        for a, b in spans:  # causal inside the span, nothing outside it
            span = sdpa_attention_forward(
                module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs
            )
            outputs.append(span[0])  # [B, b - a, H, D]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # [B, T, H, D]
    return out.to(dtype), None


def _plain_causal(module: nn.Module, query: torch.Tensor, key: torch.Tensor, spans, kwargs: dict) -> bool:
    """Whether SDPA's mask over the row is exactly causal attention inside each span."""
    if query.shape[2] != key.shape[2] or spans[-1][1] != query.shape[2]:  # a KV cache, or another row's spans
        return False
    if not getattr(module, "is_causal", True) or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("output_attentions") or kwargs.get("position_bias") is not None:
        return False
    window = kwargs.get("sliding_window")
    return window is None or max(b - a for a, b in spans) <= window


def enable_segment_attention(model: nn.Module) -> bool:
    """Switch ``model`` from SDPA to per-sample attention on padding-free rows, if it gives SDPA's output.

    Checked, not assumed: two forwards without grad of a two-sample row, one with the spans, one with SDPA's mask
    over the whole row (``WHOLE_ROW``: transformers' own mask, with the same precision inside as the spans get, so
    the two differ only by summation order). Every attention call must have taken the per-sample path (the
    keyword reached it and the layer is plain causal attention) and the logits must agree to 1e-4 of the largest
    (2e-2 for bf16 / fp16 weights, whose rounding turns small differences into larger ones). Otherwise, or on
    another implementation (eager, flash), the model keeps what it had.

    Args:
        model (nn.Module): A transformers model (possibly with adapters).

    Returns:
        bool: Whether the model now uses ``"lorakit_segments"``.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    _register()
    if config._attn_implementation == NAME:
        return True
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]], device=device)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.set_attn_implementation(NAME)
            _CALLS.update(per_sample=0, whole_row=0)
            reference = model(input_ids=ids, position_ids=positions, use_cache=False, **{KEYWORD: WHOLE_ROW})
            reference = reference.logits
            reference_dtype, reference = reference.dtype, reference.float()
            spans = segment_spans(positions)
            ours = model(
                input_ids=ids, position_ids=positions, use_cache=False, **{KEYWORD: spans}
            ).logits.float()
    except (TypeError, ValueError):  # the keyword is not accepted somewhere: keep SDPA
        model.set_attn_implementation("sdpa")
        return False
    finally:
        model.train(training)
    tolerance = 1e-4 if reference_dtype == torch.float32 else 2e-2
    close = torch.allclose(
        ours, reference, atol=tolerance * float(reference.abs().max().clamp(min=1e-6)), rtol=0
    )
    if not close or _CALLS["whole_row"] or not _CALLS["per_sample"]:
        model.set_attn_implementation("sdpa")
        return False
    return True


def disable_segment_attention(model: nn.Module) -> None:
    """Put ``model`` back on SDPA (before it is saved or served: other programs do not know the name)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")


def uses_segment_attention(model: nn.Module) -> bool:
    """Whether the loss should pass spans to ``model`` (it runs on ``"lorakit_segments"``)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == NAME


def _register() -> None:
    """Add the name to transformers' attention and mask tables (their public extension point); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, segment_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
