"""The training loop: one explicit loop, read top to bottom.

recipe -> base model (4-bit or compute dtype) -> adapter -> data -> optimizer + schedule -> steps
(gradient accumulation normalized by target tokens, clipping, autocast) -> evaluation, early stopping,
checkpoints -> adapter files + tokenizer + resolved recipe + metrics + loss curve in ``output_dir``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from lorakit.activations import enable_checkpointing, return_freed_memory_to_os
from lorakit.adapters.pissa import initial_state, quantize_model, save_as_lora
from lorakit.adapters.rank_allocator import AdaLoraController
from lorakit.arithmetic import stack_adapters
from lorakit.checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from lorakit.config import is_pissa_init
from lorakit.data import DataError, load_dataset, make_collator
from lorakit.data.formats import read_rows
from lorakit.errors import ConfigError, LorakitError
from lorakit.evaluate import evaluate_loss, exact_match_report
from lorakit.hardware import DTYPE_NAMES, bf16_report
from lorakit.io import atomic_write_bytes, load_adapter, save_adapter
from lorakit.loading import load_model
from lorakit.loss import causal_lm_loss_sum
from lorakit.optim import build_optimizer as make_optimizer
from lorakit.optim.loraplus import loraplus_param_groups
from lorakit.plot import plot_metrics
from lorakit.recipe import Recipe
from lorakit.variants import wrap_adapter

RECIPE_NAME = "recipe.yaml"
METRICS_NAME = "metrics.jsonl"


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (a NaN loss, an output directory that holds another run ...)."""


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


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _check_output_dir(recipe: Recipe, resume: bool) -> Path:
    """Refuse to write into a directory that holds something else, unless resuming or ``overwrite``."""
    out = Path(recipe.output_dir)
    if not out.exists() or not any(out.iterdir()):
        return out
    if resume:
        saved = out / RECIPE_NAME
        if saved.is_file() and saved.read_text() != recipe.to_yaml():
            raise TrainingError(
                f"{saved} differs from the recipe being resumed; resume with the same recipe and overrides"
            )
        return out
    if recipe.overwrite:
        shutil.rmtree(out)
        return out
    what = "another run" if (out / RECIPE_NAME).exists() else "files"
    raise TrainingError(
        f"output_dir {out} already holds {what}; nothing was overwritten. Use --resume to continue it, "
        "overwrite=true to replace it, or another output_dir"
    )


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
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: expected a Hugging Face model directory with config.json, got {path}")
    tokenizer = AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=section.trust_remote_code
    )
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


def lr_lambda(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine / linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def _micro_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches: a permutation fixed by (seed, epoch), so a resumed run sees the same order."""
    order = torch.randperm(
        n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    ).tolist()
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    precision: str = "bf16",
    chunked: bool = True,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Forward and backward over the micro-batches of one optimizer step; returns the step's loss.

    Each micro-batch's summed token loss is divided by the number of target tokens of *all* micro-batches,
    so the accumulated gradient equals the gradient of one large batch (not a mean of per-batch means, which
    over-weights short batches: transformers PR #34191).
    """
    n_targets = max(1, sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches))
    loss_total = 0.0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(precision, device):
            loss_sum, _ = causal_lm_loss_sum(model, batch, chunked=chunked)
        loss = loss_sum / n_targets
        (scaler.scale(loss) if scaler else loss).backward()
        loss_total += loss.item()
    return loss_total


