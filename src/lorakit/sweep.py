"""``lorakit sweep``: a grid, or the seed's staged search, over recipe keys; configs that share a base train as packs.

Every config is an ordinary run (the recipe plus its ``key=value`` overrides) with its own output directory under
``<sweep>/configs/<name>/``: adapter, checkpoints, metrics, loss curve, summary. Configs that can share the base
(:func:`lorakit.packed.pack_key`) are split into packs by the planner's memory figures (:mod:`lorakit.plan`) and
each pack trains in one process over one base (:func:`lorakit.packed.train_pack`); the others train one after
another (:func:`lorakit.train.train`).

With stages (``--stages r,target_modules:lr:lora_alpha,lora_dropout``) each stage sweeps its keys with the keys of
earlier stages fixed at their best value and later ones at the recipe's. The results (``results.csv``,
``results.json``, ``eval_curves.png``) and the best config's full recipe (``best_recipe.yaml``, ready for ``lorakit
train``) go to the sweep directory. Running the same command again resumes: finished configs are read back,
unfinished packs continue from their checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.files import atomic_write_bytes
from lorakit.packed import pack_key, train_pack, why_not_packable
from lorakit.plan import PlanConfig, plan_memory
from lorakit.plan_terms import TARGETS
from lorakit.plot import plot_eval_curves
from lorakit.recipe import Recipe, load_recipe
from lorakit.sweep_space import Axis, as_dict, config_name, grid, parse_stages
from lorakit.train import METRICS_NAME, RECIPE_NAME, train

METRICS = {"eval_loss": min, "exact_match": max}  # the sweep metric and which end of it is best
SHARED_MEMORY = (
    "base weights",
    "quantization constants",
    "dequantization buffer",
    "runtime",
)  # once per pack
RUN_NAME = "sweep_run.json"  # per config: its pack, wall time and peak memory


@dataclass
class SweepOptions:
    """How to sweep.

    Args:
        recipe (str | None): Recipe file or shipped recipe name (None: the quickstart).
        overrides (list[str]): Overrides applied to every config (``train.max_steps=200`` ...).
        stages (str | None): The staged search (``r,target_modules:lr:lora_alpha,lora_dropout``); None: one grid.
        budget_steps (int | None): Train each config this many steps (``train.max_steps``); the best recipe written
            out keeps the recipe's own length. Default None.
        metric (str): ``eval_loss`` (lower is better) or ``exact_match`` (higher; needs ``train.eval_generate``).
        out (str | None): The sweep directory. Default ``<output_dir>-sweep``.
        memory_budget (int | None): Bytes a pack may take (planned); None: 80% of the free memory.
        max_pack (int): Most configs per pack. Default 8.
        pack (bool): Train configs that share a base together. Default True.
        progress (bool): Progress bars. Default True.
    """

    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    stages: str | None = None
    budget_steps: int | None = None
    metric: str = "eval_loss"
    out: str | None = None
    memory_budget: int | None = None
    max_pack: int = 8
    pack: bool = True
    progress: bool = True


@dataclass
class SweepResult:
    """Every config's row (in the order run), the best one, and where the files are."""

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    out: Path
    best_recipe: Path


def run_sweep(axes: list[Axis], options: SweepOptions) -> SweepResult:
    """Run the grid (or the stages) of ``axes``; see the module docstring.

    Raises:
        ConfigError: A bad axis, stage, metric or recipe; a sweep without a validation set.
    """
    if options.metric not in METRICS:
        raise ConfigError(f"--metric: expected one of {', '.join(METRICS)}, got {options.metric!r}")
    budget = [f"train.max_steps={options.budget_steps}"] if options.budget_steps else []
    base = load_recipe(options.recipe, [*options.overrides, *budget])
    _check_metric(base, options.metric)
    out = Path(options.out or f"{base.output_dir}-sweep")
    stages = parse_stages(options.stages, axes) if options.stages else [axes]
    rows = _run_stages(stages, options, budget, out)
    best = _best(rows, options.metric)
    best_recipe = load_recipe(
        options.recipe, [*options.overrides, *best["overrides_list"], f"output_dir={out / 'best'}"]
    )
    path = _write_results(rows, best, best_recipe, out, options.metric)
    print(format_table(rows, options.metric))
    print(f"\nbest: {best['config']} ({options.metric} {best[options.metric]}); recipe: {path}")
    print(f"  lorakit train {path}")
    return SweepResult(rows, best, out, path)


