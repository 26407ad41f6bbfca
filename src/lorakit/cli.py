"""The ``lorakit`` command line: one explicit table of subcommands.

Every subcommand validates its input at the boundary; a :class:`~lorakit.errors.LorakitError` is printed as
one clear line (``error: ...``) with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from lorakit.hardware import DTYPE_CHOICES

EPILOG_TRAIN = """examples:
  lorakit train                                  # the bundled quickstart (QLoRA on a tiny model, offline)
  lorakit train recipes/qlora_alpaca.yaml model.path=/models/llama data.path=my.jsonl
  lorakit train my.yaml train.lr=1e-4 adapter.r=32 --dry-run
  lorakit train my.yaml --resume                 # continue from the newest checkpoint in output_dir
"""


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="fine-tune an adapter from a YAML recipe",
        description="Fine-tune an adapter from a YAML recipe (sections model, adapter, data, train, output_dir). "
        "With no recipe, runs the bundled quickstart.",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "recipe", nargs="?", help="recipe YAML file, or a name under recipes/ (default: quickstart)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=2e-4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe as YAML and exit")
    p.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT_DIR",
        help="continue a run: from CHECKPOINT_DIR, or from the newest checkpoint in output_dir",
    )  # fmt: skip
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)"
    )
    return p


def _split_recipe_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:
        overrides.insert(0, recipe)  # `lorakit train train.lr=1e-3`: the quickstart with an override
        recipe = None
    return recipe, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from lorakit.recipe import load_recipe

    recipe_path, overrides = _split_recipe_args(args)
    recipe = load_recipe(recipe_path, overrides)
    if args.dry_run:
        from lorakit.train import precision_header

        resolved = recipe.with_precision_resolved()
        print(f"# {precision_header(recipe, resolved)}")
        print(resolved.to_yaml(), end="")
        return 0
    from lorakit.train import train

    result = train(recipe, resume=args.resume, progress=not args.no_progress)
    _print_result(result, recipe)
    return 0


def _print_result(result, recipe) -> None:
    """The run's summary; with a before/after report (``train.eval_generate``), the base and the fine-tuned
    model side by side on held-out rows, then the commands that use the adapter."""
    loss = result.final_train_loss
    print(f"\nsteps: {result.steps}  final train loss: {loss:.4f}  time: {result.seconds:.0f} s")
    if result.eval_loss is not None:
        print(f"eval loss: {result.eval_loss:.4f}  best: {result.best_eval_loss:.4f}")
    before, after = result.before, result.after
    if before and after:
        print(f"\nheld-out rows (n={after['n']})   base model   fine-tuned")
        if before.get("eval_loss") is not None and after.get("eval_loss") is not None:
            print(f"eval loss             {before['eval_loss']:12.4f} {after['eval_loss']:12.4f}")
        print(f"exact match           {before['exact_match']:12.1%} {after['exact_match']:12.1%}")
        rows = [(a["input"] or a["instruction"], a["expected"], b["got"], a["got"])
                for b, a in zip(before["answers"], after["answers"])][:8]  # fmt: skip
        print()
        print(_table(["input", "expected", "base model", "fine-tuned"], rows))
    out, model = result.output_dir, recipe.model.path
    print(f"\nadapter (PEFT format), tokenizer, recipe, metrics and loss curve written to {out}/")
    example = after["answers"][0] if after and after["answers"] else {}
    prompt = shlex.quote(example.get("instruction", "Hello"))
    given = f" --input {shlex.quote(example['input'])}" if example.get("input") else ""
    print("next:")
    print(f"  lorakit generate --model {shlex.quote(model)} --adapter {out} --greedy{given} {prompt}")
    print(f"  lorakit merge --model {shlex.quote(model)} --adapter {out} --out {out}-merged")


def _table(header: list[str], rows: list[tuple[str, ...]], width: int = 24) -> str:
    """Left-aligned columns; cells longer than ``width`` are cut with ``...``, line breaks shown as ``\\n``."""

    def cell(text: str) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 3] + "..."

    cells = [list(header), *[[cell(c) for c in row] for row in rows]]
    sizes = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  " + "  ".join(c.ljust(n) for c, n in zip(r, sizes)).rstrip() for r in cells]
    lines.insert(1, "  " + "  ".join("-" * n for n in sizes))
    return "\n".join(lines)


def _add_generate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="generate text with a base model and an adapter",
        description="Generate text from a local base model, optionally with one or more adapters.",
    )
    p.add_argument("prompts", nargs="+", help="prompt(s); each is wrapped in --template")
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", action="append", default=[], help="adapter directory (repeat to combine)")
    p.add_argument("--template", choices=["alpaca", "chat", "none"], default="alpaca", help="prompt template")
    p.add_argument("--input", default="", help="alpaca 'input' field for the prompt(s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature and top-p)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument(
        "--quantize", choices=["nf4", "fp4", "none"], default=None,
        help="load the base in 4 bits (default: as the adapter's recipe.yaml says, else none)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="compute dtype (default auto: bfloat16 where the hardware multiplies it natively, else float32 "
        "on CPU / float16 on older GPUs; `lorakit env` shows what auto means here)",
    )  # fmt: skip
    return p


def _base_quantize(choice: str | None, adapters: list[str]) -> str | None:
    """The quantization the adapter was trained with (from its recipe.yaml) unless given explicitly."""
    if choice is not None:
        return None if choice == "none" else choice
    import yaml

    for adapter in adapters:
        recipe = Path(adapter) / "recipe.yaml"
        if recipe.is_file():
            return (yaml.safe_load(recipe.read_text()) or {}).get("model", {}).get("quantize")
    return None


def _load_for_inference(model_dir: str, adapters: list[str], quantize: str | None, dtype: str = "auto"):
    from transformers import AutoTokenizer

    import lorakit
    from lorakit.loading import load_model

    model = load_model(model_dir, quantize=quantize, compute_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(
        adapters[0] if adapters and _has_tokenizer(adapters[0]) else model_dir
    )
    names = []
    for i, adapter in enumerate(adapters):
        name = f"adapter_{i}"
        lorakit.load_adapter(model, adapter, adapter_name=name, activate=False)
        names.append(name)
    if names:
        lorakit.set_adapter(model, names)
    return model, tokenizer


def _checkpoint_dtype(model_dir: str) -> str:
    """The dtype a model directory's config.json says its weights are stored in (float32 if it names none)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    named = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return named if named in ("bfloat16", "float16", "float32") else "float32"