def train(recipe: Recipe, resume: str | bool | None = None, progress: bool = True) -> TrainResult:
    """Run a recipe to the end (or resume one) and write everything into ``recipe.output_dir``.

    Args:
        recipe (Recipe): The validated recipe.
        resume (str | bool | None): True: continue from the newest checkpoint in ``output_dir``; a path:
            from that checkpoint directory; None/False: a new run.
        progress (bool): Show a progress bar. Default True.

    Returns:
        TrainResult: Final losses, before/after metrics, steps and history.

    Raises:
        TrainingError: NaN/Inf loss (the last good checkpoint is kept) or an occupied output directory.
        ConfigError / DataError: Invalid recipe or data.
    """
    started = time.perf_counter()
    device = _device()
    resolved = recipe.with_precision_resolved(device.type)  # "auto" -> what this hardware runs fast
    print(precision_header(recipe, resolved))
    recipe, train_cfg = resolved, resolved.train
    if train_cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if device.type == "cpu" and train_cfg.lean_cpu_heap:  # freed tensors go back to the OS, at a cost in time
        return_freed_memory_to_os()
    out = _check_output_dir(recipe, bool(resume))
    seed_everything(train_cfg.seed)

    pissa = is_pissa_init(recipe.adapter.init_lora_weights)
    tokenizer, model = load_base(recipe, quantize=not pissa)  # PiSSA's SVD needs the full-precision weights
    stacked = [f"stacked_{i}" for i in range(len(recipe.adapter.stack_on))]
    for name, path in zip(stacked, recipe.adapter.stack_on):
        load_adapter(model, path, adapter_name=name, activate=False)
    # LoRA / DoRA / PiSSA, AdaLoRA or QR-LoRA, by adapter.method
    wrap_adapter(model, recipe.adapter.adapter_config(), adapter_name="default")
    pissa_start = initial_state(model) if pissa else None
    if pissa and recipe.model.quantize:  # QPiSSA: the residuals (and the other Linears) go to 4 bits now
        base = recipe.model
        dtype = DTYPE_NAMES[base.compute_dtype]
        quantize_model(model, base.quantize, base.blocksize, base.double_quant, dtype)
    if stacked:  # continual learning: earlier adapters active, frozen, without dropout; the new one trains
        stack_adapters(model, frozen=stacked, trainable="default")
    train_set, val_set, stats = load_dataset(recipe.data, tokenizer)
    if len(train_set) == 0:
        raise DataError(f"{recipe.data.path}: no training samples")
    collator = make_collator(tokenizer)
    print(f"data: {stats.summary()}")
    # Only now, with model and data loaded, does output_dir hold a run: a start that fails on bad input
    # leaves nothing behind that would block the corrected run.
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / RECIPE_NAME, recipe.to_yaml().encode())

    steps_per_epoch = math.ceil(math.ceil(len(train_set) / train_cfg.batch_size) / train_cfg.grad_accum)
    total_steps = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * steps_per_epoch))
    warmup = (
        train_cfg.warmup_steps
        if train_cfg.warmup_steps is not None
        else int(train_cfg.warmup_ratio * total_steps)
    )
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, train_cfg.scheduler)
    )
    scaler = torch.amp.GradScaler("cuda") if train_cfg.precision == "fp16" else None
    controller = _adalora_controller(model, recipe, total_steps)

    state: dict[str, Any] = {"step": 0, "micro_index": 0, "history": [], "best_eval": None, "bad_evals": 0}
    checkpoints = out / "checkpoints"
    if resume:
        source = (
            Path(resume) if isinstance(resume, (str, Path)) else (list_checkpoints(checkpoints) or [None])[-1]
        )
        if source is None:
            raise TrainingError(f"--resume: no checkpoint in {checkpoints}; start the run without --resume")
        state = load_checkpoint(source, model, optimizer, controller=controller)
        scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from {source} at step {state['step']}")

    result = TrainResult(output_dir=out, steps=total_steps, final_train_loss=None)
    report_rows = _report_rows(recipe) if train_cfg.eval_generate else []
    if report_rows and not resume:
        result.before = exact_match_report(model, tokenizer, report_rows, train_cfg.max_new_tokens)
        if val_set is not None:
            result.before["eval_loss"] = evaluate_loss(model, val_set, collator, train_cfg, device)

    metrics_file = open(out / METRICS_NAME, "a")  # noqa: SIM115 - closed in the finally below
    board = _tensorboard(out) if train_cfg.tensorboard else None
    bar = tqdm(
        total=total_steps, initial=state["step"], disable=not progress, desc="train", dynamic_ncols=True
    )
    tokens_seen, window_start = 0, time.perf_counter()
    try:
        model.train()
        while state["step"] < total_steps:
            epoch, position = divmod(state["micro_index"], math.ceil(len(train_set) / train_cfg.batch_size))
            batches = _micro_batches(len(train_set), train_cfg.batch_size, train_cfg.seed, epoch)
            # One optimizer step: grad_accum micro-batches; the loss is normalized by their total target tokens.
            micro = []
            for _ in range(train_cfg.grad_accum):
                if position >= len(batches):
                    break  # the epoch ends inside this step; the next step starts the next epoch
                micro.append(collator([train_set[i] for i in batches[position]]))
                position += 1
            state["micro_index"] += len(micro)
            loss_total = accumulate_gradients(
                model, micro, device, train_cfg.precision, train_cfg.chunked_loss, scaler
            )
            tokens_seen += sum(int(b["input_ids"].numel()) for b in micro)
            if controller is not None:
                # AdaLoRA's orthogonality regularizer, once per optimizer step: the micro-batch losses above
                # already sum to the mean token loss of the whole step, so adding it per micro-batch would count
                # it grad_accum times. Logged apart from the task loss (which eval_loss is comparable to).
                orth_reg = controller.regularizer(model)
                (scaler.scale(orth_reg) if scaler else orth_reg).backward()
                orth_reg_value = orth_reg.item()
            if not math.isfinite(loss_total):
                last = list_checkpoints(checkpoints)
                raise TrainingError(
                    f"the loss became {loss_total} at step {state['step'] + 1}; training stopped"
                    + (f" (the last good checkpoint is {last[-1]})" if last else "")
                    + ". Lower train.lr, check the data, or use precision=fp32"
                )
            if scaler:
                scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm or float("inf"))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if controller is not None:  # PEFT's update_and_allocate: after the update, before zero_grad
                controller.step(model, state["step"] + 1)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            step = state["step"]
            result.final_train_loss = loss_total
            now = time.perf_counter()
            speed = tokens_seen / max(1e-9, now - window_start)
            line = {"step": step, "epoch": round(state["micro_index"] / len(batches), 4), "loss": loss_total,
                    "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": round(speed, 1)}  # fmt: skip
            if controller is not None:
                line.update(orth_reg=orth_reg_value, adalora_rank=controller.kept_rank())
            state["history"].append(line)
            if step % train_cfg.log_every == 0 or step == total_steps:
                metrics_file.write(json.dumps(line) + "\n")
                metrics_file.flush()
                if board is not None:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        board.add_scalar(f"train/{key}", line[key], step)
            bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{line['lr']:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)

            epoch_end = state["micro_index"] % len(batches) == 0
            eval_now = val_set is not None and (
                (train_cfg.eval_every and step % train_cfg.eval_every == 0)
                or (not train_cfg.eval_every and epoch_end)
                or step == total_steps
            )
            stop = False
            if eval_now:
                eval_loss = evaluate_loss(model, val_set, collator, train_cfg, device)
                model.train()
                record = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))}
                state["history"].append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if board is not None:
                    board.add_scalar("eval/loss", eval_loss, step)
                    board.add_scalar("eval/perplexity", record["eval_ppl"], step)
                result.eval_loss = eval_loss
                if state["best_eval"] is None or eval_loss < state["best_eval"]:
                    state["best_eval"], state["bad_evals"] = eval_loss, 0
                    save_adapter(model, out / "best")
                else:
                    state["bad_evals"] += 1
                    patience = train_cfg.early_stopping_patience
                    stop = patience is not None and state["bad_evals"] >= patience
            if (
                (train_cfg.save_every and step % train_cfg.save_every == 0)
                or epoch_end
                or step == total_steps
                or stop
            ):
                state["scheduler"] = scheduler.state_dict()
                save_checkpoint(
                    checkpoints / f"step-{step:06d}", model, optimizer, state, controller=controller
                )
                prune_checkpoints(checkpoints, train_cfg.keep_last)
            if stop:
                result.stopped_early = True
                print(f"early stopping at step {step}: no improvement in {state['bad_evals']} evaluations")
                break
    finally:
        bar.close()
        metrics_file.close()
        if board is not None:
            board.close()

    model.eval()
    save_adapter(model, out)
    if pissa_start is not None:  # the same update as a plain LoRA adapter for the original base weights
        save_as_lora(model, out / "as_lora", pissa_start)
    tokenizer.save_pretrained(out)
    plot_metrics(out / METRICS_NAME, out / "loss.png")
    result.best_eval_loss = state["best_eval"]
    result.history = state["history"]
    if report_rows:
        result.after = exact_match_report(model, tokenizer, report_rows, train_cfg.max_new_tokens)
        result.after["eval_loss"] = result.eval_loss
    result.seconds = time.perf_counter() - started
    (out / "train_summary.json").write_text(
        json.dumps(
            {k: v for k, v in vars(result).items() if k not in ("history", "output_dir")},
            indent=1,
            default=str,
        )
    )
    return result


