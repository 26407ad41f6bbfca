"""How much memory a fine-tuning step takes, predicted from the model's config alone (``lorakit plan``).

The planner models exactly what lorakit allocates for a Llama-shaped decoder (Llama, Mistral, Qwen2):

- base weights: the compute dtype (bf16) for LoRA; for QLoRA every decoder Linear in 4 bits (``(n + 1) // 2``
  bytes) plus its quantization constants (one uint8 absmax code per 64 weights, one fp32 per 256 codes and an fp32
  offset with double quantization: 4.127 bits per weight in all; one fp32 absmax per block without), while the
  embeddings, the output head, the norms and biases stay in the compute dtype (:func:`lorakit.loading.load_model`).
- adapters: ``A [r, in]`` and ``B [out, r]`` in fp32, their gradients in fp32, and the optimizer states:
  ``adamw`` 2 x 4 bytes per element; ``adamw_8bit`` 2 bytes plus 2 fp32 absmax per 256 elements, with fp32 states
  for tensors under 4096 elements; paged optimizers keep states of >= 1e5 elements in host memory on CUDA.
- activations: the tensors autograd saves for backward, counted op by op for transformers' Llama decoder layer
  under bf16 autocast (RMSNorm keeps its fp32 input, SDPA keeps q, k, v, output and logsumexp, SwiGLU keeps
  its three [tokens, intermediate] tensors, each LoRA adapter keeps a compute-dtype copy of its input, its
  rank-r hidden and, with dropout, an fp32 mask). ``tests/test_plan.py`` checks the count against the bytes
  autograd really saves. With gradient checkpointing only each layer's input is kept, plus one layer recomputed.
- the loss: lorakit's chunked cross-entropy keeps at most one chunk of ``[CHUNK_TOKENS, vocab]`` logits; its backward
  holds the fp32 log-softmax, its gradient and the gradient of the logits (12 bytes per logit).
- workspace: the per-thread 4-bit dequantization buffer on CPU (the largest layer, kept), one dequantized weight
  at a time on CUDA, autocast's cached bf16 copies of fp32 trainable weights, the optimizer's step temporaries.
- runtime: on CPU the resident size of Python + torch + transformers + lorakit (measured, see docs/plan.md);
  on CUDA the context, outside PyTorch's allocator.

The peak of a steady-state step is ``always + max(forward/backward, optimizer step)``: activations and loss
buffers are gone before the optimizer runs, gradients appear during backward. Sizes are in bytes; printed GB
are 1e9 bytes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.loss import CHUNK_TOKENS
from lorakit.plan_terms import (
    DEVICES,
    DTYPE_BYTES,
    METHODS,
    OPTIMIZER_NAMES,
    PROJECTIONS,
    RUNTIME_BYTES,
    STRATEGIES,
    TARGETS,
    Component,
    activation_terms,
    check_rank,
    layer_activation_bytes,
    loss_term,
    optimizer_terms,
    parallel_terms,
    quantized_bits_per_parameter,
    trainable_tensors,
    weight_terms,
    workspace_terms,
)
from lorakit.presets import ModelShape


@dataclass
class PlanConfig:
    """What is trained and how; the same choices ``lorakit train`` reads from a recipe.

    Args:
        method (str): ``"full"``, ``"lora"`` (bf16 base) or ``"qlora"`` (4-bit base). Default ``"qlora"``.
        r (int): LoRA rank. Default 16.
        target (str | list[str]): ``"all"`` / ``"all-linear"`` (the seven projections), ``"attention"``, ``"mlp"``,
            ``"minimal"`` (q, v) or a list of projection names. Default ``"all"``.
        batch_size (int): Sequences per micro-batch. Default 4.
        seq_len (int): Tokens per sequence. Default 512.
        optimizer (str): ``adamw``, ``adamw_8bit``, ``paged_adamw`` or ``paged_adamw_8bit``. Default ``"adamw"``.
        gradient_checkpointing (bool): Recompute each decoder layer in backward. Default False.
        lora_dropout (float): Dropout on the adapter input (keeps an fp32 mask per adapter). Default 0.05.
        compute_dtype (str): ``"bfloat16"`` or ``"float16"``: weights of LoRA/QLoRA and the autocast dtype.
        full_dtype (str): Weights (and their gradients, AdamW states) of full fine-tuning: ``"bfloat16"``
            (pure bf16) or ``"float32"`` (fp32 master weights, bf16 autocast). Default ``"bfloat16"``.
        quant_type (str | None): ``"nf4"`` or ``"fp4"``, QLoRA only; None means nf4 for QLoRA. Default None.
        double_quant (bool): Quantize the block scales (QLoRA). Default True.
        blocksize (int): 4-bit block size. Default 64.
        chunked_loss (bool): lorakit's chunked cross-entropy (``train.chunked_loss``). Default True.
        chunk_tokens (int): Tokens per loss chunk. Default :data:`lorakit.loss.CHUNK_TOKENS` (what train uses).
        target_fraction (float): Share of tokens that carry a loss (prompt tokens do not). Default 1.0.
        device (str): ``"cuda"`` or ``"cpu"`` (adds the process's resident runtime; no paging). Default ``"cuda"``.
        runtime_bytes (int | None): Override the device's runtime overhead (:data:`RUNTIME_BYTES`).
        gpus (int): Devices training data-parallel (one rank each, ``torchrun``); the plan is per device and the
            micro-batch per device stays ``batch_size``. Default 1.
        strategy (str): ``"ddp"`` (everything on every device) or ``"fsdp"`` (parameters, gradients and optimizer
            states 1/N per device; 4-bit weights whole). Default ``"ddp"``.

    Raises:
        ConfigError: A field is out of range or the combination cannot work (says why and what to use).
    """

    method: str = "qlora"
    r: int = 16
    target: str | list[str] = "all"
    batch_size: int = 4
    seq_len: int = 512
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    lora_dropout: float = 0.05
    compute_dtype: str = "bfloat16"
    full_dtype: str = "bfloat16"
    quant_type: str | None = None
    double_quant: bool = True
    blocksize: int = 64
    chunked_loss: bool = True
    chunk_tokens: int = CHUNK_TOKENS
    target_fraction: float = 1.0
    device: str = "cuda"
    runtime_bytes: int | None = None
    gpus: int = 1
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {got!r}")

        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        need(self.method in METHODS, "method", " / ".join(METHODS), self.method)
        need(positive_int(self.r), "r", "a positive integer", self.r)
        need(positive_int(self.batch_size), "batch_size", "a positive integer", self.batch_size)
        need(positive_int(self.seq_len), "seq_len", "a positive integer (tokens per sequence)", self.seq_len)
        need(positive_int(self.chunk_tokens), "chunk_tokens", "a positive integer", self.chunk_tokens)
        need(self.optimizer in OPTIMIZER_NAMES, "optimizer", " / ".join(OPTIMIZER_NAMES), self.optimizer)
        need(self.device in DEVICES, "device", " / ".join(DEVICES), self.device)
        need(positive_int(self.gpus), "gpus", "a positive integer (devices, one rank each)", self.gpus)
        need(self.strategy in STRATEGIES, "strategy", " / ".join(STRATEGIES), self.strategy)
        need(
            self.compute_dtype in ("bfloat16", "float16"),
            "compute_dtype",
            "bfloat16 / float16",
            self.compute_dtype,
        )
        need(self.full_dtype in ("bfloat16", "float32"), "full_dtype", "bfloat16 / float32", self.full_dtype)
        need(self.quant_type in (None, "nf4", "fp4"), "quant_type", "nf4 / fp4", self.quant_type)
        if self.quant_type is not None and self.method != "qlora":
            why = (
                "full fine-tuning trains the base weights, and 4-bit weights cannot be trained"
                if self.method == "full"
                else "LoRA keeps the base in the compute dtype"
            )
            raise ConfigError(
                f"quant_type={self.quant_type!r} with method={self.method!r}: {why}; use method qlora"
            )
        need(self.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096), "blocksize", "a power of two in 32..4096",
             self.blocksize)  # fmt: skip
        need(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)",
             self.lora_dropout)  # fmt: skip
        need(0 < self.target_fraction <= 1, "target_fraction", "a number in (0, 1]", self.target_fraction)
        self.targets()  # validates target

    def targets(self) -> tuple[str, ...]:
        """The targeted projection names.

        Raises:
            ConfigError: An unknown preset or projection name (lists the valid ones).
        """
        target = self.target
        if isinstance(target, str) and target in TARGETS:
            return TARGETS[target]
        names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
        unknown = [n for n in names if n not in PROJECTIONS]
        if unknown or not names:
            raise ConfigError(
                f"target {target!r}: unknown module {', '.join(map(repr, unknown)) or '(empty)'}; expected one of "
                f"the presets {', '.join(TARGETS)} or a comma-separated list of {', '.join(PROJECTIONS)}"
            )
        return tuple(n for n in PROJECTIONS if n in names)


@dataclass
class MemoryPlan:
    """The predicted memory of one training step.

    Attributes:
        model (ModelShape): The model.
        config (PlanConfig): The training choices.
        trainable_params (int): Trainable parameters (PEFT's count for LoRA).
        total_params (int): All parameters (4-bit weights counted by their logical number of elements).
        components (list[Component]): The breakdown.
        peak_bytes (int): ``always + max(forward/backward, step)``.
        peak_phase (str): The phase of the peak.
        budget_bytes (int | None): The memory given with ``gpu_memory``.
        suggestions (list[str]): Changes that make the step fit the budget (empty when it fits).
    """

    model: ModelShape
    config: PlanConfig
    trainable_params: int
    total_params: int
    components: list[Component]
    peak_bytes: int
    peak_phase: str
    budget_bytes: int | None = None
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits ``budget_bytes`` (None without a budget)."""
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    def component(self, name: str) -> int:
        """Bytes of the component called ``name`` (0 if absent)."""
        return sum(c.bytes for c in self.components if c.name == name)

    def phase_bytes(self, phase: str) -> int:
        """Bytes of every component of ``phase``."""
        return sum(c.bytes for c in self.components if c.phase == phase)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "model": dataclasses.asdict(self.model), "config": dataclasses.asdict(self.config),
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "components": [dataclasses.asdict(c) for c in self.components], "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase, "budget_bytes": self.budget_bytes, "fits": self.fits,
            "suggestions": self.suggestions,
        }  # fmt: skip

    def table(self) -> str:
        """The breakdown as text, as ``lorakit plan`` prints it."""
        c, m = self.config, self.model
        what = f"{c.method}" + ("" if c.method == "full" else f" r={c.r} on {','.join(c.targets())}")
        lines = [
            f"model      {m.name}: {self.total_params / 1e9:.2f}B params, {m.num_layers} layers, hidden "
            f"{m.hidden_size}, vocab {m.vocab_size}",
            f"training   {what}; batch {c.batch_size} x {c.seq_len} tokens; {c.optimizer}; checkpointing "
            f"{'on' if c.gradient_checkpointing else 'off'}; {'chunked' if c.chunked_loss else 'full'} loss; {c.device}"
            + (f"; {c.gpus} devices, {c.strategy}, per device" if c.gpus > 1 or c.strategy == "fsdp" else ""),
            f"trainable  {self.trainable_params:,d} params ({100 * self.trainable_params / self.total_params:.4f}%)",
            "",
            f"{'component':34} {'GB':>9}  {'when':17} detail",
        ]
        for comp in self.components:
            if comp.bytes:
                lines.append(f"{comp.name:34} {comp.bytes / 1e9:9.3f}  {comp.phase:17} {comp.detail}")
        always, fb, step = (self.phase_bytes(p) for p in ("always", "forward/backward", "step"))
        lines += [
            "",
            f"peak       {self.peak_bytes / 1e9:.2f} GB during {self.peak_phase} "
            f"(always {always / 1e9:.2f} + max(forward/backward {fb / 1e9:.2f}, step {step / 1e9:.2f}))",
        ]
        if (
            c.device == "cpu"
        ):  # the planner counts live tensors; glibc keeps freed ones resident (docs/plan.md)
            lines.append(
                "note       CPU: this is the RSS with train.lean_cpu_heap=true; with glibc's default heap "
                "expect 20-35% more"
            )
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"budget     {self.budget_bytes / 1e9:.2f} GB: {verdict}")
            lines += [f"  - {s}" for s in self.suggestions]
        return "\n".join(lines)


