"""The training loop: one explicit loop, read top to bottom.

recipe -> base model (4-bit or compute dtype) -> adapter -> data -> optimizer + schedule -> steps
(gradient accumulation normalized by target tokens, clipping, autocast) -> evaluation, early stopping,
checkpoints -> adapter files + tokenizer + resolved recipe + metrics + loss curve in ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorakit import distributed
from lorakit.activations import enable_checkpointing, return_freed_memory_to_os
from lorakit.arithmetic import stack_adapters
from lorakit.checkpoint import list_checkpoints, load_checkpoint
from lorakit.data import DataError, load_dataset, real_token_count, training_collator
from lorakit.errors import ConfigError
from lorakit.evaluate import evaluate_loss, exact_match_report, report_rows
from lorakit.hardware import DTYPE_NAMES
from lorakit.inject import wrap
from lorakit.io import atomic_write_bytes, load_adapter
from lorakit.loading import check_model_source, load_model, load_tokenizer
from lorakit.loss import target_count
from lorakit.methods import TrainingHooks, method_of
from lorakit.optim import build_optimizer as make_optimizer
from lorakit.optim.loraplus import loraplus_param_groups
from lorakit.plot import MetricsLog, plot_metrics
from lorakit.quantize import quantize_model
from lorakit.recipe import Recipe, TrainSection, precision_header
from lorakit.run_dir import (
    METRICS_NAME,
    RECIPE_NAME,
    SUMMARY_NAME,
    TrainingError,
    finished_summary,
    owns_output_dir,
    prepare_output_dir,
    reopen_run,
)
from lorakit.schedule import lr_lambda, lr_schedule, run_length  # noqa: F401 - lr_lambda's old home
from lorakit.step import accumulate_gradients, epoch_micro_batches


@dataclass
class TrainResult:
    """What a run produced and measured."""

    output_dir: Path
    steps: int
    final_train_loss: float | None
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


_SUMMARY_FIELDS = {f.name for f in dataclasses.fields(TrainResult)} - {"output_dir", "history"}


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_base(recipe: Recipe, quantize: bool = True):
    """The tokenizer and the base model of a recipe, on the training device.

    ``quantize=False`` loads in the compute dtype even when the recipe asks for 4 bits (QPiSSA quantizes the
    residuals after the PiSSA initialization).
    """
    section = recipe.model
    path = Path(section.path)
    if recipe.train.activation_offload and not section.gradient_checkpointing:
        raise ConfigError(
            "train.activation_offload=true offloads the inputs kept by gradient checkpointing; set "
            "model.gradient_checkpointing=true too, or train.activation_offload=false"
        )
    check_model_source(path, section.trust_remote_code)  # before any work: config, model_type, tokenizer
    tokenizer = load_tokenizer(path, trust_remote_code=section.trust_remote_code)
    model = load_model(
        path, quantize=section.quantize if quantize else None, double_quant=section.double_quant,
        blocksize=section.blocksize, compute_dtype=DTYPE_NAMES[section.compute_dtype], device=_device(),
        trust_remote_code=section.trust_remote_code,
    )  # fmt: skip
    if section.gradient_checkpointing:  # per decoder layer, non-reentrant (lorakit.activations)
        enable_checkpointing(model, offload=recipe.train.activation_offload)
    return tokenizer, model


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names (:mod:`lorakit.optim`) over the trainable parameters; with
    ``train.loraplus_ratio``, over LoRA+'s parameter groups (the B matrices and 1-D parameters at ``ratio x lr``:
    :mod:`lorakit.optim.loraplus`)."""
    section = recipe.train
    if section.loraplus_ratio is not None:
        params = loraplus_param_groups(
            model, section.lr, section.loraplus_ratio, weight_decay=section.weight_decay
        )
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    return make_optimizer(params, section.optimizer, lr=section.lr, weight_decay=section.weight_decay)