def precision_header(recipe: Recipe, resolved: Recipe) -> str:
    """One line for the run header: the compute dtype and precision, and why when ``auto`` chose them."""
    line = f"precision: {resolved.train.precision} (compute dtype {resolved.model.compute_dtype})"
    if "auto" in (recipe.model.compute_dtype, recipe.train.precision):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        line += f"; auto on this {device}: {bf16_report(device).reason}"
    return line


def _adalora_controller(model: torch.nn.Module, recipe: Recipe, total_steps: int) -> AdaLoraController | None:
    """AdaLoRA's rank allocator for a run of ``total_steps`` optimizer steps (None for other methods)."""
    if recipe.adapter.method != "adalora":
        return None
    config = recipe.adapter
    try:
        return AdaLoraController(model, "default", total_step=total_steps)
    except ConfigError:
        raise ConfigError(
            f"adapter.tinit={config.tinit or 0} and adapter.tfinal={config.tfinal or 0} leave no steps for "
            f"AdaLoRA's rank budget in this run of {total_steps} optimizer steps (train.max_steps / train.epochs): "
            "expected tinit < steps - tfinal; lower them or train longer"
        ) from None


def _tensorboard(out: Path):
    """A TensorBoard writer logging into ``out/tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard (or set it to false)"
        ) from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _report_rows(recipe: Recipe) -> list[dict[str, str]]:
    """Alpaca rows of the validation file used for the exact-match report."""
    if recipe.data.val_path is None:
        return []
    parsed, _ = read_rows(Path(recipe.data.val_path))
    rows = [
        r.value for r in parsed if isinstance(r.value, dict) and {"instruction", "output"} <= r.value.keys()
    ]
    return rows[: recipe.train.eval_generate]
