"""What an adapter directory, a training checkpoint or a run's output directory holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFileError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_weights


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of ``path``: method, rank(s), targets, tensor count, trainable parameters, file size, and for
    checkpoints and runs the step, losses and the checkpoints present.

    Raises:
        AdapterFileError: ``path`` holds no adapter.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{path} holds no {CONFIG_NAME}: not an adapter, checkpoint or run directory")
    config = json.loads((path / CONFIG_NAME).read_text())
    weights = read_adapter_weights(path)
    ranks = sorted({int(t.shape[0]) for k, t in weights.items() if k.endswith("lora_A.weight")})
    modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if ".lora_" in k})
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in weights.values()})
    info: dict[str, Any] = {
        "path": str(path),
        "kind": "checkpoint" if (path / "trainer_state.json").is_file() else "adapter",
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "r": config.get("r"),
        "ranks_in_file": ranks,
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": config.get("use_rslora", False),
        "target_modules": config.get("target_modules"),
        "wrapped_layers": sum(k.endswith("lora_A.weight") for k in weights),
        "module_names": modules,
        "tensors": len(weights),
        "parameters": sum(t.numel() for t in weights.values()),
        "dtypes": dtypes,
        "file_bytes": (path / WEIGHTS_NAME).stat().st_size,
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
        checkpoints = (
            sorted(p.name for p in (path / "checkpoints").glob("step-*"))
            if (path / "checkpoints").is_dir()
            else []
        )
        info["checkpoints"] = checkpoints
        summary = path / "train_summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            info.update(final_train_loss=data.get("final_train_loss"), eval_loss=data.get("eval_loss"))
    return info
