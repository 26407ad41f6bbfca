"""Data files -> rows -> rendered text with target character spans.

Three formats, each rendered to one string plus the character spans the loss is computed on:

* alpaca: ``{"instruction", "input" (optional), "output"}`` with the Stanford Alpaca prompt template;
* chat: OpenAI ``{"messages": [{"role", "content"}]}`` or ShareGPT ``{"conversations": [{"from", "value"}]}``,
  rendered by the tokenizer's own chat template; the targets are the assistant turns;
* text: ``{"text"}`` rows or a ``.txt`` file; the whole text is the target.

Token ids come later (:mod:`lorakit.data.encode`): working in characters here lets one tokenization of the
whole string decide which tokens are targets (by offsets), so no token boundary is changed by the mask.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from lorakit.data.config import DataError

# The Stanford Alpaca templates (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_RESPONSE_MARKER = "### Response:\n"

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's message roles

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def format_alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one instruction, ending with ``### Response:\\n`` (what generation continues).

    Args:
        instruction (str): The task.
        input (str): Optional context; empty selects the template without the ``### Input:`` section.

    Returns:
        str: The prompt text.
    """
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


class Row(NamedTuple):
    """One parsed row: its position in the file (for ordering), where it is (``file:line`` or ``file[i]``)."""

    index: int
    location: str
    value: Any


class BadRow(NamedTuple):
    """A row that cannot be used, with its position and a message that starts with its location."""

    index: int
    message: str


class Rendered(NamedTuple):
    """A row rendered to text.

    Attributes:
        text (str): The full sample text.
        targets (list[tuple[int, int]]): Character spans ``[start, end)`` whose tokens are loss targets.
        final_span (tuple[int, int] | None): The span that must end the sample with a stop token (EOS or the
            chat template's end-of-turn); EOS is inserted after it when it holds none. None when the sample
            does not end with something the model should learn to stop after (a chat ending on a user turn).
        add_special_tokens (bool): Whether tokenization adds the tokenizer's own BOS (False for chat: the
            template writes it).
    """

    text: str
    targets: list[tuple[int, int]]
    final_span: tuple[int, int] | None
    add_special_tokens: bool


class BadRowError(Exception):
    """Raised by :func:`render_row` for a malformed row; the caller adds the location."""


