"""A packed sweep against the same configs one after another: ``lorakit sweep`` with and without ``--no-pack``.

Four LoRA configs (r = 8, 16 x lr = 1e-3, 2e-3) on the quickstart task (the bundled 3.4M-parameter Llama, its base in
NF4 as the quickstart loads it; ``--model`` takes a larger local model), ``--steps`` optimizer steps of 8 rows each,
an evaluation on the 100 held-out rows at the end. Each mode is one ``lorakit sweep`` process, timed from start to
exit (imports, loading, training, evaluation, writing every run directory):

- ``processes``: four ``lorakit train`` commands one after another (what a user runs without ``lorakit sweep``:
  each process imports torch, loads the base and tokenizes the data again);
- ``sequential``: ``lorakit sweep --no-pack``: the same four runs one after another in one process;
- ``packed``: ``lorakit sweep``: the four configs in one pack over one base (``lorakit.packed``).

The peak memory of each mode is the largest pack's (or run's) peak RSS (``VmHWM`` after a reset; on CUDA the
allocator's peak) from the sweep's ``results.json``; for ``processes`` the largest child's (``wait4``). Afterwards the script checks that the two modes trained the
same adapters (largest difference of any tensor), so the speed is not bought with different results. The modes
alternate over ``--repeats`` and the table shows medians.

Usage (the quiet-file protocol of docs/benchmarks: nobody else timing, nothing heavy running):
    PYTHONPATH=src .venv/bin/python benchmarks/sweep.py [--workload smollm2] [--steps 60] [--repeats 1]
        [--modes processes,sequential,packed] [--model DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from results_file import write_results

AXES = ["adapter.r=8,16", "train.lr=1e-3,2e-3"]


def run_mode(root: Path, packed: bool, steps: int, extra: list[str], threads: int | None) -> dict:
    """One ``lorakit sweep`` process; its wall time, peak memory and the sweep's rows."""
    out = root / ("packed" if packed else "sequential")
    overrides = [f"train.max_steps={steps}", "train.eval_generate=0", f"train.eval_every={steps}",
                 f"output_dir={root / 'run'}", *extra]  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "lorakit.cli",
        "sweep",
        *AXES,
        *overrides,
        "--out",
        str(out),
        "--no-progress",
    ]
    if not packed:
        command.append("--no-pack")
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    seconds = time.perf_counter() - started
    rows = json.loads((out / "results.json").read_text())["configs"]
    return {
        "seconds": seconds,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "eval_loss": {r["config"]: r["eval_loss"] for r in rows},
        "tokens_per_s": {r["config"]: r["tokens_per_s"] for r in rows},
        "dir": out,
    }


def run_processes(root: Path, steps: int, extra: list[str], threads: int | None) -> dict:
    """Four ``lorakit train`` processes, one per config; wall time and the largest child's peak RSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    values = [[f"{axis.split('=')[0]}={v}" for v in axis.split("=")[1].split(",")] for axis in AXES]
    started, peak_kib = time.perf_counter(), 0
    for i, config in enumerate(itertools.product(*values)):
        overrides = [f"train.max_steps={steps}", "train.eval_generate=0", f"train.eval_every={steps}", *config,
                     f"output_dir={root / str(i)}", *extra]  # fmt: skip
        command = [sys.executable, "-m", "lorakit.cli", "train", *overrides, "--no-progress"]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS (RUSAGE_CHILDREN: any child's)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, command)
        peak_kib = max(peak_kib, usage.ru_maxrss)
    return {
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": round(peak_kib * 1024 / 1e6, 1),
        "dir": None,
    }


def adapter_difference(first: Path, second: Path) -> float:
    """The largest absolute difference between the two sweeps' adapters, over every config and tensor."""
    worst = 0.0
    for config in sorted(p.name for p in (first / "configs").iterdir()):
        a = load_file(first / "configs" / config / "adapter_model.safetensors")
        b = load_file(second / "configs" / config / "adapter_model.safetensors")
        worst = max(worst, *(float((a[k] - b[k]).abs().max()) for k in a))
    return worst


