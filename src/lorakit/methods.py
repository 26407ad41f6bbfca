"""The adapter methods lorakit implements, one record each, in one table: :data:`METHODS`.

A record says everything the rest of lorakit asks about a method: its config class and layer class, its
``peft_type`` in ``adapter_config.json`` and how a config is written to and read from it, how its rank and
scale are named, whether it has LoRA's factors (mixed batches, int8 files, adapter arithmetic, LoRA+, stacking),
and what it adds to a training run (:class:`TrainingHooks`: AdaLoRA's rank allocator and orthogonality term,
PiSSA's full-precision start and its LoRA export). How its tensors are named in a file is its layer's
(:meth:`~lorakit.adapters.base.AdapterLinear.file_tensors`); the maths is in the method's own file under
``adapters/``.

``lorakit.wrap``, ``set_adapter``, ``merge``, ``save_adapter`` / ``load_adapter``, checkpoints, recipes and the
training loop all dispatch through this table; nothing else lists the methods. Adding a method is a row here
plus its file (``docs/architecture.md`` has the checklist).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.adapters.adalora import AdaLoraConfig, AdaLoraLinear
from lorakit.adapters.base import AdapterLinear
from lorakit.adapters.lora import LoraLinear, pissa_as_lora
from lorakit.adapters.qrlora import QRLoraConfig, QRLoraLinear
from lorakit.adapters.rank_allocator import AdaLoraController
from lorakit.config import LoraConfig, is_pissa_init
from lorakit.errors import ConfigError
from lorakit.walk import adapter_configs, adapter_state_dict


class TrainingHooks:
    """What a method adds to one training run of adapter ``adapter_name``; this base adds nothing.

    The loop calls, in order: :meth:`regularizer` once per optimizer step (its value is added to the loss),
    :meth:`after_step` after ``optimizer.step()`` and before ``zero_grad()``, :meth:`metrics` for the step's log
    line, :meth:`checkpoint_state` / :meth:`load_checkpoint_state` with each checkpoint, and :meth:`exports` at the
    end (extra adapter directories written next to the adapter).
    """

    name = ""  # the checkpoint files' prefix (``<name>_state.safetensors``) and trainer-state key

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """A scalar with grad to add to the step's loss, or None."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Run after optimizer step ``step`` (1, 2, ...)."""

    def metrics(self) -> dict[str, float]:
        """Extra values for the step's metrics line."""
        return {}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Tensors and JSON data a checkpoint keeps for this run, or None."""
        return None

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""

    def exports(self, model: nn.Module) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Extra adapter directories to write at the end: subdirectory -> (file tensors, config dict)."""
        return {}


class AdaLoraTraining(TrainingHooks):
    """AdaLoRA in a training run: :class:`~lorakit.adapters.rank_allocator.AdaLoraController` prunes the rank after
    each step, and its orthogonality regularizer joins the loss once per optimizer step."""

    name = "adalora"

    def __init__(self, controller: AdaLoraController) -> None:
        self.controller = controller
        self.orth_reg = 0.0

    @classmethod
    def for_run(cls, model: nn.Module, adapter_name: str, total_steps: int) -> AdaLoraTraining:
        """The hooks of a recipe's run of ``total_steps`` optimizer steps.

        Raises:
            ConfigError: ``tinit`` / ``tfinal`` leave no budget phase in the run (named as recipe fields).
        """
        config = adapter_configs(model).get(adapter_name)
        if isinstance(config, AdaLoraConfig) and config.tinit >= total_steps - config.tfinal:
            raise ConfigError(
                f"adapter.tinit={config.tinit} and adapter.tfinal={config.tfinal} leave no steps for AdaLoRA's rank "
                f"budget in this run of {total_steps} optimizer steps (train.max_steps / train.epochs): "
                "expected tinit < steps - tfinal; lower them or train longer"
            )
        return cls(AdaLoraController(model, adapter_name, total_step=total_steps))

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        orth_reg = self.controller.regularizer(model)
        self.orth_reg = orth_reg.item()
        return orth_reg

    def after_step(self, model: nn.Module, step: int) -> None:
        self.controller.step(model, step)  # PEFT's update_and_allocate: after the update, before zero_grad

    def metrics(self) -> dict[str, float]:
        return {"orth_reg": self.orth_reg, "adalora_rank": self.controller.kept_rank()}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.controller.state_dict().items()}
        return tensors, {"rank_pattern": self.controller.config.rank_pattern}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        self.controller.load_state_dict(tensors)
        self.controller.config.rank_pattern = data["rank_pattern"]


