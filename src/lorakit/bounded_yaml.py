"""YAML for recipes and ``key=value`` overrides, read with limits: no input can exhaust memory or the stack.

PyYAML's ``safe_load`` already refuses Python tags, but it expands aliases (a 600-byte "billion laughs" recipe
grows to gigabytes), recurses once per nesting level (a deep ``[[[[...`` ends in a ``RecursionError``) and keeps
the last of two equal keys silently. This loader refuses aliases (anchors alone are harmless), caps the text's
size and its nesting depth, and makes a repeated key an error naming both lines. Every failure is a
:class:`~lorakit.errors.ConfigError` naming the source and the line; echoed values are cut by :func:`shown`.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from lorakit.errors import ConfigError

MAX_YAML_BYTES = 1 << 20  # a recipe is a few hundred bytes; 1 MiB leaves room for long target lists
MAX_YAML_DEPTH = 32  # a recipe nests 3 levels (section, key, list or mapping)
SHOWN_CHARS = 80  # the longest value echoed in an error message
_OPENERS = re.compile(r"(?:[\[{]\s*){" + str(MAX_YAML_DEPTH + 1) + "}")  # that many flow openers in a row


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters (``...`` and the full length mark a cut one).

    The repr of a huge value is never built whole: containers are summarized by type and size first.
    """
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # a deeply nested value, a >4300-digit integer
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} chars)"


def cut(text: str, limit: int = 400) -> str:
    """``text`` cut to about ``limit`` characters (for messages quoted from other libraries)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} chars)"


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases, with a depth limit and duplicate keys as errors."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source, self.depth = source, 0

    def _error(self, mark: yaml.Mark | None, message: str) -> ConfigError:
        where = f"{self.source}, line {mark.line + 1}" if mark is not None else self.source
        return ConfigError(f"{where}: {message}")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise self._error(
                event.start_mark,
                f"YAML aliases (*{shown(event.anchor, 40)}) are not allowed here: write the value out",
            )
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise self._error(self.peek_event().start_mark, f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class says so below
                continue
            if first is not None:
                raise self._error(
                    key_node.start_mark, f"the key {shown(key, 40)} appears twice (first on line {first})"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str | bytes, source: str) -> Any:
    """Parse one YAML document with the limits above.

    Args:
        text (str | bytes): The YAML text (bytes must be UTF-8).
        source (str): Where it comes from, for messages (a file name, ``override 'train.lr=...'``).

    Returns:
        Any: The plain data (mappings, lists, scalars); None for an empty document.

    Raises:
        ConfigError: Too large, not UTF-8, invalid YAML, an alias, too deep, a repeated key, or a tag PyYAML's
            safe loader refuses (``!!python/...``); the message names ``source`` and the line.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {len(text)} bytes; the limit is {MAX_YAML_BYTES} (1 MiB)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{source}: not UTF-8 text (byte {err.start}); save the file as UTF-8"
            ) from None
    if _OPENERS.search(text):  # cheap first: PyYAML scans a whole flow collection before composing it
        raise ConfigError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels")
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {cut(str(err), 400)}") from None
    except (ValueError, OverflowError, RecursionError) as err:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{source}: invalid YAML value: {cut(str(err), 200)}") from None
    finally:
        loader.dispose()


__all__ = ["MAX_YAML_BYTES", "MAX_YAML_DEPTH", "cut", "load_yaml", "shown"]
