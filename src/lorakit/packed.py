"""Training packs: several adapter configs trained together over one frozen base, in one process (packed LoRA).

Configs that share the base model, its quantization, the data and the batch shape (:func:`pack_key`) train as one
pack. Each micro-batch is repeated once per config along the batch dimension (``[K·B, T]``); one forward runs the
frozen base over all copies, so the base weights are read (and a 4-bit base dequantized) once per step instead of
once per config, and every block of ``B`` rows goes through its own config's adapter exactly as in a run of that
adapter alone (:meth:`lorakit.adapters.base.AdapterLinear.block_output`: dropout, DoRA, rsLoRA, other target
modules). The loss is summed per block and normalized by the step's target tokens (the same in every block); a
block's loss reaches only its own adapter, so one backward gives every config its separate run's gradient.

Everything after the backward is per config and is the training loop's own code (:mod:`lorakit.train`): the NaN
check, gradient clipping, optimizer and scheduler (so any lr, schedule, warmup, weight decay, LoRA+ ratio), the
metrics lines, evaluation (one packed pass), early stopping (a stopped config leaves the pack, the others go on),
checkpoints and the output directory with its adapter, metrics, loss curve and summary.

The same seed gives the same samples in every step and the same initial adapter (the RNG is rewound to where a
separate run would create its adapter before each config's is made), so a packed config ends where its separate
run ends, up to float rounding (``tests/test_packed.py``). Dropout masks come from one random stream in a pack:
with dropout > 0 a packed config matches its separate run in distribution, not bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorakit.checkpoint import list_checkpoints, load_checkpoint, rng_state, set_rng_state
from lorakit.data import DataError, load_dataset, real_token_count, training_collator
from lorakit.errors import ConfigError
from lorakit.evaluate import evaluate_losses, exact_match_report, report_rows
from lorakit.files import atomic_write_bytes
from lorakit.inject import batch_adapters, mark_trainable, set_adapter, wrap
from lorakit.loss import causal_lm_loss_sums
from lorakit.methods import METHODS, method_of
from lorakit.plot import MetricsLog
from lorakit.recipe import Recipe, precision_header
from lorakit.run_lock import RunLock
from lorakit.schedule import lr_schedule, run_length
from lorakit.step import autocast_for
from lorakit.train import (
    RECIPE_NAME,
    TrainingError,
    TrainResult,
    TrainState,
    _device,
    _eval_due,
    _finish,
    _next_micro_batches,
    _Run,
    _start,
    apply_update,
    build_optimizer,
    checkpoint_if_due,
    load_base,
    log_step,
    record_eval,
    seed_everything,
)  # fmt: skip

# Train fields each config of a pack may set for itself; every other field (and the model and data sections) is
# shared by the pack.
PER_CONFIG_TRAIN = (
    "lr", "weight_decay", "warmup_ratio", "warmup_steps", "scheduler", "max_grad_norm", "optimizer",
    "loraplus_ratio", "early_stopping_patience",
)  # fmt: skip


def pack_key(recipe: Recipe) -> str:
    """What configs must share to train in one pack: the recipe without its adapter section, output directory and
    per-config train fields (:data:`PER_CONFIG_TRAIN`). Equal keys: same base, quantization, data, batch shape,
    steps, seed and precision."""
    data = recipe.to_dict()
    for name in ("adapter", "output_dir", "overwrite"):
        data.pop(name)
    for name in PER_CONFIG_TRAIN:
        data["train"].pop(name)
    return json.dumps(data, sort_keys=True)


def why_not_packable(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot join a pack (it then trains alone), or None.

    Packs hold LoRA-family adapters (LoRA, DoRA, rsLoRA, LoRA+) over an unchanged shared base. PiSSA rewrites the
    base weights, stacked adapters and ``modules_to_save`` copies are not routed per row, AdaLoRA / QR-LoRA prune or
    factor per layer, and fp16 loss scaling is one scale per run.
    """
    config = recipe.adapter.adapter_config()
    method = method_of(config)
    if not method.lora_factors:  # the LoRA rows of the method table
        packable = ", ".join(name for name, record in METHODS.items() if record.lora_factors)
        return (
            f"adapter.method={method.name}: packs hold adapters of the methods with LoRA factors ({packable})"
        )
    if method.float_base_init is not None and method.float_base_init(config):
        return "PiSSA initialization rewrites the shared base weights"
    if recipe.adapter.stack_on:
        return "adapter.stack_on: stacked adapters are not routed per config"
    if config.modules_to_save:
        return "adapter.modules_to_save: full module copies are not routed per config"
    if recipe.train.precision == "fp16":
        return "train.precision=fp16: loss scaling is one scale per run"
    return None


