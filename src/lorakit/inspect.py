"""What an adapter directory, a training checkpoint or a run's output directory holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lorakit.checkpoint import list_checkpoints
from lorakit.errors import AdapterFileError
from lorakit.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_weights
from lorakit.methods import Method, method_for_file
from lorakit.walk import FILE_PREFIX


def _layer_ranks(method: Method, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module path -> rank of its adapter as stored in the file."""
    suffix, rank_of = method.rank_key
    return {
        key.removeprefix(FILE_PREFIX).removesuffix(suffix): rank_of(tensor)
        for key, tensor in weights.items()
        if key.endswith(suffix)
    }


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of ``path``: method (lora, dora, adalora, qrlora), rank(s) (AdaLoRA: its final rank pattern),
    targets, tensor count, parameters in the file and trainable parameters (QR-LoRA trains only its λ; the
    stored factors are frozen), file size, and for checkpoints and runs the step, losses and the checkpoints
    present.

    Raises:
        AdapterFileError: ``path`` holds no adapter.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{path} holds no {CONFIG_NAME}: not an adapter, checkpoint or run directory")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path / CONFIG_NAME} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path / CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    weights = read_adapter_weights(path)
    method = method_for_file(config, str(path / CONFIG_NAME))
    ranks = _layer_ranks(method, weights)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in weights.values()})
    parameters = sum(t.numel() for t in weights.values())
    frozen = sum(
        t.numel() for k, t in weights.items() if method.frozen_keys and k.endswith(method.frozen_keys)
    )
    info: dict[str, Any] = {
        "path": str(path),
        "kind": "checkpoint" if (path / "trainer_state.json").is_file() else "adapter",
        "method": method.name,
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        **(method.describe(config, ranks) if method.describe else {}),
        "ranks_in_file": sorted(set(ranks.values())),
        "target_modules": config.get("target_modules"),
        "wrapped_layers": len(ranks),
        "module_names": sorted({p.rsplit(".", 1)[-1] for p in ranks}),
        "tensors": len(weights),
        "parameters": parameters,
        "trainable_parameters": parameters - frozen,
        "dtypes": dtypes,
        "file_bytes": (path / WEIGHTS_NAME).stat().st_size if (path / WEIGHTS_NAME).is_file() else None,
        "base_model": config.get("base_model_name_or_path"),
    }
    state_file = path / "trainer_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        losses = [h["loss"] for h in state.get("history", []) if "loss" in h]
        info.update(
            step=state.get("step"),
            last_train_loss=losses[-1] if losses else None,
            best_eval_loss=state.get("best_eval"),
        )
    if (path / "recipe.yaml").is_file():
        info["kind"] = "run"
        info["checkpoints"] = [p.name for p in list_checkpoints(path / "checkpoints")]  # complete ones only
        summary = path / "train_summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            info.update(final_train_loss=data.get("final_train_loss"), eval_loss=data.get("eval_loss"))
    return info
