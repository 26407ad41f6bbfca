"""lorakit 4-bit storage vs bitsandbytes, side by side on CPU.

For each weight shape ([out, in], bf16): NF4 + double-quant quantize time, dequantize time (to bf16), a 4-bit linear
forward + backward over 2048 tokens (input gradient only, as in QLoRA), and bits per parameter. lorakit and bnb run
alternately within each repeat so that both see the same machine load; the table reports medians and the ratio of
medians (bnb / lorakit: above 1 means lorakit is faster).

bnb's forward + backward uses ``bnb.matmul_4bit`` with an input that requires grad (its training path); in eval /
no-grad mode bnb's CPU backend would instead repack the weight on the first forward.

Usage:
    .venv/bin/python benchmarks/quant.py [--repeats 5] [--threads 2] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from lorakit.quant import Linear4bit, dequantize_4bit, quantize_4bit

SHAPES = [(4096, 4096), (11008, 4096)]
RESULTS = Path(__file__).parent / "results" / "quant.json"


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Run each function once to warm up, then ``repeats`` times round-robin; median and min per function."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def _forward_backward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        x.grad = None
        forward(x).backward(grad)

    return run


def bench_shape(shape: tuple[int, int], tokens: int, repeats: int) -> dict:
    out_features, in_features = shape
    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)  # [out, in]
    packed, state = quantize_4bit(weight)
    bnb_packed, bnb_state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, bnb_packed.view(-1)), "packed bytes differ from bitsandbytes"

    linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_features, dtype=torch.bfloat16)
    bnb_weight = bnb_packed.t()  # matmul_4bit takes the transposed packed view

    timings = {
        "quantize": _median_seconds(
            {
                "lorakit": lambda: quantize_4bit(weight),
                "bnb": lambda: bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True),
            },
            repeats,
        ),
        "dequantize": _median_seconds(
            {
                "lorakit": lambda: dequantize_4bit(packed, state, torch.bfloat16),
                "bnb": lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state),
            },
            repeats,
        ),
        f"forward+backward ({tokens} tokens)": _median_seconds(
            {
                "lorakit": _forward_backward(layer, x, grad),
                "bnb": _forward_backward(lambda t: bnb.matmul_4bit(t, bnb_weight, bnb_state), x, grad),
            },
            repeats,
        ),
    }
    for row in timings.values():
        row["bnb/lorakit"] = row["bnb"]["median_s"] / row["lorakit"]["median_s"]
    return {
        "shape": list(shape),
        "timings": timings,
        "bits_per_parameter": {
            "lorakit": state.bits_per_parameter(),
            "bnb": _bnb_bits(bnb_packed, bnb_state),
        },
    }


def _bnb_bits(packed: torch.Tensor, state: bnbf.QuantState) -> float:
    """bnb storage per parameter: packed bytes + uint8 absmax codes + nested fp32 absmax + the offset."""
    bits = packed.numel() * 8 + state.absmax.numel() * 8 + state.state2.absmax.numel() * 32 + 32
    return bits / state.shape.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (this machine has 2 cores)"
    )
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the input for forward + backward")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    load_before = os.getloadavg()
    results = [bench_shape(shape, args.tokens, args.repeats) for shape in SHAPES]
    load_after = os.getloadavg()

    print(f"CPU, {args.threads} threads, bf16 weights, nf4 + double quant, median of {args.repeats} (ms)")
    print(
        f"1-minute load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores"
    )
    print(f"{'shape [out, in]':<16} {'measurement':<30} {'lorakit':>10} {'bnb':>10} {'bnb/lorakit':>12}")
    for result in results:
        shape = "x".join(map(str, result["shape"]))
        for name, row in result["timings"].items():
            ours, theirs = row["lorakit"]["median_s"] * 1e3, row["bnb"]["median_s"] * 1e3
            print(f"{shape:<16} {name:<30} {ours:>10.1f} {theirs:>10.1f} {row['bnb/lorakit']:>11.2f}x")
        bits = result["bits_per_parameter"]
        print(f"{shape:<16} {'bits per parameter':<30} {bits['lorakit']:>10.4f} {bits['bnb']:>10.4f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": "cpu",
        "threads": args.threads,
        "repeats": args.repeats,
        "tokens": args.tokens,
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