def _run_stages(
    stages: list[list[Axis]], options: SweepOptions, budget: list[str], out: Path
) -> list[dict[str, Any]]:
    """Each stage's grid with the earlier stages' best values fixed; returns every config's row, in order.

    A config equal to one already run (a recipe's own value in a later stage's grid) is not trained again: the
    stage compares the earlier row.
    """
    rows: list[dict[str, Any]] = []
    fixed: tuple[str, ...] = ()
    for number, stage in enumerate(stages, 1):
        configs = grid(stage, fixed)
        keys = ", ".join(a.key for a in stage)
        print(f"sweep stage {number}/{len(stages)}: {len(configs)} configs over {keys}")
        earlier = {
            _signature(_config_recipe(options, budget, tuple(r["overrides_list"]), out)): r for r in rows
        }
        recipes = [_config_recipe(options, budget, c, out) for c in configs]
        new = [i for i, r in enumerate(recipes) if _signature(r) not in earlier]
        trained = iter(_run_configs([recipes[i] for i in new], [configs[i] for i in new], options, number))
        stage_rows = [next(trained) if i in new else earlier[_signature(r)] for i, r in enumerate(recipes)]
        rows += [r for i, r in enumerate(stage_rows) if i in new]
        fixed = tuple(_best(stage_rows, options.metric)["overrides_list"])
    return rows


def _signature(recipe: Recipe) -> str:
    """The recipe without its output directory: equal signatures train the same run."""
    return json.dumps({**recipe.to_dict(), "output_dir": None}, sort_keys=True)


def dry_run(axes: list[Axis], options: SweepOptions) -> str:
    """The first stage's configs and how they would be packed (nothing is loaded or trained)."""
    budget = [f"train.max_steps={options.budget_steps}"] if options.budget_steps else []
    base = load_recipe(options.recipe, [*options.overrides, *budget])
    out = Path(options.out or f"{base.output_dir}-sweep")
    stages = parse_stages(options.stages, axes) if options.stages else [axes]
    configs = grid(stages[0], ())
    recipes = [_config_recipe(options, budget, c, out) for c in configs]
    lines = [f"sweep directory: {out}", f"stages: {[[a.key for a in s] for s in stages]}"]
    for pack in _packs(recipes, options):
        names = [Path(recipes[i].output_dir).name for i in pack]
        reason = why_not_packable(recipes[pack[0]]) if len(pack) == 1 else None
        kind = "pack" if len(pack) > 1 else "alone" + (f" ({reason})" if reason else "")
        lines.append(f"{kind}: {', '.join(names)}")
    return "\n".join(lines)


def _packs(recipes: list[Recipe], options: SweepOptions) -> list[list[int]]:
    """Indices of ``recipes`` grouped into packs (shared base, planned memory) and lone runs."""
    groups: dict[str, list[int]] = {}
    for i, recipe in enumerate(recipes):
        reason = why_not_packable(recipe) if options.pack else "--no-pack"
        groups.setdefault(pack_key(recipe) if reason is None else f"alone-{i}", []).append(i)
    return [
        [members[j] for j in pack]
        for members in groups.values()
        for pack in split_packs([recipes[i] for i in members], options.memory_budget, options.max_pack)
    ]


def _check_metric(recipe: Recipe, metric: str) -> None:
    if recipe.data.val_path is None:
        raise ConfigError("lorakit sweep compares configs on held-out data: set data.val_path")
    if metric == "exact_match" and not recipe.train.eval_generate:
        raise ConfigError("--metric exact_match answers held-out rows: set train.eval_generate (e.g. 100)")


def _config_recipe(options: SweepOptions, budget: list[str], config: tuple[str, ...], out: Path) -> Recipe:
    output = f"output_dir={out / 'configs' / config_name(config)}"
    return load_recipe(options.recipe, [*options.overrides, *budget, *config, output])


