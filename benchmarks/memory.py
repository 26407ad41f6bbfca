"""Peak memory of a QLoRA training step: lorakit's memory savings vs PEFT + bitsandbytes, on CPU.

One TinyLlama-1.1B-shaped model (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 key/value heads, vocab
32000; random init, bf16, one ``model.safetensors`` like the real checkpoint) is written to disk once; every
configuration then runs in its own subprocess: load the model, add r=16 LoRA on all seven projections, and run two
training steps on one batch of 1 x 1024 tokens (all of them targets) under bf16 autocast.

Configurations:
- ``lorakit-lora-bf16``: bf16 base, fp32 AdamW, plain (unchunked) loss, no checkpointing.
- ``lorakit-qlora``: NF4 + double quant base, otherwise the same.
- ``lorakit-qlora-all``: NF4 + double quant, paged 8-bit AdamW, chunked cross-entropy, per-layer checkpointing
  (lorakit's settings for ``recipes/qlora_alpaca.yaml``).
- ``lorakit-qlora-lean``: the same plus ``train.lean_cpu_heap`` (glibc's mmap threshold fixed at 128 KiB, so freed
  tensors go back to the OS; slower steps). The other lorakit rows keep glibc's default allocator, as
  ``lorakit.train`` does by default.
- ``peft-bnb``: the seed recipe in PEFT + bitsandbytes: transformers ``BitsAndBytesConfig`` (4-bit NF4, double
  quant, bf16 compute), ``prepare_model_for_kbit_training`` (which turns on gradient checkpointing),
  ``get_peft_model``, ``bnb.optim.PagedAdamW8bit``, transformers' own loss.

Reported, from ``/proc/self/status`` of each subprocess: ``VmHWM`` (peak RSS) of the whole process (imports, load and
two steps) and of the steps alone: before the first step the script writes ``5`` to ``/proc/self/clear_refs``, which
resets ``VmHWM`` to the current RSS (Linux >= 4.0), so the second figure is the highest RSS while stepping, the loaded
model included. The RSS after the imports (the interpreter, torch, transformers: the same for every configuration
but PEFT's, which also imports peft and bitsandbytes) is reported beside them.

Usage:
    .venv/bin/python benchmarks/memory.py [--model-dir DIR] [--configs NAME ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(tempfile.gettempdir()) / "lorakit-bench-tinyllama-1.1b"
TINYLLAMA = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ("lorakit-lora-bf16", "lorakit-qlora", "lorakit-qlora-all", "lorakit-qlora-lean", "peft-bnb")
LOAD_CONFIGS = ("load-lorakit-nf4", "load-transformers-bnb-nf4")  # load only (benchmarks/quant.py)
SEQ = 1024
STEPS = 2
LR = 2e-4
MAX_GRAD_NORM = 0.3  # recipes/qlora_alpaca.yaml


# ---------------------------------------------------------------------------------------------- the model on disk


def write_model(model_dir: Path, seed: int = 0) -> Path:
    """Write the TinyLlama-shaped model (random N(0, 0.02) weights, unit norms, bf16) unless already there.

    The safetensors file is written tensor by tensor (header first, then each tensor's bytes), so writing it never
    holds more than one tensor in memory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINYLLAMA, dtype="bfloat16")
    file, marker = model_dir / "model.safetensors", model_dir / "written.json"
    expected = json.dumps({"config": TINYLLAMA, "seed": seed}, sort_keys=True)
    if file.is_file() and marker.is_file() and marker.read_text() == expected:
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(model_dir)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            handle.write(tensor.view(torch.uint8).numpy().tobytes())
    marker.write_text(expected)
    return model_dir


# ---------------------------------------------------------------------------------- measurement inside the child


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        lines = handle.read().splitlines()
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (write 5 to clear_refs); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") <= _status_bytes("VmRSS") + (8 << 20)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, TINYLLAMA["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _lorakit_model(name: str, model_dir: Path):
    import lorakit
    from lorakit.activations import enable_checkpointing, return_freed_memory_to_os
    from lorakit.optim import build_optimizer

    if name == "lorakit-qlora-lean":
        return_freed_memory_to_os()  # what lorakit.train does on CPU with train.lean_cpu_heap
    quantize = None if name == "lorakit-lora-bf16" else "nf4"
    model = lorakit.load_model(model_dir, quantize=quantize, double_quant=True, compute_dtype=torch.bfloat16)
    config = lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    lorakit.wrap(model, config)
    all_savings = name in ("lorakit-qlora-all", "lorakit-qlora-lean")
    if all_savings:
        enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        params, "paged_adamw_8bit" if all_savings else "adamw", lr=LR, weight_decay=0.0
    )
    return model, optimizer, all_savings


def _lorakit_step(model, optimizer, batch, chunked: bool) -> float:
    from lorakit.train import accumulate_gradients

    loss = accumulate_gradients(model, [batch], torch.device("cpu"), "bf16", chunked=chunked)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _peft_model(model_dir: Path):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(model)  # fp32 norms/embeddings/head, gradient checkpointing on
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, bnb.optim.PagedAdamW8bit(params, lr=LR, weight_decay=0.0)