class PissaTraining(TrainingHooks):
    """PiSSA in a training run: the adapter as initialized is kept, and at the end the trained one is also written
    as a plain LoRA adapter for the original base weights (``as_lora/``, :func:`~lorakit.adapters.lora.pissa_as_lora`)."""

    def __init__(self, model: nn.Module, adapter_name: str, total_steps: int) -> None:
        self.adapter_name = adapter_name
        self.initial = {k: v.detach().clone() for k, v in adapter_state_dict(model, adapter_name).items()}

    def exports(self, model: nn.Module) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        config = adapter_configs(model)[self.adapter_name]
        tensors, as_lora = pissa_as_lora(adapter_state_dict(model, self.adapter_name), self.initial, config)
        return {"as_lora": (tensors, as_lora.to_peft_dict())}


def _lora_training(model: nn.Module, adapter_name: str, total_steps: int) -> TrainingHooks:
    config = adapter_configs(model)[adapter_name]
    if is_pissa_init(config.init_lora_weights):
        return PissaTraining(model, adapter_name, total_steps)
    return TrainingHooks()


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Attributes:
        name (str): ``adapter.method`` in a recipe and ``method`` in :func:`lorakit.inject.list_adapters`.
        title (str): The name in messages (``"QR-LoRA"``).
        config (type): Its config dataclass.
        flags (dict): Config fields that tell this method from another with the same config class
            (DoRA: ``use_dora=True``).
        layer (type): Its :class:`~lorakit.adapters.base.AdapterLinear` subclass.
        peft_type (str): ``peft_type`` in ``adapter_config.json``.
        to_file (Callable): Config -> the ``adapter_config.json`` dict.
        from_file (Callable): ``(dict, source)`` -> config; raises ``ConfigError`` naming ``source``.
        rank_field, alpha_field (str): The config fields holding the rank and the scale numerator.
        lora_factors (bool): Adapters are LoRA factors ``A``, ``B`` (mixed batches, int8 files, arithmetic, LoRA+,
            stacking on earlier adapters).
        float_base_init (Callable | None): Config -> whether the adapter's init needs the full-precision base
            (PiSSA): the trainer then loads the base unquantized and quantizes after wrapping.
        training (Callable): ``(model, adapter_name, total_steps)`` -> the run's :class:`TrainingHooks`.
        recipe_fields (dict): Recipe ``adapter.<key>`` -> config field, for every key this method reads (a recipe
            refuses the others, which would be ignored).
        recipe_rule (Callable | None): ``(recipe values, recipe defaults, config kwargs)`` -> config kwargs, for
            fields that give one thing two ways (AdaLoRA's ``r`` / ``init_r``, QR-LoRA's ``r`` / ``tau``).
        rank_key (tuple): The file-key suffix of one tensor per adapted matrix, and how its rank is read from it.
        frozen_keys (tuple[str, ...]): File-key suffixes of stored tensors that are not trained.
        describe (Callable | None): ``(adapter_config.json dict, rank per module)`` -> the rank and scale fields
            ``lorakit inspect`` shows.
    """

    name: str
    title: str
    config: type
    layer: type[AdapterLinear]
    peft_type: str
    to_file: Callable[[Any], dict[str, Any]]
    from_file: Callable[..., Any]
    flags: dict[str, Any] = field(default_factory=dict)
    rank_field: str = "r"
    alpha_field: str = "lora_alpha"
    lora_factors: bool = False
    float_base_init: Callable[[Any], bool] | None = None
    training: Callable[[nn.Module, str, int], TrainingHooks] = lambda model, name, steps: TrainingHooks()
    recipe_fields: dict[str, str] = field(default_factory=dict)
    recipe_rule: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    rank_key: tuple[str, Callable[[torch.Tensor], int]] = (".lora_A.weight", lambda t: int(t.shape[0]))
    frozen_keys: tuple[str, ...] = ()
    describe: Callable[[dict[str, Any], dict[str, int]], dict[str, Any]] | None = None

    def selects(self, config: Any) -> bool:
        """Whether ``config`` describes an adapter of this method."""
        return type(config) is self.config and all(getattr(config, k) == v for k, v in self.flags.items())

    def recipe_config(self, values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """The config's keyword arguments from a recipe's adapter section (recipe key -> value; None: unset).

        Raises:
            ConfigError: Two recipe fields say the same thing differently (``recipe_rule``).
        """
        kwargs = dict(self.flags)
        for key, name in self.recipe_fields.items():
            if values.get(key) is not None and name not in kwargs:
                kwargs[name] = values[key]
        return kwargs if self.recipe_rule is None else self.recipe_rule(values, defaults, kwargs)


def _pissa_start(config: LoraConfig) -> bool:
    return is_pissa_init(config.init_lora_weights)


# ------------------------------------------------------------------------ recipes: fields that give the rank twice
def _adalora_recipe(
    values: dict[str, Any], defaults: dict[str, Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """AdaLoRA's initial rank is ``init_r``, else the recipe's ``r``."""
    if values["init_r"] is not None and values["r"] not in (values["init_r"], defaults["r"]):
        raise ConfigError(
            f"adapter.r={values['r']} and adapter.init_r={values['init_r']} disagree: for AdaLoRA r is the initial "
            "rank; set only one of them"
        )
    return {**kwargs, "init_r": values["init_r"] if values["init_r"] is not None else values["r"]}


def _qrlora_recipe(
    values: dict[str, Any], defaults: dict[str, Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """QR-LoRA keeps a fixed ``r`` components, or the energy rule's rank (``tau``, capped by ``max_r``)."""
    if values["tau"] is not None and values["r"] != defaults["r"]:
        raise ConfigError(
            f"adapter.r={values['r']} (a fixed QR-LoRA rank) and adapter.tau={values['tau']} (the rank chosen by "
            "energy) exclude each other; remove one (adapter.max_r caps the energy-chosen rank)"
        )
    if values["max_r"] is not None and values["tau"] is None:
        raise ConfigError(
            f"adapter.max_r={values['max_r']} caps the rank chosen by the energy threshold adapter.tau, which is "
            "not set; set adapter.tau too, or use adapter.r for a fixed rank"
        )
    return {**kwargs, "r": None} if values["tau"] is not None else kwargs


