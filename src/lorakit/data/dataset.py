"""``load_dataset``: data files -> tokenized train and validation sets, with stats and the label guard.

The flow, per file: read rows -> (cache hit? done) -> detect the format -> encode in chunks (optionally in
worker processes) -> report or skip bad rows -> cache. Then, for the whole dataset: stop if (nearly) no
token is a target, drop samples truncation left without targets, split off validation, pack.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lorakit.data import cache
from lorakit.data.config import DataConfig, DataError
from lorakit.data.encode import IGNORE_INDEX, Encoded, EncodeSpec, encode_all, stop_token_ids
from lorakit.data.formats import BadRow, detect_format, read_rows

logger = logging.getLogger(__name__)

MAX_LISTED_BAD_ROWS = 5


class TokenizedDataset(Dataset):
    """Tokenized samples (or packed rows) stored as flat int32 arrays with offsets.

    Item ``i`` is a dict of 1-D int64 tensors of one length: ``input_ids``, ``labels`` (-100 where there is no
    loss) and, for packed rows, ``position_ids`` (restarting at 0 at each packed sample).

    Args:
        input_ids (torch.Tensor): ``[total_tokens]`` token ids of all items, concatenated.
        labels (torch.Tensor): ``[total_tokens]`` labels, aligned with ``input_ids``.
        offsets (torch.Tensor): ``[len + 1]`` int64 start of each item in the flat arrays; the last is the end.
        position_ids (torch.Tensor | None): ``[total_tokens]`` positions for packed rows; None when unpacked.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        offsets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        self.input_ids = input_ids
        self.labels = labels
        self.offsets = offsets
        self.position_ids = position_ids

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> TokenizedDataset:
        """Build from ``(input_ids, labels)`` pairs."""
        lengths = torch.tensor([len(ids) for ids, _ in samples], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        ids = torch.tensor([t for s, _ in samples for t in s], dtype=torch.int32)
        labels = torch.tensor([t for _, s in samples for t in s], dtype=torch.int32)
        return cls(ids, labels, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = range(len(self))[index]  # negative indices; IndexError past the end (ends iteration)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        item = {"input_ids": self.input_ids[start:end].long(), "labels": self.labels[start:end].long()}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[start:end].long()
        return item

    def lengths(self) -> torch.Tensor:
        """``[len]`` int64 number of tokens of each item."""
        return self.offsets.diff()

    def target_counts(self) -> torch.Tensor:
        """``[len]`` int64 number of target (non -100) tokens of each item."""
        is_target = torch.cat(
            [torch.zeros(1, dtype=torch.int64), (self.labels != IGNORE_INDEX).long().cumsum(0)]
        )
        return is_target[self.offsets[1:]] - is_target[self.offsets[:-1]]

    def select(self, indices: Sequence[int] | torch.Tensor) -> TokenizedDataset:
        """A new dataset of the items at ``indices`` (of an unpacked dataset), in that order."""
        assert self.position_ids is None, "select works on samples, before packing"
        indices = torch.as_tensor(indices, dtype=torch.int64)
        lengths = self.lengths()[indices]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        # Flat index of every kept token: its item's old start plus its position inside the item.
        within = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lengths)
        flat = self.offsets[:-1][indices].repeat_interleave(lengths) + within
        return TokenizedDataset(self.input_ids[flat], self.labels[flat], offsets)


@dataclass
class DataStats:
    """What loading did, for the log and ``lorakit preprocess``.

    Attributes:
        format (str): The data format used (detected when ``format="auto"``).
        train_samples (int): Training samples (before packing).
        val_samples (int): Validation samples.
        train_tokens (int): Tokens in the training samples.
        train_target_tokens (int): Of those, the ones with a loss (labels != -100).
        target_fraction (float): ``train_target_tokens / train_tokens`` over the whole training file, before
            samples without targets are dropped (the quantity the ``min_label_fraction`` guard checks).
        truncated (int): Samples cut to ``max_length`` (all files).
        skipped_rows (int): Bad rows skipped under ``on_bad_row="skip"`` (all files).
        dropped_no_target (int): Samples dropped because truncation left them without any target token.
        longest (int): Longest training sample, in tokens.
        packed_rows (int | None): Training rows after packing; None without packing.
        cache_hit (bool): True when every file came from the on-disk cache (nothing was tokenized).
        bad_rows (list[str]): The first skipped rows' messages (file:line: what is wrong).
    """

    format: str
    train_samples: int
    val_samples: int
    train_tokens: int
    train_target_tokens: int
    target_fraction: float
    truncated: int
    skipped_rows: int
    dropped_no_target: int
    longest: int
    packed_rows: int | None = None
    cache_hit: bool = False
    bad_rows: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"format {self.format}: {self.train_samples} train / {self.val_samples} val samples, "
            f"{self.train_tokens} train tokens ({self.target_fraction:.1%} targets), longest {self.longest}",
            f"truncated {self.truncated}, skipped bad rows {self.skipped_rows}, "
            f"dropped without targets {self.dropped_no_target}" + (" (from cache)" if self.cache_hit else ""),
        ]
        if self.packed_rows is not None:
            lines.append(f"packed into {self.packed_rows} rows")
        return "\n".join(lines)