@dataclass
class TrainState:
    """Where a run is: what a checkpoint's ``trainer_state.json`` keeps besides the optimizer and RNG states.

    Attributes:
        step (int): Optimizer steps done.
        micro_index (int): Micro-batches consumed since the start (epoch and position follow from it).
        history (list[dict]): Every metrics line so far (train steps and evaluations).
        best_eval (float | None): The lowest evaluation loss so far.
        bad_evals (int): Evaluations since the last improvement (early stopping).
        scheduler (dict | None): The learning-rate schedule's state, set when a checkpoint is written.
    """

    step: int = 0
    micro_index: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_eval: float | None = None
    bad_evals: int = 0
    scheduler: dict[str, Any] | None = None

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> TrainState:
        """The state in a checkpoint's trainer state (its other keys are the optimizer's, RNG's, hooks')."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class _Run:
    """The objects one run trains with, built once by :func:`_setup` (per config of a pack by :mod:`lorakit.packed`)."""

    model: torch.nn.Module
    tokenizer: Any
    hooks: TrainingHooks
    train_set: Any
    val_set: Any
    collator: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    device: torch.device
    total_steps: int
    params: list[torch.nn.Parameter] = field(default_factory=list)  # clipped together; empty: all trainable
    adapter: str = "default"
    ranks: distributed.Ranks = field(default_factory=distributed.Ranks)


@owns_output_dir
def train(recipe: Recipe, resume: str | bool | None = None, progress: bool = True) -> TrainResult:
    """Run a recipe to the end (or resume one) and write everything into ``recipe.output_dir``, which the run
    holds locked (:mod:`lorakit.run_lock`). Resuming a finished run changes nothing and returns its summary.

    Args:
        recipe (Recipe): The validated recipe.
        resume (str | bool | None): True: continue from the newest checkpoint in ``output_dir``; a path:
            from that checkpoint directory; None/False: a new run.
        progress (bool): Show a progress bar. Default True.

    Returns:
        TrainResult: Final losses, before/after metrics, steps and history.

    Raises:
        TrainingError: NaN/Inf loss (the last good checkpoint is kept) or an occupied output directory.
        RunLockedError: Another process is training into ``output_dir``.
        ConfigError / DataError: Invalid recipe or data.
        RankError: Under torchrun, another rank failed (lorakit.distributed).
    """
    with distributed.start(recipe.train.strategy) as ranks:  # under torchrun: this rank (lorakit.distributed)
        return _train(recipe, resume, progress, ranks)


def _train(
    recipe: Recipe, resume: str | bool | None, progress: bool, ranks: distributed.Ranks
) -> TrainResult:
    started = time.perf_counter()
    resolved = recipe.with_precision_resolved(_device().type)  # "auto" -> what this hardware runs fast
    ranks.print(precision_header(recipe, resolved))
    recipe, cfg = resolved, resolved.train
    out = _start(recipe, resume, ranks)
    if resume is True and (summary := finished_summary(out)) is not None:  # finished: nothing changes
        return TrainResult(output_dir=out, **{k: v for k, v in summary.items() if k in _SUMMARY_FIELDS})
    run = _setup(recipe, out, ranks)
    checkpoints = out / "checkpoints"
    state = _resume(run, checkpoints, resume) if resume else TrainState()
    ranks.spread(run.model, run.optimizer)  # ddp: rank 0's adapter on every rank; fsdp: shards
    result = TrainResult(output_dir=out, steps=run.total_steps, final_train_loss=None)
    for entry in state.history:  # resumed at its last step (killed during the final writes): no more training
        result.final_train_loss = entry.get("loss", result.final_train_loss)
        result.eval_loss = entry.get("eval_loss", result.eval_loss)
    rows = report_rows(recipe.data.val_path, cfg.eval_generate) if cfg.eval_generate else []  # exact match
    if rows and state.step == 0:
        result.before = exact_match_report(run.model, run.tokenizer, rows, cfg.max_new_tokens, ranks)
        if run.val_set is not None:
            result.before["eval_loss"] = evaluate_loss(
                run.model, run.val_set, run.collator, cfg, run.device, ranks
            )
    log = distributed.metrics_log(ranks, out, cfg.tensorboard)  # rank 0 writes, the others log nothing
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not progress or not ranks.is_main,
               desc="train", dynamic_ncols=True)  # fmt: skip
    tokens_seen, window_start = 0, time.perf_counter()
    try:
        run.model.train()
        while state.step < run.total_steps:
            ranks.seed_step(cfg.seed, state.step)  # each rank its own dropout masks, the same after a resume
            micro, per_epoch = _next_micro_batches(state, run, cfg)
            n_targets = ranks.loss_denominator(
                sum(map(target_count, micro))
            )  # all ranks' (None: one process)
            loss = accumulate_gradients(
                run.model, micro, run.device, cfg.precision, cfg.chunked_loss, run.scaler, n_targets
            )
            loss, grad_norm = apply_update(run, loss, cfg, state.step + 1, checkpoints)  # loss: all ranks'
            state.step += 1
            result.final_train_loss = loss
            tokens = int(
                ranks.sum([sum(real_token_count(b) for b in micro if target_count(b))])[0]
            )  # no pads
            tokens_seen += tokens
            speed = tokens_seen / max(1e-9, time.perf_counter() - window_start)
            line = log_step(run, state, log, cfg, (loss, grad_norm, tokens, speed), per_epoch)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{line['lr']:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)
            epoch_end = state.micro_index % per_epoch == 0
            stop = _eval_due(run, cfg, state.step, epoch_end) and record_eval(
                run, state, result, log, out, cfg
            )
            checkpoint_if_due(run, state, cfg, checkpoints, epoch_end or stop)
            if stop:
                result.stopped_early = True
                ranks.print(f"early stopping at step {state.step}: no improvement in {state.bad_evals} evals")
                break
    finally:
        bar.close()
        log.close()
    return _finish(run, recipe, out, state, result, rows, started)


def log_step(
    run: _Run, state: TrainState, log: MetricsLog, cfg: TrainSection, values: tuple, per_epoch: int
) -> dict[str, Any]:
    """The step's metrics line from ``values`` = (loss, grad_norm, tokens, tokens_per_s): kept in the history,
    written every ``log_every`` steps and at the last."""
    loss, grad_norm, tokens, speed = values
    line = {"step": state.step, "epoch": round(state.micro_index / per_epoch, 4), "loss": loss,
            "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": tokens,
            "tokens_per_s": round(speed, 1), "time": round(time.time(), 3), **run.hooks.metrics()}  # fmt: skip
    state.history.append(line)
    if state.step % cfg.log_every == 0 or state.step == run.total_steps:
        log.write(line, "train", ("loss", "lr", "grad_norm", "tokens_per_s"))
    return line


def checkpoint_if_due(
    run: _Run, state: TrainState, cfg: TrainSection, checkpoints: Path, force: bool
) -> None:
    """Checkpoint every ``save_every`` steps, at the last step and when ``force``; keep the newest ``keep_last``."""
    if (cfg.save_every and state.step % cfg.save_every == 0) or force or state.step == run.total_steps:
        state.scheduler = run.scheduler.state_dict()
        distributed.save_checkpoint_on_main(run.ranks, checkpoints / f"step-{state.step:06d}", run,
                                            dataclasses.asdict(state), cfg.keep_last)  # fmt: skip


def _start(recipe: Recipe, resume: str | bool | None, ranks: distributed.Ranks | None = None) -> Path:
    """Check the device and the output directory, seed, and set the CPU allocator; returns ``output_dir``."""
    ranks = ranks or distributed.Ranks()
    if recipe.train.precision == "fp16" and _device().type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    distributed.check_strategy(recipe.train.strategy, recipe.adapter.method, recipe.train.optimizer)
    ranks.check_grad_accum(recipe.train.grad_accum)
    if _device().type == "cpu" and recipe.train.lean_cpu_heap:  # freed tensors go back to the OS, at a cost
        return_freed_memory_to_os()
    out = Path(recipe.output_dir)
    if ranks.is_main:
        prepare_output_dir(out, recipe.to_yaml(), bool(resume), recipe.overwrite)
    ranks.barrier("checking output_dir")  # rank 0 may have cleared it (overwrite=true)
    seed_everything(recipe.train.seed)
    return out


def _setup(recipe: Recipe, out: Path, ranks: distributed.Ranks) -> _Run:
    """Base model + adapter (its method's record decides the rest) -> data -> schedule -> hooks -> optimizer."""
    cfg, config = recipe.train, recipe.adapter.adapter_config()
    method = method_of(config)
    float_init = method.float_base_init is not None and method.float_base_init(config)
    tokenizer, model = load_base(
        recipe, quantize=not float_init
    )  # PiSSA's SVD needs the full-precision weights
    stacked = [f"stacked_{i}" for i in range(len(recipe.adapter.stack_on))]
    for name, path in zip(stacked, recipe.adapter.stack_on):
        load_adapter(model, path, adapter_name=name, activate=False)
    wrap(model, config, adapter_name="default")
    if stacked:  # continual learning: earlier adapters active, frozen, without dropout; the new one trains
        stack_adapters(model, frozen=stacked, trainable="default")
    train_set, val_set, stats = load_dataset(recipe.data, tokenizer)
    if len(train_set) == 0:
        raise DataError(f"{recipe.data.path}: no training samples")
    ranks.print(f"data: {stats.summary()}")
    # Only now, with model and data loaded, does output_dir hold a run: a start that fails on bad input
    # leaves nothing behind that would block the corrected run.
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / RECIPE_NAME, recipe.to_yaml().encode())
    total_steps, warmup = run_length(cfg, len(train_set))
    hooks = method.training(
        model, "default", total_steps
    )  # after the init (PiSSA keeps it), before quantizing
    if float_init and recipe.model.quantize:  # QPiSSA: the residuals (and the other Linears) go to 4 bits now
        base = recipe.model
        quantize_model(
            model, base.quantize, base.blocksize, base.double_quant, DTYPE_NAMES[base.compute_dtype]
        )
    optimizer = build_optimizer(model, recipe)
    scheduler = lr_schedule(optimizer, cfg, total_steps, warmup)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    collator = training_collator(tokenizer, model, recipe.data.padding_free)  # padding-free where it can
    return _Run(model, tokenizer, hooks, train_set, val_set, collator, optimizer, scheduler,
                scaler, _device(), total_steps, ranks=ranks)  # fmt: skip


