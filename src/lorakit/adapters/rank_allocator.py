"""AdaLoRA's rank allocation: importance scores, the cubic budget schedule, and masking (arXiv 2303.10512 §3).

Per parameter, after backward: ``I = |w ⊙ ∇w|``, smoothed sensitivity ``Ī ← β1 Ī + (1−β1) I``, uncertainty
``Ū ← β2 Ū + (1−β2) |I − Ī|``, score ``s = Ī · Ū`` (paper eqs. 8–10). Component ``i`` of a matrix scores
``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` (eq. 11). The budget (total kept components over all
matrices) follows a cubic schedule from ``init_r × n`` to ``target_r × n``; the components scoring at or
below the ``(b(0) − b(t))``-th smallest score get ``λ_i = 0`` (P and Q are kept, so a component can return).
Every step, operation order and tie rule is PEFT's ``RankAllocator`` / ``AdaLoraModel.update_and_allocate``
(peft 0.21.2); ``tests/test_adalora.py`` compares them step by step.

:class:`AdaLoraController` is what a training loop holds: ``regularizer(model)`` is added to the loss and
``step(model, global_step)`` runs after ``optimizer.step()`` and before ``zero_grad()``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.adalora import AdaLoraConfig, AdaLoraLinear
from lorakit.errors import ConfigError
from lorakit.walk import adapter_configs, adapter_layers

_PARTS = ("lora_A", "lora_E", "lora_B")


def budget_schedule(
    step: int, init_budget: int, target_budget: int, config: AdaLoraConfig
) -> tuple[int, bool]:
    """The budget at ``step`` and whether to mask at this step (PEFT's ``RankAllocator.budget_schedule``).

    Args:
        step (int): The global step (1 after the first optimizer step).
        init_budget (int): ``b(0)``, the sum of the initial ranks.
        target_budget (int): ``b(T)``, ``target_r`` × number of adapted matrices.
        config (AdaLoraConfig): ``tinit``, ``tfinal``, ``deltaT`` and ``total_step`` (set).

    Returns:
        tuple[int, bool]: ``b(t)`` and the masking flag. Warm-up (``step ≤ tinit``): ``(b(0), False)``; final
        phase (``step > total_step − tfinal``): ``(b(T), True)``; in between
        ``int((b(0) − b(T)) (1 − (t − tinit)/(T − tfinal − tinit))³ + b(T))``, masking when ``step % deltaT == 0``.
    """
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * (remaining**3) + target_budget), step % config.deltaT == 0


class RankAllocator:
    """Importance EMAs and budget masking for the matrices of one adapter.

    Args:
        config (AdaLoraConfig): ``beta1``, ``beta2``, ``target_r`` and the schedule.
        ranks (dict[str, int]): Module path -> current rank of its adapter (``init_r`` when training starts).

    Attributes:
        sensitivity (dict[str, Tensor]): ``"<path>.lora_A"`` (and ``lora_E``, ``lora_B``) -> ``Ī``, shaped as
            the parameter, fp32.
        uncertainty (dict[str, Tensor]): Same keys -> ``Ū``.
    """

    def __init__(self, config: AdaLoraConfig, ranks: dict[str, int]) -> None:
        self.config = config
        self.init_budget = sum(ranks.values())
        self.target_budget = config.target_r * len(ranks)
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the importance EMAs (PEFT's ``reset_ipt``, done when the final pattern is fixed)."""
        self.sensitivity.clear()
        self.uncertainty.clear()

    @torch.no_grad()
    def update(self, key: str, param: torch.Tensor) -> None:
        """Fold ``|param ⊙ param.grad|`` into the EMAs of ``key`` (a missing gradient counts as zero)."""
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        importance = (param * grad).abs()
        if key not in self.sensitivity:
            self.sensitivity[key] = torch.zeros_like(param)
            self.uncertainty[key] = torch.zeros_like(param)
        beta1, beta2 = self.config.beta1, self.config.beta2
        self.sensitivity[key] = beta1 * self.sensitivity[key] + (1 - beta1) * importance
        self.uncertainty[key] = (
            beta2 * self.uncertainty[key] + (1 - beta2) * (importance - self.sensitivity[key]).abs()
        )

    def triplet_score(self, path: str) -> torch.Tensor:
        """``S_i`` for every component of the matrix at ``path``: [r] (PEFT's sum order, for equal ties)."""
        score = {
            part: self.sensitivity[f"{path}.{part}"] * self.uncertainty[f"{path}.{part}"] for part in _PARTS
        }
        vectors = score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)  # [r, in] -> [r]; [out, r] -> [r]
        return score["lora_E"].view(-1) + vectors

    def keep_masks(self, paths: list[str], budget: int) -> dict[str, torch.Tensor]:
        """Which components stay at ``budget``: path -> bool [r]; scores ``≤`` the ``(b(0) − budget)``-th
        smallest are dropped, so ties at the threshold drop more than the budget asks (as in PEFT)."""
        scores = {path: self.triplet_score(path) for path in paths}
        k = self.init_budget - budget
        if k <= 0:  # nothing to prune (PEFT's kthvalue would fail on k = 0)
            return {path: torch.ones_like(score, dtype=torch.bool) for path, score in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        return {path: score > threshold for path, score in scores.items()}


class AdaLoraController:
    """Drives AdaLoRA for one adapter from inside a training loop; the user calls nothing.

    Args:
        model (nn.Module): A model with an AdaLoRA adapter (``lorakit.wrap(model, AdaLoraConfig(...))``).
        adapter_name (str): The AdaLoRA adapter being trained. Default ``"default"``.
        total_step (int | None): Optimizer steps of the run; overrides and is written into the config (so
            the saved ``adapter_config.json`` records it). Needed here or in the config.

    Raises:
        ConfigError: No AdaLoRA adapter of that name, or ``total_step`` missing or leaving no budget phase.

    Example::

        controller = AdaLoraController(model, "default", total_step=total_steps)
        loss = loss + controller.regularizer(model)
        loss.backward(); optimizer.step()
        controller.step(model, step)  # step = 1, 2, ..., total_steps
        optimizer.zero_grad()
    """

    def __init__(
        self, model: nn.Module, adapter_name: str = "default", total_step: int | None = None
    ) -> None:
        config = adapter_configs(model).get(adapter_name)
        if not isinstance(config, AdaLoraConfig):
            raise ConfigError(
                f"no AdaLoRA adapter named {adapter_name!r} on this model; add one with lorakit.wrap(model, AdaLoraConfig(...))"
            )
        if total_step is not None:
            config.check_total_step(total_step)
            config.total_step = total_step
        elif config.total_step is None:
            raise ConfigError("AdaLoRA needs total_step: set AdaLoraConfig.total_step or pass total_step=")
        self.config, self.adapter_name = config, adapter_name
        ranks = {path: layer.r[adapter_name] for path, layer in self.layers(model)}
        self.allocator = RankAllocator(config, ranks)

    def layers(self, model: nn.Module) -> list[tuple[str, AdaLoraLinear]]:
        """Every ``(path, layer)`` holding this adapter, in module order."""
        return [
            (path, layer)
            for path, layer in adapter_layers(model)
            if isinstance(layer, AdaLoraLinear) and self.adapter_name in layer.lora_A
        ]

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        """``γ · mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F over all adapted matrices)``: a scalar with grad, to add to
        the loss once per optimizer step (PEFT adds it inside ``forward``)."""
        norms = [norm for _, layer in self.layers(model) for norm in layer.orthogonality(self.adapter_name)]
        if not norms:
            return torch.zeros(())
        return self.config.orth_reg_weight * (sum(norms) / len(norms))

    @torch.no_grad()
    def step(self, model: nn.Module, global_step: int) -> None:
        """Update importance, prune to the budget, or re-apply the final pattern (PEFT's ``update_and_allocate``).

        Call after ``optimizer.step()`` and before ``zero_grad()``, with ``global_step`` counting optimizer
        steps from 1 (the pattern is fixed at ``total_step − tfinal``, the last step when ``tfinal = 0``).
        """
        config, layers = self.config, self.layers(model)
        end = config.total_step - config.tfinal
        if global_step < end:
            for path, layer in layers:
                for part in _PARTS:
                    self.allocator.update(f"{path}.{part}", getattr(layer, part)[self.adapter_name])
            budget, mask_now = budget_schedule(
                global_step, self.allocator.init_budget, self.allocator.target_budget, config
            )
            if mask_now:
                self._mask(layers, budget)
        elif global_step == end:
            budget, _ = budget_schedule(
                global_step, self.allocator.init_budget, self.allocator.target_budget, config
            )
            self._mask(layers, budget)
            self.allocator.reset()
        elif config.rank_pattern:
            for path, layer in layers:
                keep = config.rank_pattern.get(f"{path}.lora_E")
                if (
                    keep is not None and len(keep) == layer.r[self.adapter_name]
                ):  # a loaded, trimmed layer: done
                    weight = layer.lora_E[self.adapter_name]
                    weight.masked_fill_(~torch.tensor(keep, device=weight.device).view(-1, 1), 0.0)

    def _mask(self, layers: list[tuple[str, AdaLoraLinear]], budget: int) -> None:
        keep = self.allocator.keep_masks([path for path, _ in layers], budget)
        for path, layer in layers:
            layer.lora_E[self.adapter_name].masked_fill_(~keep[path].view(-1, 1), 0.0)
        self.config.rank_pattern = {f"{path}.lora_E": mask.tolist() for path, mask in keep.items()}

    def kept_rank(self) -> int:
        """Components kept over all adapted matrices: the sum of the current rank pattern, ``b(0)`` before the
        first masking."""
        if not self.config.rank_pattern:
            return self.allocator.init_budget
        return sum(sum(keep) for keep in self.config.rank_pattern.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The importance EMAs, for a training checkpoint (the rank pattern lives in the adapter config)."""
        return {
            **{f"sensitivity.{key}": value for key, value in self.allocator.sensitivity.items()},
            **{f"uncertainty.{key}": value for key, value in self.allocator.uncertainty.items()},
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.allocator.reset()
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            getattr(self.allocator, kind)[name] = value


__all__ = ["AdaLoraController", "RankAllocator", "budget_schedule"]
