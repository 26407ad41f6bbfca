"""lorakit 4-bit storage vs bitsandbytes, side by side on CPU.

For each weight shape ([out, in], in the compute dtype ``--dtype``; ``auto``: bf16 where the CPU multiplies bf16
natively, else fp32): NF4 + double-quant quantize time, dequantize time (to the compute dtype), a 4-bit linear
forward + backward over 2048 tokens (input gradient only, as in QLoRA), and bits per parameter. lorakit and bnb run
alternately within each repeat so that both see the same machine load; the table reports medians and the ratio of
medians (bnb / lorakit: above 1 means lorakit is faster). Timings are kept per compute dtype in the results file.

An AVX2-only machine can be imitated on a wider CPU with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``: it caps
torch's and oneDNN's kernels (lorakit's side, and bnb's matmul, which is torch's), not bitsandbytes' own C kernels
(its quantize and dequantize keep the CPU's full ISA).

bnb's forward + backward uses ``bnb.matmul_4bit`` with an input that requires grad (its training path); in eval /
no-grad mode bnb's CPU backend would instead repack the weight on the first forward.

Peak memory of a 4-bit model load: the TinyLlama-1.1B-shaped bf16 model of ``benchmarks/memory.py`` (written to
disk once) is loaded in NF4 + double quant by ``lorakit.load_model`` and by transformers + ``BitsAndBytesConfig``,
each in a fresh subprocess; the figure is the rise of peak RSS (``VmHWM``) over the RSS just before the load.

Small layers and few tokens show the fixed costs per call (``--shapes 512x512 1344x512 --tokens 32``: the layers of
``benchmarks/qlora_step.py``'s model). Each compute dtype keeps a list of runs in the results file; a run replaces
the earlier figures of the same shape and token count and keeps the others, each with its machine.

Usage:
    .venv/bin/python benchmarks/quant.py [--dtype auto|bfloat16|float32] [--repeats 5] [--threads 2] [--tokens 2048]
        [--shapes 4096x4096 11008x4096] [--skip-timings] [--skip-load]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from lorakit.hardware import resolve_dtype
from lorakit.quant import Linear4bit, dequantize_4bit, quantize_4bit
from memory import DEFAULT_MODEL_DIR, LOAD_CONFIGS, measure, write_model
from results_file import avx2_emulated, machine_record, read_results, write_results
from timing import median_seconds

SHAPES = ["4096x4096", "11008x4096"]  # Llama-7B's attention and MLP weights [out, in]


def _forward_backward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        x.grad = None
        forward(x).backward(grad)

    return run


def bench_shape(shape: tuple[int, int], tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    out_features, in_features = shape
    weight = (torch.randn(shape) * 0.02).to(dtype)  # [out, in]
    packed, state = quantize_4bit(weight)
    bnb_packed, bnb_state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, bnb_packed.view(-1)), "packed bytes differ from bitsandbytes"

    linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = Linear4bit.from_linear(linear, compute_dtype=dtype)
    x = torch.randn(tokens, in_features, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_features, dtype=dtype)
    bnb_weight = bnb_packed.t()  # matmul_4bit takes the transposed packed view
    buffer = torch.empty(shape, dtype=dtype)

    timings = {
        "quantize": median_seconds(
            {
                "lorakit": lambda: quantize_4bit(weight),
                "bnb": lambda: bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True),
            },
            repeats,
        ),
        "dequantize": median_seconds(
            {
                "lorakit": lambda: dequantize_4bit(packed, state, dtype),
                "bnb": lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state),
            },
            repeats,
        ),
        # What Linear4bit does in forward and backward: write into a buffer it keeps. bnb's CPU op has no out=
        # (bitsandbytes::dequantize_4bit.out is not registered for CPU), so its column is the allocating call.
        "dequantize into a reused buffer": median_seconds(
            {
                "lorakit": lambda: dequantize_4bit(packed, state, dtype, out=buffer),
                "bnb": lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state),
            },
            repeats,
        ),
        f"forward+backward ({tokens} tokens)": median_seconds(
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


def print_timings(run: dict) -> None:
    """The timing table of one run."""
    meta = run["meta"]
    print(
        f"{meta['compute_dtype']}, {meta['threads']} threads, {meta['tokens']} tokens, median of {meta['repeats']} "
        f"(ms); 1-minute load average before / after: {meta['loadavg_1min_before_after'][0]:.2f} / "
        f"{meta['loadavg_1min_before_after'][1]:.2f}; {run['machine']['cpu']} ({run['machine']['isa']}"
        + (", torch and oneDNN capped at AVX2" if run["machine"].get("avx2_emulated") else "")
        + ")"
    )
    print(f"{'shape [out, in]':<16} {'measurement':<30} {'lorakit':>10} {'bnb':>10} {'bnb/lorakit':>12}")
    for result in run["results"]:
        shape = "x".join(map(str, result["shape"]))
        for name, row in result["timings"].items():
            ours, theirs = row["lorakit"]["median_s"] * 1e3, row["bnb"]["median_s"] * 1e3
            digits = 3 if min(ours, theirs) < 10 else 1  # small layers take fractions of a millisecond
            print(
                f"{shape:<16} {name:<30} {ours:>10.{digits}f} {theirs:>10.{digits}f} {row['bnb/lorakit']:>11.2f}x"
            )
        bits = result["bits_per_parameter"]
        print(f"{shape:<16} {'bits per parameter':<30} {bits['lorakit']:>10.4f} {bits['bnb']:>10.4f}")


def merge_runs(runs: list[dict] | dict, new: dict) -> list[dict]:
    """``runs`` of one compute dtype with ``new`` added: its (shape, tokens) figures replace the earlier ones."""
    runs = [runs] if isinstance(runs, dict) else runs  # one run per dtype, as first written
    replaced = {(tuple(r["shape"]), new["meta"]["tokens"]) for r in new["results"]}
    kept = []
    for run in runs:
        results = [r for r in run["results"] if (tuple(r["shape"]), run["meta"]["tokens"]) not in replaced]
        if results:
            kept.append({**run, "results": results})
    return [*kept, new]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="weights and compute dtype"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the input for forward + backward")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="weight shapes OUTxIN")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/quant.<kind>.json"
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="model for the load peak")
    parser.add_argument(
        "--skip-timings", action="store_true", help="keep the timings already in the results file"
    )
    parser.add_argument(
        "--skip-load", action="store_true", help="keep the load peak already in the results file"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    # Each run of each compute dtype, and the load peak, carry the machine they were measured on: a rerun of one
    # part keeps the others from the file.
    previous = read_results("quant", args.out) or {}
    timings = previous.get("timings", {})
    load_peak = previous.get("load_peak")

    new = None
    if not args.skip_timings:
        shapes = [tuple(int(size) for size in shape.split("x")) for shape in args.shapes]
        load_before = os.getloadavg()
        results = [bench_shape(shape, args.tokens, args.repeats, dtype) for shape in shapes]
        load_after = os.getloadavg()
        meta = {
            "threads": args.threads, "repeats": args.repeats, "tokens": args.tokens, "compute_dtype": dtype_name,
            "loadavg_1min_before_after": [load_before[0], load_after[0]],
        }  # fmt: skip
        new = {"machine": machine_record(), "meta": meta, "results": results}
        timings[dtype_name] = merge_runs(timings.get(dtype_name, []), new)
        if avx2_emulated():
            print("torch and oneDNN capped at AVX2 (emulation); bitsandbytes' own C kernels are not capped")
        print("this run, nf4 + double quant:")
        print_timings(new)
    for runs in timings.values():
        for run in [runs] if isinstance(runs, dict) else runs:
            if run is not new:
                print("\nkept from the file:")
                print_timings(run)
    if not args.skip_load:
        load_peak = {"machine": machine_record(), **bench_load(args.model_dir, args.threads)}
    if load_peak:
        print(
            f"4-bit load of a {load_peak['bf16_file_bytes'] / 1e9:.2f} GB bf16 TinyLlama-shaped model, peak RSS rise:"
        )
        for name in LOAD_CONFIGS:
            row = load_peak[name]
            print(f"  {name:<28} {row['peak_rise'] / 1e9:.2f} GB (model {row['model_bytes'] / 1e9:.2f} GB)")

    write_results("quant", {"timings": timings, "load_peak": load_peak}, args.out)


if __name__ == "__main__":
    main()
