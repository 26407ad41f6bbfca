"""Mixed-adapter batches: one batch whose rows use different adapters, lorakit against one adapter and against PEFT.

One random Llama (``--hidden``, ``--layers``, ``--vocab``; built from a config in memory, never saved) carries 16
LoRA adapters (rank ``--rank`` on all 7 linear projections, B random and non-zero). lorakit saves them and PEFT loads
the same files into a ``peft.PeftModel`` over a copy of the same base, so both models compute the same function
(checked: the mixed-batch logits agree before anything is timed). A batch of ``--batch`` rows runs as:

- ``single``: every row on one adapter through the ordinary active-adapter path (``set_adapter``);
- ``names x1``: every row naming the same adapter through ``adapter_names=`` (the mixed path's own overhead);
- ``mixed xK``: rows spread round-robin over K = 4, 8, 16 adapters with ``adapter_names=[...]``.

Prefill: one forward of ``--batch x --prompt`` tokens (``logits_to_keep=1``, as a server prefill). Decode: ``--steps``
greedy steps of one token per row on a KV cache filled by that prefill, a manual loop over ``past_key_values`` (what
``generate`` runs per step, without its bookkeeping); the cache is cropped back after each repeat. All variants run
round-robin within each repeat so they see the same machine load; the table reports medians of ``--repeats`` and the
ratios are ratios of medians.

Usage:
    .venv/bin/python benchmarks/multi_adapter.py [--repeats 5] [--threads 2] [--dtype auto|fp32|bf16]

``--dtype auto`` (the default) is bf16 where the CPU multiplies bf16 natively, else fp32
(:func:`lorakit.hardware.auto_dtype`); the recorded runs in docs/serving.md are ``--dtype fp32``.

Give ``--threads`` no more than the idle cores: on a 2-core machine with one core busy elsewhere, 2 OpenMP threads
made single runs up to 7x slower than their minimum (use ``--threads 1`` there; the table prints the load average).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.hardware import auto_dtype
from results_file import write_results
from timing import median_seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPREADS = (4, 8, 16)  # adapters per mixed batch


def build_models(args: argparse.Namespace, directory: Path) -> tuple[torch.nn.Module, peft.PeftModel]:
    """The lorakit model with 16 adapters, and PEFT's model of the same base loading the same adapter files."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.prompt + args.steps,
    )  # fmt: skip
    base = LlamaForCausalLM(config).to(DTYPES[args.dtype]).eval()
    theirs_base = copy.deepcopy(base)
    ours = base
    for i in range(max(SPREADS)):
        name = f"a{i}"
        cfg = lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
        lorakit.wrap(ours, cfg, adapter_name=name)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # PEFT's init leaves B = 0; a trained adapter has a real delta
            for _, layer in lorakit.inject.lora_layers(ours):
                weight = layer.lora_B[name].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
        lorakit.save_adapter(ours, directory / name, adapter_name=name)
    theirs = peft.PeftModel.from_pretrained(theirs_base, directory / "a0", adapter_name="a0")
    for i in range(1, max(SPREADS)):
        theirs.load_adapter(directory / f"a{i}", adapter_name=f"a{i}")
    return ours.eval(), theirs.eval()


def variants(args: argparse.Namespace) -> dict[str, list[str] | None]:
    """Row adapter names per variant; None runs the single active adapter (``a0``) without ``adapter_names``."""
    rows = {"single": None, "names x1": ["a0"] * args.batch}
    rows.update({f"mixed x{k}": [f"a{i % k}" for i in range(args.batch)] for k in SPREADS})
    return rows


def forward_kwargs(names: list[str] | None) -> dict:
    return {} if names is None else {"adapter_names": names}


def prefill_fn(model: torch.nn.Module, ids: torch.Tensor, names: list[str] | None) -> Callable[[], None]:
    def run() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1, **forward_kwargs(names))

    return run


def decode_fn(
    model: torch.nn.Module, ids: torch.Tensor, names: list[str] | None, steps: int
) -> Callable[[], None]:
    """``steps`` greedy decode steps on a cache prefilled once; each call crops the cache back to the prompt."""
    cache = DynamicCache()
    out = model(
        input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **forward_kwargs(names)
    )
    first = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    prompt = ids.shape[1]

    def run() -> None:
        token = first
        for step in range(steps):
            positions = torch.full_like(token, prompt + step)  # [B, 1]
            logits = model(
                input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True,
                **forward_kwargs(names),
            ).logits  # fmt: skip
            token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        cache.crop(-steps)  # back to the prompt

    return run


