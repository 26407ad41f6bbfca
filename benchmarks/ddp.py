"""Data parallel on one CPU machine: 1 process x T threads vs T processes x 1 thread, the same global batch.

Both arms run ``lorakit train`` on the quickstart recipe (QLoRA, the bundled 3.4M-parameter model, precision
``auto``), with a global batch of ``--batch`` x ``--accum`` samples per step:

- ``1 process x T threads``: ``OMP_NUM_THREADS=T lorakit train ...``: the step's ``accum`` micro-batches one after
  the other, each op on T threads;
- ``T processes x 1 thread``: ``lorakit train ... --nproc T`` (torchrun, gloo): each rank runs ``accum / T`` of the
  micro-batches on one thread, then one all-reduce of the adapter's gradients.

Reported per arm (median of ``--repeats``, the arms taking turns): the loop's tokens/s (``tokens_per_s`` of the last
metrics line: padded tokens of all ranks over the loop's time, start-up excluded), the wall time of the command
(start-up included), the final loss (the arms train the same samples: equal up to rounding), and the bytes one
all-reduce moves per step (the adapter in fp32). JSON via results_file.py.

Usage:
    .venv/bin/python benchmarks/ddp.py [--steps 40] [--batch 8] [--accum 2] [--processes 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from results_file import write_results

ROOT = Path(__file__).resolve().parents[1]


def run_arm(processes: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    """One ``lorakit train`` run; its loop tokens/s, wall time and final loss."""
    overrides = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", f"train.grad_accum={args.accum}",
                 "train.eval_generate=0", "data.val_path=null", "train.save_every=100000", f"output_dir={out}",
                 "overwrite=true"]  # fmt: skip
    command = [sys.executable, "-m", "lorakit", "train", *overrides, "--no-progress"]
    if processes > 1:
        command += ["--nproc", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if "tokens_per_s" in line][-1]
    adapter = load_file(out / "adapter_model.safetensors")
    return {"tokens_per_s": last["tokens_per_s"], "wall_s": wall, "final_loss": last["loss"],
            "allreduce_bytes_per_step": 4 * sum(t.numel() for t in adapter.values())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (samples)")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step (a multiple of --processes)")
    parser.add_argument("--processes", type=int, default=2, help="T: threads of the one process, or ranks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    arms = {f"1 process x {args.processes} threads": (1, args.processes),
            f"{args.processes} processes x 1 thread": (args.processes, 1)}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, (processes, threads) in arms.items():
                runs[name].append(run_arm(processes, threads, args, Path(tmp) / f"{processes}-{repeat}"))
                print(f"{name}: {runs[name][-1]}", flush=True)
    rows = {}
    for name, measured in runs.items():
        rows[name] = {key: statistics.median(r[key] for r in measured) for key in measured[0]}
        rows[name]["runs"] = measured
    print(f"\n{'arm':28} {'tokens/s':>10} {'wall s':>8} {'final loss':>11}  (median of {args.repeats})")
    for name, row in rows.items():
        print(f"{name:28} {row['tokens_per_s']:10.0f} {row['wall_s']:8.1f} {row['final_loss']:11.5f}")
    volume = next(iter(rows.values()))["allreduce_bytes_per_step"]
    print(f"all-reduce per step: {volume / 1e6:.2f} MB (the adapter's gradients in fp32)")
    import torch

    torch.set_num_threads(args.processes)  # the machine record names the thread count of the 1-process arm
    write_results("ddp", {"recipe": "quickstart (QLoRA nf4, 3.4M-parameter Llama, precision auto)",
                          "global_batch": args.batch * args.accum, "steps": args.steps, "arms": rows,
                          "allreduce_bytes_per_step": volume})  # fmt: skip


if __name__ == "__main__":
    main()
