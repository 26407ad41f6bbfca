"""Change a model's adapters: wrap its target modules (found by :mod:`lorakit.targets`), activate, freeze, count,
merge, unload, for every method alike (the method's record in :data:`lorakit.methods.METHODS` says which layer).

Every function here works in place on an ordinary ``nn.Module`` (a transformers model stays a transformers
model: ``forward``, ``generate`` and ``save_pretrained`` keep working). The adapter configs are kept on the
model as ``model.lorakit_configs`` (name -> config; :mod:`lorakit.walk` reads them).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.base import AdapterLinear, ModulesToSaveWrapper, is_quantized
from lorakit.adapters.mixed import BASE, RowPlan
from lorakit.errors import ConfigError, TargetModuleError
from lorakit.methods import method_of, require_lora_factors
from lorakit.quant import Linear4bit
from lorakit.targets import resolve_targets
from lorakit.walk import (
    CONFIGS_ATTR,
    adapter_configs,
    adapter_layers,
    adapter_state_dict,
    lora_layers,
    saved_modules,
    set_submodule,
)

# One name for the mixed-batch operations that read LoRA factors (kept for callers of the old name).
require_lora = require_lora_factors


def wrap(
    model: nn.Module,
    config: Any,
    adapter_name: str = "default",
    strict: bool = True,
    init: Callable[[str, nn.Module], Any] | None = None,
) -> nn.Module:
    """Add an adapter named ``adapter_name`` to ``model``, in place, of the method ``config`` describes.

    ``config`` is a :class:`~lorakit.LoraConfig` (LoRA, DoRA, PiSSA), an
    :class:`~lorakit.adapters.adalora.AdaLoraConfig` or a :class:`~lorakit.adapters.qrlora.QRLoraConfig`
    (:data:`lorakit.methods.METHODS`). The first adapter becomes active and trainable; all base weights are frozen.
    A later adapter is added inactive and frozen (as in PEFT) until :func:`set_adapter` names it.

    Args:
        model (nn.Module): Any Hugging Face (or plain torch) model.
        config: The adapter's configuration.
        adapter_name (str): Unique name of the adapter. Default ``"default"``.
        strict (bool): Refuse listed target names that match nothing.
        init (Callable[[str, nn.Module], Any] | None): ``(path, base layer)`` -> what the layer needs from an
            adapter file (``load_adapter`` passes it: ranks of a pruned AdaLoRA adapter, QR-LoRA's factors).

    Returns:
        nn.Module: The same ``model`` object.

    Raises:
        ConfigError: ``adapter_name`` is already used or not a valid name, ``config`` is no method's, or a target
            holds another method's adapters.
        TargetModuleError: The targets match no module.
    """
    method = method_of(config)
    configs = adapter_configs(model)
    _check_new_name(adapter_name, configs)
    first = not configs
    if config.task_type is None:
        config.task_type = _infer_task_type(model)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    paths = resolve_targets(model, config, strict=strict)
    modules = {path: model.get_submodule(path) for path in paths}
    held = [
        (p, type(m).__name__)
        for p, m in modules.items()
        if isinstance(m, AdapterLinear) and type(m) is not method.layer
    ]
    if held:  # checked before wrapping anything, so a refused call changes nothing
        raise ConfigError(
            f"{held[0][0]} already holds {held[0][1]} adapters; lorakit does not mix adapter methods on one layer: "
            "merge the other adapter first (merge_and_unload) or exclude this module"
        )
    bases = {p: m.base_layer if isinstance(m, AdapterLinear) else m for p, m in modules.items()}
    inits = (
        {p: init(p, base) for p, base in bases.items()} if init is not None else {}
    )  # may refuse: nothing wrapped yet
    if hasattr(
        config, "fan_in_fan_out"
    ):  # GPT-2 Conv1D stores W^T; PEFT records that (and forces it when loading)
        config.fan_in_fan_out = any(isinstance(b, Conv1D) for b in bases.values()) or config.fan_in_fan_out
    if first:
        model.requires_grad_(False)
    for path, module in modules.items():
        if not isinstance(module, method.layer):
            module = method.layer(module)
            set_submodule(model, path, module)
        module.add_from_config(adapter_name, config, path, inits.get(path))
        module.set_trainable(adapter_name, first)
    _wrap_modules_to_save(model, config, adapter_name, trainable=first)
    _install_adapter_names_hook(model)
    configs[adapter_name] = config
    if first:
        set_adapter(model, adapter_name)
    return model


def _check_new_name(adapter_name: str, configs: dict[str, Any]) -> None:
    if not adapter_name or not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name) or adapter_name == BASE:
        raise ConfigError(
            f"adapter_name must be letters, digits, '_' or '-' (not '__base__'), got {adapter_name!r}"
        )
    if adapter_name in configs:
        raise ConfigError(
            f"an adapter named {adapter_name!r} is already on this model; pick another name "
            f"(present: {sorted(configs)})"
        )


def _wrap_modules_to_save(model: nn.Module, config: Any, adapter_name: str, trainable: bool) -> None:
    for pattern in config.modules_to_save or []:
        matched = False
        for path, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                target = module if (path == pattern or path.endswith(f".{pattern}")) else None
            elif (path == pattern or path.endswith(f".{pattern}")) and ".modules_to_save." not in path:
                target = ModulesToSaveWrapper(module)
                set_submodule(model, path, target)
            else:
                target = None
            if target is not None:
                target.add_adapter(adapter_name)
                target.modules_to_save[adapter_name].requires_grad_(trainable)
                matched = True
        if not matched:
            raise TargetModuleError(
                f"modules_to_save entry {pattern!r} matches no module of {type(model).__name__}"
            )


def _infer_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return None


def set_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Make ``adapter_names`` the active adapter(s); only they are trainable.

    Several active adapters add their deltas in the given order; ``[]`` leaves no adapter active (the model
    computes the base, like :func:`disable_adapters`, and every adapter is frozen).

    Raises:
        ConfigError: A name is not an adapter of the model.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = adapter_configs(model)
    for name in names:
        if name not in configs:
            raise ConfigError(f"no adapter named {name!r} on this model; present: {sorted(configs)}")
    for _, layer in adapter_layers(model):
        held = layer.adapter_names()
        layer.active_adapters = [n for n in names if n in held]
        for name in held:
            layer.set_trainable(name, name in names)
    for _, module in saved_modules(model):
        active = [n for n in names if n in module.modules_to_save]
        module.active_adapter = active[0] if active else None
        for name, copy in module.modules_to_save.items():
            copy.requires_grad_(name in names)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters active in at least one layer, in the order the layers add them.

    The union over layers: an adapter that skips the first wrapped layer (``target_modules=["v_proj"]``) is
    active too. The order matters (``merge_and_unload`` merges this list by default, and a DoRA adapter rescales
    what comes before it): each layer's list is in :func:`set_adapter`'s order, and they are merged keeping it.
    """
    order: list[str] = []
    for _, layer in adapter_layers(model):
        names = layer.active_adapters
        for i, name in enumerate(names):
            if name not in order:
                later = [order.index(n) for n in names[i + 1 :] if n in order]
                order.insert(min(later, default=len(order)), name)
    return order


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model only inside the ``with`` block (merged adapters are unmerged first)."""
    layers = [m for m in model.modules() if isinstance(m, (AdapterLinear, ModulesToSaveWrapper))]
    with _set_in_block(layers, "adapters_disabled", True):
        yield


@contextlib.contextmanager
def _set_in_block(modules: list[nn.Module], attr: str, value: Any) -> Iterator[None]:
    """Set ``attr`` to ``value`` on every module for the ``with`` block, then restore each one's own value."""
    previous = [getattr(module, attr) for module in modules]
    for module in modules:
        setattr(module, attr, value)
    try:
        yield
    finally:
        for module, state in zip(modules, previous):
            setattr(module, attr, state)


@contextlib.contextmanager
def batch_adapters(model: nn.Module, adapter_names: list[str], per_block: bool = False) -> Iterator[None]:
    """Inside the block, row ``i`` of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none).

    ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` do the same for one
    call. The rows are planned once (:class:`lorakit.adapters.mixed.RowPlan`, reused while the names stay the
    same, as in a decode loop) and every layer computes all rows' adapter outputs at once with grouped low-rank
    products. ``per_block`` (training packs, :mod:`lorakit.packed`): the names come in one contiguous block per
    adapter and each block runs through its adapter's own forward (:meth:`AdapterLinear.block_output`).

    Raises:
        ConfigError: A name is neither an adapter of the model nor ``"__base__"``, or adapters are merged.
    """
    configs = adapter_configs(model)
    distinct = set(adapter_names)
    unknown = sorted(n for n in distinct if n != BASE and n not in configs)
    if unknown:
        raise ConfigError(
            f"adapter_names: unknown adapter(s) {unknown}; present: {sorted(configs)} or '{BASE}'"
        )
    require_lora(
        model, sorted(distinct - {BASE}), "adapter_names: mixed batches", "activate one with set_adapter"
    )
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise ConfigError(
            "adapter_names: unmerge the adapters first (lorakit.unmerge): a merged batch cannot mix"
        )
    plan = model.__dict__.get("_lorakit_row_plan")
    if plan is None or plan.rows != tuple(adapter_names) or plan.per_block != per_block:
        plan = RowPlan(adapter_names, per_block)
        model.__dict__["_lorakit_row_plan"] = plan
    with _set_in_block(layers, "row_plan", plan):
        yield


def _install_adapter_names_hook(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` select an adapter per row (the kwarg never reaches the model)."""
    if model.__dict__.get("_lorakit_names_hook") is not None:
        return

    def pre_hook(module, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            context = batch_adapters(module, list(names))
            context.__enter__()
            module.__dict__["_lorakit_batch_context"] = context
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        context = module.__dict__.pop("_lorakit_batch_context", None)
        if context is not None:
            context.__exit__(None, None, None)
        return output

    model.__dict__["_lorakit_names_hook"] = (
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        model.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    )
    original = getattr(model, "generate", None)
    if callable(original):
        # transformers' generate validates its kwargs against forward's signature, so adapter_names is taken
        # here, on this model instance only (tests pin it; lorakit.batch_adapters is the explicit form).
        @functools.wraps(original)
        def generate(*args, adapter_names: list[str] | None = None, **kwargs):
            if adapter_names is None:
                return original(*args, **kwargs)
            with batch_adapters(model, list(adapter_names)):
                return original(*args, **kwargs)

        model.generate = generate


def _remove_adapter_names_hook(model: nn.Module) -> None:
    handles = model.__dict__.pop("_lorakit_names_hook", None)
    for handle in handles or ():
        handle.remove()
    model.__dict__.pop("generate", None)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer and free its memory."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r} on this model; present: {sorted(configs)}")
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names():
            layer.delete_adapter(adapter_name)
    for _, module in saved_modules(model):
        module.delete_adapter(adapter_name)
    del configs[adapter_name]


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = True) -> None:
    """Merge the active (or named) adapters into the base weights, reversibly (see :func:`unmerge`)."""
    for _, layer in adapter_layers(model):
        layer.merge(adapter_names, safe_merge=safe_merge)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every layer."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge the active (or named) adapters and remove every wrapper: a plain model of the original classes.

    4-bit base layers are dequantized once into ``nn.Linear`` in their compute dtype and merged exactly.
    ``modules_to_save`` copies of the active adapter replace their originals.
    """
    names = adapter_names if adapter_names is not None else active_adapters(model)
    for path, layer in list(adapter_layers(model)):
        layer.unmerge()
        set_submodule(model, path, layer.merged_base_layer(names))
    _unwrap_modules_to_save(model, keep=names[0] if names else None)
    adapter_configs(model).clear()
    _remove_adapter_names_hook(model)
    return model


def merge_and_requantize(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge adapters into a 4-bit base and quantize the merged weights to 4 bits again (PEFT's behaviour).

    The result is small, but re-quantizing rounds the merged weight: its outputs differ from base + adapter
    (a warning says so). For an exact merged model use :func:`merge_and_unload`, which keeps the merged
    weights in the compute dtype. Layers whose base is not quantized are merged as usual.
    """
    warnings.warn(
        "re-quantizing merged weights to 4 bits rounds them: outputs will differ slightly from base + adapter; "
        "use lorakit.merge_and_unload(model) for an exact bf16 merge",
        UserWarning,
        stacklevel=2,
    )
    names = adapter_names if adapter_names is not None else active_adapters(model)
    for path, layer in list(adapter_layers(model)):
        layer.unmerge()
        base = layer.base_layer
        merged = layer.merged_base_layer(names)
        if is_quantized(base):
            merged = Linear4bit.from_linear(
                merged, quant_type=base.quant_type, blocksize=base.blocksize, double_quant=base.double_quant,
                compute_dtype=base.compute_dtype, name=path,
            )  # fmt: skip
        set_submodule(model, path, merged)
    _unwrap_modules_to_save(model, keep=names[0] if names else None)
    adapter_configs(model).clear()
    _remove_adapter_names_hook(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base model of the original classes."""
    for path, layer in list(adapter_layers(model)):
        layer.unmerge()
        set_submodule(model, path, layer.base_layer)
    _unwrap_modules_to_save(model, keep=None)
    adapter_configs(model).clear()
    _remove_adapter_names_hook(model)
    return model


def _unwrap_modules_to_save(model: nn.Module, keep: str | None) -> None:
    for path, module in list(saved_modules(model)):
        inner = module.modules_to_save[keep] if keep in module.modules_to_save else module.original_module  # noqa: SIM401
        set_submodule(model, path, inner)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as PEFT's ``get_nb_trainable_parameters``.

    Quantized base weights count as their logical number of elements (PEFT counts bitsandbytes' packed
    4-bit tensors as ``numel * 2``, which is the same number).
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    for module in model.modules():
        if is_quantized(module):
            total += module.weight_numel
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's exact line: ``trainable params: 4,096 || all params: 102,720 || trainable%: 3.9875``."""
    trainable, total = trainable_parameters(model)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def mark_trainable(model: nn.Module, adapter_name: str, trainable: bool = True) -> None:
    """Set ``requires_grad`` on every weight of one adapter."""
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names():
            layer.set_trainable(adapter_name, trainable)
    for _, module in saved_modules(model):
        if adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(trainable)


def list_adapters(model: nn.Module) -> list[dict]:
    """One row per adapter on ``model``, in the order the adapters were added.

    Each row: ``name`` (str), ``method`` (``"lora"``, ``"dora"``, ``"adalora"`` or ``"qrlora"``), ``r`` (int, the
    config's rank: AdaLoRA's ``init_r``; None for a QR-LoRA rank chosen by energy), ``ranks`` (sorted distinct
    per-layer ranks, which differ from ``[r]`` with ``rank_pattern``; AdaLoRA: kept components), ``lora_alpha``
    (float; QR-LoRA's ``alpha``), ``target_modules`` (list[str] | str), ``layers`` (int, wrapped layers holding it),
    ``active`` (bool, active in at least one layer), ``trainable`` (bool, some weight has ``requires_grad``),
    ``parameters`` (int, elements of A, B, DoRA magnitudes, AdaLoRA's Λ, QR-LoRA's λ and ``modules_to_save``
    copies), ``use_dora`` (bool) and ``merged`` (bool, merged into the base in some layer).
    """
    rows = []
    for name, config in adapter_configs(model).items():
        method = method_of(config)
        layers = [(path, layer) for path, layer in adapter_layers(model) if name in layer.adapter_names()]
        params = [p for _, layer in layers for p in layer.adapter_parameters(name)]
        params += [
            p
            for _, m in saved_modules(model)
            if name in m.modules_to_save
            for p in m.modules_to_save[name].parameters()
        ]
        ranks = {layer.adapter_rank(name, layer.kept_components(config, path)) for path, layer in layers}
        use_dora = bool(getattr(config, "use_dora", False))
        rows.append(
            {
                "name": name,
                "method": method.name,
                "r": getattr(config, method.rank_field),
                "ranks": sorted(ranks),
                "lora_alpha": getattr(config, method.alpha_field),
                "target_modules": config.target_modules,
                "layers": len(layers),
                "active": any(name in layer.active_adapters for _, layer in layers),
                "trainable": any(p.requires_grad for p in params),
                "parameters": sum(p.numel() for p in params),
                "use_dora": use_dora,
                "merged": any(name in layer.merged_adapters for _, layer in layers),
            }
        )
    return rows


__all__ = [
    "CONFIGS_ATTR",
    "active_adapters",
    "adapter_configs",
    "adapter_layers",
    "adapter_state_dict",
    "batch_adapters",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "lora_layers",
    "mark_trainable",
    "merge",
    "merge_and_requantize",
    "merge_and_unload",
    "print_trainable_parameters",
    "require_lora",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
    "wrap",
]
