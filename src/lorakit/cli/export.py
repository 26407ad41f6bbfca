"""``lorakit export``: a trained adapter as the files a deployment target loads (docs/export.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.gguf_write import GGUF_QUANTS
from lorakit.hardware import DTYPE_CHOICES
from lorakit.quant import QUANT_TYPES

FORMATS = ("gguf", "safetensors", "peft")

EPILOG_EXPORT = """examples:
  lorakit export --model base.gguf --adapter runs/chat --format gguf --out chat.gguf       # llama.cpp / Ollama
  lorakit export --model base.gguf --adapter runs/chat --format gguf --quant q8_0 --out chat-q8.gguf
  lorakit export --model base.gguf --adapter runs/chat --format gguf --adapter-only --out chat-lora.gguf
  lorakit export --model models/llama --adapter runs/x --format safetensors --out merged/   # transformers
  lorakit export --model models/llama --adapter runs/x --format peft --out adapter/         # vLLM / TGI / PEFT
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export an adapter for deployment: GGUF (llama.cpp, Ollama), merged safetensors, or PEFT files",
        description="Write what a deployment target loads. gguf: the merged model as one GGUF file (llama.cpp, "
        "Ollama, LM Studio; architecture, tokenizer and chat template included), or with --adapter-only the "
        "adapter as a GGUF LoRA file (llama.cpp --lora). safetensors: the merged model as a Hugging Face "
        "directory (as `lorakit merge`). peft: the adapter alone in PEFT's format (vLLM, TGI, PEFT). GGUF needs "
        "the gguf package (pip install 'lorakit[gguf]'). See docs/export.md.",
        epilog=EPILOG_EXPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model: a Hugging Face directory or a .gguf file")
    p.add_argument(
        "--adapter", action="append", required=True,
        help="adapter (run output) directory; repeat to merge several (gguf / safetensors only)",
    )  # fmt: skip
    p.add_argument("--format", choices=FORMATS, required=True, help="what to write (see above)")
    p.add_argument(
        "--out", required=True, help="output .gguf file or directory (must not exist, unless --overwrite)"
    )
    p.add_argument(
        "--quant", choices=GGUF_QUANTS, default="f16",
        help="gguf: how the matrices are stored (default f16; 1-D tensors stay f32; q8_0 is 8.5 bits/weight)",
    )  # fmt: skip
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="gguf: write the adapter as a GGUF LoRA file, not the merged model",
    )
    p.add_argument(
        "--quantize", choices=[*QUANT_TYPES, "none"], default=None,
        help="the base as trained, for merging (default: from the adapter's recipe.yaml, else none)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="safetensors: saved dtype (default auto: the base checkpoint's; float32 for a GGUF base)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def run(args: argparse.Namespace) -> int:
    from lorakit import export
    from lorakit.errors import ConfigError

    out = Path(args.out)
    export.check_out(out, args.overwrite)
    single = args.format == "peft" or args.adapter_only
    if single and len(args.adapter) != 1:
        raise ConfigError(f"--format {args.format}{' --adapter-only' if args.adapter_only else ''}: "
                          f"expected one --adapter, got {len(args.adapter)}")  # fmt: skip
    if args.adapter_only and args.format != "gguf":
        raise ConfigError(
            "--adapter-only: only with --format gguf (--format peft is the adapter alone already)"
        )
    quantize = export.base_quantize(args.quantize, args.adapter)
    if args.format == "peft":
        export.export_peft(args.adapter[0], out)
        what = "adapter (PEFT format)"
    elif args.format == "safetensors":
        dtype = export.export_merged(args.model, args.adapter, out, quantize, args.dtype)
        what = f"merged model (Hugging Face directory, {dtype})"
    elif args.adapter_only:
        export.export_gguf_adapter(args.model, args.adapter[0], out)
        what = "adapter (GGUF LoRA: llama-cli -m BASE.gguf --lora FILE)"
    else:
        export.export_gguf(args.model, args.adapter, out, quantize, args.quant)
        what = f"merged model (GGUF, {args.quant})"
    print(f"{what} written to {out}")
    return 0
