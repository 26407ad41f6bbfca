"""Rendered rows -> token ids and labels, in-process or in spawned worker processes.

Each rendered text is tokenized once, with offsets; a token is a target when its characters overlap a target
span. Then EOS is ensured after the final response, the first label is masked (nothing predicts the first
token, and in a packed row it would otherwise be predicted from the previous sample), and the sample is
truncated to ``max_length``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

from lorakit.data.formats import BadRow, BadRowError, Rendered, Row, render_row

IGNORE_INDEX = -100
PROBE_USER, PROBE_REPLY = "lorakit probe question", "lorakit probe reply"


@dataclass(frozen=True)
class EncodeSpec:
    """Everything besides the tokenizer that decides how a row is encoded (it travels to the workers).

    Attributes:
        format (str): ``"alpaca"``, ``"chat"`` or ``"text"`` (resolved, never ``"auto"``).
        train_on (str): ``"response"`` or ``"all"``.
        max_length (int): Truncation length in tokens.
        eos_id (int): The token inserted when a response does not end with a stop token.
        stop_ids (tuple[int, ...]): Tokens that end a response: EOS and the chat template's end-of-turn.
    """

    format: str
    train_on: str
    max_length: int
    eos_id: int
    stop_ids: tuple[int, ...]


class Encoded(NamedTuple):
    """One tokenized sample: ids and labels of equal length (labels are -100 where there is no loss)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``).

    Found by rendering a two-message probe conversation and taking the first special or added token after the
    reply. Generation should stop on it as well as on EOS.

    Args:
        tokenizer (PreTrainedTokenizerBase): A tokenizer, with or without a chat template.

    Returns:
        int | None: The token id, or None without a chat template or when the template writes no such token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that refuses the probe (e.g. one requiring a system turn) has no known EOT
        return None
    if PROBE_REPLY not in text:
        return None
    after = text[text.rindex(PROBE_REPLY) + len(PROBE_REPLY) :]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return next((t for t in tokenizer(after, add_special_tokens=False)["input_ids"] if t in special), None)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a response: EOS, then the chat template's end-of-turn token if it differs.

    Args:
        tokenizer (PreTrainedTokenizerBase): The tokenizer.

    Returns:
        list[int]: Possibly empty, without duplicates.
    """
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _overlapping(offsets: list[tuple[int, int]], span: tuple[int, int]) -> range:
    """Indices of the tokens whose characters overlap ``span`` (zero-width special tokens never do)."""
    start, end = span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    return range(hits[0], hits[-1] + 1) if hits else range(0)


def _encode_one(
    rendered: Rendered, ids: list[int], offsets: list[tuple[int, int]], spec: EncodeSpec
) -> Encoded:
    labels = [IGNORE_INDEX] * len(ids)
    for span in rendered.targets:
        for i in _overlapping(offsets, span):
            labels[i] = ids[i]
    if rendered.final_span is not None:
        final = _overlapping(offsets, rendered.final_span)
        if not any(ids[i] in spec.stop_ids for i in final):
            # Teach the model to stop: EOS right after the response, as a target.
            at = final.stop if final else len(ids)
            ids = [*ids[:at], spec.eos_id, *ids[at:]]
            labels = [*labels[:at], spec.eos_id, *labels[at:]]
    labels[0] = IGNORE_INDEX
    truncated = len(ids) > spec.max_length
    return Encoded(ids[: spec.max_length], labels[: spec.max_length], truncated)


def encode_rows(rows: list[Row], tokenizer: Any, spec: EncodeSpec) -> list[Encoded | BadRow]:
    """Render, tokenize (one batched call) and label rows, in order.

    Args:
        rows (list[Row]): Parsed rows.
        tokenizer (PreTrainedTokenizerFast): A fast tokenizer (offsets are needed).
        spec (EncodeSpec): How to encode.

    Returns:
        list[Encoded | BadRow]: One result per row: the sample, or the row's error.
    """
    results: list[Encoded | BadRow | None] = [None] * len(rows)
    good: list[tuple[int, Rendered]] = []
    for i, row in enumerate(rows):
        try:
            good.append((i, render_row(row.value, spec.format, spec.train_on, tokenizer)))
        except BadRowError as e:
            results[i] = BadRow(row.index, f"{row.location}: {e}")
    if good:
        batch = tokenizer(
            [r.text for _, r in good],
            add_special_tokens=spec.format != "chat",
            return_offsets_mapping=True,
        )
        for k, (i, rendered) in enumerate(good):
            ids, offsets = batch["input_ids"][k], batch["offset_mapping"][k]
            if not ids:
                results[i] = BadRow(rows[i].index, f"{rows[i].location}: the text tokenizes to nothing")
            else:
                results[i] = _encode_one(rendered, ids, offsets, spec)
    return results  # type: ignore[return-value]  # every slot is filled above


_WORKER_STATE: tuple[Any, EncodeSpec] | None = None


def _init_worker(tokenizer: Any, spec: EncodeSpec) -> None:
    global _WORKER_STATE
    # The processes are the parallelism; Rust threads inside each would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_STATE = (tokenizer, spec)


def _encode_chunk(rows: list[Row]) -> list[Encoded | BadRow]:
    assert _WORKER_STATE is not None, "worker not initialized"
    return encode_rows(rows, *_WORKER_STATE)


def encode_all(
    rows: list[Row], tokenizer: Any, spec: EncodeSpec, num_workers: int = 0, chunk_size: int = 512
) -> list[Encoded | BadRow]:
    """Encode rows in chunks, in this process (``num_workers=0``) or in a pool of spawned processes.

    The result is the same either way and in row order. Spawn (not fork) is used everywhere: forking a process
    that holds torch or Rust thread pools can deadlock.

    Args:
        rows (list[Row]): Parsed rows.
        tokenizer (PreTrainedTokenizerFast): A fast tokenizer (pickled once to each worker).
        spec (EncodeSpec): How to encode.
        num_workers (int): Worker processes; 0 encodes in-process. Default 0.
        chunk_size (int): Most rows per tokenizer call / per task. Default 512.

    Returns:
        list[Encoded | BadRow]: One result per row.
    """
    if num_workers > 0:
        # Several chunks per worker keep them all busy to the end.
        chunk_size = max(1, min(chunk_size, math.ceil(len(rows) / (4 * num_workers))))
    chunks = [rows[i : i + chunk_size] for i in range(0, len(rows), chunk_size)]
    if num_workers == 0:
        return [result for chunk in chunks for result in encode_rows(chunk, tokenizer, spec)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer, spec)) as pool:
        return [result for chunk in pool.imap(_encode_chunk, chunks) for result in chunk]
