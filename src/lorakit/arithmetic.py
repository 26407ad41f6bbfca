"""Combining adapters: at run time (:func:`stack_adapters`) or into a new adapter (:func:`add_weighted_adapter`).

Several active adapters already add their deltas in the forward pass, ``y = W0 x + Σ_a s_a B_a A_a x``.
:func:`stack_adapters` uses that for continual learning: earlier adapters stay active but frozen while a new one
trains on top. :func:`add_weighted_adapter` materializes a weighted combination ``Σ_i w_i ΔW_i`` as one new named
adapter (PEFT's ``add_weighted_adapter``, same math), which saves in PEFT's format like any other.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.inject import adapter_configs, lora_layers, mark_trainable, require_lora, set_adapter, wrap
from lorakit.targets import resolve_targets

Combination = Literal["linear", "cat", "svd"]
COMBINATIONS = ("linear", "cat", "svd")

# One source adapter in one layer: (name, A [r, in] fp32, B [out, r] fp32, weight w · scaling s).
_Term = tuple[str, torch.Tensor, torch.Tensor, float, float]


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination: Combination = "svd",
    svd_rank: int | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name``, a weighted combination of existing adapters (PEFT's math).

    The new adapter has ``lora_alpha == r`` (scale ``s = 1``, no rsLoRA), so its delta is ``B A``; per layer:

    - ``"linear"``: ``A = Σ sign(w_i s_i)·sqrt(|w_i s_i|)·A_i`` and ``B = Σ sqrt(|w_i s_i|)·B_i`` (equal ranks).
      Not the weighted sum of deltas (``B A`` has cross terms ``B_i A_j``): a cheap approximation, as in PEFT.
    - ``"cat"``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` (rows), ``B = [B_1, B_2, ...]`` (columns); rank = sum of
      ranks and ``B A = Σ w_i s_i B_i A_i = Σ w_i ΔW_i`` exactly.
    - ``"svd"``: ``ΔW = Σ w_i ΔW_i`` ([out, in], fp32), ``U S Vᵀ = svd(ΔW)``, ``B = U_k S_k``, ``A = V_kᵀ`` with
      ``k = svd_rank`` (default: the largest source rank): the best rank-k approximation (Eckart-Young); exact
      when ``k >= Σ r_i``.

    Layers where an adapter is absent skip it; ranks that differ between layers are zero-padded to the largest.
    The new adapter is added inactive and frozen (as in PEFT): activate it with :func:`lorakit.set_adapter`.
    Unlike PEFT, one source adapter with ``"svd"`` is re-compressed (PEFT switches to ``"linear"``), and a name
    already in use is an error (PEFT silently returns).

    Args:
        model (nn.Module): A model with the adapters ``adapters`` (any base: fp32, bf16, 4-bit, GPT-2 Conv1D).
        adapters (list[str]): Names of the adapters to combine (LoRA; DoRA and ``modules_to_save`` are refused).
        weights (list[float]): One weight per adapter; negative weights subtract.
        adapter_name (str): Name of the new adapter; must not be in use.
        combination (str): ``"linear"``, ``"cat"`` or ``"svd"``. Default ``"svd"`` (PEFT's default).
        svd_rank (int | None): Target rank for ``"svd"``; default the largest source rank.

    Returns:
        nn.Module: The same ``model``.

    Raises:
        ConfigError: Unknown adapter or combination, weights/adapters length mismatch, name in use, unequal
            ranks for ``"linear"`` (names both), ``svd_rank`` without ``"svd"`` or not positive.
    """
    configs = _check(model, adapters, weights, adapter_name, combination, svd_rank)
    largest = max(layer.r[n] for _, layer in lora_layers(model) for n in adapters if n in layer.r)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # path -> (A [k, in], B [out, k])
    for path, layer in lora_layers(model):
        terms = [
            (name, layer.lora_A[name].weight.detach().float(), layer.lora_B[name].weight.detach().float(),
             weight, layer.scaling[name])
            for name, weight in zip(adapters, weights)
            if name in layer.lora_A
        ]  # fmt: skip
        if not terms:
            continue
        if combination == "linear":
            factors[path] = _linear(terms, path)
        elif combination == "cat":
            factors[path] = _cat(terms)
        else:
            factors[path] = _svd(terms, svd_rank or largest)
    # One rank for the whole adapter (a PEFT file has one r); layers with fewer components are zero-padded.
    rank = (svd_rank or largest) if combination == "svd" else max(a.shape[0] for a, _ in factors.values())

    config = _combined_config(model, configs[adapters[0]], sorted(factors), rank)
    wrap(model, config, adapter_name=adapter_name)
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        new_a, new_b = factors[path]
        k = new_a.shape[0]
        weight_a, weight_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        with torch.no_grad():
            weight_a.zero_()  # components past k stay zero (padding to the adapter's rank)
            weight_b.zero_()
            weight_a[:k].copy_(new_a)
            weight_b[:, :k].copy_(new_b)
    mark_trainable(model, adapter_name, False)
    return model


