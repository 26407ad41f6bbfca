"""The ``lorakit`` command line: one explicit table of subcommands (:data:`COMMANDS`).

The recipe and adapter subcommands (train, preprocess, generate, merge, inspect) are here; ``serve``, ``plan``,
``export`` and ``env`` each have their own module beside this one.

Every subcommand validates its input at the boundary, and runs inside one error boundary
(:mod:`lorakit.cli.boundary`): a :class:`~lorakit.errors.LorakitError` is printed as one clear line
(``error: ...``) with exit status 2, any other failure as one line with status 1; the traceback only with
``--debug`` or ``LORAKIT_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from lorakit.cli import env, export, plan, serve, sweep
from lorakit.cli.boundary import add_debug_flag, run_command
from lorakit.hardware import DTYPE_CHOICES
from lorakit.quant import QUANT_TYPES

EPILOG_TRAIN = """examples:
  lorakit train                                  # the bundled quickstart (QLoRA on a tiny model, offline)
  lorakit train qlora_alpaca model.path=/models/llama data.path=my.jsonl   # a shipped recipe, by name
  lorakit train my.yaml train.lr=1e-4 adapter.r=32 --dry-run
  lorakit train my.yaml --resume                 # continue from the newest checkpoint in output_dir
  lorakit train my.yaml --nproc 2                # data parallel on 2 ranks (torchrun; docs/distributed.md)
  torchrun --nproc-per-node 2 -m lorakit train my.yaml   # the same, launched by hand
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
        "recipe",
        nargs="?",
        help="recipe YAML file, or the name of a shipped recipe, e.g. qlora_alpaca (default: quickstart)",
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
    p.add_argument(
        "--nproc", type=int, default=None, metavar="N",
        help="train data-parallel on N processes of this machine: starts torchrun (one per GPU, else CPU "
        "processes with gloo); train.strategy picks ddp or fsdp",
    )  # fmt: skip
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
        from lorakit.recipe import precision_header

        resolved = recipe.with_precision_resolved()
        print(f"# {precision_header(recipe, resolved)}")
        print(resolved.to_yaml(), end="")
        return 0
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: start it
        from lorakit.cli.torchrun import launch

        resume = ["--resume", *([args.resume] if isinstance(args.resume, str) else [])] if args.resume else []
        return launch(args.nproc, ["train", *([args.recipe] if args.recipe else []), *args.overrides,
                                   *resume, *(["--no-progress"] if args.no_progress else [])])  # fmt: skip
    from lorakit.train import train

    result = train(recipe, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    _print_result(result, recipe)
    return 0


def _print_result(result, recipe) -> None:
    """The run's summary; with a before/after report (``train.eval_generate``), the base and the fine-tuned
    model side by side on held-out rows, then the commands that use the adapter."""
    print(f"\nsteps: {result.steps}  final train loss: {_number(result.final_train_loss)}  "
          f"time: {result.seconds:.0f} s")  # fmt: skip
    if result.eval_loss is not None:
        print(f"eval loss: {_number(result.eval_loss)}  best: {_number(result.best_eval_loss)}")
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
    template = " --template chat" if _data_format(recipe) == "chat" else ""
    print("next:")
    print(
        f"  lorakit generate --model {shlex.quote(model)} --adapter {out}{template} --greedy{given} {prompt}"
    )
    print(f"  lorakit merge --model {shlex.quote(model)} --adapter {out} --out {out}-merged")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _data_format(recipe) -> str:
    """The recipe's data format (detected from its file when ``auto``), for the ``generate`` hint's template."""
    if recipe.data.format != "auto":
        return recipe.data.format
    from lorakit.data.formats import detect_format, read_rows

    try:
        return detect_format(read_rows(Path(recipe.data.path))[0], Path(recipe.data.path))
    except Exception:  # only a hint: a file that cannot be read again keeps the default template
        return "alpaca"


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
    p.add_argument("--model", required=True, help="base model: a Hugging Face directory or a .gguf file")
    p.add_argument("--adapter", action="append", default=[], help="adapter directory (repeat to combine)")
    p.add_argument("--template", choices=["alpaca", "chat", "none"], default="alpaca", help="prompt template")
    p.add_argument("--input", default="", help="alpaca 'input' field for the prompt(s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature and top-p)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument(
        "--quantize", choices=[*QUANT_TYPES, "none"], default=None,
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
    from lorakit.export import base_quantize

    return base_quantize(choice, adapters)


def _load_for_inference(model_dir: str, adapters: list[str], quantize: str | None, dtype: str = "auto"):
    from lorakit.export import load_with_adapters

    return load_with_adapters(model_dir, adapters, quantize, dtype)


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
    p.add_argument("--model", required=True, help="base model: a Hugging Face directory or a .gguf file")
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
        "--quantize", choices=[*QUANT_TYPES, "none"], default=None,
        help="the base as trained (default: from the adapter's recipe.yaml, else none)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    return p


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit.export import check_out, export_merged

    out = Path(args.out)
    check_out(out, args.overwrite)
    # Merged in fp32 (a 4-bit base is dequantized to fp32 once), rounded once to the saved dtype.
    dtype = export_merged(
        args.model, args.adapter, out, _base_quantize(args.quantize, args.adapter), args.dtype
    )
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
    from lorakit.data import load_dataset, render_masked_sample
    from lorakit.loading import load_tokenizer
    from lorakit.recipe import load_recipe

    recipe_path, overrides = _split_recipe_args(args)
    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    train_set, _, stats = load_dataset(recipe.data, tokenizer)
    print(stats.summary())
    if args.debug:
        for i in range(min(args.num_samples, len(train_set))):
            print(f"\n--- sample {i} ---")
            print(render_masked_sample(tokenizer, train_set[i]))
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (_add_train, cmd_train),
    "generate": (_add_generate, cmd_generate),
    "merge": (_add_merge, cmd_merge),
    "export": (export.add_parser, export.run),
    "inspect": (_add_inspect, cmd_inspect),
    "preprocess": (_add_preprocess, cmd_preprocess),
    "serve": (serve.add_parser, serve.run),
    "plan": (plan.add_parser, plan.run),
    "sweep": (sweep.add_parser, sweep.run),
    "env": (env.add_parser, env.run),
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
    add_debug_flag(parser, top_level=True)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="run 'lorakit COMMAND --help' for its options"
    )
    for add, _ in COMMANDS.values():
        command = add(sub)
        if "--debug" not in command._option_string_actions:  # preprocess's --debug shows samples
            add_debug_flag(command, top_level=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script: parse, then run the command inside the error boundary
    (:func:`lorakit.cli.boundary.run_command`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `lorakit train recipe.yaml --no-progress train.lr=1e-3`: argparse takes positionals in one run, so
    # overrides after an option come back unparsed; they are overrides all the same
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(COMMANDS[args.command][1], args)


if __name__ == "__main__":
    sys.exit(main())