def parse_size(text: str | int | float) -> int:
    """``"24GB"`` (1e9 bytes), ``"24GiB"`` (2**30), ``"512MB"``, ``"80g"`` or a number of bytes -> bytes.

    Raises:
        ConfigError: Not a size.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match or not match.group(1):
        raise ConfigError(f"memory size: expected e.g. 24GB, 24GiB or 512MB, got {text!r}")
    power = " kmgt".index(match.group(2) or " ")
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base**power)


# ------------------------------------------------------------------------------------------------ the model
def plan_memory(
    model: str | Path | ModelShape,
    config: PlanConfig | None = None,
    gpu_memory: str | int | None = None,
    **overrides: Any,
) -> MemoryPlan:
    """Predict the peak memory of one training step, without loading any weight.

    Args:
        model (str | Path | ModelShape): A preset name (:data:`lorakit.presets.PRESETS`), a model directory,
            a ``config.json`` path, or a :class:`ModelShape`.
        config (PlanConfig | None): The training choices. Default: ``PlanConfig()``.
        gpu_memory (str | int | None): Memory available (``"24GB"``, ``"24GiB"``, bytes); adds the verdict
            and the changes that would make the step fit.
        **overrides: Fields of :class:`PlanConfig` replacing those of ``config``.

    Returns:
        MemoryPlan: The breakdown, the peak and (with ``gpu_memory``) whether it fits.

    Raises:
        ConfigError: Unknown model or preset (lists the presets), or an impossible configuration (says why).
    """
    shape = model if isinstance(model, ModelShape) else ModelShape.resolve(model)
    config = dataclasses.replace(config or PlanConfig(), **overrides)
    check_rank(shape, config)
    tensors = trainable_tensors(shape, config)
    trainable = sum(tensors)
    full = config.method == "full"
    param_bytes = DTYPE_BYTES[config.full_dtype] if full else 4
    components = weight_terms(shape, config)
    if not full:
        components.append(Component("adapters (fp32)", trainable * 4, "always", f"{trainable:,d} params"))
    components += optimizer_terms(tensors, param_bytes, config)
    components.append(
        Component("gradients", trainable * param_bytes, "step", f"{trainable:,d} x {param_bytes} B")
    )
    activations, transient = activation_terms(shape, config)
    loss = loss_term(shape, config)
    components += [activations, loss]
    if transient > loss.bytes:  # the layer backward, not the loss, is the largest working set
        components.append(Component("backward working memory", transient - loss.bytes, "forward/backward",
                                    "one layer's gradients beyond the loss buffers"))  # fmt: skip
    if full:  # the head's gradient exists from the first loss chunk's backward on
        head = shape.vocab_size * shape.hidden_size * param_bytes
        components.append(
            Component("head gradient (early)", head, "forward/backward", "allocated in the loss backward")
        )
    components += workspace_terms(shape, config, trainable)
    runtime = RUNTIME_BYTES[config.device] if config.runtime_bytes is None else config.runtime_bytes
    what = "Python + torch + transformers resident" if config.device == "cpu" else "CUDA context"
    components.append(Component("runtime", runtime, "always", what))
    components = parallel_terms(shape, config, components)  # per device on config.gpus ranks
    always = sum(c.bytes for c in components if c.phase == "always")
    fb = sum(c.bytes for c in components if c.phase == "forward/backward")
    step = sum(c.bytes for c in components if c.phase == "step")
    plan = MemoryPlan(
        model=shape, config=config, trainable_params=trainable, total_params=shape.num_parameters(),
        components=components, peak_bytes=always + max(fb, step),
        peak_phase="forward/backward" if fb >= step else "optimizer step",
        budget_bytes=None if gpu_memory is None else parse_size(gpu_memory),
    )  # fmt: skip
    if plan.fits is False:
        plan.suggestions = suggest_changes(shape, config, plan.budget_bytes)
    return plan


def _candidates(model: ModelShape, config: PlanConfig) -> list[tuple[str, dict[str, Any]]]:
    """Single changes that lower memory, in the order they cost the least quality or speed."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not config.gradient_checkpointing:
        out.append(
            ("turn on gradient checkpointing (--gradient-checkpointing)", {"gradient_checkpointing": True})
        )
    if not config.chunked_loss:
        out.append(("use the chunked loss (drop --no-chunked-loss)", {"chunked_loss": True}))
    if not config.optimizer.endswith("8bit"):
        out.append(
            ("8-bit optimizer states (--optimizer paged_adamw_8bit)", {"optimizer": "paged_adamw_8bit"})
        )
    if config.method != "full":
        current = config.targets()
        for name in ("attention", "minimal"):
            if len(TARGETS[name]) < len(current):
                out.append((f"fewer target modules (--target {name})", {"target": name}))
    if config.method != "qlora":
        out.append(("a 4-bit base (--method qlora)", {"method": "qlora", "quant_type": None}))
    if config.gpus > 1 and config.strategy == "ddp":
        out.append((f"shard across the {config.gpus} devices (--strategy fsdp)", {"strategy": "fsdp"}))
    return out


