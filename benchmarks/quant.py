"""lorakit 4-bit storage vs bitsandbytes, side by side on CPU.

For each weight shape ([out, in], bf16): NF4 + double-quant quantize time, dequantize time (to bf16), a 4-bit linear
forward + backward over 2048 tokens (input gradient only, as in QLoRA), and bits per parameter. lorakit and bnb run
alternately within each repeat so that both see the same machine load; the table reports medians and the ratio of
medians (bnb / lorakit: above 1 means lorakit is faster).

bnb's forward + backward uses ``bnb.matmul_4bit`` with an input that requires grad (its training path); in eval /
no-grad mode bnb's CPU backend would instead repack the weight on the first forward.

Peak memory of a 4-bit model load: the TinyLlama-1.1B-shaped bf16 model of ``benchmarks/memory.py`` (written to
disk once) is loaded in NF4 + double quant by ``lorakit.load_model`` and by transformers + ``BitsAndBytesConfig``,
each in a fresh subprocess; the figure is the rise of peak RSS (``VmHWM``) over the RSS just before the load.

Usage:
    .venv/bin/python benchmarks/quant.py [--repeats 5] [--threads 2] [--tokens 2048] [--skip-timings] [--skip-load]
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
from memory import DEFAULT_MODEL_DIR, LOAD_CONFIGS, measure, write_model

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
    buffer = torch.empty(shape, dtype=torch.bfloat16)

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
        # What Linear4bit does in forward and backward: write into a buffer it keeps. bnb's CPU op has no out=
        # (bitsandbytes::dequantize_4bit.out is not registered for CPU), so its column is the allocating call.
        "dequantize into a reused buffer": _median_seconds(
            {
                "lorakit": lambda: dequantize_4bit(packed, state, torch.bfloat16, out=buffer),
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


def bench_load(model_dir: Path, threads: int) -> dict:
    """Peak-RSS rise of a 4-bit load of the TinyLlama-shaped model, lorakit vs transformers + bnb (subprocesses)."""
    write_model(model_dir)
    rows = {name: measure(name, model_dir, threads) for name in LOAD_CONFIGS}
    bf16_bytes = (model_dir / "model.safetensors").stat().st_size
    return {"model_dir": str(model_dir), "bf16_file_bytes": bf16_bytes, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (this machine has 2 cores)"
    )
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the input for forward + backward")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="model for the load peak")
    parser.add_argument("--skip-timings", action="store_true", help="keep the timings already in --out")
    parser.add_argument("--skip-load", action="store_true", help="keep the load peak already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}

    load_before = os.getloadavg()
    if args.skip_timings:
        results = previous["results"]
    else:
        results = [bench_shape(shape, args.tokens, args.repeats) for shape in SHAPES]
    load_after = os.getloadavg()
    load_peak = previous.get("load_peak") if args.skip_load else bench_load(args.model_dir, args.threads)

    if args.skip_timings:
        print(f"timings kept from {args.out} (median of {previous['meta']['repeats']}, ms)")
    else:
        print(f"CPU, {args.threads} threads, bf16 weights, nf4 + double quant, median of {args.repeats} (ms)")
        print(
            f"1-minute load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
            f"on {os.cpu_count()} cores"
        )
    print(f"{'shape [out, in]':<16} {'measurement':<30} {'lorakit':>10} {'bnb':>10} {'bnb/lorakit':>12}")
    for result in results:
        shape = "x".join(map(str, result["shape"]))
        for name, row in result["timings"].items():
            ours, theirs = row["lorakit"]["median_s"] * 1e3, row["bnb"]["median_s"] * 1e3
            print(f"{shape:<16} {name:<30} {ours:>10.1f} {theirs:>10.1f} {row['bnb/lorakit']:>11.2f}x")
        bits = result["bits_per_parameter"]
        print(f"{shape:<16} {'bits per parameter':<30} {bits['lorakit']:>10.4f} {bits['bnb']:>10.4f}")
    if load_peak:
        print(
            f"4-bit load of a {load_peak['bf16_file_bytes'] / 1e9:.2f} GB bf16 TinyLlama-shaped model, peak RSS rise:"
        )
        for name in LOAD_CONFIGS:
            row = load_peak[name]
            print(f"  {name:<28} {row['peak_rise'] / 1e9:.2f} GB (model {row['model_bytes'] / 1e9:.2f} GB)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.skip_timings:
        meta = previous["meta"]
    else:
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
    document = {"meta": meta, "results": results, "load_peak": load_peak}
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
