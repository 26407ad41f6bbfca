"""LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen base layer plus name-keyed low-rank adapters.

``y = base(x) + Σ_active s_a · B_a(A_a(dropout_a(x)))``, with ``A_a ∈ R^{r×in}``, ``B_a ∈ R^{out×r}``.

The wrapper never dissolves its base layer: ``base_layer`` is the original ``nn.Linear``, GPT-2 ``Conv1D``
or lorakit 4-bit layer, untouched. Adapters live in ``nn.ModuleDict``s keyed by adapter name, so several
coexist; parameter paths (``q_proj.lora_A.default.weight``) match PEFT's in-memory names.

A DoRA adapter (``use_dora``) is a LoRA adapter plus a magnitude in ``lora_magnitude_vector[name]``; its math lives in
:mod:`lorakit.adapters.dora`. PiSSA (``init_lora_weights="pissa"``) only changes the initialization
(:mod:`lorakit.adapters.pissa`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters import dora, mixed
from lorakit.errors import ConfigError, MergeError


def base_layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a wrappable layer (Linear, GPT-2 Conv1D, 4-bit linear)."""
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape  # Conv1D stores W^T: [in, out]
        return in_features, out_features
    return layer.in_features, layer.out_features


def is_quantized(layer: nn.Module) -> bool:
    """True for base layers that store their weight in a quantized form and expose ``dequantize()``."""
    return hasattr(layer, "dequantize") and hasattr(layer, "weight_numel")


