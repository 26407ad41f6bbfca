"""QR-LoRA (arXiv 2508.21810): scale the leading components of a column-pivoted QR of the frozen weight.

``W0 P = Q R`` (Householder QR with column pivoting, ``|R_11| ≥ |R_22| ≥ …``), so ``W0 = Σ_i Q_i (R Pᵀ)_i``
with ``Q_i`` the i-th column of ``Q`` and ``(R Pᵀ)_i`` the i-th row of ``R Pᵀ``. The adapter keeps the first
``r`` components frozen and trains one scalar each:

    ΔW = α · Q_r diag(λ) (R Pᵀ)_r,    λ ∈ R^r,  λ = 0 at init (ΔW = 0),

so ``W0 + ΔW = Σ_{i≤r} (1 + αλ_i) Q_i (R Pᵀ)_i + Σ_{i>r} Q_i (R Pᵀ)_i``: ``αλ_i`` is the relative change
of component ``i``. The paper's text was not available to us; the choices made here (energy rule, scale,
rank cap) and why are in ``docs/variants.md``. ``r`` is either fixed or the smallest rank
whose diagonal energy ``Σ_{i≤r} R_ii² / Σ_i R_ii²`` reaches ``tau``, capped by ``max_r``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.adapters.base import AdapterLinear, base_layer_shape
from lorakit.config import check_target_fields, config_fields, field_error
from lorakit.errors import AdapterMismatchError, ConfigError

PEFT_TYPE = "LORAKIT_QRLORA"


# -------------------------------------------------------------------------------------- pivoted QR (reference)
def _householder_cpqr(matrix: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` Householder steps with column pivoting (LAPACK ``geqp3`` without blocking), in fp64.

    Returns:
        tuple: reflectors ``V`` [m, steps] (unit ``v_j`` in rows ``j:``, zero above; a zero column means no
        reflection), ``R`` [steps, n] (upper trapezoidal), ``perm`` [n] (int64, ``matrix[:, perm] = Q R`` once
        ``steps = min(m, n)``).
    """
    work = matrix.detach().to(torch.float64).clone()  # [m, n], becomes R in place
    m, n = work.shape
    reflectors = torch.zeros(m, steps, dtype=torch.float64, device=work.device)
    perm = torch.arange(n, device=work.device)
    for j in range(steps):
        # Pivot: the remaining column with the largest norm below row j (recomputed, not downdated: exact
        # and O(mn) per step, the same order as the reflection itself).
        pivot = j + int(torch.argmax(work[j:, j:].pow(2).sum(dim=0)))
        if pivot != j:
            work[:, [j, pivot]] = work[:, [pivot, j]]
            perm[[j, pivot]] = perm[[pivot, j]]
        column = work[j:, j]  # [m - j]
        norm = torch.linalg.vector_norm(column)
        if norm == 0:  # the trailing block is zero: the weight has rank j
            continue
        alpha = -norm if column[0] >= 0 else norm  # the sign that avoids cancellation in v_0
        v = column.clone()
        v[0] -= alpha
        v /= torch.linalg.vector_norm(v)
        work[j:, j:] -= 2.0 * torch.outer(v, v @ work[j:, j:])  # H_j = I − 2 v vᵀ on rows j:
        reflectors[j:, j] = v
    return reflectors, torch.triu(work[:steps]), perm


def _form_q(reflectors: torch.Tensor, columns: int) -> torch.Tensor:
    """The first ``columns`` columns of ``Q = H_1 ⋯ H_s``: [m, columns]. Only ``H_1 … H_columns`` touch them."""
    m = reflectors.shape[0]
    q = torch.eye(m, columns, dtype=reflectors.dtype, device=reflectors.device)
    for j in reversed(range(columns)):
        v = reflectors[j:, j]  # [m - j]
        q[j:] -= 2.0 * torch.outer(v, v @ q[j:])
    return q


