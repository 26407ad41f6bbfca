"""A QLoRA training step, lorakit against transformers + bitsandbytes + PEFT, side by side on CPU.

One random Llama built from a config (``--hidden`` 512, intermediate 8/3 of it, ``--layers`` 4, ``--vocab`` 8192)
is saved once to a temporary directory as fp32 safetensors. Both stacks load that file in NF4 + double quantization
with the same compute dtype (``--dtype``; ``auto``: :func:`lorakit.hardware.auto_dtype`, fp32 where bf16 is
emulated) and add r=16, alpha=32, dropout 0.05 LoRA on all seven projections:

- lorakit: ``lorakit.load_model(dir, quantize="nf4", compute_dtype=dtype)`` + ``lorakit.wrap``;
- reference: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype), dtype=dtype)`` +
  ``peft.get_peft_model``.

A step is forward with ``labels`` (transformers' causal-LM loss for both), backward, ``torch.optim.AdamW`` over the
LoRA parameters, ``zero_grad``: no gradient checkpointing on either side. The two models step in turns
(``benchmarks/timing.py``), so both see the same load on a shared machine; the table reports medians and the
ratio of medians. Before timing, the first losses are compared (B = 0, so both equal the quantized base's loss).

``--profile`` adds one profiled step of each (``torch.profiler``, CPU) and prints the ops by self time.

For an AVX2-only machine on a wider CPU: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` caps torch and
oneDNN (bf16 matmul falls to ~1.5 GFLOP/s); bitsandbytes' own C kernels ignore both variables and keep the CPU's
full ISA, so on a real AVX2 machine its dequantize would be somewhat slower than under this emulation.

Usage:
    .venv/bin/python benchmarks/qlora_step.py [--dtype auto|bfloat16|float32] [--repeats 5] [--threads 2]
        [--batch 2] [--seq 256] [--profile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.hardware import DTYPE_CHOICES, resolve_dtype
from results_file import machine_record, read_results, write_results
from timing import median_seconds

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, DROPOUT, LR = 16, 32, 0.05, 2e-4


def write_model(directory: Path, hidden: int, layers: int, vocab: int) -> None:
    """A seeded random Llama saved as fp32 safetensors (both stacks quantize the same values)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


def build_lorakit(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = lorakit.load_model(directory, quantize="nf4", double_quant=True, compute_dtype=dtype)
    config = lorakit.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
    return lorakit.wrap(model, config).train()


def build_peft_bnb(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quant, dtype=dtype, device_map="cpu"
    )
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config).train()


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[Callable[[], float], int]:
    """One step's work (forward with labels, backward, AdamW on the trainable parameters) and their count."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params)


def profile(name: str, step: Callable[[], float], rows: int = 14) -> None:
    """One step under ``torch.profiler``: the ops that take the most self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n{name}: one profiled step, ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="compute dtype of both stacks")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per stack (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per stack first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="also print one profiled step of each")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: benchmarks/results/qlora_step-<dtype>.<kind>.json (runs keyed by batch x seq)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), args.hidden, args.layers, args.vocab)
        models = {"lorakit": build_lorakit(Path(tmp), dtype), "peft+bnb": build_peft_bnb(Path(tmp), dtype)}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    steps, trainable = {}, {}
    for name, model in models.items():
        steps[name], trainable[name] = training_step(model, ids)
    assert trainable["lorakit"] == trainable["peft+bnb"], f"trainable parameters differ: {trainable}"
    first_loss = {name: step() for name, step in steps.items()}  # B = 0: both are the quantized base's loss

    load_before = os.getloadavg()
    timings = median_seconds(steps, args.repeats, args.warmup)
    load_after = os.getloadavg()
    tokens = args.batch * args.seq
    for row in timings.values():
        row["tokens_per_s"] = tokens / row["median_s"]
    ratio = timings["peft+bnb"]["median_s"] / timings["lorakit"]["median_s"]

    dtype_name = str(dtype).removeprefix("torch.")
    print(
        f"QLoRA step, cpu, {args.threads} threads, {dtype_name} compute, Llama hidden={args.hidden} "
        f"layers={args.layers} vocab={args.vocab}, NF4 + double quant, r={RANK} alpha={ALPHA} on all 7 projections, "
        f"batch {args.batch} x {args.seq} tokens, median of {args.repeats}"
    )
    print(
        f"1-minute load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} "
        f"cores; first loss lorakit {first_loss['lorakit']:.5f}, peft+bnb {first_loss['peft+bnb']:.5f}; "
        f"{trainable['lorakit']:,} trainable parameters each"
    )
    print(f"{'stack':<10} {'median ms':>10} {'min ms':>9} {'tokens/s':>9}")
    for name, row in timings.items():
        print(
            f"{name:<10} {row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>9.1f} {row['tokens_per_s']:>9.0f}"
        )
    print(f"peft+bnb / lorakit step time (above 1: lorakit faster): {ratio:.2f}x")
    print(f"whole run {time.perf_counter() - started:.0f} s")
    if args.profile:
        for name, step in steps.items():
            profile(name, step)

    meta = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    meta.update(
        compute_dtype=dtype_name, tokens_per_step=tokens, rank=RANK, alpha=ALPHA, dropout=DROPOUT,
        trainable_parameters=trainable["lorakit"], first_loss=first_loss,
        loadavg_1min_before_after=[load_before[0], load_after[0]],
    )  # fmt: skip
    # One file per compute dtype and machine kind; runs of other shapes (batch x seq) are kept, each with its machine.
    name = f"qlora_step-{dtype_name}"
    runs = (read_results(name, args.out) or {}).get("runs", {})
    runs[f"{args.batch}x{args.seq}"] = {
        "machine": machine_record(),
        "meta": meta,
        "timings": timings,
        "peft+bnb/lorakit": ratio,
    }
    write_results(name, {"runs": runs}, args.out)


if __name__ == "__main__":
    main()