def _run_configs(
    recipes: list[Recipe], configs: list[tuple[str, ...]], options: SweepOptions, stage: int
) -> list[dict[str, Any]]:
    """Train the configs not finished yet (packs where they can share a base), then read every config's row."""
    todo = [r for r in recipes if not _finished(r)]
    for pack in _packs(todo, options):
        _train_group([todo[i] for i in pack], options.progress)
    return [_row(recipe, config, stage, options.metric) for recipe, config in zip(recipes, configs)]


def _finished(recipe: Recipe) -> bool:
    """The config's directory holds a finished run of this very recipe (a resumed sweep skips it)."""
    out = Path(recipe.output_dir)
    saved = out / RECIPE_NAME
    resolved = recipe.with_precision_resolved()
    return (
        (out / "train_summary.json").is_file() and saved.is_file() and saved.read_text() == resolved.to_yaml()
    )


def split_packs(recipes: list[Recipe], budget: int | None, max_pack: int) -> list[list[int]]:
    """Indices of ``recipes`` (which share a base) in packs whose planned peak fits ``budget`` bytes, in order.

    The planner (:func:`lorakit.plan.plan_memory`) gives each config's step; a pack holds the shared terms (base
    weights, quantization constants, dequantization buffer, runtime) once and every config's adapter, optimizer,
    gradients and activations (its copy of the batch). A model the planner cannot read packs by ``max_pack`` alone.
    """
    budget = budget if budget is not None else int(0.8 * free_memory_bytes())
    packs: list[list[int]] = []
    shared, parts = 0, []
    for i, recipe in enumerate(recipes):
        figures = _planned(recipe)
        if figures is not None:
            candidate = max(shared, figures[0]), [*parts, figures[1:]]
            peak = (
                candidate[0]
                + sum(p[0] for p in candidate[1])
                + max(sum(p[1] for p in candidate[1]), sum(p[2] for p in candidate[1]))
            )
        else:
            candidate, peak = (shared, parts), 0
        if packs and len(packs[-1]) < max_pack and peak <= budget:
            packs[-1].append(i)
            shared, parts = candidate
        else:
            packs.append([i])
            shared, parts = (figures[0], [figures[1:]]) if figures else (0, [])
    return packs


def _planned(recipe: Recipe) -> tuple[int, int, int, int] | None:
    """(shared bytes, the config's own always / forward-backward / step bytes) from the planner, or None."""
    targets = recipe.adapter.target_modules
    target = targets if isinstance(targets, list) or targets in TARGETS else "all"
    method = "qlora" if recipe.model.quantize else "lora"
    dtype = recipe.with_precision_resolved().model.compute_dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        plan = plan_memory(recipe.model.path, PlanConfig(
            method=method, r=recipe.adapter.r, target=target, batch_size=recipe.train.batch_size,
            seq_len=recipe.data.max_length, optimizer=recipe.train.optimizer,
            gradient_checkpointing=recipe.model.gradient_checkpointing, lora_dropout=recipe.adapter.lora_dropout,
            compute_dtype=dtype if dtype != "float32" else "bfloat16", device=device,
        ))  # fmt: skip
    except (ConfigError, TypeError, ValueError):
        return None
    shared = sum(c.bytes for c in plan.components if c.name.startswith(SHARED_MEMORY))
    own = {phase: sum(c.bytes for c in plan.components if c.phase == phase and not c.name.startswith(SHARED_MEMORY))
           for phase in ("always", "forward/backward", "step")}  # fmt: skip
    return shared, own["always"], own["forward/backward"], own["step"]