def _resume(run: _Run, checkpoints: Path, resume: str | bool) -> TrainState:
    """Restore the newest checkpoint (``resume=True``; none yet: start from step 0) or the one at path
    ``resume``; the run's files are reopened at that step (:func:`lorakit.run_dir.reopen_run`)."""
    source = (
        Path(resume) if isinstance(resume, (str, Path)) else (list_checkpoints(checkpoints) or [None])[-1]
    )
    if source is None:
        run.ranks.print(f"--resume: no checkpoint in {checkpoints} yet: starting from step 0")
        state = TrainState()
    else:
        state = TrainState.from_checkpoint(load_checkpoint(source, run.model, run.optimizer, hooks=run.hooks))
        run.scheduler.load_state_dict(state.scheduler)
        run.ranks.print(f"resumed from {source} at step {state.step}")
    if run.ranks.is_main:
        reopen_run(checkpoints.parent, state.step)
    return state


def _next_micro_batches(
    state: TrainState, run: _Run, cfg: TrainSection
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """This rank's micro-batches of the next optimizer step (of its ``grad_accum``, fewer at an epoch's end; all of
    them in a single process), and the micro-batches per epoch. Advances ``state.micro_index``."""
    per_epoch = math.ceil(len(run.train_set) / cfg.batch_size)
    epoch, position = divmod(state.micro_index, per_epoch)
    batches = epoch_micro_batches(len(run.train_set), cfg.batch_size, cfg.seed, epoch)
    step = batches[position : position + cfg.grad_accum]  # fewer when the epoch ends inside this step
    state.micro_index += len(step)
    micro = []
    for indices in run.ranks.mine(step):  # a single process: all of them
        batch = run.collator([run.train_set[i] for i in indices or step[0]])
        if indices is None:  # FSDP: a rank without a micro-batch runs one without targets (no gradient)
            batch["labels"] = torch.full_like(batch["labels"], -100)
        micro.append(batch)
    return micro, per_epoch


def apply_update(
    run: _Run, loss: float, cfg: TrainSection, step: int, checkpoints: Path
) -> tuple[float, float]:
    """After the step's backward (``loss`` its value): the regularizer, the gradients summed over ranks, the NaN
    check (TrainingError naming the last good checkpoint), clipping, the optimizer and scheduler steps. Returns
    the step's loss (summed over ranks) and the grad norm before clipping."""
    # A method's regularizer (AdaLoRA's orthogonality term), once per optimizer step: the micro-batch losses above
    # already sum to the mean token loss of the whole step, so adding it per micro-batch would count it grad_accum
    # times (and on every rank it would count world_size times: rank 0 adds it). Logged apart from the task loss.
    regularizer = run.hooks.regularizer(run.model) if run.ranks.is_main else None
    if regularizer is not None:
        (run.scaler.scale(regularizer) if run.scaler else regularizer).backward()
    params = run.params or [p for p in run.model.parameters() if p.requires_grad]
    loss = run.ranks.reduce_gradients(params, loss)  # summed over ranks: the single-process gradient
    if not math.isfinite(loss):
        last = list_checkpoints(checkpoints)
        raise TrainingError(
            f"the loss became {loss} at step {step}; training stopped"
            + (f" (the last good checkpoint is {last[-1]})" if last else "")
            + ". Lower train.lr or check the data"
            + (", or use train.precision=fp32" if cfg.precision != "fp32" else "")
        )
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.hooks.after_step(run.model, step)  # after the update, before zero_grad (AdaLoRA's rank allocation)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return loss, float(grad_norm)


def _eval_due(run: _Run, cfg: TrainSection, step: int, epoch_end: bool) -> bool:
    """Evaluate every ``eval_every`` steps (else at each epoch's end) and at the last step, given a val set."""
    every = cfg.eval_every and step % cfg.eval_every == 0
    return run.val_set is not None and bool(
        every or (not cfg.eval_every and epoch_end) or step == run.total_steps
    )


def record_eval(
    run: _Run, state: TrainState, result: TrainResult, log: MetricsLog, out: Path, cfg: TrainSection,
    eval_loss: float | None = None,
) -> bool:  # fmt: skip
    """Evaluate (unless given ``eval_loss``), log it, keep the best adapter in ``out/best``, and say whether early
    stopping's patience ran out."""
    if eval_loss is None:
        eval_loss = evaluate_loss(run.model, run.val_set, run.collator, cfg, run.device, run.ranks)
        run.model.train()
    record = {"step": state.step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))}
    state.history.append(record)
    log.write(record, "eval", (), board={"eval/loss": eval_loss, "eval/perplexity": record["eval_ppl"]})
    result.eval_loss = eval_loss
    if state.best_eval is None or eval_loss < state.best_eval:
        state.best_eval, state.bad_evals = eval_loss, 0
        distributed.save_adapter_on_main(run.ranks, run.model, out / "best", adapter=run.adapter)
        return False
    state.bad_evals += 1
    return cfg.early_stopping_patience is not None and state.bad_evals >= cfg.early_stopping_patience


def _finish(
    run: _Run,
    recipe: Recipe,
    out: Path,
    state: TrainState,
    result: TrainResult,
    rows: list[dict[str, str]],
    started: float,
) -> TrainResult:
    """Write the adapter (and what the method's hooks export), tokenizer, loss curve and summary (rank 0)."""
    run.model.eval()
    # the adapter and what the method's hooks export (PiSSA: as_lora/)
    distributed.save_adapter_on_main(run.ranks, run.model, out, run.hooks, run.adapter)
    result.best_eval_loss = state.best_eval
    result.history = state.history
    if rows:
        result.after = exact_match_report(
            run.model, run.tokenizer, rows, recipe.train.max_new_tokens, run.ranks
        )
        result.after["eval_loss"] = result.eval_loss
    result.seconds = time.perf_counter() - started
    if run.ranks.is_main:
        run.tokenizer.save_pretrained(out)
        plot_metrics(out / METRICS_NAME, out / "loss.png")
        summary = {k: v for k, v in vars(result).items() if k not in ("history", "output_dir")}
        atomic_write_bytes(out / SUMMARY_NAME, json.dumps(summary, indent=1, default=str).encode())
    return result
