"""What a sweep searches: axes (``adapter.r=8,16,32``), the grid over them, and the seed's stages.

A config is a tuple of ``key=value`` overrides (the same strings ``lorakit train`` takes), so every config of a
sweep is an ordinary recipe plus overrides; its name, used for its output directory, is made from them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import yaml

from lorakit.errors import ConfigError
from lorakit.recipe import apply_overrides

# The seed's tuning order (docs/sweep.md): the capacity first, then the step size, then the regularization.
DEFAULT_STAGES = "r,target_modules:lr:lora_alpha,lora_dropout"


@dataclass(frozen=True)
class Axis:
    """One swept recipe key and its values.

    Attributes:
        key (str): Dotted recipe key, e.g. ``adapter.r``.
        values (tuple[str, ...]): The values as written (YAML scalars or flow lists such as ``[q_proj,v_proj]``).
    """

    key: str
    values: tuple[str, ...]

    @property
    def short(self) -> str:
        """The key without its section (``r``, ``lr``): what ``--stages`` names."""
        return self.key.rsplit(".", 1)[-1]


def split_values(text: str) -> list[str]:
    """Split ``8,16,[q_proj,v_proj]`` at the commas outside brackets."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_axes(items: list[str]) -> list[Axis]:
    """``["adapter.r=8,16", "train.lr=1e-4,2e-4"]`` -> axes; every key is checked against the recipe sections.

    Raises:
        ConfigError: An item without ``=``, an unknown key (the closest valid one), a repeated key, an empty value.
    """
    axes: list[Axis] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"sweep axis {item!r}: expected key=value1,value2, e.g. adapter.r=8,16,32")
        values = tuple(split_values(raw))
        if any(v == "" for v in values):
            raise ConfigError(f"sweep axis {item!r}: an empty value; separate values with single commas")
        for value in values:
            apply_overrides({}, [f"{key}={value}"])  # an unknown key fails here, with a suggestion
            yaml.safe_load(value)
        if key in (axis.key for axis in axes):
            raise ConfigError(f"sweep axis {key!r} is given twice; list all its values in one item")
        axes.append(Axis(key, values))
    if not axes:
        raise ConfigError("lorakit sweep: give at least one axis, e.g. adapter.r=8,16,32 train.lr=1e-4,2e-4")
    return axes


def grid(axes: list[Axis], fixed: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every combination of ``axes`` (first axis slowest), each after the ``fixed`` overrides."""
    return [
        (*fixed, *(f"{a.key}={v}" for a, v in zip(axes, combo)))
        for combo in itertools.product(*(a.values for a in axes))
    ]


def parse_stages(text: str, axes: list[Axis]) -> list[list[Axis]]:
    """``r,target_modules:lr:lora_alpha,lora_dropout`` -> the axes of each stage, in order.

    Stages are separated by ``:``, keys within a stage by ``,``; a key is an axis's short name (``r``) or full key
    (``adapter.r``). Keys that name no axis are skipped (the default stages name more than most sweeps vary); a stage
    left empty is dropped.

    Raises:
        ConfigError: An axis in no stage or in two, or no stage left.
    """
    by_name = {**{a.short: a for a in axes}, **{a.key: a for a in axes}}
    stages, seen = [], []
    for part in text.split(":"):
        stage = [by_name[k.strip()] for k in part.split(",") if k.strip() in by_name]
        seen += stage
        if stage:
            stages.append(stage)
    twice = sorted({a.key for a in seen if seen.count(a) > 1})
    missing = [a.key for a in axes if a not in seen]
    if twice or missing or not stages:
        raise ConfigError(
            f"--stages {text!r}: every swept key must be in exactly one stage; "
            + (f"in none: {missing}" if missing else f"in two: {twice}")
            + f" (axes: {', '.join(a.short for a in axes)})"
        )
    return stages


def config_name(overrides: tuple[str, ...]) -> str:
    """A directory name from a config's overrides: ``r=8_lr=0.0002`` (short keys, safe characters)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={re.sub(r'[^A-Za-z0-9._+-]+', '-', value).strip('-')}")
    return "_".join(parts) or "base"


def as_dict(overrides: tuple[str, ...]) -> dict[str, Any]:
    """``("adapter.r=8",)`` -> ``{"adapter.r": 8}`` (values parsed as YAML, as the recipe reads them)."""
    return {key: yaml.safe_load(value) for key, _, value in (o.partition("=") for o in overrides)}


__all__ = [
    "DEFAULT_STAGES",
    "Axis",
    "as_dict",
    "config_name",
    "grid",
    "parse_axes",
    "parse_stages",
    "split_values",
]
