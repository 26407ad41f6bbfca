"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): an SVD-shaped adapter whose rank is pruned during training.

``ΔW = P Λ Q · s / (ranknum + 1e-5)`` with ``P`` = ``lora_B`` [out, r], ``Λ`` = diag(``lora_E`` [r, 1]),
``Q`` = ``lora_A`` [r, in] and ``s = lora_alpha``; ``ranknum`` is the initial rank and never shrinks, so
pruning a component does not rescale the others. Names, shapes and scale are PEFT's
(``peft/tuners/adalora/layer.py``, ``SVDLinear``), so adapters move between the two libraries unchanged.
The rank allocation (importance scores, budget, masking) is in :mod:`lorakit.adapters.rank_allocator`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import AdapterLinear
from lorakit.config import _PEFT_UNSUPPORTED, check_target_fields, config_fields, field_error
from lorakit.errors import ConfigError

PEFT_TYPE = "ADALORA"


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class AdaLoraConfig:
    """Configuration of one AdaLoRA adapter (PEFT's ``AdaLoraConfig`` field names, defaults and meanings).

    Args:
        init_r (int): Rank each adapted matrix starts with. Default 12.
        target_r (int): Average rank left per matrix at the end: the final budget is ``target_r`` × #matrices,
            shared unevenly by importance. ``1 ≤ target_r ≤ init_r``. Default 8.
        lora_alpha (float): Scale numerator ``s`` (the update is ``s / init_r · P Λ Q``). Default 8.
        lora_dropout (float): Dropout on the adapter input, in ``[0, 1)``. Default 0.
        target_modules, exclude_modules, modules_to_save, layers_to_transform, layers_pattern: as in
            :class:`~lorakit.LoraConfig` (same matching rules).
        tinit (int): Warm-up steps before any pruning. Default 0.
        tfinal (int): Steps at the end that train with the final, fixed rank pattern. Default 0.
        deltaT (int): Prune every ``deltaT`` steps during the budget phase. Default 1.
        beta1 (float): EMA factor of the sensitivity, in (0, 1). Default 0.85.
        beta2 (float): EMA factor of the uncertainty, in (0, 1). Default 0.85.
        orth_reg_weight (float): Weight γ of the orthogonality regularizer added to the loss. Default 0.5.
        total_step (int | None): Training steps; the training loop fills it in when ``None``. The budget
            phase is steps ``tinit+1 .. total_step-tfinal``.
        rank_pattern (dict[str, list[bool]] | None): Kept components per matrix, keyed ``<path>.lora_E`` (as
            PEFT saves it); written by the allocator, read when loading.
        init_lora_weights (bool): ``True``: Λ = 0 (the model is unchanged at step 0), P, Q ~ N(0, 0.02).
            ``False``: all three N(0, 1) (debugging). Default True.
        fan_in_fan_out (bool): Set automatically for GPT-2 ``Conv1D``.
        task_type (str | None): PEFT task type written to the file; inferred from the model when ``None``.
        base_model_name_or_path (str | None): Recorded in the file.

    Raises:
        ConfigError: A field is invalid (names the field, expected vs got).
    """

    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's field name (camelCase)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> ConfigError:
            return field_error("AdaLoraConfig", name, f" must be {expected}, got {getattr(self, name)!r}")

        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            if not _is_int(getattr(self, name), low):
                raise fail(name, f"an integer >= {low}")
        if self.target_r > self.init_r:
            raise fail("target_r", f"<= init_r={self.init_r} (AdaLoRA only prunes)")
        if not (_is_number(self.lora_alpha) and self.lora_alpha > 0):
            raise fail("lora_alpha", "a positive number")
        if not (_is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            raise fail("lora_dropout", "in [0, 1)")
        for name in ("beta1", "beta2"):
            if not (_is_number(getattr(self, name)) and 0.0 < getattr(self, name) < 1.0):
                raise fail(name, "a number in (0, 1)")
        if not (_is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise fail("orth_reg_weight", "a number >= 0")
        if self.total_step is not None:
            self.check_total_step(self.total_step)
        if self.rank_pattern is not None and not (
            isinstance(self.rank_pattern, dict)
            and all(
                isinstance(v, list) and all(isinstance(b, bool) for b in v)
                for v in self.rank_pattern.values()
            )
        ):
            raise fail("rank_pattern", "a dict of '<module path>.lora_E' -> list of booleans")
        if not isinstance(self.init_lora_weights, bool):
            raise fail("init_lora_weights", "true or false")
        check_target_fields(self, "AdaLoraConfig")

    def check_total_step(self, total_step: int) -> None:
        """Raise unless ``total_step`` leaves a budget phase (``tinit < total_step - tfinal``, PEFT's check)."""
        if not _is_int(total_step, 1):
            raise field_error(
                "AdaLoraConfig", "total_step", f" must be a positive integer, got {total_step!r}"
            )
        if self.tinit >= total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoraConfig: tinit={self.tinit} and tfinal={self.tfinal} leave no budget phase in "
                f"total_step={total_step} steps; lower tinit/tfinal or train longer"
            )

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content in PEFT's schema (``peft_type: ADALORA``).

        ``r`` is not written (PEFT ignores it for AdaLoRA and warns when it is not its default). PEFT refuses
        ``total_step: null``; an adapter saved before training records the smallest valid value,
        ``tinit + tfinal + 1``, which matters only to a run that continues training.
        """
        values = dataclasses.asdict(self)
        target = values["target_modules"]
        values.update(
            peft_type=PEFT_TYPE, revision=None, inference_mode=True, bias="none", use_dora=False,
            use_rslora=False, target_modules=sorted(target) if isinstance(target, list) else target,
            total_step=self.total_step or self.tinit + self.tfinal + 1,
        )  # fmt: skip
        if values["exclude_modules"] is None:
            del values["exclude_modules"]
        return values

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> AdaLoraConfig:
        """Build a config from an ``adapter_config.json`` dict written by lorakit or PEFT.

        Raises:
            ConfigError: Not an AdaLoRA adapter, a PEFT feature lorakit does not implement, or a bad field.
        """
        if data.get("peft_type") != PEFT_TYPE:
            raise ConfigError(f"{source}: peft_type is {data.get('peft_type')!r}; expected {PEFT_TYPE!r}")
        for key, default in {**_PEFT_UNSUPPORTED, "use_dora": False, "use_rslora": False}.items():
            if data.get(key, default) not in (default, [], {}):
                raise ConfigError(f"{source}: {key}={data[key]!r} is not supported with AdaLoRA by lorakit")
        names = config_fields(cls)
        kwargs = {key: value for key, value in data.items() if key in names and value is not None}
        if isinstance(kwargs.get("init_lora_weights"), str):
            kwargs["init_lora_weights"] = True  # initialization schemes do not matter for saved weights
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


class AdaLoraLinear(AdapterLinear):
    """A frozen linear-like base layer with named AdaLoRA adapters (PEFT's ``SVDLinear``).

    Parameter paths (``q_proj.lora_A.default`` ...) equal PEFT's in-memory names. Adapter weights are fp32.

    Args:
        base_layer (nn.Module): ``nn.Linear``, GPT-2 ``Conv1D`` or a lorakit 4-bit linear.
    """

    adapter_tables = ("lora_A", "lora_B", "lora_E", "lora_dropout", "r", "lora_alpha", "ranknum")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()  # Q: [r, in]
        self.lora_B = nn.ParameterDict()  # P: [out, r]
        self.lora_E = nn.ParameterDict()  # Λ: [r, 1]
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}

    def add_from_config(self, name: str, config: AdaLoraConfig, path: str, init: int | None = None) -> None:
        """Add adapter ``name`` with ``init_r`` components, or ``init`` of them (a pruned adapter read from a file);
        the scale always divides by ``init_r`` (PEFT's ``ranknum``)."""
        r = config.init_r if init is None else init
        self.add_adapter(
            name, r, config.lora_alpha, config.lora_dropout, config.init_lora_weights, ranknum=config.init_r
        )

    @staticmethod
    def parameter_count(config: AdaLoraConfig, path: str, in_features: int, out_features: int) -> int:
        """``init_r (in + out + 1)``: Q, P and Λ."""
        return config.init_r * (in_features + out_features + 1)

    @staticmethod
    def file_init(path: str, base_layer: nn.Module, tensors: dict[str, torch.Tensor]) -> int | None:
        """The number of components the file stores for this layer (PEFT trims pruned ones), or None."""
        return int(tensors["lora_A"].shape[0]) if "lora_A" in tensors else None

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool = True,
        ranknum: int | None = None,
    ) -> None:
        """Create adapter ``name`` with ``r`` components in fp32 on the base's device.

        Args:
            name (str): Adapter name.
            r (int): Number of components (``init_r``; fewer when loading a pruned adapter).
            lora_alpha (float): Scale numerator.
            lora_dropout (float): Input dropout probability. Default 0.
            init_lora_weights (bool): Λ = 0, P, Q ~ N(0, 0.02) (PEFT's init); False: all N(0, 1). Default True.
            ranknum (int | None): Denominator rank (PEFT's ``ranknum``, the initial rank). Default ``r``.
        """
        device = self.base_device()
        self.lora_A[name] = nn.Parameter(torch.randn(r, self.in_features, device=device))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1, device=device))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, device=device))
        if init_lora_weights:
            with torch.no_grad():
                self.lora_E[name].zero_()
                self.lora_A[name].normal_(0.0, 0.02)
                self.lora_B[name].normal_(0.0, 0.02)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.train(self.training)
        self.r[name], self.lora_alpha[name] = r, float(lora_alpha)
        self.ranknum[name] = float(r if ranknum is None else ranknum)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_E[name], self.lora_B[name]]

    def adapter_rank(self, name: str, keep: list[bool] | None = None) -> int:
        """Components of adapter ``name``: the kept ones when ``keep`` (the rank pattern) covers them all."""
        return sum(keep) if keep is not None and len(keep) == self.r[name] else self.r[name]

    def kept_components(self, config: AdaLoraConfig, path: str) -> list[bool] | None:
        """The rank pattern's entry for this layer (``<path>.lora_E``), as PEFT keys it."""
        return (config.rank_pattern or {}).get(f"{path}.lora_E")

    def file_tensors(self, name: str, keep: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """``lora_A`` [r, in], ``lora_E`` [r, 1], ``lora_B`` [out, r] as PEFT saves them (no ``.weight``), trimmed to
        the components ``keep`` marks (PEFT's rank pattern) when it covers them all."""
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        if keep is not None and len(keep) == a.shape[0] and sum(keep) != a.shape[0]:
            index = torch.tensor(keep, device=a.device)
            a, e, b = a[index], e[index], b[:, index]
        return {"lora_A": a, "lora_E": e, "lora_B": b}

    def scale(self, name: str) -> float:
        """``lora_alpha / (ranknum + 1e-5)``, PEFT's scale (the epsilon included, for identical outputs)."""
        return self.lora_alpha[name] / (self.ranknum[name] + 1e-5)

    def adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., r] -> [..., out]; ΔW is never formed (PEFT's order of operations)
        a_scaled = self.lora_A[name] * self.lora_E[name]  # Λ Q: [r, in]
        hidden = self.lora_dropout[name](x) @ a_scaled.T  # [..., r]
        return (hidden @ self.lora_B[name].T) * self.lora_alpha[name] / (self.ranknum[name] + 1e-5)

    def delta_rows(self, name: str) -> torch.Tensor:
        a_scaled = self.lora_A[name].float() * self.lora_E[name].float()  # [r, in]
        return (self.lora_B[name].float() @ a_scaled) * self.scale(name)  # [out, in]

    def orthogonality(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F)`` for adapter ``name``: plain Frobenius norms, as PEFT computes them."""
        q, p = self.lora_A[name], self.lora_B[name]
        gram_q = q @ q.T  # [r, r]
        gram_p = p.T @ p  # [r, r]
        eye = torch.eye(gram_q.shape[0], device=q.device, dtype=q.dtype)
        return torch.linalg.matrix_norm(gram_q - eye), torch.linalg.matrix_norm(gram_p - eye)


__all__ = ["PEFT_TYPE", "AdaLoraConfig", "AdaLoraLinear"]