class LoraLinear(nn.Module):
    """A frozen linear-like base layer with any number of named LoRA adapters.

    Args:
        base_layer (nn.Module): ``nn.Linear``, transformers ``Conv1D`` (weight ``[in, out]``) or a quantized
            linear exposing ``in_features``, ``out_features`` and ``dequantize()``.

    Adapter weights are kept in fp32 whatever the base dtype; inputs are cast to the adapter dtype and the
    adapter output back to the base output dtype (``algorithms.md`` §1, pitfalls).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = base_layer_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: name -> DoraMagnitude
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        # The rows of a mixed batch (set by lorakit.inject.batch_adapters for one forward), and the cache of the
        # stacked adapter weights that its grouped products read (dropped when an adapter is added or deleted).
        self.row_plan: mixed.RowPlan | None = None
        self._stack_cache: tuple | None = None
        # DoRA: ||W0||^2 per row (frozen, keyed by the base weight), norms cached in no-grad mode, and the norm of
        # each merged DoRA adapter (it cannot be recovered from the merged weight).
        self._base_sq_norm: tuple | None = None
        self._norm_cache: dict[str, tuple] = {}
        self._merged_norm: dict[str, torch.Tensor] = {}
        self.train(base_layer.training)  # a wrapper added to a model in eval mode stays in eval mode

    # ---------------------------------------------------------------------------------------------- setup
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
        device = self._base_device()
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
            # pissa.py builds on inject/io (model-level flows), which import this module: import it here.
            from lorakit.adapters.pissa import pissa_init_

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
        if name in self.merged_adapters:
            self._unmerge_one(name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in table:
                del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self._norm_cache):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._stack_cache = None  # it holds the adapter's tensors and a stacked copy of them

    def set_trainable(self, name: str, trainable: bool) -> None:
        """Set ``requires_grad`` on every weight of adapter ``name`` (A, B and the DoRA magnitude)."""
        for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in table:
                table[name].requires_grad_(trainable)

    def replace_base_layer(self, base_layer: nn.Module) -> None:
        """Swap the frozen base layer for an equivalent one (e.g. its 4-bit version); adapters are kept.

        Raises:
            ConfigError: The new layer has other shapes, or adapters are merged into the old one.
        """
        if self.merged_adapters:
            raise ConfigError(f"unmerge adapters {self.merged_adapters} before replacing the base layer")
        if base_layer_shape(base_layer) != (self.in_features, self.out_features):
            raise ConfigError(
                f"replacement base layer has (in, out) = {base_layer_shape(base_layer)}, "
                f"expected {(self.in_features, self.out_features)}"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.clear_weight_caches()

    def clear_weight_caches(self) -> None:
        """Forget values derived from the base weight (call after changing it in place through ``.data``)."""
        self._base_sq_norm = None
        self._norm_cache.clear()

    def _base_device(self) -> torch.device:
        for tensor in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            return tensor.device
        return torch.device("cpu")

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., in]  ->  [..., out]
        if self.adapters_disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.row_plan is not None:
            return self._mixed_batch_output(x, result)
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            x_adapter = self.lora_dropout[name](x.to(lora_a.weight.dtype))
            if name in self.lora_magnitude_vector:
                # DoRA reuses the base output (no second matmul with W0); dropout acts on the adapter input only,
                # as for LoRA (PEFT instead recomputes the base path on the dropped x: docs/variants.md).
                hidden = lora_a(x_adapter)  # [..., r]
                scale = self.dora_scale(name)  # [out]
                result = dora.dora_forward(
                    result, hidden, lora_b.weight, scale, self.scaling[name], self._bias()
                )
                continue
            # The scale multiplies the rank-r hidden, not the [..., out] product: the same value, r/out of the
            # elementwise work (it was 10-18% of a small model's training step on CPU).
            delta = lora_b(lora_a(x_adapter) * self.scaling[name])  # [..., r] -> [..., out]
            result = result + delta.to(result.dtype)
        return result

    # ----------------------------------------------------------------------------------------------- DoRA
    def base_weight_rows(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D; dequantized to fp32 if 4-bit)."""
        if is_quantized(self.base_layer):
            return self.base_layer.dequantize(torch.float32)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

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

    def _mixed_batch_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter output, for all rows at once (gathered low-rank products, :mod:`mixed`).

        ``x`` is ``[B, ..., in]`` with ``B == len(self.row_plan.rows)``, ``result`` the base output
        ``[B, ..., out]``; rows naming ``"__base__"`` (or an adapter this layer does not have) get the base
        output. DoRA rows are rescaled by their own ``k = m / n`` (1 for LoRA and base rows). No Python loop over
        rows.
        """
        plan = self.row_plan
        if x.shape[0] != len(plan.rows):
            raise ValueError(
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
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` for adapter ``name`` in fp32, laid out like the base weight ([out, in], or [in, out]
        for Conv1D)."""
        weight_a = self.lora_A[name].weight.float()  # [r, in]
        weight_b = self.lora_B[name].weight.float()  # [out, r]
        delta = (weight_b @ weight_a) * self.scaling[name]  # [out, in]
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the deltas of ``adapter_names`` (default: the active ones) into the base weight.

        A DoRA adapter merges as ``W ← k ⊙ (W + ΔW)`` with ``k = m / ‖W0 + ΔW‖``, the norm taken on the base weight
        without previously merged adapters (as its forward sees it) and cached for :meth:`unmerge`.

        Args:
            adapter_names (list[str] | None): Adapters to merge; already merged ones are skipped.
            safe_merge (bool): Compute the merged weight on a copy first and raise if it is not finite.

        Raises:
            MergeError: The merged weight has NaN/Inf (with ``safe_merge``), or the base is quantized.
        """
        if is_quantized(self.base_layer):
            raise MergeError(
                "cannot merge into a quantized base layer in place; use lorakit.merge_and_unload(model), "
                "which dequantizes the base once and merges exactly"
            )
        weight = self.base_layer.weight
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            delta = self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                norm = self._merge_norm(self._unmerged_weight(), delta)
                factor = dora.magnitude_scale(self.lora_magnitude_vector[name].weight.detach(), norm)
                merged = dora.merged_weight(weight.data.float(), delta, factor, self.fan_in_fan_out)
            else:
                norm, merged = None, weight.data.float() + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise MergeError(
                    f"merging adapter {name!r} gives NaN or Inf weights; the base was left unchanged"
                )
            weight.data.copy_(merged.to(weight.dtype))
            if norm is not None:
                self._merged_norm[name] = norm
            self.merged_adapters.append(name)
            self.clear_weight_caches()

    def unmerge(self) -> None:
        """Subtract every merged delta from the base weight, in reverse merge order."""
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters[-1])

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data.copy_(self._unmerge_math(weight.data.float(), name).to(weight.dtype))
        self.merged_adapters.remove(name)
        self._merged_norm.pop(name, None)
        self.clear_weight_caches()

    def _unmerge_math(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight`` (fp32, storage layout) with merged adapter ``name`` taken out."""
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

    def merged_base_layer(self, adapter_names: list[str] | None = None) -> nn.Module:
        """The base layer with the adapters' deltas merged in, as its original class.

        A quantized base is dequantized once into an ``nn.Linear`` in its compute dtype; the deltas are added
        in fp32 before the single rounding to that dtype, so the result equals dequantized base + adapter.
        """
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        if not is_quantized(self.base_layer):
            self.merge(names, safe_merge=True)
            self.merged_adapters.clear()  # the layer is about to leave this wrapper
            self._merged_norm.clear()
            return self.base_layer
        base = self.base_layer
        base_weight = base.dequantize(torch.float32)  # [out, in]
        weight = base_weight
        for name in names:
            if name not in self.lora_A:
                continue
            delta = self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                norm = self._merge_norm(base_weight, delta)
                factor = dora.magnitude_scale(self.lora_magnitude_vector[name].weight.detach(), norm)
                weight = dora.merged_weight(weight, delta, factor, fan_in_fan_out=False)
            else:
                weight = weight + delta
        if not torch.isfinite(weight).all():
            raise MergeError(f"merging adapters {names} gives NaN or Inf weights")
        dtype = base.compute_dtype
        linear = nn.Linear(
            self.in_features, self.out_features, bias=base.bias is not None, device=weight.device
        )
        linear = linear.to(dtype)
        linear.weight.data.copy_(weight.to(dtype))
        if base.bias is not None:
            linear.bias.data.copy_(base.bias.data.to(dtype))
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        ranks = ", ".join(
            f"{n}: r={self.r[n]}{', dora' if n in self.lora_magnitude_vector else ''}" for n in self.lora_A
        )
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={self.active_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full for an adapter (PEFT ``modules_to_save``): the original stays untouched and
    each adapter owns a trainable copy under ``modules_to_save[name]``."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_disabled = False

    def add_adapter(self, name: str) -> None:
        """Make adapter ``name``'s trainable copy of the original module."""
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self.adapters_disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str):
        # Attribute reads (``weight``, ``out_features`` ...) go to the module in use, so code that inspects a
        # wrapped lm_head or classifier keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self._modules
            active = self.__dict__.get("active_adapter")
            if active is not None and active in modules["modules_to_save"]:
                return getattr(modules["modules_to_save"][active], name)
            return getattr(modules["original_module"], name)


__all__ = ["LoraLinear", "ModulesToSaveWrapper", "base_layer_shape", "is_quantized"]