# ------------------------------------------------------------- `lorakit inspect`: a file's rank and scale fields
def _describe_lora(config: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    return {
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": config.get("use_rslora", False),
    }


def _describe_adalora(config: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """AdaLoRA's final rank pattern as module path -> kept components."""
    pattern = config.get("rank_pattern") or {}
    kept = {
        path: sum(pattern[f"{path}.lora_E"]) if f"{path}.lora_E" in pattern else rank
        for path, rank in sorted(ranks.items())
    }
    init_r = config.get("init_r")
    return {
        "r": init_r,
        "target_r": config.get("target_r"),
        "lora_alpha": config.get("lora_alpha"),
        "total_rank": f"{sum(kept.values())} of {init_r * len(kept) if init_r else '?'} components kept",
        "rank_pattern": kept,
    }


def _describe_qrlora(config: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    rule = (
        f"fixed r={config['r']}"
        if config.get("r")
        else f"tau={config.get('tau')}, max_r={config.get('max_r')}"
    )
    return {"r": config.get("r"), "rank_rule": rule, "alpha": config.get("alpha")}


# Recipe keys -> config fields. The target fields mean the same for every method.
_TARGETS = {k: k for k in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform")}
_LORA_KEYS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
)
_ADALORA_KEYS = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")
_LORA = dict(
    config=LoraConfig, layer=LoraLinear, peft_type="LORA", to_file=LoraConfig.to_peft_dict,
    from_file=LoraConfig.from_peft_dict, lora_factors=True, float_base_init=_pissa_start, training=_lora_training,
    recipe_fields={**{k: k for k in _LORA_KEYS}, **_TARGETS}, describe=_describe_lora,
)  # fmt: skip

# The table. Order matters only for reading files: the first row with a file's peft_type reads it.
METHODS: dict[str, Method] = {
    "lora": Method("lora", "LoRA", flags={"use_dora": False}, **_LORA),
    "dora": Method("dora", "DoRA", flags={"use_dora": True}, **_LORA),
    "adalora": Method(
        "adalora", "AdaLoRA", AdaLoraConfig, AdaLoraLinear, "ADALORA",
        to_file=AdaLoraConfig.to_peft_dict, from_file=AdaLoraConfig.from_peft_dict, rank_field="init_r",
        training=AdaLoraTraining.for_run, recipe_rule=_adalora_recipe, describe=_describe_adalora,
        rank_key=(".lora_A", lambda t: int(t.shape[0])),  # [rank, in]: PEFT's AdaLoRA keys have no ".weight"
        recipe_fields={
            "r": "init_r", "init_r": "init_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
            "init_lora_weights": "init_lora_weights", **{k: k for k in _ADALORA_KEYS}, **_TARGETS,
        },
    ),
    "qrlora": Method(
        "qrlora", "QR-LoRA", QRLoraConfig, QRLoraLinear, "LORAKIT_QRLORA",
        to_file=QRLoraConfig.to_dict, from_file=QRLoraConfig.from_dict, alpha_field="alpha",
        recipe_fields={"r": "r", "tau": "tau", "max_r": "max_r", "qr_alpha": "alpha", **_TARGETS},
        recipe_rule=_qrlora_recipe, describe=_describe_qrlora, rank_key=(".qr_lambda", lambda t: int(t.numel())),
        frozen_keys=(".qr_Q", ".qr_RP"),  # the stored factors: in the file, not trained
    ),
}  # fmt: skip


def method_of(config: Any) -> Method:
    """The method whose config ``config`` is.

    Raises:
        ConfigError: No method in :data:`METHODS` takes it.
    """
    for method in METHODS.values():
        if method.selects(config):
            return method
    names = sorted({m.config.__name__ for m in METHODS.values()})
    raise ConfigError(
        f"expected the config of an adapter method ({', '.join(names)}), got {type(config).__name__}"
    )


def method_for_file(data: dict[str, Any], source: str) -> Method:
    """The method that reads an ``adapter_config.json`` (by ``peft_type``; PEFT's default is ``LORA``).

    Raises:
        ConfigError: No method reads that ``peft_type``.
    """
    peft_type = data.get("peft_type", "LORA")
    for method in METHODS.values():
        defaults = {f.name: f.default for f in dataclasses.fields(method.config)}
        if method.peft_type == peft_type and all(
            data.get(k, defaults[k]) == v for k, v in method.flags.items()
        ):
            return method
    by_type: dict[str, list[str]] = {}
    for method in METHODS.values():
        by_type.setdefault(method.peft_type, []).append(method.title)
    kinds = ", ".join(f"{peft_type} ({', '.join(titles)})" for peft_type, titles in by_type.items())
    raise ConfigError(
        f"{source}: peft_type is {peft_type!r}; lorakit reads {kinds} adapters: train or convert it to one of those"
    )


def require_lora_factors(model: nn.Module, names: list[str], what: str, instead: str) -> None:
    """Raise :class:`ConfigError` naming the first of ``names`` whose method has no LoRA factors.

    Args:
        model (nn.Module): The wrapped model (``names`` must be its adapters).
        names (list[str]): Adapters about to be used by an operation that reads LoRA factors.
        what (str): The operation, for the message (e.g. ``"add_weighted_adapter"``).
        instead (str): What to do instead, besides merging.
    """
    configs = adapter_configs(model)
    for name in names:
        method = method_of(configs[name])
        if not method.lora_factors:
            article = "an" if method.title[0] in "AEIOU" else "a"
            raise ConfigError(
                f"{what} take LoRA and DoRA adapters only, and {name!r} is {article} {method.title} adapter: "
                f"{instead}, or merge it into the base first (lorakit.merge_and_unload)"
            )


__all__ = [
    "METHODS",
    "AdaLoraTraining",
    "Method",
    "PissaTraining",
    "TrainingHooks",
    "method_for_file",
    "method_of",
    "require_lora_factors",
]
