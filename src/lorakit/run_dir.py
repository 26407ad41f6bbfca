"""A run's output directory: who may write into it, and what a new start or a resume finds there.

* One run at a time: :func:`owns_output_dir` holds :class:`lorakit.run_lock.RunLock` for the whole run.
* A plain start refuses a directory that holds another run or other files (unless ``overwrite``), but takes over
  one whose run stopped before its first checkpoint (killed, a NaN, a failure): nothing there is worth keeping.
* Half-written checkpoint folders are removed first (:func:`lorakit.checkpoint.clean_checkpoints`).
* ``train_summary.json`` is written last, so its presence means the run finished: a resume from the newest
  checkpoint then changes nothing (a resume from a named older checkpoint trains again from there).
* ``metrics.jsonl`` is cut back to the step a resume restarts from, so no step is logged twice.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from lorakit.checkpoint import clean_checkpoints, list_checkpoints
from lorakit.errors import LorakitError
from lorakit.files import atomic_write_bytes
from lorakit.run_lock import RunLock, is_lock_file

RECIPE_NAME = "recipe.yaml"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "train_summary.json"  # written last: its presence means the run finished


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (a NaN loss, an output directory that holds another run ...)."""


def owns_output_dir(function):
    """Run ``function(recipe, ...)`` holding the exclusive lock of ``recipe.output_dir``: two runs never write
    into one directory (the second gets :class:`lorakit.run_lock.RunLockedError` naming the first)."""

    @functools.wraps(function)
    def locked(recipe, *args, **kwargs):
        with RunLock(recipe.output_dir):
            return function(recipe, *args, **kwargs)

    return locked


def entries(out: Path) -> list[Path]:
    """What ``out`` holds besides the run's lock file."""
    return [p for p in out.iterdir() if not is_lock_file(p)] if out.is_dir() else []


def prepare_output_dir(out: Path, recipe_yaml: str, resume: bool, overwrite: bool) -> Path:
    """Check ``out`` for a start (``resume`` False) or a resume of the recipe whose YAML is ``recipe_yaml``.

    Raises:
        TrainingError: A plain start into a directory holding a checkpointed or finished run, or other files
            (without ``overwrite``); a resume with another recipe.
    """
    clean_checkpoints(out / "checkpoints")
    if not entries(out):
        return out
    saved = out / RECIPE_NAME
    if resume:
        if saved.is_file() and saved.read_text() != recipe_yaml:
            raise TrainingError(
                f"{saved} differs from the recipe being resumed; resume with the same recipe and overrides"
            )
        return out
    never_checkpointed = (
        saved.is_file() and not (out / SUMMARY_NAME).exists() and not list_checkpoints(out / "checkpoints")
    )
    if overwrite or never_checkpointed:
        if not overwrite:
            print(f"output_dir {out} holds a run that stopped before its first checkpoint: starting it over")
        for entry in entries(out):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return out
    what = "another run" if saved.exists() else "files"
    raise TrainingError(
        f"output_dir {out} already holds {what}; nothing was overwritten. Use --resume to continue it, "
        "overwrite=true to replace it, or another output_dir"
    )


def finished_summary(out: Path) -> dict[str, Any] | None:
    """The summary of the finished run in ``out`` (printed as such), or None when it did not finish."""
    try:
        summary = json.loads((out / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    loss = summary.get("final_train_loss")
    loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "n/a"
    print(f"{out} holds a finished run ({summary.get('steps')} steps, final train loss {loss}): nothing to "
          "resume, nothing was changed")  # fmt: skip
    return summary


def reopen_run(out: Path, step: int) -> None:
    """A run resumed at ``step``: ``metrics.jsonl`` cut back to it (the later steps are trained again) and the
    summary of an earlier finish removed (a resume from an older checkpoint writes a new one at its end)."""
    truncate_metrics(out / METRICS_NAME, step)
    (out / SUMMARY_NAME).unlink(missing_ok=True)


def truncate_metrics(metrics: Path, step: int) -> None:
    """Keep the lines of ``metrics`` up to ``step`` (atomically); a torn last line is dropped too."""
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_bytes(metrics, "".join(kept).encode())


__all__ = [
    "METRICS_NAME", "RECIPE_NAME", "SUMMARY_NAME", "TrainingError", "entries", "finished_summary",
    "owns_output_dir", "prepare_output_dir", "reopen_run", "truncate_metrics",
]  # fmt: skip