def _has_tokenizer(directory: str) -> bool:
    return (Path(directory) / "tokenizer_config.json").is_file()


def cmd_generate(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.generate import SamplingConfig, generate_text, render_prompt

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if not args.greedy and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise ConfigError("--temperature must be > 0 and --top-p in (0, 1] (or pass --greedy)")
    model, tokenizer = _load_for_inference(
        args.model, args.adapter, _base_quantize(args.quantize, args.adapter), args.dtype
    )
    prompts = [render_prompt(p, args.template, tokenizer, args.input) for p in args.prompts]
    sampling = SamplingConfig(args.max_new_tokens, args.greedy, args.temperature, args.top_p, args.seed)
    for prompt, answer in zip(args.prompts, generate_text(model, tokenizer, prompts, sampling)):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(answer)
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge",
        help="merge adapters into the base and save a plain Hugging Face model",
        description="Merge adapters into the base model and write a plain Hugging Face model directory that "
        "transformers loads without lorakit. A 4-bit base is dequantized once and merged exactly: the result "
        "equals the dequantized base the adapter was trained on, plus the adapter.",
    )
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument(
        "--adapter", action="append", required=True, help="adapter directory (repeat to merge several)"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist, unless --overwrite)")
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="saved dtype (default auto: the dtype the base checkpoint is stored in, from its config.json; "
        "the merge itself is computed in float32)",
    )  # fmt: skip
    p.add_argument(
        "--quantize", choices=["nf4", "fp4", "none"], default=None,
        help="the base as trained (default: from the adapter's recipe.yaml, else none)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    return p


def cmd_merge(args: argparse.Namespace) -> int:
    import shutil

    import torch

    import lorakit
    from lorakit.errors import ConfigError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(
            f"--out {out} already exists and is not empty; pass --overwrite or choose another path"
        )
    # Merged in fp32 (a 4-bit base is dequantized to fp32 once), rounded once to the saved dtype.
    model, tokenizer = _load_for_inference(
        args.model, args.adapter, _base_quantize(args.quantize, args.adapter), "float32"
    )
    dtype = _checkpoint_dtype(args.model) if args.dtype == "auto" else args.dtype
    merged = lorakit.merge_and_unload(model).to(getattr(torch, dtype))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"merged model written to {out} ({dtype})")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect",
        help="show what an adapter, checkpoint or run directory holds",
        description="Show an adapter's config, tensors, ranks and size; a checkpoint's step and metrics.",
    )
    p.add_argument("path", help="adapter, checkpoint or run output directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def cmd_inspect(args: argparse.Namespace) -> int:
    from lorakit.inspect import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key:18} {value}")
    return 0


def _add_preprocess(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "preprocess",
        help="tokenize a recipe's data (and show decoded samples with their label mask)",
        description="Tokenize the recipe's data as training would (filling the cache when data.cache_dir is "
        "set) and print statistics; with --debug, print decoded samples with masked (no-loss) spans marked.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML file (default: quickstart)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--debug", action="store_true", help="print decoded samples with their label mask")
    p.add_argument("-n", "--num-samples", type=int, default=3, help="samples shown with --debug (default 3)")
    return p