def workload_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe overrides of the workload (the quickstart recipe is the sweep's base either way)."""
    extra = [f"model.path={args.model}"] if args.model else []
    if args.workload == "smollm2":
        from e2e import chat_rows, smollm2_dir, write_jsonl

        args.cache.mkdir(parents=True, exist_ok=True)
        train, held_out = args.cache / "chat_train.jsonl", args.cache / "chat_eval.jsonl"
        write_jsonl(train, chat_rows(400, seed=1))  # the e2e benchmark's files
        write_jsonl(held_out, chat_rows(32, seed=2))
        extra = extra or [f"model.path={smollm2_dir(args.cache)}"]
        extra += [f"data.path={train}", f"data.val_path={held_out}", "data.format=chat", "data.max_length=256",
                  "model.quantize=nf4", "adapter.lora_dropout=0.05"]  # fmt: skip
    batch = args.batch or (1 if args.workload == "smollm2" else None)
    return extra + ([f"train.batch_size={batch}"] if batch else [])


TITLES = {
    "processes": "4 `lorakit train` processes, one after another",
    "sequential": "`lorakit sweep --no-pack`: 4 runs in one process",
    "packed": "`lorakit sweep`: one pack of 4",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per config (default 60)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating (default 1)")
    parser.add_argument(
        "--workload", choices=["quickstart", "smollm2"], default="quickstart",
        help="quickstart: its recipe as shipped; smollm2: SmolLM2-135M-Instruct in NF4 (from the bench extra's "
        "GGUF, converted once under --cache, as benchmarks/e2e.py does) on e2e's chat task",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=None, help="train.batch_size (default: 8 / 1)")
    parser.add_argument("--model", default=None, help="a local model directory instead of the workload's")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-e2e")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of every mode (default: torch's)"
    )
    parser.add_argument(
        "--modes", default=",".join(TITLES), help=f"modes to run, comma-separated (default {','.join(TITLES)})"
    )
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/)")
    args = parser.parse_args()
    modes = [m for m in TITLES if m in args.modes.split(",")]
    if "packed" not in modes or len(modes) < 2:
        parser.error(f"--modes: packed and at least one of {', '.join(m for m in TITLES if m != 'packed')}")
    extra = workload_overrides(args)
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in modes:
                root = Path(tmp) / f"{mode}-{repeat}"
                if mode == "processes":
                    run = run_processes(root, args.steps, extra, args.threads)
                else:
                    run = run_mode(root, mode == "packed", args.steps, extra, args.threads)
                runs[mode].append(run)
                print(f"{mode:10} {run['seconds']:7.1f} s  peak {run['peak_memory_mb']:7.1f} MB")
        difference = (
            adapter_difference(runs["sequential"][0]["dir"], runs["packed"][0]["dir"]) if "sequential" in runs else None
        )
    median = {mode: statistics.median(r["seconds"] for r in runs[mode]) for mode in runs}
    peak = {mode: max(r["peak_memory_mb"] for r in runs[mode]) for mode in runs}
    load = os.getloadavg()[0]
    threads = args.threads or torch.get_num_threads()
    print(f"\n{args.workload}: 4 configs x {args.steps} steps ({', '.join(AXES)}), {' '.join(extra) or 'as shipped'}, "
          f"{threads} threads, load average {load:.1f}")  # fmt: skip
    print("| mode | wall time (s) | peak memory (MB) | time / packed |\n|---|---|---|---|")
    for mode in modes:
        title = TITLES[mode]
        print(f"| {title} | {median[mode]:.1f} | {peak[mode]:.0f} | {median[mode] / median['packed']:.2f}x |")
    if difference is not None:
        print(f"largest adapter difference packed vs sequential: {difference:.2e}")
    for mode in runs:
        for run in runs[mode]:
            run["dir"] = None
    meta = {"steps": args.steps, "axes": AXES, "workload": args.workload, "overrides": extra,
            "repeats": args.repeats, "threads": threads, "load_average": load, "modes": modes}  # fmt: skip
    summary = {"seconds": median, "peak_memory_mb": peak, "max_adapter_difference": difference,
               **{f"speedup_vs_{mode}": median[mode] / median["packed"] for mode in modes if mode != "packed"}}  # fmt: skip
    name = "sweep" if args.workload == "quickstart" else f"sweep-{args.workload}"
    write_results(name, {"meta": meta, "summary": summary, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
