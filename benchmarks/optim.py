"""lorakit's 8-bit AdamW next to fp32 torch AdamW and bitsandbytes' AdamW8bit, on CPU.

Three measurements:

1. state memory: bytes of every state tensor after one step, for one [2048, 2048] fp32 weight and for a whole tiny
   Llama (hidden 64, where the 64-element norms keep fp32 state);
2. loss curves: the tiny Llama (full fine-tuning, one fixed batch of 8 x 32 tokens) trained with each optimizer;
   reported as the largest per-step relative deviation from fp32 AdamW, and the final loss;
3. step time on the [2048, 2048] weight (median of ``--repeats``, the three optimizers taking turns).

Usage:
    .venv/bin/python benchmarks/optim.py [--steps 40] [--hidden 64] [--lr 1e-3] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.optim import AdamW8bit
from results_file import write_results

MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def optimizers(lr: float) -> dict[str, MakeOptimizer]:
    """Name -> factory; all with lr, betas (0.9, 0.999), eps 1e-8 and weight decay 0.01."""
    return {
        "torch AdamW (fp32)": lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        "lorakit AdamW8bit": lambda params: AdamW8bit(params, lr=lr, weight_decay=0.01),
        "bnb AdamW8bit": lambda params: bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.01),
    }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every state tensor; bnb's shared 256-entry quantization maps are counted once."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def tiny_llama(hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def loss_curve(make: MakeOptimizer, hidden: int, steps: int) -> tuple[list[float], int]:
    """Losses of ``steps`` full fine-tuning steps on one fixed batch, and the optimizer's state bytes."""
    model = tiny_llama(hidden)
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    optimizer = make(list(model.parameters()))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, state_bytes(optimizer)


def large_weight(makers: dict[str, MakeOptimizer], repeats: int) -> dict[str, dict[str, float]]:
    """State bytes and median step time for one [2048, 2048] fp32 weight per optimizer."""
    torch.manual_seed(0)
    init, grad = torch.randn(2048, 2048), torch.randn(2048, 2048)
    runs = {}
    for name, make in makers.items():
        param = torch.nn.Parameter(init.clone())
        param.grad = grad.clone()
        runs[name] = (param, make([param]))
        runs[name][1].step()  # allocate the state
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (_, optimizer) in runs.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"state_bytes": state_bytes(opt), "step_ms": 1e3 * statistics.median(times[name])}
        for name, (_, opt) in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps of the loss curve")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Llama")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every optimizer")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps on the large weight (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/optim.<kind>.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    makers = optimizers(args.lr)
    load_before = os.getloadavg()

    weight = large_weight(makers, args.repeats)
    curves = {name: loss_curve(make, args.hidden, args.steps) for name, make in makers.items()}
    reference, reference_bytes = curves["torch AdamW (fp32)"]
    table = {}
    for name, (losses, nbytes) in curves.items():
        deviation = max(abs(a - b) / b for a, b in zip(losses, reference))
        table[name] = {
            **weight[name], "model_state_bytes": nbytes, "max_rel_loss_deviation": deviation,
            "first_loss": losses[0], "final_loss": losses[-1],
        }  # fmt: skip

    print(
        f"CPU, {args.threads} threads; [2048, 2048] fp32 weight; tiny Llama hidden {args.hidden}, {args.steps} steps"
    )
    header = ("optimizer", "state MB", "ratio", "model ratio", "step ms", "max loss dev", "final loss")
    print(f"{header[0]:<20} " + " ".join(f"{h:>12}" for h in header[1:]))
    for name, row in table.items():
        ratio = table["torch AdamW (fp32)"]["state_bytes"] / row["state_bytes"]
        model_ratio = reference_bytes / row["model_state_bytes"]
        row["state_ratio_vs_fp32"], row["model_state_ratio_vs_fp32"] = ratio, model_ratio
        print(
            f"{name:<20} {row['state_bytes'] / 2**20:>12.2f} {ratio:>12.3f} {model_ratio:>12.3f} "
            f"{row['step_ms']:>12.1f} {row['max_rel_loss_deviation']:>12.2e} {row['final_loss']:>12.4f}"
        )

    meta = {
        "device": "cpu", "threads": args.threads, "steps": args.steps, "hidden": args.hidden, "lr": args.lr,
        "repeats": args.repeats, "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
    }  # fmt: skip
    write_results("optim", {"meta": meta, "results": table}, args.out)


if __name__ == "__main__":
    main()