@dataclass
class _Member:
    """One config of a pack: its recipe and its own run objects, state, log and result."""

    recipe: Recipe
    run: _Run
    out: Path
    state: TrainState
    result: TrainResult
    log: MetricsLog
    active: bool = True
    error: str | None = None
    finished: bool = False


def accumulate_pack_gradients(
    model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], adapters: list[str], device: torch.device,
    precision: str, chunked: bool = True,
) -> list[float]:  # fmt: skip
    """Forward and backward of one optimizer step for every adapter of a pack; returns each one's step loss.

    Each micro-batch ``[B, T]`` is repeated once per adapter (``[K·B, T]``, block ``k`` routed to ``adapters[k]``);
    each block's summed token loss is divided by the target tokens of all micro-batches of the step, as
    :func:`lorakit.step.accumulate_gradients` does for one run. Backward runs inside the routing block, so
    recomputed (checkpointed) layers route the same way.
    """
    blocks = len(adapters)
    n_targets = max(1, sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches))
    totals = [0.0] * blocks
    for batch in micro_batches:
        rows = len(batch["input_ids"])
        batch = {k: v.to(device).repeat(blocks, *[1] * (v.dim() - 1)) for k, v in batch.items()}  # [K·B, ...]
        with batch_adapters(model, [a for a in adapters for _ in range(rows)], per_block=True):
            with autocast_for(precision, device):
                sums, _ = causal_lm_loss_sums(model, batch, blocks, chunked=chunked)  # [K]
            losses = sums / n_targets
            losses.sum().backward()  # block k's loss depends on adapter k alone: each gets its own gradient
        totals = [t + v for t, v in zip(totals, losses.tolist())]
    return totals


def train_pack(recipes: list[Recipe], resume: bool = False, progress: bool = True) -> list[TrainResult]:
    """Train several configs as one pack; each writes a complete run into its own ``output_dir``.

    Args:
        recipes (list[Recipe]): The configs; equal :func:`pack_key`, each packable (:func:`why_not_packable`).
        resume (bool): Continue from the newest step every unfinished config has a checkpoint of. Default False.
        progress (bool): Show a progress bar. Default True.

    Returns:
        list[TrainResult]: One per recipe, in order. A config whose loss became NaN leaves the pack (the others go
        on); its result has ``final_train_loss`` NaN, and its ``train_summary.json`` holds the error, no adapter.

    Raises:
        ConfigError: The recipes cannot share a pack. TrainingError: An occupied output directory.
        RunLockedError: Another process is training into one of the configs' output directories.
    """
    resolved = [r.with_precision_resolved(_device().type) for r in recipes]
    # before any lock: configs that cannot share a pack (or a directory) are refused first
    _check_pack(resolved)
    # each config's directory is the pack's alone, as a run's is (lorakit.run_lock)
    with contextlib.ExitStack() as locks:
        for recipe in recipes:
            locks.enter_context(RunLock(recipe.output_dir))
        return _train_pack(recipes, resolved, resume, progress)


def _train_pack(
    recipes: list[Recipe], resolved: list[Recipe], resume: bool, progress: bool
) -> list[TrainResult]:
    started = time.perf_counter()
    print(precision_header(recipes[0], resolved[0]))
    lead, cfg = resolved[0], resolved[0].train
    outs = [_start(recipe, resume) for recipe in resolved]
    seed_everything(cfg.seed)
    tokenizer, model = load_base(lead)
    adapters = [f"pack{k}" for k in range(len(resolved))]
    _wrap_configs(model, resolved, adapters)
    train_set, val_set, stats = load_dataset(lead.data, tokenizer)
    if len(train_set) == 0:
        raise DataError(f"{lead.data.path}: no training samples")
    print(f"data: {stats.summary()} (one copy per config: {len(resolved)} configs in this pack)")
    rows = report_rows(lead.data.val_path, cfg.eval_generate) if cfg.eval_generate else []
    before = None
    if rows and not resume:  # every adapter starts as the identity (B = 0): one "before" report serves all
        set_adapter(model, adapters[0])
        before = exact_match_report(model, tokenizer, rows, cfg.max_new_tokens)
    members = _members(model, tokenizer, resolved, outs, adapters, (train_set, val_set), started)
    for member in members:
        member.result.before = dict(before) if before else None
    pace = _resume(members) if resume else TrainState()
    finish = _Finisher(model, members, rows, started)
    try:
        _train_loop(model, members, pace, progress, finish)
    finally:
        for member in members:
            member.log.close()
    for member in members:
        finish(member)
    return [member.result for member in members]