def _linear(terms: list[_Term], path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``linear``: ``sqrt(|w s|)`` on both factors, the sign of ``w s`` on A only (so it is not squared)."""
    first, rank = terms[0][0], terms[0][1].shape[0]
    for name, a, _, _, _ in terms[1:]:
        if a.shape[0] != rank:
            raise ConfigError(
                f"combination='linear' needs adapters of equal rank, but at {path} adapter {first!r} has "
                f"r={rank} and adapter {name!r} has r={a.shape[0]}; use combination='cat' (exact) or 'svd'"
            )
    new_a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for _, a, _, w, s in terms)  # [r, in]
    new_b = sum(math.sqrt(abs(w * s)) * b for _, _, b, w, s in terms)  # [out, r]
    return new_a, new_b


def _cat(terms: list[_Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[w_i s_i A_i]`` stacked by rows ([Σr, in]) and ``[B_i]`` by columns ([out, Σr]): ``B A = Σ w_i ΔW_i``."""
    # a * w * s in PEFT's order of products, so the rounding is the same.
    new_a = torch.cat([a * w * s for _, a, _, w, s in terms], dim=0)
    new_b = torch.cat([b for _, _, b, _, _ in terms], dim=1)
    return new_a, new_b


def _svd(terms: list[_Term], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``Σ w_i s_i B_i A_i`` ([out, in]): ``A = V_kᵀ`` [k, in], ``B = U_k S_k``
    [out, k], ``k = min(rank, out, in)``."""
    deltas = torch.stack([(b @ a) * s for _, a, b, _, s in terms])  # [n, out, in]
    weights = torch.tensor([w for _, _, _, w, _ in terms], dtype=deltas.dtype, device=deltas.device)
    delta = (deltas * weights[:, None, None]).sum(dim=0)  # [out, in], summed in PEFT's order
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)  # u [out, m], sigma [m], vh [m, in]
    k = min(rank, sigma.numel())
    return vh[:k], u[:, :k] * sigma[:k]


def _check(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination: str,
    svd_rank: int | None,
) -> dict[str, LoraConfig]:
    configs = adapter_configs(model)
    if combination not in COMBINATIONS:
        raise ConfigError(f"combination must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    if not adapters:
        raise ConfigError("adapters is empty: name at least one adapter to combine")
    unknown = [name for name in adapters if name not in configs]
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r} on this model; present: {sorted(configs)}")
    require_lora(model, adapters, "add_weighted_adapter: combinations", "combine LoRA adapters")
    if len(weights) != len(adapters):
        raise ConfigError(
            f"got {len(weights)} weights for {len(adapters)} adapters {adapters}; give one weight per adapter"
        )
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights!r}")
    if adapter_name in configs:
        raise ConfigError(
            f"an adapter named {adapter_name!r} is already on this model; pick another name "
            f"(present: {sorted(configs)})"
        )
    if svd_rank is not None and combination != "svd":
        raise ConfigError(f"svd_rank is only used with combination='svd', got combination={combination!r}")
    if svd_rank is not None and not (
        isinstance(svd_rank, int) and not isinstance(svd_rank, bool) and svd_rank > 0
    ):
        raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    for name in adapters:
        if configs[name].use_dora:
            raise ConfigError(
                f"adapter {name!r} is a DoRA adapter: its magnitude rescales W0 + ΔW and does not add up; "
                "combine plain LoRA adapters, or merge DoRA adapters with lorakit.merge_and_unload"
            )
        if configs[name].modules_to_save:
            raise ConfigError(
                f"adapter {name!r} trains modules_to_save={configs[name].modules_to_save}, fully trained copies "
                "that cannot be combined by weights; combine adapters without modules_to_save"
            )
    return configs


def _combined_config(model: nn.Module, first: LoraConfig, paths: list[str], rank: int) -> LoraConfig:
    """The new adapter's config: the first source's (task type, dropout, base model), ``r = lora_alpha = rank``,
    targeting exactly ``paths`` (as suffix names when they select exactly these paths, else full paths)."""
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    probe = LoraConfig(target_modules=suffixes)
    targets = suffixes if sorted(resolve_targets(model, probe)) == paths else paths
    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=first.lora_dropout,
        task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path,
    )  # fmt: skip


def stack_adapters(model: nn.Module, frozen: list[str], trainable: str | None = None) -> None:
    """Continual learning: ``frozen`` and ``trainable`` all active (their deltas add), only ``trainable`` learns.

    The frozen adapters also lose their dropout for good: they are part of the function the new adapter
    adapts, like the base weights (with dropout they would add noise to every training step). Call this after
    any :func:`lorakit.set_adapter`, which makes every active adapter trainable again.

    Args:
        model (nn.Module): A model with all the named adapters.
        frozen (list[str]): Earlier adapters: active, ``requires_grad=False``, no dropout.
        trainable (str | None): The adapter to train; ``None`` activates the frozen ones only.

    Raises:
        ConfigError: A name is not an adapter of the model, or ``trainable`` is also listed in ``frozen``.
    """
    if trainable is not None and trainable in frozen:
        raise ConfigError(f"adapter {trainable!r} is listed both in frozen={frozen} and as trainable")
    configs = adapter_configs(model)
    unknown = [name for name in frozen if name not in configs]
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r} on this model; present: {sorted(configs)}")
    require_lora(model, frozen, "stack_adapters: frozen adapters", "stack LoRA adapters")
    set_adapter(model, [*frozen, *([trainable] if trainable is not None else [])])
    for name in frozen:
        mark_trainable(model, name, False)
    for _, layer in lora_layers(model):
        for name in frozen:
            if name in layer.lora_dropout:
                layer.lora_dropout[name] = nn.Identity()


__all__ = ["COMBINATIONS", "add_weighted_adapter", "stack_adapters"]
