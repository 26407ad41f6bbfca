"""DoRA's training-step cost against a LoRA step of the same rank, lorakit and PEFT side by side.

One training step = forward + causal-LM loss + backward on a random Llama (``--hidden``, ``--layers``) with adapters
of rank ``--rank`` on every linear layer, ``--batch x --seq`` tokens. Four models with the same base weights: lorakit
LoRA, lorakit DoRA, PEFT LoRA, PEFT DoRA (lora_dropout 0, as in the PEFT fast path). They run round-robin within each
repeat so all see the same machine load; the table reports medians, and the ratios are ratios of medians.

Usage:
    .venv/bin/python benchmarks/dora.py [--repeats 7] [--threads 2] [--dtypes auto|fp32|bf16 ...] [--device cpu|cuda]

``--dtypes auto`` (the default) is bf16 where the device multiplies bf16 natively, else fp32
(:func:`lorakit.hardware.auto_dtype`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.hardware import auto_dtype
from results_file import write_results
from timing import median_seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args: argparse.Namespace, dtype: str) -> LlamaForCausalLM:
    """The same random Llama every call (seeded), in ``dtype`` on ``--device``."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device=args.device, dtype=DTYPES[dtype]).train()


def build_models(args: argparse.Namespace, dtype: str) -> dict[str, torch.nn.Module]:
    """The four models, each with B randomized (a trained-like adapter) from the same seed."""
    models = {}
    for use_dora in (False, True):
        name = "dora" if use_dora else "lora"
        ours = lorakit.wrap(
            build_base(args, dtype),
            lorakit.LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, use_dora=use_dora
            ),
        )
        theirs = peft.get_peft_model(
            build_base(args, dtype),
            peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, use_dora=use_dora),
        )
        for model in (ours, theirs):
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if "lora_B" in param_name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        models[f"lorakit {name}"], models[f"peft {name}"] = ours, theirs
    return models


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if ids.is_cuda:
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument(
        "--dtypes", nargs="+", choices=["auto", *DTYPES], default=["auto"], help="base dtypes"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/dora.<kind>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    auto = "bf16" if auto_dtype(args.device) == torch.bfloat16 else "fp32"
    args.dtypes = list(dict.fromkeys(auto if name == "auto" else name for name in args.dtypes))

    tokens = args.batch * args.seq
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    ids = ids.to(args.device)
    runs = {}
    for dtype in args.dtypes:
        models = build_models(args, dtype)
        load_before = os.getloadavg()
        fns = {name: training_step(model, ids) for name, model in models.items()}
        timings = median_seconds(fns, args.repeats, args.warmup)
        load_after = os.getloadavg()
        median = {name: row["median_s"] for name, row in timings.items()}
        ratios = {
            "lorakit dora / lorakit lora": median["lorakit dora"] / median["lorakit lora"],
            "peft dora / peft lora": median["peft dora"] / median["peft lora"],
            "peft lora / lorakit lora": median["peft lora"] / median["lorakit lora"],
            "peft dora / lorakit dora": median["peft dora"] / median["lorakit dora"],
        }
        runs[dtype] = {
            "timings": timings,
            "ratios": ratios,
            "loadavg_1min_before_after": [load_before[0], load_after[0]],
        }
        del models

        print(
            f"\n{args.device}, {args.threads} threads, Llama hidden={args.hidden} layers={args.layers}, {dtype} base, "
            f"r={args.rank} on all 7 projections, {tokens} tokens/step, forward+backward, median of {args.repeats}"
        )
        print(
            f"1-minute load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores"
        )
        print(f"{'model':<16} {'median ms':>10} {'min ms':>10} {'tokens/s':>10}")
        for name, row in timings.items():
            print(
                f"{name:<16} {row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>10.1f} {tokens / row['median_s']:>10.0f}"
            )
        for name, value in ratios.items():
            print(f"{name:<30} {value:>6.2f}x")

    meta = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    meta["tokens_per_step"] = tokens
    write_results("dora", {"meta": meta, "runs": runs}, args.out, device=args.device)


if __name__ == "__main__":
    main()
