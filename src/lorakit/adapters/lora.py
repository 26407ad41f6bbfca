"""LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen base layer plus name-keyed low-rank adapters.

``y = base(x) + Σ_active s_a · B_a(A_a(dropout_a(x)))``, with ``A_a ∈ R^{r×in}``, ``B_a ∈ R^{out×r}``.

The wrapper never dissolves its base layer: ``base_layer`` is the original ``nn.Linear``, GPT-2 ``Conv1D``
or lorakit 4-bit layer, untouched. Adapters live in ``nn.ModuleDict``s keyed by adapter name, so several
coexist; parameter paths (``q_proj.lora_A.default.weight``) match PEFT's in-memory names. Forward, merge and
unmerge are :class:`~lorakit.adapters.base.AdapterLinear`'s; this file adds LoRA's maths, its mixed-adapter
batches (:mod:`lorakit.adapters.mixed`) and its initializations.

A DoRA adapter (``use_dora``) is a LoRA adapter plus a magnitude in ``lora_magnitude_vector[name]``; its math lives in
:mod:`lorakit.adapters.dora`. PiSSA (``init_lora_weights="pissa"``) only changes the initialization
(:func:`pissa_init_`, as PEFT's ``LoraLayer.pissa_init``; the workflows around it are in :mod:`lorakit.adapters.pissa`).
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
from torch import nn

from lorakit.adapters import dora, mixed
from lorakit.adapters.base import AdapterLinear, ModulesToSaveWrapper, base_layer_shape, is_quantized
from lorakit.adapters.lora_fn import lora_product, packed_lora_product
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError


class LoraLinear(AdapterLinear):
    """A frozen linear-like base layer with any number of named LoRA adapters.

    Args:
        base_layer (nn.Module): ``nn.Linear``, transformers ``Conv1D`` (weight ``[in, out]``) or a quantized
            linear exposing ``in_features``, ``out_features`` and ``dequantize()``.

    Adapter weights are kept in fp32 whatever the base dtype; inputs are cast to the adapter dtype and the
    adapter output back to the base output dtype (as PEFT does, so a bf16 base trains fp32 factors).
    """

    adapter_tables = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "r", "lora_alpha", "scaling")  # fmt: skip

    # Training products through lora_fn.LoraProduct (fewer passes over the activations); False: the module path,
    # the reference the tests compare it with.
    fused_autograd: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: name -> DoraMagnitude
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        # The cache of the stacked adapter weights that a mixed batch's grouped products read (dropped when an
        # adapter is added or deleted).
        self._stack_cache: tuple | None = None
        # DoRA: ||W0||^2 per row (frozen, keyed by the base weight), norms cached in no-grad mode, and the norm of
        # each merged DoRA adapter (it cannot be recovered from the merged weight).
        self._base_sq_norm: tuple | None = None
        self._norm_cache: dict[str, tuple] = {}
        self._merged_norm: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- setup
    def add_from_config(self, name: str, config: LoraConfig, path: str, init: None = None) -> None:
        """Add adapter ``name`` with the rank and alpha ``config`` gives the module at ``path``."""
        r, alpha = config.rank_for(path), config.alpha_for(path)
        self.add_adapter(
            name, r, alpha, config.scaling(r, alpha), config.lora_dropout, config.init_lora_weights,
            use_dora=config.use_dora,
        )  # fmt: skip

    @staticmethod
    def parameter_count(config: LoraConfig, path: str, in_features: int, out_features: int) -> int:
        """``r (in + out)``, plus ``out`` for a DoRA magnitude."""
        return config.rank_for(path) * (in_features + out_features) + (out_features if config.use_dora else 0)

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        scaling: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ) -> None:
        """Create adapter ``name``: ``lora_A`` [r, in] and ``lora_B`` [out, r] in fp32 on the base's device.

        With ``use_dora`` the adapter also gets a magnitude ``lora_magnitude_vector[name].weight`` [out], fp32,
        initialized to ``‖W0 + s·B A‖`` per row (after the A/B initialization, as PEFT).
        """
        device = self.base_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.train(self.training)  # new submodules start in training mode; follow the wrapper's mode
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, lora_alpha, scaling
        self._norm_cache.pop(name, None)  # new tensors may reuse an old adapter's addresses and versions
        self._stack_cache = None
        self.reset_adapter(name, init_lora_weights)
        if use_dora:
            norm = dora.weight_norm_reference(
                self.base_weight_rows(), self.lora_A[name].weight, self.lora_B[name].weight, scaling
            )
            self.lora_magnitude_vector[name] = dora.DoraMagnitude(norm)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights: bool | str = True) -> None:
        """Initialize adapter ``name`` as PEFT does (``reset_lora_parameters``)."""
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
            pissa_init_(self, name, init_lora_weights)
            return
        if init_lora_weights is False:
            return  # nn.Linear's own random init for both: the output changes at step 0 (debugging only)
        if init_lora_weights == "gaussian":
            nn.init.normal_(weight_a, std=1 / self.r[name])
        else:
            # kaiming-uniform with a=√5 gives U(-1/√in, 1/√in), the nn.Linear default.
            nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5))
        nn.init.zeros_(weight_b)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if merged) and free its weights."""
        super().delete_adapter(name)
        self._stack_cache = None  # it holds the adapter's tensors and a stacked copy of them

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        tables = (self.lora_A, self.lora_B, self.lora_magnitude_vector)
        return [table[name].weight for table in tables if name in table]

    def adapter_rank(self, name: str, keep: list[bool] | None = None) -> int:
        return self.r[name]

    def file_tensors(self, name: str, keep: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """``lora_A.weight``, ``lora_B.weight`` and a DoRA magnitude as PEFT names it on disk,
        ``lora_magnitude_vector`` (no ``.weight``)."""
        tensors = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return tensors

    def clear_weight_caches(self) -> None:
        """Forget values derived from the base weight (call after changing it in place through ``.data``)."""
        self._base_sq_norm = None
        self._norm_cache.clear()

    # -------------------------------------------------------------------------------------------- forward
    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        plain = isinstance(dropout, (nn.Dropout, nn.Identity)) and name not in self.lora_magnitude_vector
        if self.fused_autograd and plain and torch.is_grad_enabled():
            # Training: one autograd function with a lean backward (lora_fn.py); the modules below are the reference.
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            return lora_product(
                x, lora_a.weight, lora_b.weight, result, self.scaling[name], p, dropout.training
            )
        x_adapter = dropout(x.to(lora_a.weight.dtype))
        if name in self.lora_magnitude_vector:
            # DoRA reuses the base output (no second matmul with W0); dropout acts on the adapter input only,
            # as for LoRA (PEFT instead recomputes the base path on the dropped x: docs/variants.md).
            hidden = lora_a(x_adapter)  # [..., r]
            scale = self.dora_scale(name)  # [out]
            return dora.dora_forward(result, hidden, lora_b.weight, scale, self.scaling[name], self._bias())
        # The scale multiplies the rank-r hidden, not the [..., out] product: the same value, r/out of the
        # elementwise work (it was 10-18% of a small model's training step on CPU).
        delta = lora_b(lora_a(x_adapter) * self.scaling[name])  # [..., r] -> [..., out]
        return result + delta.to(result.dtype)

    def joined_block_output(
        self, x: torch.Tensor, result: torch.Tensor, blocks: list[tuple[str, int, int]]
    ) -> torch.Tensor:
        dropouts = [self.lora_dropout[name] for name, _, _ in blocks]
        equal = len({stop - start for _, start, stop in blocks}) == 1  # a pack: one micro-batch per config
        plain = all(isinstance(d, (nn.Dropout, nn.Identity)) for d in dropouts)  # else: the module path
        if not (self.fused_autograd and equal and plain):
            return super().joined_block_output(x, result, blocks)
        # A pack (training or its evaluation): every block's product batched over the blocks (PackedLoraProduct).
        factors = [(self.lora_A[name].weight, self.lora_B[name].weight) for name, _, _ in blocks]
        p, scales = [getattr(d, "p", 0.0) for d in dropouts], [self.scaling[name] for name, _, _ in blocks]
        return packed_lora_product(x, result, factors, scales, p, dropouts[0].training)

    def adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name])

    def additive(self, name: str) -> bool:
        return name not in self.lora_magnitude_vector  # DoRA rescales the whole output

    # ----------------------------------------------------------------------------------------------- DoRA
    def _bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def dora_weight_norm(self, name: str) -> torch.Tensor:
        """``‖W + s·B A‖`` per output row for DoRA adapter ``name`` (W: the current base weight), ``[out]`` fp32.

        Computed without grad (a constant in the gradient). ``‖W‖²`` is computed once per base weight; in no-grad
        mode (inference) the norm is also cached, keyed by the versions of A, B and W (in-place changes through
        ``.data`` bypass versions: call :meth:`clear_weight_caches` after them).
        """
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        base_key = self._base_weight_key()
        key = (
            lora_a.data_ptr(),
            lora_a._version,
            lora_b.data_ptr(),
            lora_b._version,
            self.scaling[name],
            base_key,
        )
        cached = self._norm_cache.get(name)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        weight = self.base_weight_rows()
        if self._base_sq_norm is None or self._base_sq_norm[0] != base_key:
            self._base_sq_norm = (base_key, dora.row_sq_norm(weight))
        norm = dora.weight_norm(weight, lora_a, lora_b, self.scaling[name], self._base_sq_norm[1])
        if not torch.is_grad_enabled():
            self._norm_cache[name] = (key, norm)
        return norm

    def dora_scale(self, name: str) -> torch.Tensor:
        """``k = m / n`` ([out], fp32): gradient flows to the magnitude ``m`` only (``n`` is a constant, §4.3)."""
        norm = self.dora_weight_norm(name)
        return dora.magnitude_scale(self.lora_magnitude_vector[name].weight, norm)

    def _base_weight_key(self) -> tuple:
        base = self.base_layer
        tensor = base.weight_packed if is_quantized(base) else base.weight
        return (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)

    # ----------------------------------------------------------------------------------------- mixed batches
    def _stacked(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The adapters ``names`` stacked for :func:`mixed.add_rows`: ``Aᵀ`` [k + 1, in, r] and ``(s·B)ᵀ``
        [k + 1, r, out] (fp32, ranks zero-padded to the largest; zeros for an adapter this layer lacks and in the
        last slot, the base's); None if the layer has none of them.

        Cached in no-grad mode. The check is cheap (no module lookups): the cache holds the weights it was built
        from and compares their versions, addresses (``.data`` swaps, ``.to()``) and scales; adding or deleting an
        adapter drops it.
        """
        cache = self._stack_cache
        if cache is not None and (cache[0] is names or cache[0] == names) and not torch.is_grad_enabled():
            weights = cache[1]
            if cache[2] == [(w._version, w.data_ptr()) for w in weights] and cache[3] == [
                self.scaling[n] for n in names if n in self.scaling
            ]:
                return cache[4]
        present = [n for n in names if n in self.lora_A]
        if not present:
            return None
        weights = [w for n in present for w in (self.lora_A[n].weight, self.lora_B[n].weight)]
        rank = max(self.r[n] for n in present)
        device, dtype = weights[0].device, weights[0].dtype
        stack_a = torch.zeros(len(names) + 1, self.in_features, rank, device=device, dtype=dtype)
        stack_b = torch.zeros(len(names) + 1, rank, self.out_features, device=device, dtype=dtype)
        for i, name in enumerate(names):
            if name in self.lora_A:
                weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
                stack_a[i, :, : weight_a.shape[0]] = weight_a.T
                stack_b[i, : weight_b.shape[1]] = (weight_b * self.scaling[name]).T
        stacked = (stack_a, stack_b)
        if not torch.is_grad_enabled():
            stamp = [(w._version, w.data_ptr()) for w in weights]
            self._stack_cache = (names, weights, stamp, [self.scaling[n] for n in present], stacked)
        return stacked

    def mixed_batch_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter output, for all rows at once (gathered low-rank products, :mod:`mixed`).

        ``x`` is ``[B, ..., in]`` with ``B == len(self.row_plan.rows)``, ``result`` the base output
        ``[B, ..., out]``; rows naming ``"__base__"`` (or an adapter this layer does not have) get the base
        output. DoRA rows are rescaled by their own ``k = m / n`` (1 for LoRA and base rows). No Python loop over
        rows.
        """
        plan = self.row_plan
        if x.shape[0] != len(plan.rows):
            raise ConfigError(
                f"adapter_names has {len(plan.rows)} entries but the batch has {x.shape[0]} rows; give one name per row"
            )
        names = plan.adapters
        if len(names) == 1 and plan.in_order and names[0] not in self.lora_magnitude_vector:
            # every row on one adapter (e.g. a server's prefill): the plain product; nothing stacked or cached
            if names[0] not in self.lora_A:
                return result
            lora_a, lora_b = self.lora_A[names[0]], self.lora_B[names[0]]
            delta = lora_b(
                lora_a(x.to(lora_a.weight.dtype)) * self.scaling[names[0]]
            )  # as forward: scale at rank r
            return result + delta.to(result.dtype)
        stacked = self._stacked(names)
        if stacked is None:
            return result
        if not self.lora_magnitude_vector or not any(n in self.lora_magnitude_vector for n in names):
            return mixed.add_rows(result, x, *stacked, plan)
        delta = mixed.add_rows(torch.zeros_like(result, dtype=stacked[0].dtype), x, *stacked, plan)
        ones = torch.ones(self.out_features, device=x.device, dtype=delta.dtype)
        factors = [self.dora_scale(n) if n in self.lora_magnitude_vector else ones for n in names]
        slots = plan.indices(x.device)[0]
        factor = torch.stack([*factors, ones])[slots]  # [B, out]
        factor = factor.reshape(x.shape[0], *([1] * (result.dim() - 2)), self.out_features)
        return dora.dora_output(result, delta, factor, 1.0, self._bias())

    # ---------------------------------------------------------------------------------------------- merge
    def delta_rows(self, name: str) -> torch.Tensor:
        """``s · B A`` for adapter ``name``: [out, in] fp32."""
        weight_a = self.lora_A[name].weight.float()  # [r, in]
        weight_b = self.lora_B[name].weight.float()  # [out, r]
        return (weight_b @ weight_a) * self.scaling[name]  # [out, in]

    def _merge_one(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """A DoRA adapter merges as ``W ← k ⊙ (W + ΔW)`` with ``k = m / ‖W0 + ΔW‖``, the norm taken on the base weight
        without previously merged adapters (as its forward sees it) and kept for :meth:`unmerge`."""
        delta = self.delta_weight(name)
        if name not in self.lora_magnitude_vector:
            return weight + delta
        norm = self._merge_norm(self._unmerged_weight(), delta)
        factor = dora.magnitude_scale(self.lora_magnitude_vector[name].weight.detach(), norm)
        self._merged_norm[name] = norm
        return dora.merged_weight(weight, delta, factor, self.fan_in_fan_out)

    def _unmerge_one(self, name: str) -> None:
        super()._unmerge_one(name)
        self._merged_norm.pop(name, None)

    def _unmerge_math(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self._merged_norm:
            return weight - self.delta_weight(name)
        factor = dora.magnitude_scale(
            self.lora_magnitude_vector[name].weight.detach(), self._merged_norm[name]
        )
        return dora.unmerged_weight(weight, self.delta_weight(name), factor, self.fan_in_fan_out)

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight (fp32, storage layout) with every merged adapter taken out, on a copy."""
        weight = self.base_layer.weight.data.float()
        for name in reversed(self.merged_adapters):
            weight = self._unmerge_math(weight, name)
        return weight

    def _merge_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``‖W + ΔW‖`` per output row, ``[out]``; both fp32 in storage layout."""
        full = weight + delta
        return torch.linalg.vector_norm(full, dim=0 if self.fan_in_fan_out else 1)

    def _merged_rows(self, weight: torch.Tensor, name: str, base_rows: torch.Tensor) -> torch.Tensor:
        delta = self.delta_rows(name)
        if name not in self.lora_magnitude_vector:
            return weight + delta
        norm = torch.linalg.vector_norm(base_rows + delta, dim=1)  # [out]
        factor = dora.magnitude_scale(self.lora_magnitude_vector[name].weight.detach(), norm)
        return dora.merged_weight(weight, delta, factor, fan_in_fan_out=False)

    def merged_base_layer(self, adapter_names: list[str] | None = None) -> nn.Module:
        layer = super().merged_base_layer(adapter_names)
        self._merged_norm.clear()
        return layer

    def _repr_note(self, name: str) -> str:
        return ", dora" if name in self.lora_magnitude_vector else ""


# ------------------------------------------------------------------------------------------------------- PiSSA
def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PiSSA factors of ``weight``: ``s·B A`` is its best rank-r approximation (exact SVD) or an estimate of it.

    With ``W0 = U S Vᵀ``: ``A = diag(√(S_r / s)) V_rᵀ`` [r, in] and ``B = U_r diag(√(S_r / s))`` [out, r] (Meng et al.
    2024, arXiv 2404.02948; PEFT divides by the scale ``s``).

    Args:
        weight (torch.Tensor): ``W0``, ``[out, in]``, fp32.
        r (int): Rank; at most ``min(out, in)``.
        scaling (float): The adapter scale ``s``.
        niter (int | None): None: exact ``torch.linalg.svd``; an integer: ``torch.svd_lowrank`` with that many
            subspace iterations (uses the torch RNG).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``A`` ``[r, in]`` and ``B`` ``[out, r]``, fp32.
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # [out, k], [k], [k, in]
        u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(weight, q=r, niter=niter)  # [out, r], [r], [in, r]
        vh_r = v_r.T
    root = torch.sqrt(s_r / scaling)  # [r]
    return root[:, None] * vh_r, u_r * root[None, :]


@torch.no_grad()
def pissa_init_(layer: LoraLinear, name: str, init: str) -> None:
    """Initialize adapter ``name`` of ``layer`` with PiSSA and replace the base weight by the residual, in place.

    Args:
        layer (LoraLinear): The wrapper; its base must be a full-precision Linear / Conv1D.
        name (str): The adapter (its A, B, r and scaling exist already).
        init (str): ``"pissa"`` or ``"pissa_niter_<k>"``.

    Raises:
        ConfigError: The base is quantized (run PiSSA before quantizing: ``lorakit.adapters.pissa.pissa_quantize``),
            its weight is not fp32/fp16/bf16, or ``r`` exceeds ``min(out, in)``.
    """
    base = layer.base_layer
    if not hasattr(base, "weight") or hasattr(base, "dequantize"):
        raise ConfigError(
            f"init_lora_weights={init!r} needs the full-precision base weight, but this layer's base is "
            f"{type(base).__name__}: run PiSSA before quantizing (lorakit.adapters.pissa.pissa_quantize)"
        )
    weight = base.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(
            f"init_lora_weights={init!r}: the base weight is {weight.dtype}; expected fp32/fp16/bf16"
        )
    r, scaling = layer.r[name], layer.scaling[name]
    if r > min(layer.in_features, layer.out_features):
        raise ConfigError(
            f"init_lora_weights={init!r}: r={r} exceeds min(in, out) = "
            f"{min(layer.in_features, layer.out_features)} of this layer"
        )
    rows = layer.base_weight_rows().float()  # [out, in]
    niter = int(init.rsplit("_", 1)[1]) if init != "pissa" else None
    lora_a, lora_b = pissa_factors(rows, r, scaling, niter)
    layer.lora_A[name].weight.copy_(lora_a)
    layer.lora_B[name].weight.copy_(lora_b)
    residual = rows - scaling * (lora_b @ lora_a)  # [out, in]
    weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))
    layer.clear_weight_caches()


def pissa_as_lora(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: LoraConfig
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A trained PiSSA adapter as a plain rank-2r LoRA adapter for the original (pre-PiSSA) base weights.

    ``ΔW = s·(B A - B0 A0)`` is written as ``A'' = [A ; A0]`` ``[2r, in]`` and ``B'' = [B | -B0]`` ``[out, 2r]``, with
    ``r``, ``lora_alpha`` (√2 with rsLoRA), ``rank_pattern`` and ``alpha_pattern`` doubled and
    ``init_lora_weights=True`` (PEFT's ``subtract_mutated_init``).

    Args:
        trained (dict[str, Tensor]): The trained adapter's tensors under their file keys.
        initial (dict[str, Tensor]): The same adapter right after the PiSSA init.
        config (LoraConfig): Its config (copied, not changed).

    Returns:
        tuple: The converted tensors (CPU) and config.

    Raises:
        ConfigError: A DoRA adapter (its update is not low-rank), rsLoRA with rank/alpha patterns (as PEFT), or
            ``initial`` does not match the adapter.
    """
    if config.use_dora:
        raise ConfigError(
            "save_as_lora: a DoRA adapter's update is not low-rank and cannot be written as LoRA"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "save_as_lora: rsLoRA with rank_pattern / alpha_pattern cannot be converted (as in PEFT)"
        )
    tensors = {}
    for key, value in trained.items():
        value = value.detach().cpu()
        if key.endswith("lora_A.weight") or key.endswith("lora_B.weight"):
            if key not in initial or initial[key].shape != value.shape:
                raise ConfigError(
                    f"save_as_lora: the initial adapter has no tensor {key!r} of shape {tuple(value.shape)}"
                )
            first = initial[key].to(value)
            value = (
                torch.cat([value, first], 0)
                if key.endswith("lora_A.weight")
                else torch.cat([value, -first], 1)
            )
        tensors[key] = value.contiguous()
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
    config.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    config.alpha_pattern = {key: 2 * value for key, value in config.alpha_pattern.items()}
    return tensors, config


__all__ = [
    "LoraLinear",
    "ModulesToSaveWrapper",
    "base_layer_shape",
    "is_quantized",
    "pissa_as_lora",
    "pissa_factors",
    "pissa_init_",
]