@dataclass
class _FileData:
    dataset: TokenizedDataset
    format: str
    truncated: int
    skipped_rows: int
    bad_rows: list[str]
    cache_hit: bool


def render_masked_sample(tokenizer: Any, sample: dict[str, Any]) -> str:
    """Decoded text of a sample with the spans that carry no loss wrapped in ``[masked]...[/masked]``.

    Args:
        tokenizer (PreTrainedTokenizerBase): The tokenizer that encoded the sample.
        sample (dict[str, Any]): With ``input_ids`` and ``labels`` (lists or 1-D tensors).

    Returns:
        str: e.g. ``"[masked]<s>### Instruction: ... ### Response:\\n[/masked]Paris.</s>"``.
    """
    ids, labels = (torch.as_tensor(sample[k]).tolist() for k in ("input_ids", "labels"))
    parts = []
    for masked, run in itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] == IGNORE_INDEX):
        text = tokenizer.decode(
            [i for i, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        parts.append(f"[masked]{text}[/masked]" if masked else text)
    return "".join(parts)


def _encode_spec(config: DataConfig, fmt: str, tokenizer: Any, path: Path) -> EncodeSpec:
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{path} holds chat data but the tokenizer has no chat template; set tokenizer.chat_template "
            "(a base model has none) or convert the data to alpaca format"
        )
    stop_ids = stop_token_ids(tokenizer)
    if not stop_ids:
        raise DataError(
            "the tokenizer has no eos_token, so the model cannot learn to stop; set tokenizer.eos_token"
        )
    return EncodeSpec(fmt, config.train_on, config.max_length, stop_ids[0], tuple(stop_ids))


def _tokenize_file(path: Path, config: DataConfig, tokenizer: Any) -> _FileData:
    rows, bad = read_rows(path)
    fmt = detect_format(rows, path) if config.format == "auto" else config.format
    spec = _encode_spec(config, fmt, tokenizer, path)
    results = encode_all(rows, tokenizer, spec, num_workers=config.num_workers)
    bad = sorted(bad + [r for r in results if isinstance(r, BadRow)])
    messages = [b.message for b in bad[:MAX_LISTED_BAD_ROWS]]
    more = f"\n  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more" if len(bad) > MAX_LISTED_BAD_ROWS else ""
    if bad and config.on_bad_row == "error":
        raise DataError(
            f"{len(bad)} bad row(s) in {path} ({fmt} format):\n  "
            + "\n  ".join(messages)
            + more
            + "\nFix them, or set data.on_bad_row=skip to drop them."
        )
    if bad:
        logger.warning("skipped %d bad row(s) in %s:\n  %s%s", len(bad), path, "\n  ".join(messages), more)
    samples = [r for r in results if isinstance(r, Encoded)]
    if not samples:
        raise DataError(f"{path}: no usable rows ({len(bad)} bad)")
    dataset = TokenizedDataset.from_samples([(s.input_ids, s.labels) for s in samples])
    truncated = sum(s.truncated for s in samples)
    return _FileData(dataset, fmt, truncated, len(bad), messages, cache_hit=False)


def _load_file(path: Path, config: DataConfig, tokenizer: Any) -> _FileData:
    """Tokenize one file, through the cache when ``config.cache_dir`` is set."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"a fast tokenizer is needed (token offsets locate the targets), got {type(tokenizer).__name__}"
        )
    if config.cache_dir is None:
        return _tokenize_file(path, config, tokenizer)
    if not path.is_file():
        read_rows(path)  # raises the missing-file error
    settings = {k: getattr(config, k) for k in ("format", "train_on", "max_length", "on_bad_row")}
    key = cache.cache_key(path, cache.tokenizer_fingerprint(tokenizer), settings)
    cache_dir = Path(config.cache_dir)
    entry = cache.load_entry(cache_dir, key)
    if entry is not None:
        tensors, meta = entry
        logger.info("loaded %s from cache %s", path, cache_dir)
        return _FileData(TokenizedDataset(**tensors), **meta, cache_hit=True)
    data = _tokenize_file(path, config, tokenizer)
    tensors = {name: getattr(data.dataset, name) for name in ("input_ids", "labels", "offsets")}
    meta = {name: getattr(data, name) for name in ("format", "truncated", "skipped_rows", "bad_rows")}
    cache.save_entry(cache_dir, key, tensors, meta)
    return data


def _check_targets(data: _FileData, config: DataConfig, tokenizer: Any) -> float:
    """The fraction of target tokens; raises when it is below ``config.min_label_fraction``."""
    counts = data.dataset.target_counts()
    fraction = int(counts.sum()) / max(1, int(data.dataset.lengths().sum()))
    if fraction >= config.min_label_fraction and counts.any():
        return fraction
    worst = int(torch.argmin(counts))  # the first sample with the fewest targets
    raise DataError(
        f"only {fraction:.2%} of the training tokens in {config.path} are targets (data.min_label_fraction="
        f"{config.min_label_fraction}): the loss would be (almost) zero and nothing would be learned.\n"
        f"Sample {worst} ({int(counts[worst])} target tokens; no loss on the [masked] parts):\n"
        f"{render_masked_sample(tokenizer, data.dataset[worst])}\n"
        f"Fix: check data.format (used: {data.format}) and the chat template, raise data.max_length "
        f"(now {config.max_length}) if prompts are long, or set data.train_on=all to train on every token."
    )


def _with_targets(dataset: TokenizedDataset) -> tuple[TokenizedDataset, int]:
    """The samples that keep at least one target after truncation, and how many were dropped."""
    has_targets = dataset.target_counts() > 0
    return dataset.select(torch.nonzero(has_targets).flatten()), int((~has_targets).sum())


def split_dataset(
    dataset: TokenizedDataset, val_size: int | float, seed: int
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Split off a validation set, deterministically for a seed.

    Args:
        dataset (TokenizedDataset): Unpacked samples.
        val_size (int | float): A count, or a fraction in (0, 1) (at least one sample).
        seed (int): Seed of the permutation.

    Returns:
        tuple[TokenizedDataset, TokenizedDataset]: Train and validation, each in the original order.

    Raises:
        DataError: The split would leave no training sample.
    """
    n = len(dataset)
    k = val_size if isinstance(val_size, int) else max(1, round(val_size * n))
    if k >= n:
        raise DataError(f"data.val_size={val_size} takes {k} of {n} samples and leaves none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return dataset.select(order[k:].sort().values), dataset.select(order[:k].sort().values)


def pack_dataset(dataset: TokenizedDataset, max_length: int) -> TokenizedDataset:
    """Pack samples greedily, in order, into rows of at most ``max_length`` tokens.

    A sample goes into the current row if it fits, else it starts a new row (next-fit: O(n), order kept).
    ``position_ids`` restart at 0 for each sample; the collator turns them into a block-diagonal mask.
    Labels need no change: every sample's first label is already -100, so no sample is trained to follow
    the previous one.

    Args:
        dataset (TokenizedDataset): Unpacked samples, each at most ``max_length`` tokens.
        max_length (int): Row length.

    Returns:
        TokenizedDataset: The packed rows, with ``position_ids``.
    """
    lengths = dataset.lengths().tolist()
    row_ends, used = [], 0
    for i, n in enumerate(lengths):
        if used + n > max_length and used > 0:
            row_ends.append(i)
            used = 0
        used += n
    row_ends.append(len(lengths))
    sample_starts = [0, *row_ends]
    offsets = dataset.offsets[torch.tensor(sample_starts)]
    # Position of each token inside its sample: 0, 1, ... restarting at every sample start.
    sample_start = dataset.offsets[:-1].repeat_interleave(dataset.lengths())  # [total_tokens]
    positions = torch.arange(len(dataset.input_ids)) - sample_start
    return TokenizedDataset(dataset.input_ids, dataset.labels, offsets, positions.int())


def load_dataset(
    config: DataConfig, tokenizer: Any
) -> tuple[TokenizedDataset, TokenizedDataset | None, DataStats]:
    """Load, validate, tokenize, check, split and (optionally) pack the data of a recipe.

    Args:
        config (DataConfig): The data section.
        tokenizer (PreTrainedTokenizerFast): The model's tokenizer (a fast one; with a chat template for chat).

    Returns:
        tuple[TokenizedDataset, TokenizedDataset | None, DataStats]: Train (packed rows when
        ``config.packing``), validation (never packed; None without ``val_path`` or ``val_size``), and stats.

    Raises:
        DataError: Missing/unreadable files, bad rows (unless skipped), no usable rows, or a fraction of
            target tokens below ``config.min_label_fraction``.
    """
    train_file = _load_file(Path(config.path), config, tokenizer)
    fraction = _check_targets(train_file, config, tokenizer)
    files = [train_file]
    train, dropped = _with_targets(train_file.dataset)
    val = None
    if config.val_path is not None:
        files.append(_load_file(Path(config.val_path), config, tokenizer))
        val, val_dropped = _with_targets(files[-1].dataset)
        dropped += val_dropped
        if len(val) == 0:
            raise DataError(f"{config.val_path}: no sample has a target token left after truncation")
    elif config.val_size:
        train, val = split_dataset(train, config.val_size, config.seed)
    if dropped:
        logger.warning(
            "dropped %d sample(s) left without targets by max_length=%d", dropped, config.max_length
        )
    stats = DataStats(
        format=train_file.format,
        train_samples=len(train),
        val_samples=0 if val is None else len(val),
        train_tokens=int(train.lengths().sum()),
        train_target_tokens=int(train.target_counts().sum()),
        target_fraction=fraction,
        truncated=sum(f.truncated for f in files),
        skipped_rows=sum(f.skipped_rows for f in files),
        dropped_no_target=dropped,
        longest=int(train.lengths().max()),
        cache_hit=all(f.cache_hit for f in files),
        bad_rows=[m for f in files for m in f.bad_rows],
    )
    if config.packing:
        train = pack_dataset(train, config.max_length)
        stats.packed_rows = len(train)
    return train, val, stats
