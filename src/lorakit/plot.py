"""Training metrics: the ``metrics.jsonl`` log (and TensorBoard, when asked), and the loss curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError


def plot_metrics(metrics: Path, png: Path) -> Path | None:
    """Draw train loss per step and eval loss per evaluation into ``png``.

    Returns:
        Path | None: The PNG written, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(metrics).read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            evals.append((record["step"], record["eval_loss"]))
    if not train and not evals:
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axis.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        axis.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats / target token)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save_figure(figure, png)


def plot_eval_curves(
    curves: dict[str, list[tuple[int, float]]], png: Path, best: str | None = None
) -> Path | None:
    """Every config's eval loss per step in one figure (``lorakit sweep``); ``best`` drawn thicker.

    Returns:
        Path | None: The PNG written, or None when no config has an evaluation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    figure, axis = plt.subplots(figsize=(8, 5), dpi=100)
    for name, points in curves.items():
        if points:
            width = 2.5 if name == best else 1.0
            axis.plot(
                *zip(*points), label=name + (" (best)" if name == best else ""), marker=".", linewidth=width
            )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("eval loss (nats / target token)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return _save_figure(figure, png)


class MetricsLog:
    """``metrics.jsonl`` in the output directory (one JSON line per train step or evaluation), and TensorBoard
    (``out/tensorboard``) when asked."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - closed by close()
        self.board = _tensorboard(out) if tensorboard else None

    def write(
        self, line: dict[str, Any], kind: str, keys: tuple[str, ...], board: dict | None = None
    ) -> None:
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.board is not None:
            for key in keys:
                self.board.add_scalar(f"{kind}/{key}", line[key], line["step"])
            for key, value in (board or {}).items():
                self.board.add_scalar(key, value, line["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _tensorboard(out: Path):
    """A TensorBoard writer logging into ``out/tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard (or set it to false)"
        ) from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _save_figure(figure, png: Path) -> Path:
    """Write ``figure`` to ``png`` atomically (a temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(png)
    return png