def set_single(ours: torch.nn.Module, theirs: peft.PeftModel) -> None:
    lorakit.set_adapter(ours, "a0")
    theirs.set_adapter("a0")


def check_parity(
    ours: torch.nn.Module, theirs: peft.PeftModel, ids: torch.Tensor, names: list[str], tolerance: float
) -> float:
    """Largest |logit difference| between lorakit and PEFT on the most mixed batch (must be rounding only)."""
    a = ours(input_ids=ids, adapter_names=names).logits.float()
    b = theirs(input_ids=ids, adapter_names=names).logits.float()
    torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    return float((a - b).abs().max())


def ratios(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Throughput ratios (ratios of median times): each variant over its library's single run, lorakit over PEFT."""
    out = {}
    kinds = sorted({name.split(" ", 1)[1] for name in table})  # "single", "mixed x4", ...
    for lib in ("lorakit", "peft"):
        for v in kinds:
            out[f"{lib} {v} / {lib} single"] = (
                table[f"{lib} single"]["median_s"] / table[f"{lib} {v}"]["median_s"]
            )
    for v in kinds:
        out[f"peft / lorakit {v}"] = table[f"peft {v}"]["median_s"] / table[f"lorakit {v}"]["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128, help="prefill tokens per row")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="base weights (adapters stay fp32)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/multi_adapter.<kind>.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        args.dtype = "bf16" if auto_dtype("cpu") == torch.bfloat16 else "fp32"
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build_models(args, Path(tmp))
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    rows = variants(args)
    load_before = os.getloadavg()
    with torch.no_grad():
        tolerance = 1e-3 if args.dtype == "fp32" else 5e-2
        parity = check_parity(ours, theirs, ids[:, :16], rows[f"mixed x{max(SPREADS)}"], tolerance)
        set_single(ours, theirs)
        models = {"lorakit": ours, "peft": theirs}
        phases = {
            "prefill": {
                f"{lib} {v}": prefill_fn(m, ids, names) for lib, m in models.items() for v, names in rows.items()
            },
            "decode": {
                f"{lib} {v}": decode_fn(m, ids, names, args.steps) for lib, m in models.items() for v, names in rows.items()
            },
        }  # fmt: skip
        tokens = {"prefill": args.batch * args.prompt, "decode": args.batch * args.steps}
        timings = {phase: median_seconds(fns, args.repeats, args.warmup) for phase, fns in phases.items()}
    load_after = os.getloadavg()

    results: dict[str, dict] = {}
    for phase, table in timings.items():
        for row in table.values():
            row["tokens_per_s"] = tokens[phase] / row["median_s"]
        results[phase] = {"tokens": tokens[phase], "timings": table, "ratios": ratios(table)}

    print(
        f"cpu, {args.threads} threads, Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {args.dtype} "
        f"base, {max(SPREADS)} adapters r={args.rank} on all 7 projections (fp32), batch {args.batch}; prefill "
        f"{args.batch}x{args.prompt} tokens, decode {args.steps} steps x {args.batch} rows; median of {args.repeats}"
    )
    print(
        f"1-minute load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores; "
        f"lorakit vs PEFT mixed-batch logits max |diff| {parity:.2e}"
    )
    for phase, result in results.items():
        print(
            f"\n{phase:<8} {'variant':<10} {'median ms':>10} {'min ms':>9} {'tokens/s':>9} {'/ single':>9} {'peft/lk':>8}"
        )
        for variant in rows:
            for lib in models:
                row = result["timings"][f"{lib} {variant}"]
                vs_single = result["ratios"][f"{lib} {variant} / {lib} single"]
                speedup = result["ratios"][f"peft / lorakit {variant}"]
                print(
                    f"{lib:<8} {variant:<10} {row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>9.1f} "
                    f"{row['tokens_per_s']:>9.0f} {vs_single:>8.2f}x "
                    + (f"{speedup:>7.2f}x" if lib == "lorakit" else "")
                )
    print(
        "\n/ single: tokens/s over the same library's single-adapter run; peft/lk: lorakit tokens/s over PEFT's"
    )
    print(
        f"target: lorakit mixed >= 0.80x single and faster than PEFT; whole run {time.perf_counter() - started:.0f} s"
    )

    meta = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    meta.update(
        loadavg_1min_before_after=[load_before[0], load_after[0]],
        parity_max_abs_logit_diff=parity,
        variants=rows,
    )
    write_results("multi_adapter", {"meta": meta, **results}, args.out)


if __name__ == "__main__":
    main()
