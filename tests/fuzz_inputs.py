"""Seeded generators of malformed inputs for tests/test_fuzz.py: recipes, dotted overrides, data rows, HTTP bodies.

Each generator mixes structural attacks (alias bombs, deep nesting, huge numbers, invalid UTF-8, lone surrogates,
tags, duplicate keys) with type confusion on real fields (a list where a number goes, a mapping for a string ...),
so both the parser limits and the field validation are reached. Everything derives from one ``random.Random``.
"""

from __future__ import annotations

import json
import random

RECIPE_FIELDS = {
    "model": ["path", "quantize", "double_quant", "blocksize", "compute_dtype", "gradient_checkpointing"],
    "adapter": ["method", "r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "init_lora_weights", "stack_on", "exclude_modules"],
    "data": ["path", "format", "max_length", "packing", "train_on", "val_size", "on_bad_row"],
    "train": ["epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_ratio", "scheduler", "optimizer",
              "seed", "keep_last", "precision", "loraplus_ratio", "save_every"],
}  # fmt: skip

YAML_VALUES = [
    "-1", "0", "1e309", "-.inf", ".nan", "1" + "0" * 40, "9" * 5000, "null", "~", "''", "[]", "{}", "[1, [2, [3]]]",
    "{a: 1}", "yes", "no", "'x' ", "!!binary aGVsbG8=", "!!python/object/apply:os.system ['true']", "!!set {a, b}",
    "2001-12-14", "&a [1, 2]", "*nope", "[&b x, *b, *b]", "'\\u0000'", '"\\ud800"', "|\n  block", "hello world",
    "[" * 60 + "]" * 60, "{" * 40 + "}" * 40, "'" + "x" * 20000 + "'", "0x1F", "0o17", "+12_000", "1:2:3",
]  # fmt: skip


def _alias_bomb(rng: random.Random) -> str:
    levels = rng.randint(3, 9)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines)


def malformed_recipe(rng: random.Random) -> bytes:
    """A recipe file's bytes, malformed in one or several ways."""
    kind = rng.randrange(8)
    if kind == 0:
        return (_alias_bomb(rng) + "\n").encode()
    if kind == 1:  # top level not a mapping, or nothing
        return rng.choice(
            [b"", b"# only a comment\n", b"- a\n- b\n", b"42\n", b"'text'\n", b"null\n", b"[[[]]]"]
        )
    if kind == 2:  # not UTF-8
        return b"model:\n  path: " + bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 8))) + b"\n"
    if kind == 3:  # deep nesting in a field
        depth = rng.choice([40, 500, 20000])
        return f"model: {{path: m}}\ntrain:\n  lr: {'[' * depth}{']' * depth}\n".encode()
    if kind == 4:  # duplicate keys
        section = rng.choice(list(RECIPE_FIELDS))
        name = rng.choice(RECIPE_FIELDS[section])
        return f"model: {{path: m}}\n{section}:\n  {name}: 1\n  {name}: 2\n".encode()
    lines = ["model:", "  path: /nonexistent/model"]
    for _ in range(rng.randint(1, 5)):  # type confusion on real fields, or unknown keys
        section = rng.choice(list(RECIPE_FIELDS))
        name = rng.choice([*RECIPE_FIELDS[section], "bogus_key", "rank", "lr " * 3])
        lines += [f"{section}:", f"  {name}: {rng.choice(YAML_VALUES)}"]
    if kind == 7:
        lines.append(
            rng.choice(["output_dir: [1]", "overwrite: maybe", "output_dir: ''", "extra: 1", ": bare"])
        )
    return ("\n".join(lines) + "\n").encode()


def malformed_override(rng: random.Random) -> str:
    """One ``key=value`` override, malformed in its key, its value or both."""
    section = rng.choice([*RECIPE_FIELDS, "trian", "", "output_dir", "model.path"])
    name = rng.choice([*RECIPE_FIELDS.get(section, ["x"]), "nope", "", "a.b"])
    key = rng.choice([f"{section}.{name}", section, f"{section}..{name}", f"{name}"])
    value = rng.choice(
        [*YAML_VALUES, _alias_bomb(rng).replace("\n", " ; "), "[1,2", "{a: ", "!!python/name:os.system"]
    )
    return rng.choice([f"{key}={value}", key, f"={value}", f"{key}=", f"{key}=={value}"])


def _deep_json(rng: random.Random) -> str:
    depth = rng.choice([100, 5000, 200000])
    return "[" * depth + "]" * depth


def malformed_data_row(rng: random.Random) -> str:
    """One JSON Lines line: bad JSON, wrong types, missing fields, unknown roles, invalid Unicode."""
    text = rng.choice(["hello", "", " ", "x" * 5000, "a\\ud800b", "\\udfff", "\\u0000", "é🙂"])
    chat_role = rng.choice(["user", "assistant", "robot", 7, None, "", "SYSTEM"])
    rows = [
        _deep_json(rng), "{", '{"text": ' + "9" * 5000 + "}", '"just a string"', "[1, 2]", "null", "NaN",
        json.dumps({"instruction": rng.choice([1, None, [], {}]), "output": "x"}),
        '{"instruction": "' + text + '", "output": "' + text + '"}',
        json.dumps({"messages": [{"role": chat_role, "content": "hi"}, {"role": "assistant", "content": "ok"}]}),
        json.dumps({"messages": rng.choice([[], "hi", [1], [{"role": "user"}], None])}),
        json.dumps({"conversations": [{"from": rng.choice(["human", "alien", 3]), "value": "hi"}]}),
        '{"text": "' + text + '"}', json.dumps({"text": rng.choice([1, [], {}, True])}),
    ]  # fmt: skip
    return rng.choice(rows)


def malformed_http_body(rng: random.Random) -> tuple[str, bytes]:
    """``(path, body bytes)`` for a POST: bad JSON, wrong types on every OpenAI field, huge or deep values."""
    path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/adapters"])
    base: dict = {
        "model": "base",
        "prompt": "hi",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    junk = rng.choice(
        [None, True, -1, 0, 10**40, 1.5, "x", "", [], [1], {}, {"a": 1}, "\ud800", [[[]]], "base"]
    )
    field = rng.choice(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                        "stream", "stream_options", "ignore_eos", "name", "path", "max_completion_tokens"])  # fmt: skip
    kind = rng.randrange(6)
    if kind == 0:
        return path, rng.choice([b"{", b"[]", b"null", b'"s"', b"{'a': 1}", b"\xff\xfe", b"{}" * 3, b"NaN"])
    if kind == 1:
        return path, ('{"model": "base", "prompt": ' + _deep_json(rng) + "}").encode()
    if kind == 2:
        return path, b'{"model": "base", "prompt": "hi", "max_tokens": ' + b"9" * rng.choice(
            [50, 5000]
        ) + b"}"
    if kind == 3:
        return path, b'{"model": "base", "prompt": "hi", "temperature": ' + rng.choice(
            [b"NaN", b"Infinity"]
        ) + b"}"
    body = {**base, field: junk}
    if kind == 5:
        body["messages"] = [{"role": junk, "content": junk}]
    try:
        return path, json.dumps(body).encode()
    except ValueError:
        return path, b"{"


__all__ = ["malformed_data_row", "malformed_http_body", "malformed_override", "malformed_recipe"]
