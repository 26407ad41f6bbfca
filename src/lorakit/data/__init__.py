"""Training data: files -> rendered text -> token ids and labels -> batches.

* :mod:`~lorakit.data.config`: :class:`DataConfig` (the recipe's ``data`` section) and :class:`DataError`.
* :mod:`~lorakit.data.formats`: reading JSON / JSONL / text files; alpaca, chat and text rows rendered to text
  with the character spans that carry the loss.
* :mod:`~lorakit.data.encode`: tokenization with offsets -> labels, EOS, truncation; worker processes.
* :mod:`~lorakit.data.cache`: the on-disk tokenization cache (safetensors).
* :mod:`~lorakit.data.dataset`: :func:`load_dataset`, the label guard, the validation split, packing.
* :mod:`~lorakit.data.collate`: dynamic padding and the attention of packed rows.
"""

from lorakit.data.collate import (
    Collator,
    additive_mask,
    block_causal_mask,
    make_collator,
    make_dataloader,
    real_token_count,
    supports_padding_free,
    training_collator,
)
from lorakit.data.config import DataConfig, DataError
from lorakit.data.dataset import (
    DataStats,
    TokenizedDataset,
    load_dataset,
    pack_dataset,
    render_masked_sample,
    split_dataset,
)
from lorakit.data.encode import IGNORE_INDEX, end_of_turn_id, stop_token_ids
from lorakit.data.formats import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    ALPACA_RESPONSE_MARKER,
    format_alpaca_prompt,
)

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "ALPACA_RESPONSE_MARKER",
    "IGNORE_INDEX",
    "Collator",
    "DataConfig",
    "DataError",
    "DataStats",
    "TokenizedDataset",
    "additive_mask",
    "block_causal_mask",
    "end_of_turn_id",
    "format_alpaca_prompt",
    "load_dataset",
    "make_collator",
    "make_dataloader",
    "pack_dataset",
    "real_token_count",
    "render_masked_sample",
    "split_dataset",
    "stop_token_ids",
    "supports_padding_free",
    "training_collator",
]
