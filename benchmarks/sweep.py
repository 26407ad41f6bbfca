"""A packed sweep against the same configs one after another: ``lorakit sweep`` with and without ``--no-pack``.

Four LoRA configs (r = 8, 16 x lr = 1e-3, 2e-3) on the quickstart task (the bundled 3.4M-parameter Llama, its base in
NF4 as the quickstart loads it; ``--model`` takes a larger local model), ``--steps`` optimizer steps of 8 rows each,
an evaluation on the 100 held-out rows at the end. Each mode is one ``lorakit sweep`` process, timed from start to
exit (imports, loading, training, evaluation, writing every run directory):

- ``sequential``: ``--no-pack``: four ordinary runs, one after another (one process, so no extra start-up cost);
- ``packed``: the four configs in one pack over one base (``lorakit.packed``).

The peak memory of each mode is the largest pack's (or run's) peak RSS (``VmHWM`` after a reset; on CUDA the
allocator's peak) from the sweep's ``results.json``. Afterwards the script checks that the two modes trained the
same adapters (largest difference of any tensor), so the speed is not bought with different results. The modes
alternate over ``--repeats`` and the table shows medians.

Usage (the quiet-file protocol of docs/benchmarks: nobody else timing, nothing heavy running):
    PYTHONPATH=src .venv/bin/python benchmarks/sweep.py [--steps 60] [--repeats 1] [--model DIR]
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

import torch
from safetensors.torch import load_file

from results_file import write_results

AXES = ["adapter.r=8,16", "train.lr=1e-3,2e-3"]


def run_mode(root: Path, packed: bool, steps: int, model: str | None) -> dict:
    """One ``lorakit sweep`` process; its wall time, peak memory and the sweep's rows."""
    out = root / ("packed" if packed else "sequential")
    overrides = [f"train.max_steps={steps}", "train.eval_generate=0", f"train.eval_every={steps}",
                 f"output_dir={root / 'run'}"]  # fmt: skip
    if model:
        overrides.append(f"model.path={model}")
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
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    rows = json.loads((out / "results.json").read_text())["configs"]
    return {
        "seconds": seconds,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "eval_loss": {r["config"]: r["eval_loss"] for r in rows},
        "tokens_per_s": {r["config"]: r["tokens_per_s"] for r in rows},
        "dir": out,
    }


def adapter_difference(first: Path, second: Path) -> float:
    """The largest absolute difference between the two sweeps' adapters, over every config and tensor."""
    worst = 0.0
    for config in sorted(p.name for p in (first / "configs").iterdir()):
        a = load_file(first / "configs" / config / "adapter_model.safetensors")
        b = load_file(second / "configs" / config / "adapter_model.safetensors")
        worst = max(worst, *(float((a[k] - b[k]).abs().max()) for k in a))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per config (default 60)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating (default 1)")
    parser.add_argument("--model", default=None, help="a local model directory (default: the quickstart's)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"sequential": [], "packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in ("sequential", "packed"):
                root = Path(tmp) / f"{mode}-{repeat}"
                runs[mode].append(run_mode(root, mode == "packed", args.steps, args.model))
                print(
                    f"{mode:10} {runs[mode][-1]['seconds']:7.1f} s  peak {runs[mode][-1]['peak_memory_mb']:7.1f} MB"
                )
        difference = adapter_difference(runs["sequential"][0]["dir"], runs["packed"][0]["dir"])
    seq = statistics.median(r["seconds"] for r in runs["sequential"])
    pack = statistics.median(r["seconds"] for r in runs["packed"])
    load = os.getloadavg()[0]
    print(
        f"\n4 configs x {args.steps} steps ({', '.join(AXES)}), torch threads {torch.get_num_threads()}, load {load:.1f}"
    )
    print("| mode | wall time (s) | peak memory (MB) |\n|---|---|---|")
    for mode, value in (("4 runs one after another", seq), ("one pack of 4", pack)):
        peak = max(r["peak_memory_mb"] for r in runs["sequential" if "after" in mode else "packed"])
        print(f"| {mode} | {value:.1f} | {peak:.0f} |")
    print(f"speed-up {seq / pack:.2f}x; largest adapter difference packed vs sequential {difference:.2e}")
    for mode in runs:
        for run in runs[mode]:
            run["dir"] = None
    meta = {"steps": args.steps, "axes": AXES, "model": args.model or "@quickstart/model (nf4)",
            "repeats": args.repeats, "threads": torch.get_num_threads(), "load_average": load}  # fmt: skip
    summary = {
        "sequential_s": seq,
        "packed_s": pack,
        "speedup": seq / pack,
        "max_adapter_difference": difference,
    }
    write_results("sweep", {"meta": meta, "summary": summary, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
