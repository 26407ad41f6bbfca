"""The engine's running batch: one left-padded KV cache, per-row sampling and streamed text.

KV cache: the running batch keeps one left-padded transformers ``DynamicCache`` ``[B, kv_heads, L, head_dim]``
per layer with a 2-D attention mask ``[B, L]`` (0 on the padding) and explicit ``position_ids`` per row, so a
row's rotary positions and attention are exactly those of the request served alone. The cache is rebuilt
only when rows join (padding everyone to the longest) or leave (dropping their rows and the columns that
became all padding); a plain decode step appends one column in place.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from lorakit.inject import BASE, batch_adapters

if TYPE_CHECKING:
    from lorakit.serve.engine import GenerationRequest, RequestHandle


class TextStream:
    """Incremental detokenization: each new token's text without decoding the whole answer every step.

    Decodes a short window ``tokens[prefix:]`` and emits what it adds over ``tokens[prefix:read]`` (a window
    start keeps merges such as leading spaces right); holds back text ending in an incomplete UTF-8 sequence.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode, self.tokens, self.prefix, self.read, self.sent = decode, [], 0, 0, ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix : self.read])
        after = self.decode(self.tokens[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        self.sent += after[len(before) :]
        return after[len(before) :]


@dataclass(eq=False)
class Row:
    """A running request: its handle, generated ids, random generator and (streaming) text state."""

    handle: RequestHandle
    generator: torch.Generator | None
    stream: TextStream | None
    generated: list[int]

    @classmethod
    def start(cls, handle: RequestHandle, decode: Callable[[list[int]], str], device: torch.device) -> Row:
        """A row for ``handle``: its own seeded generator when sampling, a text stream when streaming."""
        request = handle.request
        generator = None
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else random.randrange(2**63)
            generator = torch.Generator(device=device).manual_seed(seed % 2**63)
        return cls(handle, generator, TextStream(decode) if request.stream else None, [])

    def choose(self, logits: torch.Tensor, greedy: int | None = None) -> int:
        """The next token from ``logits`` [vocab] (fp32): sampled, or greedy (``greedy`` if precomputed)."""
        request = self.handle.request
        if request.temperature > 0:
            return sample_next(logits, request.temperature, request.top_p, self.generator)
        return greedy if greedy is not None else int(logits.argmax())


class Batch:
    """The running rows and their left-padded KV cache.

    ``mask`` [B, L] long (0 = padding), ``positions`` [B] (position id of each row's next input token),
    ``tokens`` [B] (each row's next input token), ``cache`` a DynamicCache with ``[B, kv_heads, L, d]`` per layer.
    """

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.tokens = None

    def join(self, new: list[tuple[Row, DynamicCache]]) -> None:
        """Add prefilled rows: everyone is left-padded to the longest cache (one rebuild for all joins)."""
        parts = [(self.cache, self.mask)] if self.rows else []
        for _, cache in new:
            length = cache.get_seq_length()
            parts.append((cache, torch.ones(1, length, dtype=torch.long, device=cache.layers[0].keys.device)))
        width = max(mask.shape[1] for _, mask in parts)
        layers = []
        for i in range(len(parts[0][0].layers)):
            keys = [_pad_left(c.layers[i].keys, width - m.shape[1]) for c, m in parts]
            values = [_pad_left(c.layers[i].values, width - m.shape[1]) for c, m in parts]
            layers.append((torch.cat(keys), torch.cat(values)))  # [B, kv_heads, width, d]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m in parts])  # [B, width]
        device, running = self.mask.device, bool(self.rows)
        # a new row's next input is its first generated token, at the position right after its prompt
        starts = torch.tensor([len(row.handle.request.prompt_ids) for row, _ in new], device=device)
        firsts = torch.tensor([row.generated[-1] for row, _ in new], device=device)
        self.positions = torch.cat([self.positions, starts]) if running else starts
        self.tokens = torch.cat([self.tokens, firsts]) if running else firsts
        self.rows += [row for row, _ in new]

    def keep(self, index: list[int]) -> None:
        """Keep only rows ``index`` (in order), dropping columns that are padding for every kept row."""
        if not index:
            self.__init__()
            return
        self.rows = [self.rows[i] for i in index]
        select = torch.tensor(index, device=self.mask.device)
        mask = self.mask[select]
        trim = int(mask.any(0).int().argmax())  # leading columns that are padding in every kept row
        self.mask = mask[:, trim:]
        self.positions, self.tokens = self.positions[select], self.tokens[select]
        layers = [
            (layer.keys[select, :, trim:], layer.values[select, :, trim:]) for layer in self.cache.layers
        ]
        self.cache = DynamicCache(ddp_cache_data=layers)

    def step(self, model: nn.Module) -> torch.Tensor:
        """One decode step for every row in one forward; returns next-token logits [B, vocab] in fp32."""
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)  # [B, L + 1]
        names = [row.handle.request.adapter or BASE for row in self.rows]
        with batch_adapters(model, names):
            out = model(
                input_ids=self.tokens[:, None],  # [B, 1]
                attention_mask=mask,
                position_ids=self.positions[:, None],  # [B, 1]
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache, self.mask, self.positions = out.past_key_values, mask, self.positions + 1
        return out.logits[:, -1].float()


def _pad_left(states: torch.Tensor, n: int) -> torch.Tensor:
    # [B, h, T, d] -> [B, h, n + T, d]; the zeros are masked out, so their value never matters
    return F.pad(states, (0, 0, n, 0)) if n else states


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Sample one token id from ``logits`` [vocab] (fp32) with temperature and nucleus (top-p) filtering.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (Holtzman et al.
    2019), as in transformers' ``TopPLogitsWarper``.
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # mass before this token already reaches top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


def prefill(
    model: nn.Module, request: GenerationRequest, device: torch.device, **forward_options
) -> tuple[torch.Tensor, DynamicCache]:
    """Run ``request``'s prompt alone (a batch of one, with its own adapter) into a fresh cache.

    Args:
        model (nn.Module): The served causal LM.
        request (GenerationRequest): The prompt ids and adapter.
        device (torch.device): Where the model runs.
        **forward_options: Extra forward arguments (e.g. ``logits_to_keep=1``).

    Returns:
        tuple[torch.Tensor, DynamicCache]: The last position's logits [vocab] in fp32, and the cache.
    """
    with batch_adapters(model, [request.adapter or BASE]):
        out = model(
            input_ids=torch.tensor([request.prompt_ids], device=device),  # [1, T]
            past_key_values=DynamicCache(),
            use_cache=True,
            **forward_options,
        )
    return out.logits[0, -1].float(), out.past_key_values


__all__ = ["Batch", "Row", "TextStream", "prefill", "sample_next"]