def _peft_step(model, optimizer, batch) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _load_only(name: str, model_dir: Path) -> dict:
    """Load the model in 4 bits and report the rise of peak RSS over the RSS just before the load."""
    if name == "load-lorakit-nf4":
        import lorakit

        load = lambda: lorakit.load_model(model_dir, quantize="nf4", double_quant=True)  # noqa: E731
    else:
        import bitsandbytes  # noqa: F401  (imported before the baseline, like lorakit)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu"
        )
    import transformers.models.llama.modeling_llama  # noqa: F401  (architecture code before the baseline)

    before = _status_bytes("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {
        "rss_before_load": before, "peak_rss": peak, "peak_rise": peak - before,
        "rss_after_load": _status_bytes("VmRSS"), "model_bytes": size, "load_s": seconds,
        "peak_reset_before_load": reset,
    }  # fmt: skip


def run_config(name: str, model_dir: Path) -> dict:
    """One configuration, in this process: imports, load, two steps; the figures of /proc/self/status."""
    if name in LOAD_CONFIGS:
        return _load_only(name, model_dir)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import lorakit  # noqa: F401

    if name == "peft-bnb":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    rss_imports = _status_bytes("VmRSS")
    start = time.perf_counter()
    if name == "peft-bnb":
        model, optimizer = _peft_model(model_dir)
        step = lambda batch: _peft_step(model, optimizer, batch)  # noqa: E731
    else:
        model, optimizer, chunked = _lorakit_model(name, model_dir)
        step = lambda batch: _lorakit_step(model, optimizer, batch, chunked)  # noqa: E731
    load_s = time.perf_counter() - start
    rss_loaded, peak_load = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    model.train()
    batch = _batch()
    reset = _reset_peak()
    losses, step_s = [], []
    for _ in range(STEPS):
        start = time.perf_counter()
        losses.append(step(batch))
        step_s.append(time.perf_counter() - start)
    peak_steps = _status_bytes("VmHWM")
    return {
        "rss_after_imports": rss_imports, "rss_after_load": rss_loaded, "peak_rss_load": peak_load,
        "peak_rss_steps": peak_steps if reset else None, "peak_rss_process": max(peak_load, peak_steps),
        "peak_reset_before_steps": reset, "losses": losses, "load_s": load_s, "step_s": step_s,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------ the driver


def measure(name: str, model_dir: Path, threads: int) -> dict:
    """Run one configuration in a fresh subprocess and return its figures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--model-dir",
        str(model_dir),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="where the model is written"
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *LOAD_CONFIGS])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (this machine: 2 cores)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/memory.<kind>.json"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_config(args.child, args.model_dir)))
        return

    from results_file import machine_record, read_results, write_results  # not in the --child processes

    print(f"writing the model to {args.model_dir} (once) ...", flush=True)
    write_model(args.model_dir)
    results = {}
    for name in args.configs:  # one at a time: each is alone in its process
        print(f"running {name} ...", flush=True)
        results[name] = measure(name, args.model_dir, args.threads)
        results[name]["loadavg_1min_after"] = os.getloadavg()[0]
        results[name]["machine"] = machine_record()  # rows not rerun keep the machine they were measured on

    print(
        f"\nTinyLlama-1.1B shape, batch 1 x {SEQ} tokens, r=16 on all seven projections, {STEPS} steps, CPU"
    )
    print(
        f"{'configuration':<20} {'process peak GB':>16} {'steps peak GB':>14} {'after imports GB':>17} {'s/step':>7}"
    )
    for name, row in results.items():
        if name in LOAD_CONFIGS:
            print(f"{name:<20} load peak rise {_gb(row['peak_rise'])} GB")
            continue
        seconds = sum(row["step_s"]) / len(row["step_s"])
        print(
            f"{name:<20} {_gb(row['peak_rss_process']):>16} {_gb(row['peak_rss_steps']):>14} "
            f"{_gb(row['rss_after_imports']):>17} {seconds:>7.1f}"
        )
    for name in ("lorakit-qlora-all", "lorakit-qlora-lean"):
        if {"peft-bnb", name} <= results.keys():
            ours, theirs = results[name], results["peft-bnb"]
            for key in ("peak_rss_process", "peak_rss_steps"):
                if ours[key] and theirs[key]:
                    print(f"{name} / peft-bnb, {key}: {ours[key] / theirs[key]:.2f} (target <= 0.50)")
            step = sorted(ours["step_s"])[0] / sorted(theirs["step_s"])[0]
            print(f"{name} / peft-bnb, fastest step time: {step:.2f}")

    meta = {
        "device": "cpu", "threads": args.threads, "seq": SEQ, "batch": 1, "steps": STEPS, "model": TINYLLAMA,
        "loadavg_1min": os.getloadavg()[0],
    }  # fmt: skip
    old = (read_results("memory", args.out) or {}).get("results", {})  # rows not rerun this time are kept
    merged = {**{k: v for k, v in old.items() if k in (*CONFIGS, *LOAD_CONFIGS)}, **results}
    write_results("memory", {"meta": meta, "results": merged}, args.out)


if __name__ == "__main__":
    main()