@dataclass
class _Finisher:
    """Writes a config's outputs as soon as it is done (early stopping, NaN) or at the end; the pack goes on."""

    model: torch.nn.Module
    members: list[_Member]
    rows: list[dict[str, str]]
    started: float

    def __call__(self, member: _Member) -> None:
        if member.finished:
            return
        member.finished, member.active = True, False
        if member.error is not None:  # a run that failed: the summary says so (a resumed sweep skips it)
            summary = {"error": member.error, "steps": member.state.step, "final_train_loss": None}
            atomic_write_bytes(member.out / "train_summary.json", json.dumps(summary, indent=1).encode())
            return
        set_adapter(self.model, member.run.adapter)  # exact match after training goes through this adapter
        _finish(member.run, member.recipe, member.out, member.state, member.result, self.rows, self.started)
        for other in self.members:  # set_adapter froze the others; the ones still training train on
            mark_trainable(self.model, other.run.adapter, other.active)
        self.model.train()


def _check_pack(recipes: list[Recipe]) -> None:
    keys = {pack_key(recipe) for recipe in recipes}
    if len(keys) > 1:
        raise ConfigError(
            "these configs cannot share a pack: they differ outside the adapter and per-config train fields"
        )
    for recipe in recipes:
        reason = why_not_packable(recipe)
        if reason is not None:
            raise ConfigError(f"{recipe.output_dir}: cannot train in a pack: {reason}")
    if len({str(recipe.output_dir) for recipe in recipes}) < len(recipes):
        raise ConfigError(
            "these configs share an output_dir: each config of a pack writes its own run directory"
        )


def _wrap_configs(model: torch.nn.Module, recipes: list[Recipe], adapters: list[str]) -> None:
    """Add one adapter per config, each created from the RNG state its separate run would create it from."""
    tensors, meta = rng_state()  # after the seed and the base: where a separate run calls wrap()
    after_first = None
    for recipe, name in zip(recipes, adapters):
        set_rng_state(tensors, meta)
        wrap(model, recipe.adapter.adapter_config(), adapter_name=name)
        after_first = after_first or rng_state()
    set_rng_state(*after_first)  # the first config's run goes on from here (its dropout masks, if any)


def _members(
    model: torch.nn.Module, tokenizer: Any, recipes: list[Recipe], outs: list[Path], adapters: list[str],
    data: tuple, started: float,
) -> list[_Member]:  # fmt: skip
    """Each config's optimizer (over its adapter alone), schedule, output directory, state and log."""
    train_set, val_set = data
    collator = training_collator(tokenizer, model, recipes[0].data.padding_free)  # the pack shares its data
    members = []
    for recipe, out, name in zip(recipes, outs, adapters):
        set_adapter(model, name)  # only this adapter trainable: the optimizer takes the trainable parameters
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, recipe)
        total, warmup = run_length(recipe.train, len(train_set))
        run = _Run(model, tokenizer, method_of(recipe.adapter.adapter_config()).training(model, name, total),
                   train_set, val_set, collator, optimizer,
                   lr_schedule(optimizer, recipe.train, total, warmup), None, _device(), total, params, name)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / RECIPE_NAME, recipe.to_yaml().encode())
        result = TrainResult(output_dir=out, steps=total, final_train_loss=None)
        members.append(
            _Member(recipe, run, out, TrainState(), result, MetricsLog(out, recipe.train.tensorboard))
        )
    for name in adapters:
        mark_trainable(model, name, True)
    return members


