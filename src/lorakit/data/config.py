"""The ``data`` section of a recipe: :class:`DataConfig`, validated in one place, and :class:`DataError`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ConfigError, LorakitError

FORMATS = ("auto", "alpaca", "chat", "text")
TRAIN_ON = ("response", "all")
ON_BAD_ROW = ("error", "skip")
EXTENSIONS = (".json", ".jsonl", ".txt")


class DataError(LorakitError, ValueError):
    """A data file cannot be used as asked: missing, unreadable, malformed rows, or (nearly) no training targets.

    The message names the file and the line (JSON Lines) or index (JSON list) of the first problems.
    """


def _fail(field: str, expected: str, got: object) -> ConfigError:
    return ConfigError(f"data.{field}: expected {expected}, got {got!r}")


def _is_int(value: object) -> bool:
    # bool is a subclass of int; `max_length: true` in YAML is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token ids and labels.

    Args:
        path (str | Path): Training data file: ``.json`` (a list of rows), ``.jsonl`` (one row a line) or
            ``.txt`` (plain text; samples are separated by blank lines).
        format (str): ``"auto"`` (default: detected from the first row's keys, ``instruction``/``output`` ->
            alpaca, ``messages``/``conversations`` -> chat, ``text`` -> text; a ``.txt`` file is text),
            ``"alpaca"``, ``"chat"`` or ``"text"``.
        train_on (str): ``"response"`` (default: loss on the response / assistant turns only) or ``"all"``.
        max_length (int): Longest sample in tokens; longer samples are truncated and counted. Default 512.
        packing (bool): Pack training samples into rows of up to ``max_length`` tokens, with position ids
            restarting per sample and no attention across samples. Default False.
        padding_free (bool): Train on padding-free batches: each micro-batch's samples (or packed rows) end to
            end in one row with per-sample positions, no pad token, the same loss as padded batches. Used where
            the model takes ``position_ids`` (else batches are padded). Default True.
        val_path (str | Path | None): A separate validation file (same formats). Default None.
        val_size (int | float): Validation samples split off the training file: a count (int >= 0) or a
            fraction in (0, 1). Default 0 (no split). Cannot be combined with ``val_path``.
        seed (int): Seed of the validation split. Default 0.
        on_bad_row (str): ``"error"`` (default: stop, listing the bad rows and their count) or ``"skip"``
            (drop them, count them in the stats).
        num_workers (int): Tokenize in this many worker processes; 0 (default) tokenizes in-process.
        cache_dir (str | Path | None): Directory of the on-disk tokenization cache; None (default) disables it.
        min_label_fraction (float): Stop before training if fewer than this fraction of the training tokens
            are targets (the sign of a masking mistake that makes the loss zero). Default 0.01.
    """

    path: str | Path
    format: str = "auto"
    train_on: str = "response"
    max_length: int = 512
    packing: bool = False
    padding_free: bool = True
    val_path: str | Path | None = None
    val_size: int | float = 0
    seed: int = 0
    on_bad_row: str = "error"
    num_workers: int = 0
    cache_dir: str | Path | None = None
    min_label_fraction: float = 0.01

    def __post_init__(self) -> None:
        for field in ("path", "val_path"):
            value = getattr(self, field)
            if value is None and field == "val_path":
                continue
            if not isinstance(value, (str, Path)) or not str(value):
                raise _fail(field, "a file path", value)
            if Path(value).suffix.lower() not in EXTENSIONS:
                raise _fail(field, f"a file ending in one of {', '.join(EXTENSIONS)}", str(value))
        for field, choices in (("format", FORMATS), ("train_on", TRAIN_ON), ("on_bad_row", ON_BAD_ROW)):
            if getattr(self, field) not in choices:
                raise _fail(field, f"one of {', '.join(map(repr, choices))}", getattr(self, field))
        if self.format not in ("auto", "text") and Path(self.path).suffix.lower() == ".txt":
            raise _fail("format", "'text' or 'auto' for a .txt file", self.format)
        if not _is_int(self.max_length) or self.max_length < 2:
            raise _fail("max_length", "an int >= 2", self.max_length)
        for field in ("packing", "padding_free"):
            if not isinstance(getattr(self, field), bool):
                raise _fail(field, "true or false", getattr(self, field))
        if isinstance(self.val_size, float) and self.val_size >= 1 and self.val_size.is_integer():
            self.val_size = int(self.val_size)  # `val_size=5` read as 5.0 (YAML, CLI) is a count
        if _is_int(self.val_size):
            if self.val_size < 0:
                raise _fail("val_size", "a count >= 0 or a fraction in (0, 1)", self.val_size)
        elif not isinstance(self.val_size, float) or not 0.0 < self.val_size < 1.0:
            raise _fail("val_size", "a count >= 0 or a fraction in (0, 1)", self.val_size)
        if self.val_path is not None and self.val_size:
            raise _fail(
                "val_size", "0 when data.val_path is set (one source of validation data)", self.val_size
            )
        if not _is_int(self.seed):
            raise _fail("seed", "an int", self.seed)
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise _fail("num_workers", "an int >= 0", self.num_workers)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, Path)):
            raise _fail("cache_dir", "a directory path or null", self.cache_dir)
        fraction = self.min_label_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
            raise _fail("min_label_fraction", "a number in [0, 1)", fraction)
