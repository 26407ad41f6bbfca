"""Which modules of a model an adapter config targets: PEFT's matching rules, presets, "all-linear", the head.

Paths are those of the unwrapped model: existing adapter wrappers are seen through, so a second adapter finds the
same modules as the first.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.base import AdapterLinear, base_layer_shape, is_quantized
from lorakit.config import ALL_LINEAR, TARGET_PRESETS, LoraConfig
from lorakit.errors import TargetModuleError
from lorakit.methods import method_of

_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
# The parts of an adapter wrapper: its base layer, the adapters' own modules, modules_to_save copies.
_WRAPPER_PART = re.compile(
    r"\.(base_layer|lora_[A-Za-z_]+|qr_[A-Za-z_]+|modules_to_save|original_module)(\.|$)"
)


def wrapper_parts(path: str) -> bool:
    """Whether module ``path`` lies inside an adapter wrapper (a base layer, adapter weights, a saved copy)."""
    return _WRAPPER_PART.search(path) is not None


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or is_quantized(module)


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules by path, seen through existing wrappers (paths as in the unwrapped model)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            found[name] = module.base_layer
        elif _is_linear_like(module) and not wrapper_parts(name):
            found[name] = module
    return found


def _matches(patterns: list[str] | str, path: str) -> bool:
    """PEFT's matching: a string is a full regex; a list matches the whole path or a ``.suffix``."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return path in patterns or any(path.endswith(f".{p}") for p in patterns)


def _layer_index_ok(config: LoraConfig, path: str) -> bool:
    if config.layers_to_transform is None:
        return True
    wanted = config.layers_to_transform
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    patterns = config.layers_pattern
    if not patterns:
        match = _LAYER_INDEX.match(path)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return match is not None and int(match.group("idx")) in wanted


SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # the task heads of transformers' classification models


def head_module_path(model: nn.Module) -> str | None:
    """Path of the model's output head: the LM head, or else a classification head (``score``/``classifier``).

    The head is never wrapped by ``"all-linear"`` and never quantized: PEFT skips the LM head the same way, and a
    classification head is newly initialized for the task, so it is trained in full (``modules_to_save``).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        head = next(
            (getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)),
            None,
        )
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def in_head(path: str, head: str | None) -> bool:
    """Whether module ``path`` is the head ``head`` (see :func:`head_module_path`) or inside it."""
    return head is not None and (path == head or path.startswith(head + "."))


def _linear_names_hint(candidates: dict[str, nn.Module]) -> str:
    suffixes = sorted({path.rsplit(".", 1)[-1] for path in candidates})
    return ", ".join(suffixes) if suffixes else "(none)"


def resolve_targets(model: nn.Module, config: LoraConfig, strict: bool = True) -> list[str]:
    """Paths of the modules ``config`` targets in ``model``, and a concrete ``target_modules`` list.

    ``"all-linear"`` and presets are resolved to the suffix names found in the model, and the config is
    updated with that list so the saved ``adapter_config.json`` names real modules (as PEFT does).

    Args:
        model (nn.Module): The model to search.
        config (LoraConfig): The adapter config; ``target_modules`` may be rewritten to a list.
        strict (bool): Each name of a user-given list must match some module.

    Raises:
        TargetModuleError: Nothing matches, or (strict) a listed name matches nothing; the message lists the
            model's linear module names.
    """
    candidates = _base_modules(model)
    saved = set()
    for pattern in config.modules_to_save or []:
        saved |= {p for p in candidates if re.match(rf"(^|.*\.){re.escape(pattern)}($|\..*)", p)}
    target = config.target_modules if config.target_modules is not None else "minimal"
    if target == ALL_LINEAR:
        head = head_module_path(model)
        paths = [p for p in candidates if not in_head(p, head)]
        target = sorted({p.rsplit(".", 1)[-1] for p in paths})
        # A name shared with a head layer (e.g. RoBERTa's classifier.dense) would re-include it: keep exact paths.
        if any(_matches(target, p) for p in candidates if in_head(p, head)):
            target = sorted(paths)
    elif isinstance(target, str) and target in TARGET_PRESETS:
        present = [s for s in TARGET_PRESETS[target] if any(_matches([s], p) for p in candidates)]
        if not present:
            raise TargetModuleError(
                f"target_modules preset {target!r} matches no module of {type(model).__name__}; "
                f"its linear modules are: {_linear_names_hint(candidates)}. Use a list of these names."
            )
        target = present
    elif isinstance(target, list) and strict:
        for name in target:
            if not any(_matches([name], p) for p in candidates):
                raise TargetModuleError(
                    f"target_modules entry {name!r} matches no linear module of {type(model).__name__}; "
                    f"its linear modules are: {_linear_names_hint(candidates)}"
                )
    config.target_modules = target
    paths = [
        p
        for p in candidates
        if p not in saved
        and _matches(target, p)
        and not (config.exclude_modules and _matches(config.exclude_modules, p))
        and _layer_index_ok(config, p)
    ]
    if not paths:
        raise TargetModuleError(
            f"target_modules={target!r} matches no linear module of {type(model).__name__}"
            f"{' in layers ' + str(config.layers_to_transform) if config.layers_to_transform is not None else ''}; "
            f"its linear modules are: {_linear_names_hint(candidates)}"
        )
    return paths


def count_parameters(model: nn.Module, config: Any) -> int:
    """Trainable parameters an adapter of ``config`` (any method) would have on ``model``, from shapes alone.

    Needs only module shapes, so it works on a model built on the meta device (where, e.g., no QR can run).

    Raises:
        ConfigError: The count needs the weights (a QR-LoRA rank chosen by energy).
    """
    layer, modules = method_of(config).layer, _base_modules(model)
    paths = resolve_targets(model, config, strict=True)
    return sum(layer.parameter_count(config, path, *base_layer_shape(modules[path])) for path in paths)