def cmd_preprocess(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from lorakit.data import load_dataset, render_masked_sample
    from lorakit.recipe import load_recipe

    recipe_path, overrides = _split_recipe_args(args)
    recipe = load_recipe(recipe_path, overrides)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, local_files_only=True)
    train_set, _, stats = load_dataset(recipe.data, tokenizer)
    print(stats.summary())
    if args.debug:
        for i in range(min(args.num_samples, len(train_set))):
            print(f"\n--- sample {i} ---")
            print(render_masked_sample(tokenizer, train_set[i]))
    return 0


EPILOG_SERVE = """examples:
  lorakit serve --model models/llama --adapter-root adapters --adapter legal=legal --adapter support=support-v2
  lorakit serve --model models/llama --quantize nf4 --port 8080 --max-batch 32
  LORAKIT_API_KEY=... lorakit serve --model models/llama --host 0.0.0.0 --api-key-env LORAKIT_API_KEY
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "legal", "prompt": "Hello", "max_tokens": 32}'
"""


def _add_serve(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description="Serve one base model with many LoRA adapters over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /v1/adapters). Concurrent requests are batched "
        "across adapters. See docs/serving.md.",
        epilog=EPILOG_SERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="base model directory (Hugging Face format, with its tokenizer)"
    )
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
        "--quantize", choices=["nf4", "fp4", "none"], default="none", help="load the base in 4 bits"
    )
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="compute dtype (default auto: bfloat16 where the hardware multiplies it natively, else float32 "
        "on CPU / float16 on older GPUs)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (default cpu)")
    p.add_argument(
        "--api-key-env", default=None, metavar="VAR",
        help="require 'Authorization: Bearer KEY' with KEY read from environment variable VAR",
    )  # fmt: skip
    return p


def cmd_serve(args: argparse.Namespace) -> int:
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
        dtype=args.dtype, device=args.device, api_key=api_key,
    )  # fmt: skip
    server = Server(config)
    print(f"serving {server.model_ids()} on {server.url} (Ctrl-C to stop)", flush=True)
    server.serve_forever()
    return 0


EPILOG_PLAN = """examples:
  lorakit plan --model llama-2-7b --method qlora --gpu-memory 24GB
  lorakit plan --model llama-3-8b --method lora --r 16 --target attention --batch 8 --seq 1024 --gradient-checkpointing
  lorakit plan --model /models/my-llama --method full --optimizer adamw_8bit --device cpu
  lorakit plan --model path/to/config.json --method qlora --optimizer paged_adamw_8bit --json

what is counted: base weights by storage type, quantization constants, adapters, gradients, optimizer states,
saved activations, the loss's logits, workspace (dequantization, optimizer temporaries), and the runtime (CUDA
context; on CPU the Python + torch process). The peak is 'always' + max(forward/backward, optimizer step).
Sizes are GB = 1e9 bytes (--gpu-memory also takes GiB). Exit status 1 when the step does not fit
--gpu-memory. See docs/plan.md.
"""


def _add_plan(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="qlora", help="default qlora")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--target", default="all",
        help="all / all-linear (7 projections), attention, mlp, minimal (q, v), or a comma list such as "
        "q_proj,v_proj (default all)",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument(
        "--optimizer", choices=["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"], default="adamw",
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
    p.add_argument(
        "--quant-type", choices=["nf4", "fp4"], default=None, help="4-bit type (qlora; default nf4)"
    )
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
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory available, e.g. 24GB or 24GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    from lorakit.plan import PlanConfig, plan_memory

    config = PlanConfig(
        method=args.method, r=args.r, target=args.target, batch_size=args.batch, seq_len=args.seq,
        optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
        lora_dropout=args.lora_dropout, compute_dtype=args.dtype, full_dtype=args.full_dtype,
        quant_type=args.quant_type, double_quant=not args.no_double_quant, chunked_loss=not args.no_chunked_loss,
        target_fraction=args.target_fraction, device=args.device,
    )  # fmt: skip
    plan = plan_memory(args.model, config, gpu_memory=args.gpu_memory)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    return 0 if plan.fits is not False else 1


def _add_env(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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


def cmd_env(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.hardware import environment_report, format_environment

    if not 0 < args.seconds <= 60:
        raise ConfigError(f"--seconds: expected a number in (0, 60], got {args.seconds}")
    report = environment_report(measure_seconds=args.seconds)
    print(json.dumps(report, indent=1) if args.json else format_environment(report))
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (_add_train, cmd_train),
    "generate": (_add_generate, cmd_generate),
    "merge": (_add_merge, cmd_merge),
    "inspect": (_add_inspect, cmd_inspect),
    "preprocess": (_add_preprocess, cmd_preprocess),
    "serve": (_add_serve, cmd_serve),
    "plan": (_add_plan, cmd_plan),
    "env": (_add_env, cmd_env),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``lorakit`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="lorakit: LoRA / QLoRA fine-tuning from a 4-bit base to a served adapter. "
        "Run 'lorakit train' for the offline quickstart.",
    )
    from lorakit import __version__

    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="run 'lorakit COMMAND --help' for its options"
    )
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script."""
    from lorakit.errors import LorakitError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][1](args)
    except LorakitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
