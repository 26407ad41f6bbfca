"""Check ``lorakit plan`` against measurement: predicted vs measured peak memory of a training step on CPU.

For each Llama-shaped model (built from a config with random bf16 weights and saved as safetensors) and each
method (full / LoRA / QLoRA, plus a few variants), a fresh subprocess:

1. imports lorakit, fixes glibc's mmap threshold as ``lorakit train`` does on CPU
   (:func:`lorakit.activations.return_freed_memory_to_os`), loads the model with
   :func:`lorakit.loading.load_model` (4-bit NF4 + double quantization for QLoRA, bf16 otherwise), turns on
   per-layer checkpointing if asked (:func:`lorakit.activations.enable_checkpointing`), wraps LoRA adapters
   (``lorakit.wrap``) or unfreezes everything (full);
2. builds the optimizer by name (:func:`lorakit.optim.build_optimizer`);
3. resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), then runs two optimizer steps
   exactly as ``lorakit train`` does: :func:`lorakit.train.accumulate_gradients` (bf16 autocast, chunked
   cross-entropy), gradient clipping, ``optimizer.step()``, ``zero_grad(set_to_none=True)``; the second step runs
   with the optimizer states allocated (the steady state the planner predicts);
4. reports ``VmHWM`` (peak resident set) from ``/proc/self/status``: of the steps, and of the whole process.

The prediction is :func:`lorakit.plan.plan_memory` with ``device="cpu"`` (which adds the resident size of the
Python + torch + lorakit runtime, measured here on a model too small to matter: the ``runtime`` row). Runs go one
at a time. Results: ``benchmarks/results/plan_validation.<kind>.json`` (``benchmarks/results_file.py``) and a table
on stdout (docs/plan.md).

    .venv/bin/python benchmarks/plan_validation.py                 # everything (~30 min on a busy 2-core box)
    .venv/bin/python benchmarks/plan_validation.py --sizes 134m    # one size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Llama-shaped models (vocab 32000, untied head); widths of TinyLlama for the largest.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
    "134m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000),
    "660m": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip

# (size, run): full fine-tuning keeps bf16 weights (pure bf16 AdamW), 8-bit states on the largest model, so
# that every subprocess stays under ~6 GB on this shared machine.
BASE = dict(r=16, target="all", batch_size=2, seq_len=512, optimizer="adamw", gradient_checkpointing=False,
            lora_dropout=0.05, chunked_loss=True)  # fmt: skip
RUNS = [
    ("134m", dict(method="full")),
    ("134m", dict(method="lora")),
    ("134m", dict(method="qlora")),
    ("134m", dict(method="lora", chunked_loss=False)),
    ("350m", dict(method="full")),
    ("350m", dict(method="lora")),
    ("350m", dict(method="qlora")),
    ("350m", dict(method="qlora", lora_dropout=0.0, target="attention", optimizer="adamw_8bit")),
    ("660m", dict(method="full", optimizer="adamw_8bit", batch_size=1)),
    ("660m", dict(method="lora")),
    ("660m", dict(method="qlora")),
    ("660m", dict(method="qlora", gradient_checkpointing=True, optimizer="paged_adamw_8bit", batch_size=4)),
]


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def worker(spec: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from lorakit import LoraConfig, wrap
    from lorakit.activations import enable_checkpointing, return_freed_memory_to_os
    from lorakit.loading import load_model
    from lorakit.optim import build_optimizer
    from lorakit.train import accumulate_gradients

    imported = _status()["VmRSS"]
    if spec.get("allocator", "fixed") == "fixed":  # as lorakit.train does on CPU
        return_freed_memory_to_os()
    torch.manual_seed(0)
    method = spec["method"]
    model = load_model(
        spec["dir"], quantize="nf4" if method == "qlora" else None, compute_dtype=torch.bfloat16
    )
    if spec["gradient_checkpointing"]:  # as lorakit.train.load_base does
        enable_checkpointing(model)
    if method == "full":
        model.requires_grad_(True)
    else:
        wrap(
            model,
            LoraConfig(
                r=spec["r"],
                lora_alpha=2 * spec["r"],
                target_modules=spec["target"],
                lora_dropout=spec["lora_dropout"],
            ),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, spec["optimizer"], lr=1e-4, weight_decay=0.0)
    loaded = _status()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the steps alone from here
    vocab = model.config.vocab_size
    model.train()
    device = torch.device("cpu")
    times = []
    for step in range(2):
        start = time.perf_counter()
        ids = torch.randint(
            0, vocab, (spec["batch_size"], spec["seq_len"]), generator=torch.Generator().manual_seed(step)
        )
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        loss = accumulate_gradients(model, [batch], device, "bf16", spec["chunked_loss"])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    end = _status()
    return {"imported_rss": imported, "loaded_rss": loaded["VmRSS"], "load_peak": loaded["VmHWM"],
            "step_peak": end["VmHWM"], "end_rss": end["VmRSS"], "loss": loss, "step_seconds": times}  # fmt: skip


def save_model(size: str, directory: Path) -> None:
    """Build a Llama model of ``size`` with random bf16 weights and save it (in a subprocess)."""
    if (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file():
        return
    code = (
        "import sys, json, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        "config = LlamaConfig(**json.loads(sys.argv[1]), tie_word_embeddings=False)\n"
        "model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)\n"
        "model.save_pretrained(sys.argv[2], max_shard_size='20GB')\n"
    )
    subprocess.run([sys.executable, "-c", code, json.dumps(SIZES[size]), str(directory)], check=True)


def measure(spec: dict, allocator: str = "fixed") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps({**spec, "allocator": allocator})],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def predict(directory: Path, spec: dict) -> dict:
    from lorakit.plan import plan_memory

    fields = {k: spec[k] for k in (*BASE, "method")}
    if fields["method"] == "full":
        fields.pop("lora_dropout")
    plan = plan_memory(directory, device="cpu", **fields)
    return {"peak": plan.peak_bytes, "phase": plan.peak_phase,
            "components": {c.name: c.bytes for c in plan.components}}  # fmt: skip


def _write(rows: list[dict], runtime: dict, allocator: str) -> Path:
    """Merge ``rows`` into this machine's results file, replacing earlier rows of the same (size, allocator).

    Every row (and each allocator's runtime row) carries the machine it was measured on, so the rows kept from an
    earlier run still name theirs.
    """
    from results_file import read_results, write_results  # benchmarks/results_file.py; not in the workers

    existing = read_results("plan_validation") or {"rows": []}
    done = {(r["size"], r["allocator"]) for r in rows}
    keep = [r for r in existing.get("rows", []) if (r["size"], r.get("allocator", "fixed")) not in done]
    data = {"base": BASE, "sizes": SIZES, "runtime": {**existing.get("runtime", {}), allocator: runtime}}
    data["rows"] = keep + rows
    return write_results("plan_validation", data)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--sizes", nargs="*", default=None, help="subset of " + ", ".join(s for s in SIZES if s != "tiny")
    )
    parser.add_argument("--allocator", choices=["fixed", "default"], default="fixed",
                        help="fixed: the measured process calls lorakit.activations.return_freed_memory_to_os() as "
                        "lorakit train does on CPU with train.lean_cpu_heap (default); default: glibc's dynamic mmap threshold, whose heap "
                        "fragmentation adds to the peak (docs/plan.md)")  # fmt: skip
    parser.add_argument(
        "--models-dir", default="/tmp/lorakit_plan_models", help="where the built models are saved"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from results_file import machine_record

    models = Path(args.models_dir)
    rows = []
    # the runtime: a LoRA step on a model too small to matter
    save_model("tiny", models / "tiny")
    runtime = measure(
        {**BASE, "method": "lora", "dir": str(models / "tiny"), "batch_size": 1, "seq_len": 16},
        args.allocator,
    )
    runtime["machine"] = machine = machine_record()
    print(f"runtime (tiny model, LoRA step): {runtime['step_peak'] / 1e6:.0f} MB peak, "
          f"{runtime['imported_rss'] / 1e6:.0f} MB after imports")  # fmt: skip
    header = f"{'model':6} {'method':6} {'variant':42} {'predicted':>10} {'measured':>10} {'error':>7}  {'process':>8}"
    print(header)
    for size, run in RUNS:
        if args.sizes and size not in args.sizes:
            continue
        save_model(size, models / size)
        spec = {**BASE, **run, "dir": str(models / size)}
        measured = measure(spec, args.allocator)
        predicted = predict(models / size, spec)
        error = predicted["peak"] / measured["step_peak"] - 1
        variant = ", ".join(f"{k}={v}" for k, v in run.items() if k != "method") or "defaults"
        row = {"size": size, "allocator": args.allocator, "spec": spec, "variant": variant, "predicted": predicted, "measured": measured,
               "error": error, "machine": machine}  # fmt: skip
        rows.append(row)
        print(f"{size:6} {run['method']:6} {variant[:42]:42} {predicted['peak'] / 1e9:9.3f}G {measured['step_peak'] / 1e9:9.3f}G "
              f"{100 * error:+6.1f}%  {measured['load_peak'] / 1e9:7.3f}G", flush=True)  # fmt: skip
        path = _write(
            rows, runtime, args.allocator
        )  # after every run, so a partial run keeps what it measured
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    where = f" -> {path.relative_to(ROOT)}" if rows else ""
    print(f"worst |error|: {100 * worst:.1f}% over {len(rows)} runs{where}")


if __name__ == "__main__":
    main()
