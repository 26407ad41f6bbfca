"""``lorakit sweep``: a hyperparameter grid or the seed's staged search, configs sharing a base trained as packs."""

from __future__ import annotations

import argparse

EPILOG_SWEEP = """examples:
  lorakit sweep my.yaml adapter.r=8,16,32 train.lr=1e-4,2e-4,5e-4           # a 9-config grid
  lorakit sweep my.yaml adapter.r=8,16 adapter.target_modules=all,[q_proj,v_proj] train.lr=1e-4,2e-4 \\
      adapter.lora_alpha=16,32 --stages --budget-steps 200                  # the seed's stages (default order)
  lorakit sweep adapter.r=8,16 train.lr=1e-3,2e-3 --metric exact_match      # the quickstart task
  lorakit sweep my.yaml adapter.r=8,16,32 --dry-run                         # the configs and packs, no training

An item with several comma-separated values is a swept axis; one with a single value is an override applied to
every config (train.max_steps=100). Values in brackets are lists: adapter.target_modules=all,[q_proj,v_proj].

--stages without a value is r,target_modules:lr:lora_alpha,lora_dropout: stages separated by ':', keys by ','.
Each stage sweeps its keys with earlier stages' keys fixed at their best and later ones at the recipe's value.

Every config is a full run in <out>/configs/<name>/ (adapter, checkpoints, metrics, loss curve). Configs that
share the base (model, quantization, data, batch size, steps, seed, precision) train as packs in one process,
the packs sized by the planner's memory figures; the rest run one after another. Results: a table on stdout,
<out>/results.csv, results.json, eval_curves.png, and best_recipe.yaml (run it with lorakit train). Run the same
command again to resume after a kill: finished configs are skipped, packs continue from their checkpoints.
See docs/sweep.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sweep",
        help="search hyperparameters: a grid or the seed's stages, configs trained together over one base",
        description="Train one adapter per config of a grid (or of the seed's staged search) over recipe keys, "
        "configs that share a base trained together in packs, and write a results table, one plot of every "
        "config's eval curve and the best config's recipe.",
        epilog=EPILOG_SWEEP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML file or shipped recipe name (default: quickstart)")
    p.add_argument(
        "items", nargs="*", metavar="key=v1,v2",
        help="swept keys with their values (adapter.r=8,16,32), or single-value overrides for every config",
    )  # fmt: skip
    p.add_argument(
        "--stages", nargs="?", const="r,target_modules:lr:lora_alpha,lora_dropout", default=None,
        metavar="KEYS:KEYS", help="staged search instead of one grid (default order: %(const)s)",
    )  # fmt: skip
    p.add_argument("--budget-steps", type=int, default=None, metavar="N", help="train each config N steps")
    p.add_argument(
        "--metric", choices=["eval_loss", "exact_match"], default="eval_loss",
        help="what picks the best config: eval_loss (lower) or exact_match (higher; needs train.eval_generate)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="sweep directory (default: <recipe output_dir>-sweep)")
    p.add_argument(
        "--memory-budget", default=None, metavar="SIZE",
        help="planned memory one pack may take, e.g. 24GB (default: 80%% of the free memory)",
    )  # fmt: skip
    p.add_argument("--max-pack", type=int, default=8, help="most configs trained together (default 8)")
    p.add_argument("--no-pack", action="store_true", help="train every config alone, one after another")
    p.add_argument(
        "--dry-run", action="store_true", help="list the (first stage's) configs and packs; no training"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.plan import parse_size
    from lorakit.sweep import SweepOptions, dry_run, run_sweep
    from lorakit.sweep_space import parse_axes, split_values

    items = list(args.items)
    recipe = args.recipe
    if recipe is not None and "=" in recipe:  # `lorakit sweep adapter.r=8,16`: the quickstart
        items.insert(0, recipe)
        recipe = None
    axes_items = [i for i in items if len(split_values(i.partition("=")[2])) > 1]
    overrides = [i for i in items if i not in axes_items]
    if args.max_pack < 1:
        raise ConfigError(f"--max-pack: expected an integer >= 1, got {args.max_pack}")
    if args.budget_steps is not None and args.budget_steps < 1:
        raise ConfigError(f"--budget-steps: expected an integer >= 1, got {args.budget_steps}")
    options = SweepOptions(
        recipe=recipe, overrides=overrides, stages=args.stages, budget_steps=args.budget_steps,
        metric=args.metric, out=args.out, max_pack=args.max_pack, pack=not args.no_pack,
        memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
        progress=not args.no_progress,
    )  # fmt: skip
    axes = parse_axes(axes_items)
    if args.dry_run:
        print(dry_run(axes, options))
        return 0
    run_sweep(axes, options)
    return 0
