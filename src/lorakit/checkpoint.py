"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

A checkpoint is a directory ``checkpoints/step-000120/`` holding the adapter in its method's format (AdaLoRA
untrimmed: every component, pruned or not, so a pruned one can come back after a resume), the optimizer
state as safetensors (tensors) + JSON (hyper-parameters), and ``trainer_state.json`` (step, data position,
scheduler, RNG states, metrics so far). An AdaLoRA run adds the rank allocator's importance EMAs
(``adalora_state.safetensors``) and its rank pattern (in ``trainer_state.json``). It is written into a temporary directory and renamed into place, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half of one. Nothing is
pickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.adapters.rank_allocator import AdaLoraController
from lorakit.errors import AdapterFileError
from lorakit.files import (
    CONFIG_NAME,
    INT8_WEIGHTS_NAME,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    read_adapter_weights,
)
from lorakit.io import save_adapter
from lorakit.methods import AdaLoraTraining, TrainingHooks
from lorakit.walk import adapter_state_dict

STATE_NAME = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_TENSORS = "rng.safetensors"
ADALORA_TENSORS = "adalora_state.safetensors"  # AdaLoraTraining.name + "_state.safetensors"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU and CUDA) and Python RNG states, as tensors and JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _hooks_of(hooks: TrainingHooks | None, controller: AdaLoraController | None) -> TrainingHooks | None:
    """The run's hooks; a bare AdaLoRA controller (the older argument) is wrapped in its hooks."""
    return hooks if controller is None else AdaLoraTraining(controller)


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    adapter_name: str = "default",
    controller: AdaLoraController | None = None,
    hooks: TrainingHooks | None = None,
) -> Path:
    """Write a checkpoint atomically into ``directory`` (replacing an older one of the same name).

    Args:
        directory (str | PathLike): Final checkpoint directory, e.g. ``out/checkpoints/step-000120``.
        model (nn.Module): The wrapped model.
        optimizer (Optimizer): Its optimizer.
        state (dict): JSON-serializable trainer state (step, data position, scheduler state, metrics).
        adapter_name (str): The adapter being trained.
        controller (AdaLoraController | None): An AdaLoRA run's rank allocator (same as its ``hooks``).
        hooks (TrainingHooks | None): The method's hooks of this run; what they keep is saved with it
            (``<name>_state.safetensors`` and ``trainer_state.json[<name>]``). Default None.

    Returns:
        Path: ``directory``.
    """
    hooks = _hooks_of(hooks, controller)
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp, adapter_name, trim=False)  # AdaLoRA untrimmed: a pruned component can come back
    payload_extra = {}
    kept = hooks.checkpoint_state() if hooks is not None else None
    if kept is not None:
        atomic_save_safetensors(kept[0], tmp / f"{hooks.name}_state.safetensors")
        payload_extra[hooks.name] = kept[1]
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    atomic_save_safetensors(opt_tensors, tmp / OPTIMIZER_TENSORS)
    rng_tensors, rng_meta = rng_state()
    atomic_save_safetensors(rng_tensors, tmp / RNG_TENSORS)
    payload = {**state, **payload_extra, "optimizer": opt_meta, "rng": rng_meta}
    (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1))
    old = directory.with_name(f".old-{directory.name}")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    adapter_name: str = "default",
    controller: AdaLoraController | None = None,
    hooks: TrainingHooks | None = None,
) -> dict[str, Any]:
    """Restore adapter weights, optimizer state, RNG states and what the method's hooks keep (an AdaLoRA run's
    importance EMAs and rank pattern); return the trainer state dict.

    Raises:
        AdapterFileError: The directory is not a complete checkpoint, or not one of this recipe's method.
    """
    hooks = _hooks_of(hooks, controller)
    directory = Path(directory)
    for name in (STATE_NAME, OPTIMIZER_TENSORS, RNG_TENSORS):
        if not (directory / name).is_file():
            raise AdapterFileError(f"{directory} is not a lorakit checkpoint: {name} is missing")
    state = json.loads((directory / STATE_NAME).read_text())
    weights = read_adapter_weights(directory)
    targets = adapter_state_dict(model, adapter_name, trim=False)
    if set(weights) != set(targets):
        raise AdapterFileError(f"{directory}: the checkpoint's adapter does not match this recipe's adapter")
    with torch.no_grad():
        for key, value in weights.items():
            targets[key].copy_(value)
    if hooks is not None and hooks.checkpoint_state() is not None:
        file = directory / f"{hooks.name}_state.safetensors"
        if not file.is_file() or hooks.name not in state:
            raise AdapterFileError(
                f"{directory}: {file.name} or its trainer state is missing: not a checkpoint of this recipe's "
                f"{hooks.name} run"
            )
        device = next(iter(targets.values())).device
        tensors = load_file(file)
        hooks.load_checkpoint_state(
            {key: value.to(device) for key, value in tensors.items()}, state[hooks.name]
        )
    optimizer.load_state_dict(
        _optimizer_from_files(load_file(directory / OPTIMIZER_TENSORS), state["optimizer"])
    )
    set_rng_state(load_file(directory / RNG_TENSORS), state["rng"])
    return state


def _step_of(path: Path) -> int | None:
    number = path.name.removeprefix("step-")
    return int(number) if path.name.startswith("step-") and number.isdigit() else None


def _is_complete(path: Path) -> bool:
    """Every file a checkpoint is written with is there (a folder half-deleted by a killed prune is not)."""
    names = (STATE_NAME, OPTIMIZER_TENSORS, RNG_TENSORS, CONFIG_NAME)
    return all((path / name).is_file() for name in names) and (
        (path / WEIGHTS_NAME).is_file() or (path / INT8_WEIGHTS_NAME).is_file()
    )


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (``step-*`` directories with all their files), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if _step_of(p) is not None and _is_complete(p)]
    return sorted(found, key=_step_of)


def clean_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Remove what a killed run left half-written under ``root``: temporary (``.tmp-``), replaced (``.old-``)
    and half-deleted (``.del-``) folders, and ``step-*`` folders missing a file. Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        partial = path.name.startswith((".tmp-", ".old-", ".del-"))
        if partial or (path.name.startswith("step-") and not _is_complete(path)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; each is first renamed to ``.del-step-*``, so a kill
    during the deletion never leaves a ``step-*`` folder with some of its files."""
    for old in list_checkpoints(root)[:-keep_last]:
        doomed = old.with_name(f".del-{old.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