def _resume(members: list[_Member]) -> TrainState:
    """Restore every config from its checkpoint of the newest step all of them have one of."""
    steps = [{int(p.name.split("-")[1]): p for p in list_checkpoints(m.out / "checkpoints")} for m in members]
    common = set.intersection(*(set(s) for s in steps))
    if not common:
        raise TrainingError(
            f"--resume: no step with a checkpoint of every config of this pack under "
            f"{[str(m.out) for m in members]}; start them again without --resume"
        )
    step = max(common)
    for member, found in zip(members, steps):
        data = load_checkpoint(found[step], member.run.model, member.run.optimizer, member.run.adapter)
        member.state = TrainState.from_checkpoint(data)
        member.run.scheduler.load_state_dict(member.state.scheduler)
    print(f"resumed the pack from step {step}")
    return TrainState(step=step, micro_index=members[0].state.micro_index)


def _train_loop(
    model: torch.nn.Module, members: list[_Member], pace: TrainState, progress: bool, finish: _Finisher
) -> None:
    """Steps until every config has run its steps or stopped: one packed backward, then each config's update."""
    lead = members[0].run
    cfg = members[0].recipe.train
    bar = tqdm(
        total=lead.total_steps, initial=pace.step, disable=not progress, desc="pack", dynamic_ncols=True
    )
    tokens_seen, window_start = 0, time.perf_counter()
    model.train()
    while pace.step < lead.total_steps and any(m.active for m in members):
        micro, per_epoch = _next_micro_batches(pace, lead, cfg)
        live = [m for m in members if m.active]
        losses = accumulate_pack_gradients(
            model, micro, [m.run.adapter for m in live], lead.device, cfg.precision, cfg.chunked_loss
        )
        pace.step += 1
        tokens = sum(real_token_count(b) for b in micro)  # pads excluded
        tokens_seen += tokens
        speed = tokens_seen / max(1e-9, time.perf_counter() - window_start)  # per config
        for member, loss in zip(live, losses):
            _update(member, loss, pace, (tokens, speed), per_epoch)
            if member.error is not None:
                finish(member)
        epoch_end = pace.micro_index % per_epoch == 0
        live = [m for m in live if m.active]
        stops = (
            _evaluate(model, live)
            if live and _eval_due(lead, cfg, pace.step, epoch_end)
            else [False] * len(live)
        )
        for member, stop in zip(live, stops):
            checkpoint_if_due(
                member.run, member.state, member.recipe.train, member.out / "checkpoints", epoch_end or stop
            )
            if stop:
                member.result.stopped_early = True
                print(f"{member.out}: early stopping at step {pace.step}; the other configs go on")
                finish(member)
        bar.set_postfix(configs=len(live), tok_s=f"{speed * len(live):.0f}")
        bar.update(1)
    bar.close()


def _update(member: _Member, loss: float, pace: TrainState, throughput: tuple, per_epoch: int) -> None:
    """One config's optimizer step and metrics line (``throughput``: the step's tokens and tokens/s); a NaN loss
    takes the config out of the pack."""
    member.state.step, member.state.micro_index = pace.step, pace.micro_index
    cfg = member.recipe.train
    try:
        loss, grad_norm = apply_update(member.run, loss, cfg, pace.step, member.out / "checkpoints")
    except TrainingError as err:
        member.error, member.result.final_train_loss = str(err), float("nan")
        member.run.optimizer.zero_grad(set_to_none=True)
        print(f"{member.out}: {err}; the other configs go on")
        return
    member.result.final_train_loss = loss
    log_step(member.run, member.state, member.log, cfg, (loss, grad_norm, *throughput), per_epoch)


def _evaluate(model: torch.nn.Module, live: list[_Member]) -> list[bool]:
    """One packed evaluation pass; each config records its loss (best adapter, early stopping)."""
    lead = live[0].run
    losses = evaluate_losses(
        model, lead.val_set, lead.collator, live[0].recipe.train, lead.device, [m.run.adapter for m in live]
    )
    model.train()
    return [
        record_eval(m.run, m.state, m.result, m.log, m.out, m.recipe.train, loss)
        for m, loss in zip(live, losses)
    ]


__all__ = ["PER_CONFIG_TRAIN", "accumulate_pack_gradients", "pack_key", "train_pack", "why_not_packable"]