def suggest_changes(model: ModelShape, config: PlanConfig, budget: int) -> list[str]:
    """What makes the step fit ``budget`` bytes: each single change that suffices, the largest batch that fits,
    or else the smallest combination (in :func:`_candidates` order, then batch 1).

    Returns:
        list[str]: Human-readable suggestions with the peak each one gives.
    """

    def peak(**change: Any) -> int:
        return plan_memory(model, config, **change).peak_bytes

    out = []
    for label, change in _candidates(model, config):
        value = peak(**change)
        if value <= budget:
            out.append(f"{label}: peak {value / 1e9:.2f} GB")
    batch = config.batch_size - 1
    while batch >= 1 and peak(batch_size=batch) > budget:
        batch = batch // 2 if batch > 8 else batch - 1
    if batch >= 1:
        out.append(f"batch size {batch} (--batch {batch}, with gradient accumulation to keep the effective batch): "
                   f"peak {peak(batch_size=batch) / 1e9:.2f} GB")  # fmt: skip
    if out:
        return out
    combined: dict[str, Any] = {}
    labels = []
    for label, change in [*_candidates(model, config), ("batch size 1 (--batch 1)", {"batch_size": 1})]:
        combined.update(change)
        labels.append(label)
        value = peak(**combined)
        if value <= budget:
            return [f"all of: {'; '.join(labels)}: peak {value / 1e9:.2f} GB"]
    return [f"does not fit even with {'; '.join(labels)} (peak {value / 1e9:.2f} GB): use a larger device, "
            "shorter sequences (--seq) or shard the model across devices"]  # fmt: skip


__all__ = [
    "METHODS", "PROJECTIONS", "RUNTIME_BYTES", "TARGETS", "Component", "MemoryPlan", "ModelShape", "PlanConfig",
    "layer_activation_bytes", "parse_size", "plan_memory", "quantized_bits_per_parameter", "suggest_changes",
]  # fmt: skip
