"""``lorakit serve``: one base model and its adapters over an OpenAI-compatible HTTP API (docs/serving.md)."""

from __future__ import annotations

import argparse

from lorakit.hardware import DTYPE_CHOICES
from lorakit.quant import QUANT_TYPES

EPILOG_SERVE = """examples:
  lorakit serve --model models/llama --adapter-root adapters --adapter legal=legal --adapter support=support-v2
  lorakit serve --model models/llama --quantize nf4 --port 8080 --max-batch 32
  LORAKIT_API_KEY=... lorakit serve --model models/llama --host 0.0.0.0 --api-key-env LORAKIT_API_KEY
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "legal", "prompt": "Hello", "max_tokens": 32}'
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description="Serve one base model with many LoRA adapters over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /v1/adapters). Concurrent requests are batched "
        "across adapters. See docs/serving.md.",
        epilog=EPILOG_SERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model: a Hugging Face directory or a .gguf file")
    p.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR",
        help="load the adapter in DIR under NAME at start (repeat); DIR is taken from --adapter-root when given",
    )  # fmt: skip
    p.add_argument(
        "--adapter-root", default=None, metavar="DIR",
        help="every adapter path must stay inside DIR; also enables loading adapters at run time "
        "(POST /v1/adapters). Default: no run-time loading",
    )  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--model-name", default=None, help="the base model's id in the API (default: the directory name)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (default 16)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="most waiting requests; more get 429 (default 64)"
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=1024,
        help="largest max_tokens a request may ask for (default 1024)",
    )
    p.add_argument(
        "--quantize", choices=[*QUANT_TYPES, "none"], default="none", help="load the base in 4 bits"
    )
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="compute dtype (default auto: bfloat16 where the hardware multiplies it natively, else float32 "
        "on CPU / float16 on older GPUs)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (default cpu)")
    p.add_argument(
        "--max-connections", type=int, default=256, help="most open connections; more get 503 (default 256)"
    )
    p.add_argument(
        "--header-timeout", type=float, default=20.0, metavar="S",
        help="seconds a connection may take to send a request's headers, idle keep-alive included (default 20)",
    )  # fmt: skip
    p.add_argument(
        "--body-timeout", type=float, default=30.0, metavar="S",
        help="seconds a request may take to send its body; then 408 (default 30)",
    )  # fmt: skip
    p.add_argument(
        "--shutdown-grace", type=float, default=10.0, metavar="S",
        help="on Ctrl-C or SIGTERM, seconds to answer in-flight requests (or 503) before exiting (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--api-key-env", default=None, metavar="VAR",
        help="require 'Authorization: Bearer KEY' with KEY read from environment variable VAR",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    from lorakit.errors import ConfigError
    from lorakit.serve import ServeConfig, Server

    adapters: dict[str, str] = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter: expected NAME=DIR, got {item!r}")
        if name in adapters:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env: environment variable {args.api_key_env} is not set or empty")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(
        model_dir=args.model, adapters=adapters, adapter_root=args.adapter_root, host=args.host, port=args.port,
        model_name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit, quantize=None if args.quantize == "none" else args.quantize,
        dtype=args.dtype, device=args.device, api_key=api_key, max_connections=args.max_connections,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, shutdown_grace=args.shutdown_grace,
    )  # fmt: skip
    server = Server(config)
    print(f"serving {server.model_ids()} on {server.url} (Ctrl-C or SIGTERM to stop)", flush=True)
    server.serve_forever()
    return 0
