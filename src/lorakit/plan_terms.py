"""The byte count of each line of ``lorakit plan``'s breakdown: weights, optimizer, activations, loss, workspace.

Every function takes the model's shape and a :class:`~lorakit.plan.PlanConfig` and returns bytes (or
:class:`Component` lines); :func:`lorakit.plan.plan_memory` adds them up into the peak. What each term models is in
the :mod:`lorakit.plan` docstring and docs/plan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError
from lorakit.hardware import DTYPE_NAMES
from lorakit.optim import OPTIMIZERS
from lorakit.optim.adamw8bit import BLOCKSIZE as OPTIM_BLOCKSIZE
from lorakit.optim.adamw8bit import CHUNK_ELEMENTS as OPTIM_CHUNK  # AdamW8bit's update chunks: CUDA, CPU
from lorakit.optim.adamw8bit import CPU_CHUNK_ELEMENTS as OPTIM_CHUNK_CPU
from lorakit.optim.adamw8bit import MIN_8BIT_SIZE  # smaller tensors keep fp32 moments (as bitsandbytes)
from lorakit.optim.paged import MIN_PAGED_SIZE  # smaller states stay on the GPU
from lorakit.presets import ModelShape
from lorakit.quant.nf4 import NESTED_BLOCKSIZE

if TYPE_CHECKING:
    from lorakit.plan import PlanConfig

METHODS = ("full", "lora", "qlora")
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
DEVICES = ("cuda", "cpu")
STRATEGIES = ("ddp", "fsdp")  # train.strategy under torchrun (lorakit.distributed)
# What FSDP shards 1/N per device: every parameter (the frozen compute-dtype ones too) and what follows one.
FSDP_SHARDED = ("adapters (fp32)", "gradients", "optimizer states", "optimizer step temporaries")
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPE_NAMES.items()}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS: dict[str, tuple[str, ...]] = {
    "all": PROJECTIONS,
    "all-linear": PROJECTIONS,
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "minimal": ("q_proj", "v_proj"),
}
# Resident memory of `python -c "import lorakit.train"` plus what the first training step adds (oneDNN / OpenMP
# buffers, the autograd engine, allocator arenas): measured by benchmarks/plan_validation.py on a model too small
# to matter (docs/plan.md). On CUDA: the context, which torch.cuda.max_memory_allocated does not include.
RUNTIME_BYTES = {"cpu": 440_000_000, "cuda": 500_000_000}
LOGIT_BYTES_BACKWARD = 12  # fp32 log-softmax + its gradient + the gradient of the logits, per logit


@dataclass
class Component:
    """One line of the breakdown: ``bytes`` alive during ``phase`` (``always``, ``forward/backward``, ``step``)."""

    name: str
    bytes: int
    phase: str
    detail: str = ""


def trainable_tensors(model: ModelShape, config: PlanConfig) -> list[int]:
    """Element counts of every trainable tensor (one optimizer state each)."""
    shapes = model.linear_shapes()
    if config.method == "full":
        layer = [a * b for a, b, _ in shapes.values()] + [b for _, b, bias in shapes.values() if bias]
        layer += [model.hidden_size] * 2  # norms
        embeddings = [model.vocab_size * model.hidden_size] * (1 if model.tie_word_embeddings else 2)
        return layer * model.num_layers + embeddings + [model.hidden_size]
    layer = []
    for name in config.targets():
        d_in, d_out, _ = shapes[name]
        layer += [config.r * d_in, d_out * config.r]  # lora_A [r, in], lora_B [out, r]
    return layer * model.num_layers


def check_rank(model: ModelShape, config: PlanConfig) -> None:
    if config.method == "full":
        return
    shapes = model.linear_shapes()
    smallest = min(min(shapes[n][:2]) for n in config.targets())
    if config.r > smallest:
        raise ConfigError(
            f"r={config.r} is larger than the smallest dimension of a targeted module ({smallest}, hidden size "
            f"{model.hidden_size}): a rank-r update of a [out, in] weight needs r <= min(in, out); lower --r"
        )


def _quantized_bytes(numel: int, blocksize: int, double_quant: bool) -> tuple[int, int]:
    """``(packed codes, constants)`` bytes of one 4-bit tensor (:class:`lorakit.quant.Linear4bit`'s buffers)."""
    blocks = math.ceil(numel / blocksize)
    # double quantization: uint8 absmax codes + fp32 nested absmax per 256 codes + fp32 offset
    nested = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4
    constants = nested if double_quant else 4 * blocks
    return (numel + 1) // 2, constants


def quantized_bits_per_parameter(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per weight of 4-bit storage with its constants: 4.127 for NF4 + double quantization (QLoRA §3)."""
    packed, constants = _quantized_bytes(numel, blocksize, double_quant)
    return 8 * (packed + constants) / numel


def weight_terms(model: ModelShape, config: PlanConfig) -> list[Component]:
    c = DTYPE_BYTES[config.compute_dtype]
    dtype = config.full_dtype if config.method == "full" else config.compute_dtype
    p = DTYPE_BYTES[dtype]
    total, L = model.num_parameters(), model.num_layers
    shapes = model.linear_shapes().values()
    if config.method != "qlora":
        return [Component(f"base weights ({dtype})", total * p, "always", f"{total:,d} params")]
    packed = constants = 0
    for d_in, d_out, _ in shapes:
        a, b = _quantized_bytes(d_in * d_out, config.blocksize, config.double_quant)
        packed, constants = packed + a * L, constants + b * L
    quantized = L * sum(a * b for a, b, _ in shapes)
    kept = total - quantized  # embeddings, head, norms, biases
    bits = 8 * (packed + constants) / quantized
    return [
        Component(
            f"base weights, 4-bit ({config.quant_type or 'nf4'})", packed, "always", f"{quantized:,d} params"
        ),
        Component(
            "quantization constants",
            constants,
            "always",
            f"{'double-quantized ' if config.double_quant else 'fp32 '}absmax per {config.blocksize}: "
            f"{bits:.3f} bits/param with the codes",
        ),
        Component(
            f"base weights ({config.compute_dtype})",
            kept * c,
            "always",
            f"{kept:,d} params: embeddings, head, norms, biases",
        ),
    ]


def optimizer_terms(tensors: list[int], param_bytes: int, config: PlanConfig) -> list[Component]:
    """States (always) and step temporaries (step), the states split between device and host when paged."""
    name, on_device, host = config.optimizer, 0, 0
    eight_bit = name.endswith("8bit")
    for n in tensors:
        if eight_bit and n >= MIN_8BIT_SIZE:
            state = 2 * n + 2 * 4 * math.ceil(n / OPTIM_BLOCKSIZE)
        elif name == "adamw":
            state = 2 * n * param_bytes  # torch.optim.AdamW: zeros_like(param)
        else:
            state = 8 * n  # lorakit's 32-bit moments are fp32 whatever the parameter dtype
        if name.startswith("paged") and config.device == "cuda" and n >= MIN_PAGED_SIZE:
            host += state
        else:
            on_device += state
    largest = max(tensors)
    # torch AdamW: sqrt(v) and sqrt(v) / c, per tensor on CPU, for every tensor at once with CUDA's foreach
    if name == "adamw":
        temporaries = (sum(tensors) if config.device == "cuda" else 2 * largest) * param_bytes
        how = "foreach sqrt(v) of all tensors" if config.device == "cuda" else "sqrt(v) of the largest tensor"
    else:  # one chunk: decoded moments, fp32 copies, sqrt / denominator, requantization
        chunk = min(largest, OPTIM_CHUNK_CPU if config.device == "cpu" else OPTIM_CHUNK)
        per_element = 48 if eight_bit else 16
        temporaries = per_element * chunk
        how = f"one chunk of {chunk:,d} elements"
        if host:
            temporaries += (2 if eight_bit else 8) * chunk  # the chunk's state copied to the GPU
    states = [Component("optimizer states", on_device, "always", f"{name}, {len(tensors):,d} tensors")]
    if host:
        states.append(
            Component("optimizer states (host, paged)", host, "host", "pinned CPU memory, not on the GPU")
        )
    return [*states, Component("optimizer step temporaries", temporaries, "step", how)]


# ------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(model: ModelShape, config: PlanConfig, first: bool = False) -> int:
    """Bytes per token that autograd saves in one decoder layer (transformers' Llama layer, SDPA, autocast).

    Counted op by op (each stored tensor once, parameters not counted):

    - each RMSNorm: its fp32 input (4H) and 1/rms (4); in full fine-tuning also the normalized tensor that
      the norm weight's gradient needs.
    - attention (SDPA): rotated q and k, v, the output and the fp32 logsumexp per head.
    - SwiGLU: gate output (SiLU's input), SiLU output and up output, each ``[I]``.
    - full fine-tuning: each weight's gradient needs the Linear's input: the two norm outputs and the down
      projection's input (q/k/v and gate/up share theirs; o's input is the SDPA output). With fp32 weights,
      autocast makes a bf16 copy of the input for each Linear.
    - LoRA / QLoRA (frozen base: the base Linear saves no input): lorakit's ``LoraProduct`` keeps each adapter's
      input itself (q/k/v share one, gate/up one, o_proj's is the attention output), the rank-r hidden, and with
      dropout a boolean mask per adapter.

    Args:
        model (ModelShape): The model.
        config (PlanConfig): The training choices.
        first (bool): The first decoder layer of an adapter run, whose input needs no gradient (its first norm
            and the dropout masks on q/k/v save nothing). Default False.

    Returns:
        int: Bytes per token.
    """
    c = DTYPE_BYTES[config.compute_dtype]
    H, inter, heads = model.hidden_size, model.intermediate_size, model.num_heads
    Q, K = model.num_heads * model.head_width, model.num_kv_heads * model.head_width
    attention = c * (2 * Q + 2 * K) + 4 * heads
    mlp = 3 * c * inter
    if config.method == "full":
        fp32 = config.full_dtype == "float32"
        norms = 2 * (4 * H + 4 + (4 if fp32 else c) * H)
        inputs = (5 * c * H if fp32 else 2 * c * H) + c * inter
        return norms + attention + mlp + inputs
    shapes = model.linear_shapes()
    targets = config.targets()
    # lorakit's LoraProduct (adapters/lora_fn.py) keeps each adapter's input as it is, no copy: q/k/v share the
    # attention norm's output, gate/up the MLP norm's, o_proj's input is the attention output counted above.
    inputs = {"q_proj": H, "k_proj": H, "v_proj": H, "gate_proj": H, "up_proj": H, "down_proj": inter}
    shared = dict.fromkeys(("q_proj", "k_proj", "v_proj"), "attention") | dict.fromkeys(
        ("gate_proj", "up_proj"), "mlp"
    )
    adapters = c * sum({shared.get(n, n): inputs[n] for n in targets if n in inputs}.values())
    for name in targets:  # the rank-r hidden, and with dropout the boolean mask (also in the first layer)
        adapters += c * config.r + (shapes[name][0] if config.lora_dropout > 0 else 0)
    norms = (1 if first else 2) * (4 * H + 4)
    return norms + attention + mlp + adapters


def activation_terms(model: ModelShape, config: PlanConfig) -> tuple[Component, int]:
    """Saved activations at the start of backward, and the largest per-layer backward transient."""
    c = DTYPE_BYTES[config.compute_dtype]
    B, T, L, H = config.batch_size, config.seq_len, model.num_layers, model.hidden_size
    N = B * T
    full = config.method == "full"
    layer = layer_activation_bytes(model, config)
    first = layer if full else layer_activation_bytes(model, config, first=True)
    targets_n = _loss_tokens(config)
    # final norm, the token ids kept by a trainable embedding, the loss's gathered hidden states and its mask
    final_norm = 4 * H + 4 + ((4 if config.full_dtype == "float32" else c) * H if full else 0)
    extra = N * (final_norm + (8 if full else 0) + (1 if config.chunked_loss else 0))
    extra += targets_n * c * H if config.chunked_loss else 0
    extra += 2 * T * model.head_width * c  # RoPE cos / sin, shared by every layer and sequence
    if config.gradient_checkpointing:
        residual = 4 if full and config.full_dtype == "float32" else c
        saved = L * N * residual * H + N * layer + extra  # layer inputs + one layer recomputed in backward
        detail = f"{L} layer inputs + 1 recomputed layer ({layer:,d} B/token) + loss inputs"
    else:
        saved = N * (first + (L - 1) * layer) + extra
        detail = f"{layer:,d} bytes/token/layer x {L} layers + loss inputs"
    # backward of the MLP: gradients of down's input, SiLU's output, up's output and gate's output, and of the
    # hidden state; a LoRA adapter adds the fp32 gradient of its input (and the dropout's) before the cast back
    inter = model.intermediate_size
    lora_in = max((model.linear_shapes()[n][0] for n in config.targets()), default=0) if not full else 0
    transient = N * (3 * c * inter + 2 * c * H + (4 + (4 if config.lora_dropout > 0 else 0) + c) * lora_in)
    return Component("activations", saved, "forward/backward", detail), transient


def _loss_tokens(config: PlanConfig) -> int:
    return max(1, round(config.batch_size * (config.seq_len - 1) * config.target_fraction))


def loss_term(model: ModelShape, config: PlanConfig) -> Component:
    n = _loss_tokens(config)
    rows = min(config.chunk_tokens, n) if config.chunked_loss else n
    how = f"{rows:,d} tokens x {model.vocab_size:,d} vocab x {LOGIT_BYTES_BACKWARD} B"
    how += " (one chunk)" if config.chunked_loss and rows < n else ""
    return Component("logits / loss", rows * model.vocab_size * LOGIT_BYTES_BACKWARD, "forward/backward", how)


def workspace_terms(model: ModelShape, config: PlanConfig, trainable: int) -> list[Component]:
    c = DTYPE_BYTES[config.compute_dtype]
    out = []
    if config.method == "qlora":
        largest = max(a * b for a, b, _ in model.linear_shapes().values())
        if config.device == "cpu":
            out.append(Component("dequantization buffer", largest * c, "always",
                                 "one per thread, the largest layer, kept"))  # fmt: skip
        else:
            out.append(
                Component("dequantized weight", largest * c, "forward/backward", "one layer at a time")
            )
    if config.method != "full":
        out.append(
            Component(
                "autocast weight copies", trainable * c, "forward/backward", "bf16 casts of fp32 adapters"
            )
        )
    elif config.full_dtype == "float32":  # every Linear's weight, the output head included
        linear = model.num_layers * sum(a * b for a, b, _ in model.linear_shapes().values())
        linear += model.vocab_size * model.hidden_size
        out.append(
            Component("autocast weight copies", linear * c, "forward/backward", "bf16 casts of fp32 weights")
        )
    return out


# ---------------------------------------------------------------------------------------------- the plan


# ------------------------------------------------------------------------------------------ data parallel
def parallel_terms(model: ModelShape, config: PlanConfig, components: list[Component]) -> list[Component]:
    """The per-device breakdown on ``config.gpus`` ranks (:mod:`lorakit.distributed`); the micro-batch per device
    stays ``batch_size``, so activations and the loss do not change.

    ``ddp``: every device holds everything, plus the flat fp32 copy of the gradients that one all-reduce moves.
    ``fsdp``: parameters (adapters and compute-dtype base weights; 4-bit weights and a head tied to the embeddings
    stay whole), their gradients and optimizer states are 1/N per device; while a decoder layer runs, it and the
    prefetched next one are gathered whole, and so are the embeddings and the head while they are used.
    """
    n, trainable_bytes = config.gpus, sum(c.bytes for c in components if c.name == "gradients")
    if config.strategy == "ddp":
        if n == 1:
            return components
        how = f"the gradients in one flat fp32 buffer, all-reduced over {n} devices"
        return [*components, Component("gradient all-reduce bucket", trainable_bytes, "step", how)]
    c = DTYPE_BYTES[config.compute_dtype]
    embedding = model.vocab_size * model.hidden_size * c
    tied = embedding if model.tie_word_embeddings else 0  # FSDP leaves a tied head whole on every device
    out = []
    for comp in components:
        if comp.name in FSDP_SHARDED or comp.name.startswith("base weights ("):
            whole = tied if comp.name.startswith("base weights (") else 0
            shard = math.ceil((comp.bytes - whole) / n) + whole
            comp = Component(comp.name, shard, comp.phase, f"{comp.detail}; 1/{n} per device (FSDP)")
        out.append(comp)
    layer = sum(c.bytes for c in components if c.name == "adapters (fp32)") // model.num_layers
    if config.method != "qlora":  # the layer's base Linears are parameters too
        p = DTYPE_BYTES[config.full_dtype if config.method == "full" else config.compute_dtype]
        layer += sum(a * b for a, b, _ in model.linear_shapes().values()) * p
    gathered = 2 * layer + (0 if tied else 2 * embedding)
    how = "2 decoder layers (current + prefetched), embeddings and head, whole while used"
    return [*out, Component("FSDP gathered parameters", gathered, "forward/backward", how)]
