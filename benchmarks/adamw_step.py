"""One AdamW step over a LoRA adapter's factors: torch's per-parameter loop, ``foreach`` and the fused kernel.

The shapes are SmolLM2-135M's LoRA factors at r=16 on every linear layer (30 layers x q, k, v, o, gate, up, down:
420 fp32 tensors, 4.9M elements). ``train.optimizer: adamw`` builds the fused kernel where it applies
(``lorakit.optim.build_optimizer``); a training pack makes one such step per config. The three take turns over
``--repeats`` rounds of ``--steps`` steps each; the table shows the median milliseconds per step.

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/adamw_step.py [--rank 16] [--steps 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorakit.optim import build_optimizer
from results_file import write_results

# (in, out) of SmolLM2-135M's q, k, v, o, gate, up, down projections
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
VARIANTS = {"loop (torch's CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=30, help="steps per round (default 30)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, the variants taking turns (default 5)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [s for _ in range(args.layers) for i, o in LAYER for s in ((args.rank, i), (o, args.rank))]
    optimizers = {}
    for name, kw in VARIANTS.items():
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers[name] = build_optimizer(params, "adamw", lr=1e-3, weight_decay=0.0, **kw)
        optimizers[name].step()  # the states exist before timing
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            times[name].append((time.perf_counter() - started) / args.steps * 1e3)
    median = {name: statistics.median(t) for name, t in times.items()}
    elements = sum(a * b for a, b in shapes)
    print(f"AdamW step over {len(shapes)} LoRA factors ({elements / 1e6:.1f}M elements), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| variant | ms / step | loop / variant |\n|---|---|---|")
    loop = median["loop (torch's CPU default)"]
    for name, ms in median.items():
        print(f"| {name} | {ms:.1f} | {loop / ms:.2f}x |")
    meta = {"rank": args.rank, "layers": args.layers, "tensors": len(shapes), "elements": elements,
            "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads()}  # fmt: skip
    write_results("adamw_step", {"meta": meta, "median_ms": median, "runs_ms": times})


if __name__ == "__main__":
    main()
