"""What an adapter directory, a training checkpoint or a run's output directory holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import AdapterFileError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_weights

PREFIX = "base_model.model."
# Per method: the key suffix that marks one adapted matrix, and how its rank is read from that tensor.
_LAYER_KEYS = {
    "ADALORA": (".lora_A", lambda t: int(t.shape[0])),  # [rank, in] (PEFT's AdaLoRA keys have no ".weight")
    "LORAKIT_QRLORA": (".qr_lambda", lambda t: int(t.numel())),  # [rank]
}
_LORA_KEY = (".lora_A.weight", lambda t: int(t.shape[0]))  # [r, in]
# Frozen tensors stored in the file (QR-LoRA's factors): not trainable parameters.
_FROZEN_SUFFIXES = (".qr_Q", ".qr_RP")


def _method(config: dict[str, Any]) -> str:
    peft_type = config.get("peft_type")
    if peft_type == "ADALORA":
        return "adalora"
    if peft_type == "LORAKIT_QRLORA":
        return "qrlora"
    return "dora" if config.get("use_dora") else "lora"


def _layer_ranks(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module path -> rank of its adapter as stored in the file."""
    suffix, rank_of = _LAYER_KEYS.get(config.get("peft_type"), _LORA_KEY)
    return {
        key.removeprefix(PREFIX).removesuffix(suffix): rank_of(tensor)
        for key, tensor in weights.items()
        if key.endswith(suffix)
    }


def _method_fields(method: str, config: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """The rank and scale fields of ``method``; AdaLoRA's final rank pattern as module path -> kept components."""
    if method == "adalora":
        pattern = config.get("rank_pattern") or {}
        kept = {
            path: sum(pattern[f"{path}.lora_E"]) if f"{path}.lora_E" in pattern else rank
            for path, rank in sorted(ranks.items())
        }
        init_r = config.get("init_r")
        return {
            "r": init_r,
            "target_r": config.get("target_r"),
            "lora_alpha": config.get("lora_alpha"),
            "total_rank": f"{sum(kept.values())} of {init_r * len(kept) if init_r else '?'} components kept",
            "rank_pattern": kept,
        }
    if method == "qrlora":
        rule = (
            f"fixed r={config['r']}"
            if config.get("r")
            else f"tau={config.get('tau')}, max_r={config.get('max_r')}"
        )
        return {"r": config.get("r"), "rank_rule": rule, "alpha": config.get("alpha")}
    return {
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": config.get("use_rslora", False),
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
    method = _method(config)
    ranks = _layer_ranks(config, weights)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in weights.values()})
    parameters = sum(t.numel() for t in weights.values())
    frozen = sum(t.numel() for k, t in weights.items() if k.endswith(_FROZEN_SUFFIXES))
    info: dict[str, Any] = {
        "path": str(path),
        "kind": "checkpoint" if (path / "trainer_state.json").is_file() else "adapter",
        "method": method,
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        **_method_fields(method, config, ranks),
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