def read_rows(path: Path) -> tuple[list[Row], list[BadRow]]:
    """Parse a ``.json``, ``.jsonl`` or ``.txt`` data file.

    Args:
        path (Path): The file.

    Returns:
        tuple[list[Row], list[BadRow]]: The parsed rows and the JSON Lines lines that are not valid JSON
        (those are bad rows, reported or skipped like any other).

    Raises:
        DataError: The file is missing, unreadable, not valid JSON (``.json``; with line and column), not a
            list of rows, or holds no rows.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check data.path / data.val_path)")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from e
    rows: list[Row] = []
    bad: list[BadRow] = []
    suffix = path.suffix.lower()
    if suffix == ".txt":
        # A sample is a block of text between blank lines; its location is the block's first line.
        for match in re.finditer(r"\S(?:.|\n(?!\s*\n))*", content):
            line = content.count("\n", 0, match.start()) + 1
            rows.append(Row(len(rows), f"{path}:{line}", {"text": match.group().rstrip()}))
    elif suffix == ".jsonl":
        for number, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(Row(number, f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(BadRow(number, f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})"))
            except (ValueError, RecursionError) as e:  # nested too deeply, a >4300-digit number
                bad.append(BadRow(number, f"{path}:{number}: not usable JSON ({type(e).__name__}: {e!s:.80})"))
    else:
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            hint = " (one JSON object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}{hint}") from e
        except (ValueError, RecursionError) as e:  # nested too deeply, a >4300-digit number
            raise DataError(f"{path}: not usable JSON: {type(e).__name__}: {e!s:.80}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got a JSON {type(data).__name__}")
        rows = [Row(i, f"{path}[{i}]", value) for i, value in enumerate(data)]
    if not rows and not bad:
        raise DataError(f"data file {path} holds no rows")
    return rows, bad


def detect_format(rows: list[Row], path: Path) -> str:
    """The format of a file from its first row that is a JSON object (a ``.txt`` file is text).

    Raises:
        DataError: No row has the keys of a known format.
    """
    if path.suffix.lower() == ".txt":
        return "text"
    first = next((row for row in rows if isinstance(row.value, dict)), None)
    if first is None:
        raise DataError(f"{path}: no row is a JSON object, cannot detect the data format")
    keys = set(first.value)
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if keys & {"messages", "conversations"}:
        return "chat"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{first.location}: cannot detect the data format from the keys {sorted(keys)}; expected "
        "instruction/output (alpaca), messages or conversations (chat), or text; or set data.format"
    )


def _string(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if key not in row:
        raise BadRowError(f"missing field {key!r}")
    if not isinstance(value, str):
        raise BadRowError(f"field {key!r}: expected a string, got {type(value).__name__}")
    check_unicode(value, f"field {key!r}")
    if required and not value.strip():
        raise BadRowError(f"field {key!r} is empty")
    return value


def check_unicode(text: str, where: str) -> None:
    """Refuse a lone surrogate (JSON allows ``"\\ud800"``; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRowError(f"{where}: holds {text[e.start]!r}, a lone surrogate (not valid Unicode)") from None


def chat_messages(row: dict) -> list[dict[str, str]]:
    """The OpenAI-style messages of a chat row (ShareGPT ``conversations`` mapped to user/assistant/system).

    Raises:
        BadRowError: The row has no messages, a message without a string role and content, an unknown
            ShareGPT speaker, or an empty assistant message.
    """
    sharegpt = "messages" not in row and "conversations" in row
    key = "conversations" if sharegpt else "messages"
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRowError(f"field {key!r}: expected a non-empty list of messages, got {turns!r:.60}")
    messages = []
    for i, turn in enumerate(turns):
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        if not isinstance(turn, dict):
            raise BadRowError(f"{key}[{i}]: expected an object, got {type(turn).__name__}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRowError(
                f"{key}[{i}]: expected string {role_key!r} and {content_key!r}, got {turn!r:.80}"
            )
        check_unicode(content, f"{key}[{i}].{content_key}")
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise BadRowError(
                    f"{key}[{i}]: unknown speaker {role!r}, expected one of {sorted(SHAREGPT_ROLES)}"
                )
            role = SHAREGPT_ROLES[role]
        elif role not in CHAT_ROLES:
            raise BadRowError(f"{key}[{i}]: unknown role {role[:40]!r}, expected one of {', '.join(CHAT_ROLES)}")
        if role == "assistant" and not content.strip():
            raise BadRowError(f"{key}[{i}]: empty assistant message")
        messages.append({"role": role, "content": content})
    return messages


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``text`` (the rendered conversation), in order.

    Turn ``i`` spans from the end of the prompt that asks for it (the conversation before it plus the
    generation prompt) to the end of the conversation rendered through it, end-of-turn tokens included. This
    needs a template that renders a conversation's prefixes as prefixes of its text; one that rewrites
    history (e.g. drops the reasoning of earlier turns) is refused.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(prompt)) or len(through) == len(prompt):
            raise BadRowError(
                "the chat template does not render conversation prefixes as prefixes of the whole "
                "conversation, so the assistant turns cannot be located; use data.train_on=all"
            )
        spans.append((len(prompt), len(through)))
    return spans


def _render_chat_row(row: dict, tokenizer: Any, train_on: str) -> Rendered:
    messages = chat_messages(row)
    ends_with_reply = messages[-1]["role"] == "assistant"
    try:
        text = _render_chat(tokenizer, messages)
        spans = _assistant_spans(tokenizer, messages, text) if train_on == "response" else [(0, len(text))]
    except BadRowError:
        raise
    except Exception as e:  # a template raising on this conversation (e.g. roles that do not alternate)
        raise BadRowError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not spans:
        raise BadRowError("no assistant message: nothing to train on (or set data.train_on=all)")
    # With train_on=all the final span is the whole text: any end-of-turn token in it counts as the stop.
    return Rendered(text, spans, spans[-1] if ends_with_reply else None, add_special_tokens=False)


def render_row(value: Any, fmt: str, train_on: str, tokenizer: Any) -> Rendered:
    """Validate one row and render it to text with its target spans.

    Args:
        value (Any): The parsed row.
        fmt (str): ``"alpaca"``, ``"chat"`` or ``"text"``.
        train_on (str): ``"response"`` or ``"all"``.
        tokenizer (PreTrainedTokenizerBase): Used for its chat template (chat only).

    Returns:
        Rendered: The text and its spans.

    Raises:
        BadRowError: A missing field, a wrong type, an empty output, or a template failure.
    """
    if not isinstance(value, dict):
        raise BadRowError(f"expected a JSON object, got {type(value).__name__}")
    if fmt == "chat":
        return _render_chat_row(value, tokenizer, train_on)
    if fmt == "alpaca":
        prompt = format_alpaca_prompt(_string(value, "instruction"), _string(value, "input", required=False))
        text = prompt + _string(value, "output")
        response = (len(prompt), len(text))
        targets = [response] if train_on == "response" else [(0, len(text))]
        return Rendered(text, targets, response, add_special_tokens=True)
    text = _string(value, "text")
    return Rendered(text, [(0, len(text))], (0, len(text)), add_special_tokens=True)