def free_memory_bytes() -> int:
    """Free memory of the training device: CUDA's free bytes, or ``MemAvailable`` on Linux (else 8 GB)."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 10**9


def _train_group(recipes: list[Recipe], progress: bool) -> None:
    """Train one pack (or one config alone), resuming from checkpoints where every config has them."""
    resume = all(any((Path(r.output_dir) / "checkpoints").glob("step-*")) for r in recipes)
    if (
        not resume
    ):  # what a killed start left behind (no checkpoint of every config) is the sweep's own: start over
        for recipe in recipes:
            shutil.rmtree(recipe.output_dir, ignore_errors=True)
    names = [Path(r.output_dir).name for r in recipes]
    print(f"training {'a pack of ' + str(len(recipes)) if len(recipes) > 1 else 'alone'}: {', '.join(names)}")
    reset_peak_memory()
    started = time.perf_counter()
    if len(recipes) == 1:
        train(recipes[0], resume=resume or None, progress=progress)
    else:
        train_pack(recipes, resume=resume, progress=progress)
    record = {
        "pack": names,
        "seconds": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(),
    }
    for recipe in recipes:
        atomic_write_bytes(Path(recipe.output_dir) / RUN_NAME, json.dumps(record, indent=1).encode())


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics, or the kernel's peak RSS (``/proc/self/clear_refs``)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # not Linux: the peak is the process's since its start
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes() -> int:
    """Peak since :func:`reset_peak_memory`: CUDA allocated bytes, or the process's peak RSS (``VmHWM``)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _row(recipe: Recipe, config: tuple[str, ...], stage: int, metric: str) -> dict[str, Any]:
    """One config's line of the results, read from its output directory."""
    out = Path(recipe.output_dir)
    summary = json.loads((out / "train_summary.json").read_text())
    run = json.loads((out / RUN_NAME).read_text()) if (out / RUN_NAME).is_file() else {}
    after = summary.get("after") or {}
    lines = (
        [json.loads(x) for x in (out / METRICS_NAME).read_text().splitlines()]
        if (out / METRICS_NAME).is_file()
        else []
    )
    speeds = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x]
    return {
        "config": config_name(config), "stage": stage, "overrides": as_dict(config), "overrides_list": list(config),
        "eval_loss": summary.get("eval_loss"), "exact_match": after.get("exact_match"),
        "tokens_per_s": speeds[-1] if speeds else None, "peak_memory_mb": round(run.get("peak_memory_bytes", 0) / 1e6, 1),
        "seconds": round(run.get("seconds", 0.0), 1), "pack": run.get("pack", [config_name(config)]),
        "adapter": None if summary.get("error") else str(out), "error": summary.get("error"),
        "eval_curve": [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x],
    }  # fmt: skip


def _best(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The best row by ``metric`` (ties: the lower eval loss); rows without the metric do not compete."""
    scored = [r for r in rows if r.get(metric) is not None and r["error"] is None]
    if not scored:
        raise ConfigError(
            f"no config of the sweep produced {metric}; see the errors in the configs' directories"
        )
    sign = -1 if METRICS[metric] is max else 1
    return min(
        scored, key=lambda r: (sign * r[metric], r["eval_loss"] if r["eval_loss"] is not None else 1e9)
    )


COLUMNS = ("config", "eval_loss", "exact_match", "tokens_per_s", "peak_memory_mb", "seconds", "adapter")


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The results as a text table (one line per config; ``*`` marks the best)."""
    best = _best(rows, metric)["config"]
    cells = [list(COLUMNS)] + [
        [("* " if r["config"] == best else "  ") + r["config"], *(_cell(r[c]) for c in COLUMNS[1:])]
        for r in rows
    ]
    sizes = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(n) for c, n in zip(line, sizes)).rstrip() for line in cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) and abs(value) < 10 else str(value)


def _write_results(
    rows: list[dict[str, Any]], best: dict[str, Any], recipe: Recipe, out: Path, metric: str
) -> Path:
    """``results.json``, ``results.csv``, ``eval_curves.png`` and ``best_recipe.yaml`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"metric": metric, "best": best["config"], "configs": rows}
    atomic_write_bytes(out / "results.json", json.dumps(payload, indent=1, default=str).encode())
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([*COLUMNS, "stage", "pack", "error"])
    for r in rows:
        writer.writerow([*(r[c] for c in COLUMNS), r["stage"], " ".join(r["pack"]), r["error"] or ""])
    atomic_write_bytes(out / "results.csv", text.getvalue().encode())
    plot_eval_curves({r["config"]: r["eval_curve"] for r in rows}, out / "eval_curves.png", best["config"])
    path = out / "best_recipe.yaml"
    header = f"# lorakit sweep: the best config by {metric}: {best['config']}\n"
    atomic_write_bytes(path, (header + recipe.to_yaml()).encode())
    return path


__all__ = ["SweepOptions", "SweepResult", "dry_run", "format_table", "run_sweep", "split_packs"]
