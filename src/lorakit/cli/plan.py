"""``lorakit plan``: the memory of a fine-tuning step, predicted from the model's config alone (docs/plan.md)."""

from __future__ import annotations

import argparse
import json

from lorakit.optim import OPTIMIZERS
from lorakit.plan_terms import METHODS as PLAN_METHODS
from lorakit.quant import QUANT_TYPES

EPILOG_PLAN = """examples:
  lorakit plan --model llama-2-7b --method qlora --gpu-memory 24GB
  lorakit plan --model llama-3-8b --method lora --r 16 --target attention --batch 8 --seq 1024 --gradient-checkpointing
  lorakit plan --model /models/my-llama --method full --optimizer adamw_8bit --device cpu
  lorakit plan --model path/to/config.json --method qlora --optimizer paged_adamw_8bit --json
  lorakit plan --model llama-2-13b --method lora --gpus 4 --strategy fsdp --gpu-memory 24GB   # per device

what is counted: base weights by storage type, quantization constants, adapters, gradients, optimizer states,
saved activations, the loss's logits, workspace (dequantization, optimizer temporaries), and the runtime (CUDA
context; on CPU the Python + torch process). The peak is 'always' + max(forward/backward, optimizer step).
Sizes are GB = 1e9 bytes (--gpu-memory also takes GiB). Exit status 1 when the step does not fit
--gpu-memory. See docs/plan.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from lorakit.presets import PRESETS

    p = sub.add_parser(
        "plan",
        help="predict the memory of a fine-tuning step, without loading weights",
        description="Predict the peak memory of one training step from the model's config alone, with a "
        "breakdown; with --gpu-memory, say whether it fits and which change makes it fit.",
        epilog=EPILOG_PLAN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True,
        help=f"a model directory, a config.json, or a preset: {', '.join(PRESETS)}",
    )  # fmt: skip
    p.add_argument("--method", choices=PLAN_METHODS, default="qlora", help="default qlora")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--target", default="all",
        help="all / all-linear (7 projections), attention, mlp, minimal (q, v), or a comma list such as "
        "q_proj,v_proj (default all)",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument(
        "--optimizer", choices=list(OPTIMIZERS), default="adamw",
        help="as train.optimizer (default adamw)",
    )  # fmt: skip
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each decoder layer in backward"
    )
    p.add_argument("--lora-dropout", type=float, default=0.05, help="adapter dropout (default 0.05)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="compute dtype (default bfloat16)",
    )
    p.add_argument(
        "--full-dtype", choices=["bfloat16", "float32"], default="bfloat16",
        help="weights of full fine-tuning: bfloat16 (pure bf16) or float32 (master weights) (default bfloat16)",
    )  # fmt: skip
    p.add_argument("--quant-type", choices=QUANT_TYPES, default=None, help="4-bit type (qlora; default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="fp32 block scales (4.5 bits per weight)")
    p.add_argument("--no-chunked-loss", action="store_true", help="materialize the full logits")
    p.add_argument(
        "--target-fraction", type=float, default=1.0,
        help="share of tokens that carry a loss, e.g. 0.5 when prompts are masked (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda",
        help="cuda (adds the CUDA context, pages optimizer states) or cpu (adds the process runtime)",
    )  # fmt: skip
    p.add_argument(
        "--gpus", type=int, default=1, metavar="N",
        help="devices training data-parallel (torchrun, one rank each); the plan is per device (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--strategy", choices=["ddp", "fsdp"], default="ddp",
        help="ddp: everything on every device; fsdp: parameters, gradients and optimizer states 1/N per "
        "device, 4-bit weights whole (default ddp; docs/distributed.md)",
    )  # fmt: skip
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory available per device, e.g. 24GB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from lorakit.plan import PlanConfig, plan_memory

    config = PlanConfig(
        method=args.method, r=args.r, target=args.target, batch_size=args.batch, seq_len=args.seq,
        optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
        lora_dropout=args.lora_dropout, compute_dtype=args.dtype, full_dtype=args.full_dtype,
        quant_type=args.quant_type, double_quant=not args.no_double_quant, chunked_loss=not args.no_chunked_loss,
        target_fraction=args.target_fraction, device=args.device, gpus=args.gpus, strategy=args.strategy,
    )  # fmt: skip
    plan = plan_memory(args.model, config, gpu_memory=args.gpu_memory)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    return 0 if plan.fits is not False else 1
