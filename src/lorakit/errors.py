"""Typed errors. Each one says what is wrong, where, and how to fix it.

Every error lorakit raises on bad input derives from :class:`LorakitError`, so callers can catch one type;
the subclasses also derive from the builtin exception a Python user would expect (``ValueError`` for bad
values, ``FileNotFoundError`` for missing files), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error lorakit raises on bad input."""


class ConfigError(LorakitError, ValueError):
    """A configuration field has a value that cannot work (names the field, expected vs got).

    Args:
        message (str): The whole message, e.g. ``"LoraConfig.r must be a positive integer, got 0"``.
        field (str | None): The field it is about (``"r"``), when it is about one.
        detail (str | None): What follows the field's name in ``message`` (``" must be a positive integer,
            got 0"``), so that a caller that names the field otherwise (a recipe's ``adapter.r``) can say the same.
    """

    def __init__(self, message: str, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.field, self.detail = field, detail


class TargetModuleError(LorakitError, ValueError):
    """The adapter's target modules do not match the model (lists what the model has)."""


class AdapterMismatchError(LorakitError, ValueError):
    """An adapter file does not fit the model it is loaded into (names the first mismatch)."""


class AdapterPathError(LorakitError, ValueError):
    """An adapter path is not inside the adapter root (absolute elsewhere, ``..``, or a symlink escaping it)."""


class AdapterFileError(LorakitError, OSError):
    """An adapter or model file is missing, unreadable or corrupt (names the file)."""


class QuantizationError(LorakitError, ValueError):
    """A tensor cannot be quantized as asked (names the tensor and the reason)."""


class MergeError(LorakitError, ValueError):
    """Merging an adapter would produce non-finite weights or is not possible for this layer."""
