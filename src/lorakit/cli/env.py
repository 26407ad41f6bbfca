"""``lorakit env``: this machine, its measured matmul rates and what ``auto`` precision picks (for bug reports)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "env",
        help="this machine, its measured matmul rates and what precision auto picks (for bug reports)",
        description="Print lorakit's environment: versions of lorakit, torch, transformers, peft and "
        "bitsandbytes; the devices; the CPU model, ISA level (AVX2 / AVX512 / AVX512_BF16 / AMX), cores "
        "and threads; measured fp32 and bf16 matmul GFLOP/s; whether bf16 is native; what compute_dtype=auto "
        "and precision=auto resolve to. Paste it into bug reports.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--seconds", type=float, default=0.3, help="time per matmul measurement (default 0.3)")
    return p


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.hardware import environment_report, format_environment

    if not 0 < args.seconds <= 60:
        raise ConfigError(f"--seconds: expected a number in (0, 60], got {args.seconds}")
    report = environment_report(measure_seconds=args.seconds)
    print(json.dumps(report, indent=1) if args.json else format_environment(report))
    return 0