def pivoted_qr(
    matrix: torch.Tensor, steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column-pivoted QR: ``matrix[:, perm] ≈ Q R`` with ``Q`` orthonormal and ``R_11 ≥ R_22 ≥ … ≥ 0``.

    Pure PyTorch (no scipy), Householder reflections in fp64 on the matrix's device. Cost ``O(m n s)``.

    Args:
        matrix (Tensor): ``[m, n]``, any float dtype.
        steps (int | None): Stop after this many columns (a truncated factorization: ``Q R`` is then the
            rank-``steps`` CPQR approximation). Default ``min(m, n)`` (exact).

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``Q`` [m, s] fp64, ``R`` [s, n] fp64 with a non-negative,
        non-increasing diagonal, ``perm`` [n] int64.
    """
    full = min(matrix.shape)
    steps = full if steps is None else min(steps, full)
    reflectors, r, perm = _householder_cpqr(matrix, steps)
    q = _form_q(reflectors, steps)
    signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(r.dtype)  # [s]: make R_ii ≥ 0 (a unique form)
    return q * signs, r * signs[:, None], perm


def select_rank(diagonal: torch.Tensor, tau: float, max_r: int | None) -> int:
    """Smallest ``r`` with ``Σ_{i≤r} R_ii² / Σ_i R_ii² ≥ tau``, capped by ``max_r`` (at least 1).

    Args:
        diagonal (Tensor): ``R``'s full diagonal [min(m, n)], non-increasing in magnitude.
        tau (float): Energy threshold in (0, 1].
        max_r (int | None): Upper bound on the rank.
    """
    energy = diagonal.double().pow(2)
    total = energy.sum()
    if total == 0:
        return 1
    captured = energy.cumsum(0) / total
    rank = int((captured < tau - 1e-12).sum()) + 1  # the tolerance absorbs rounding at tau = 1
    rank = min(rank, diagonal.numel())
    return rank if max_r is None else min(rank, max_r)


def qr_components(weight: torch.Tensor, config: QRLoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen factors of one matrix: ``Q_r`` [out, r] and ``(R Pᵀ)_r`` [r, in], fp32.

    Args:
        weight (Tensor): ``W0`` [out, in] (nn.Linear layout).
        config (QRLoraConfig): ``r`` (fixed: only ``r`` QR steps run) or ``tau`` and ``max_r`` (full QR).
    """
    full = min(weight.shape)
    steps = min(config.r, full) if config.r is not None else full
    reflectors, r_mat, perm = _householder_cpqr(weight, steps)
    rank = steps if config.r is not None else select_rank(r_mat.diagonal(), config.tau, config.max_r)
    q = _form_q(reflectors, rank)
    signs = torch.where(r_mat.diagonal()[:rank] < 0, -1.0, 1.0).to(r_mat.dtype)
    rows = r_mat[:rank] * signs[:, None]  # [rank, in] in pivoted column order
    rp = torch.empty_like(rows)
    rp[:, perm] = rows  # (R Pᵀ): column perm[j] of W0 is column j of R
    return (q * signs).float().contiguous(), rp.float().contiguous()


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class QRLoraConfig:
    """Configuration of one QR-LoRA adapter (lorakit's own file format, ``peft_type: LORAKIT_QRLORA``).

    Args:
        r (int | None): Fixed number of components per matrix (capped by ``min(out, in)``); when set, ``tau``
            and ``max_r`` are not used and only ``r`` QR steps run. Default None.
        tau (float): Energy threshold in (0, 1]: keep the smallest ``r`` whose share of ``Σ R_ii²`` reaches
            it. Default 0.9 (the paper reports 90–95%).
        max_r (int | None): Cap on the energy-chosen rank. The frozen factors take ``r (out + in)`` fp32
            numbers per matrix, as a LoRA of rank ``r``; pretrained matrices need hundreds of components to
            reach 90%, so the cap usually decides. Default 16.
        alpha (float): Scale of the update, ``ΔW = α Q_r diag(λ) (R Pᵀ)_r``. Default 1 (``αλ_i`` is the
            relative change of component ``i``).
        target_modules, exclude_modules, modules_to_save, layers_to_transform, layers_pattern: as in
            :class:`~lorakit.LoraConfig` (same matching rules).
        task_type (str | None): Task type recorded in the file; inferred from the model when ``None``.
        base_model_name_or_path (str | None): Recorded in the file.

    Raises:
        ConfigError: A field is invalid (names the field, expected vs got).
    """

    r: int | None = None
    tau: float = 0.9
    max_r: int | None = 16
    alpha: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        for name in ("r", "max_r"):
            value = getattr(self, name)
            if value is not None and not positive_int(value):
                raise field_error("QRLoraConfig", name, f" must be a positive integer or null, got {value!r}")
        if not (isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool) and 0 < self.tau <= 1):
            raise field_error("QRLoraConfig", "tau", f" must be in (0, 1], got {self.tau!r}")
        if not (
            isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha != 0
        ):
            raise field_error("QRLoraConfig", "alpha", f" must be a non-zero number, got {self.alpha!r}")
        check_target_fields(self, "QRLoraConfig")

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content."""
        values = dataclasses.asdict(self)
        target = values["target_modules"]
        values.update(
            peft_type=PEFT_TYPE, target_modules=sorted(target) if isinstance(target, list) else target
        )
        return values

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> QRLoraConfig:
        """Build a config from an ``adapter_config.json`` dict.

        Raises:
            ConfigError: Not a QR-LoRA adapter, or a field is invalid.
        """
        if data.get("peft_type") != PEFT_TYPE:
            raise ConfigError(f"{source}: peft_type is {data.get('peft_type')!r}; expected {PEFT_TYPE!r}")
        names = config_fields(cls)
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


# ----------------------------------------------------------------------------------------------------- layer
class QRFactors(nn.Module):
    """The frozen factors of one adapter, as buffers: ``Q`` [out, r] and ``RP`` = ``(R Pᵀ)_r`` [r, in]."""

    def __init__(self, q: torch.Tensor, rp: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("Q", q)
        self.register_buffer("RP", rp)


class QRLoraLinear(AdapterLinear):
    """A frozen linear-like base layer with named QR-LoRA adapters.

    Each adapter holds ``qr_lambda[name]`` [r] (the only trainable tensor, fp32) and frozen fp32 buffers
    ``qr_factors[name].Q`` [out, r] and ``.RP`` [r, in].

    Args:
        base_layer (nn.Module): ``nn.Linear``, GPT-2 ``Conv1D`` or a lorakit 4-bit linear.
    """

    adapter_tables = ("qr_lambda", "qr_factors", "alpha")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.qr_lambda = nn.ParameterDict()
        self.qr_factors = nn.ModuleDict()
        self.alpha: dict[str, float] = {}

    def add_from_config(
        self,
        name: str,
        config: QRLoraConfig,
        path: str,
        init: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add adapter ``name``: factors from the pivoted QR of the base weight, or ``init`` (read from a file)."""
        if init is None:
            self.init_from_base(name, config)
        else:
            self.add_adapter(name, *init, config.alpha)

    @staticmethod
    def parameter_count(config: QRLoraConfig, path: str, in_features: int, out_features: int) -> int:
        """``min(r, out, in)``: one λ per component.

        Raises:
            ConfigError: ``config.r`` is not set (the energy rule needs the weights).
        """
        if config.r is None:
            raise ConfigError(
                "count_qrlora_parameters needs a fixed QRLoraConfig.r; tau needs the real weights"
            )
        return min(config.r, in_features, out_features)

    @staticmethod
    def file_init(
        path: str, base_layer: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors of the layer at ``path``, ``(Q_r [out, r], (R Pᵀ)_r [r, in])``: loading runs no QR.

        Raises:
            AdapterMismatchError: They are missing or do not fit the layer.
        """
        q, rp = tensors.get("qr_Q"), tensors.get("qr_RP")
        if q is None or rp is None:
            raise AdapterMismatchError(f"the factors of {path!r} are missing from the adapter file")
        in_features, out_features = base_layer_shape(base_layer)
        if rp.ndim != 2 or rp.shape[1] != in_features or q.shape != (out_features, rp.shape[0]):
            raise AdapterMismatchError(
                f"{path} has factors qr_Q {tuple(q.shape)} and qr_RP {tuple(rp.shape)}, but the layer needs "
                f"[{out_features}, r] and [r, {in_features}]"
            )
        return q, rp

    def add_adapter(self, name: str, q: torch.Tensor, rp: torch.Tensor, alpha: float) -> None:
        """Add adapter ``name`` from its factors (λ = 0, so the output is unchanged).

        Args:
            name (str): Adapter name.
            q (Tensor): ``Q_r`` [out, r].
            rp (Tensor): ``(R Pᵀ)_r`` [r, in].
            alpha (float): Scale ``α``.
        """
        device = self.base_device()
        rank = q.shape[1]
        self.qr_factors[name] = QRFactors(q.to(device, torch.float32), rp.to(device, torch.float32))
        self.qr_lambda[name] = nn.Parameter(torch.zeros(rank, device=device))
        self.alpha[name] = float(alpha)

    @torch.no_grad()
    def init_from_base(self, name: str, config: QRLoraConfig) -> None:
        """Add adapter ``name`` with factors from the pivoted QR of this layer's (dequantized) base weight."""
        q, rp = qr_components(self.base_weight(), config)
        self.add_adapter(name, q, rp, config.alpha)

    def adapter_names(self) -> list[str]:
        return list(self.qr_lambda)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.qr_lambda[name]]

    def rank(self, name: str) -> int:
        """Number of components of adapter ``name``."""
        return self.qr_lambda[name].numel()

    def adapter_rank(self, name: str, keep: list[bool] | None = None) -> int:
        return self.rank(name)

    def file_tensors(self, name: str, keep: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """``qr_lambda`` [r] and the frozen factors ``qr_Q`` [out, r], ``qr_RP`` [r, in] (lorakit's format)."""
        factors = self.qr_factors[name]
        return {"qr_lambda": self.qr_lambda[name], "qr_Q": factors.Q, "qr_RP": factors.RP}

    def adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., r] -> [..., out]: r (in + out) MACs per token, ΔW never formed
        factors = self.qr_factors[name]
        hidden = x @ factors.RP.T  # [..., r]
        hidden = hidden * (self.qr_lambda[name] * self.alpha[name])  # [..., r]
        return hidden @ factors.Q.T  # [..., out]

    def delta_rows(self, name: str) -> torch.Tensor:
        factors = self.qr_factors[name]
        scaled_q = factors.Q.float() * (self.qr_lambda[name].float() * self.alpha[name])  # [out, r]
        return scaled_q @ factors.RP.float()  # [out, in]


__all__ = [
    "PEFT_TYPE",
    "QRFactors",
    "QRLoraConfig",
    "QRLoraLinear",
    "pivoted_qr",
    "qr_components",
    "select_rank",
]
