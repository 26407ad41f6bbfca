"""The loss curve (train and eval) as a PNG, from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


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
    figure.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(png)
    return png
