"""What every adapter layer shares: the frozen-base frame, forward, merge, unmerge, delete, and ``modules_to_save``.

An :class:`AdapterLinear` wraps its base layer (``nn.Linear``, GPT-2 ``Conv1D`` or a lorakit 4-bit layer) and
never dissolves it. A method's layer (:class:`~lorakit.adapters.lora.LoraLinear`,
:class:`~lorakit.adapters.adalora.AdaLoraLinear`, :class:`~lorakit.adapters.qrlora.QRLoraLinear`) stores its
adapters in name-keyed dicts and says what is particular to it: how an adapter is added from its config
(:meth:`AdapterLinear.add_from_config`), its output for an input (:meth:`AdapterLinear.adapter_delta`), its
dense update (:meth:`AdapterLinear.delta_rows`), its trainable tensors, and its tensors under their file names
(:meth:`AdapterLinear.file_tensors`). Forward, merging (exact, also into a 4-bit base), unmerging, deleting and
mixed batches (where the method has them) live here, once.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

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


class AdapterLinear(nn.Module):
    """A frozen linear-like base layer plus named adapters of one method (subclasses fill in the math).

    Args:
        base_layer (nn.Module): ``nn.Linear``, transformers ``Conv1D`` (weight ``[in, out]``) or a quantized
            linear exposing ``in_features``, ``out_features`` and ``dequantize()``.

    Attributes:
        active_adapters (list[str]): Adapters added in forward, in this order.
        merged_adapters (list[str]): Adapters merged into the base weight, in merge order.
        adapters_disabled (bool): Forward computes the base only (``lorakit.disable_adapters``).
        row_plan: A mixed batch's rows (set by ``lorakit.batch_adapters`` for one forward, LoRA only).
    """

    # The attributes holding one entry per adapter (dicts / ModuleDicts / ParameterDicts), cleared by delete.
    adapter_tables: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = base_layer_shape(base_layer)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.row_plan = None
        self.train(base_layer.training)  # a wrapper added to a model in eval mode stays in eval mode

    # ------------------------------------------------------------------------------- what a method defines
    def add_from_config(self, name: str, config: Any, path: str, init: Any = None) -> None:
        """Add adapter ``name`` as ``config`` describes it for the module at ``path``.

        ``init`` is what :meth:`file_init` read from an adapter file for this layer (None: a new adapter).
        """
        raise NotImplementedError

    @staticmethod
    def file_init(path: str, base_layer: nn.Module, tensors: dict[str, torch.Tensor]) -> Any:
        """What this method needs from an adapter file before adding the adapter at ``path`` (ranks of a pruned
        adapter, stored factors ...), given the file's tensors of this layer keyed as :meth:`file_tensors` names
        them; None when the config says everything. Raises ``AdapterMismatchError``."""
        return None

    @staticmethod
    def parameter_count(config: Any, path: str, in_features: int, out_features: int) -> int:
        """Trainable parameters of a new adapter of ``config`` on an ``in -> out`` layer at ``path`` (no weights)."""
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``."""
        raise NotImplementedError

    def adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s output for ``x`` [..., in] (already in the adapter dtype): [..., out]."""
        raise NotImplementedError

    def delta_rows(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s dense update ``ΔW`` [out, in] in fp32 (nn.Linear layout, also for Conv1D)."""
        raise NotImplementedError

    def file_tensors(self, name: str, keep: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under their file names (``lora_A.weight`` ...), without the module path.

        ``keep``: the components to keep (AdaLoRA's rank pattern for this layer); other methods ignore it.
        """
        raise NotImplementedError

    def adapter_rank(self, name: str, keep: list[bool] | None = None) -> int:
        """Adapter ``name``'s rank in this layer (``keep``: AdaLoRA's kept components)."""
        raise NotImplementedError

    def kept_components(self, config: Any, path: str) -> list[bool] | None:
        """Which components of this layer ``config`` keeps (AdaLoRA's rank pattern); None: all of them."""
        return None

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the output so far, [..., out]) plus adapter ``name``'s part for ``x`` [..., in].

        The default casts ``x`` to the adapter dtype (fp32) and the delta back to the output dtype; DoRA, which
        rescales the whole output, overrides it.
        """
        dtype = self.adapter_parameters(name)[0].dtype
        delta = self.adapter_delta(name, x.to(dtype))  # [..., out] in the adapter dtype
        return result + delta.to(result.dtype)

    def mixed_batch_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter output (``row_plan``); only methods with mixed batches implement it."""
        raise ConfigError(f"{type(self).__name__} has no mixed-adapter batches")

    # --------------------------------------------------------------------------------------------- shared
    def block_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each contiguous block of rows through its own adapter (``row_plan.blocks``), as a run of it alone computes it.

        A training pack (:mod:`lorakit.packed`): the base output ``result`` [B, ..., out] was computed once for all
        blocks; each block's rows then take the path a run of that adapter alone takes (dropout, DoRA, scaling), so a
        block's gradient equals its separate run's. When every block's adapter is additive (:meth:`additive`: LoRA,
        not DoRA) and on this layer: :meth:`joined_block_output`; otherwise each block goes through
        :meth:`adapter_output`, and a block whose adapter this layer lacks (other target modules) keeps the base
        output.
        """
        held, blocks = self.adapter_names(), self.row_plan.blocks
        present = [name for name, _, _ in blocks if name in held]
        if not present:
            return result
        if len(present) == len(blocks) and all(self.additive(name) for name in present):
            return self.joined_block_output(x, result, blocks)
        x = x.to(self.adapter_parameters(present[0])[0].dtype)  # [B, ..., in], once (a no-op per block after)
        parts = []
        for name, start, stop in blocks:
            part = result[start:stop]  # [b, ..., out]
            parts.append(self.adapter_output(name, x[start:stop], part) if name in held else part)
        return torch.cat(parts)  # [B, ..., out]

    def joined_block_output(
        self, x: torch.Tensor, result: torch.Tensor, blocks: list[tuple[str, int, int]]
    ) -> torch.Tensor:
        """:meth:`block_output` when every block's adapter is additive and on this layer: the deltas joined and
        added in one go (``result + delta`` is elementwise: the same values, fewer ops)."""
        x = x.to(self.adapter_parameters(blocks[0][0])[0].dtype)  # [B, ..., in], once for all blocks
        deltas = [
            self.adapter_delta(name, x[start:stop]) for name, start, stop in blocks
        ]  # [b, ..., out] each
        return result + torch.cat(deltas).to(result.dtype)

    def additive(self, name: str) -> bool:
        """Adapter ``name``'s :meth:`adapter_output` is ``result + adapter_delta(x)`` cast to ``result``'s dtype (the
        default); False for a method that rescales the output (DoRA)."""
        return True

    def set_trainable(self, name: str, trainable: bool) -> None:
        """Set ``requires_grad`` on adapter ``name``'s parameters."""
        for param in self.adapter_parameters(name):
            param.requires_grad_(trainable)

    def base_device(self) -> torch.device:
        """Device of the base layer's storage (CPU for a layer without tensors)."""
        for tensor in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            return tensor.device
        return torch.device("cpu")

    def base_weight(self) -> torch.Tensor:
        """The frozen weight ``W0`` [out, in] in fp32 (dequantized for a 4-bit base, transposed for Conv1D)."""
        return self.base_weight_rows().detach().float()

    def base_weight_rows(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D; dequantized to fp32 if 4-bit)."""
        if is_quantized(self.base_layer):
            return self.base_layer.dequantize(torch.float32)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s update in fp32, laid out like the base weight ([out, in], or [in, out] for Conv1D)."""
        return self._layout(self.delta_rows(name))

    def _layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta  # Conv1D stores W^T

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., in]  ->  [..., out]
        if self.adapters_disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # [..., out]
        if self.row_plan is not None:
            if self.row_plan.per_block:
                return self.block_output(x, result)
            return self.mixed_batch_output(x, result)
        held = self.adapter_names()
        for name in self.active_adapters:
            if name not in self.merged_adapters and name in held:
                result = self.adapter_output(name, x, result)
        return result

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if merged) and free its weights."""
        if name in self.merged_adapters:
            self._unmerge_one(name)
        for attr in self.adapter_tables:
            table = getattr(self, attr)
            if name in table:  # ParameterDict.pop takes no default
                del table[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self.clear_weight_caches()

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

    # ---------------------------------------------------------------------------------------------- merge
    def _merge_one(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight`` (fp32, storage layout) with adapter ``name`` merged in (DoRA overrides: it rescales)."""
        return weight + self.delta_weight(name)

    def _unmerge_math(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight`` (fp32, storage layout) with merged adapter ``name`` taken out (inverse of :meth:`_merge_one`)."""
        return weight - self.delta_weight(name)

    def _merged_rows(self, weight: torch.Tensor, name: str, base_rows: torch.Tensor) -> torch.Tensor:
        """``weight`` [out, in] fp32 with adapter ``name`` merged, for a dequantized base ``base_rows``."""
        return weight + self.delta_rows(name)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the deltas of ``adapter_names`` (default: the active ones) into the float base weight.

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
        held = self.adapter_names()
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in held:
                continue
            merged = self._merge_one(weight.data.float(), name)
            if safe_merge and not torch.isfinite(merged).all():
                raise MergeError(
                    f"merging adapter {name!r} gives NaN or Inf weights; the base was left unchanged"
                )
            weight.data.copy_(merged.to(weight.dtype))
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
        self.clear_weight_caches()

    def merged_base_layer(self, adapter_names: list[str] | None = None) -> nn.Module:
        """The base layer with the adapters' deltas merged in, as its original class.

        A quantized base is dequantized once into an ``nn.Linear`` in its compute dtype; the deltas are added
        in fp32 before the single rounding to that dtype, so the result equals dequantized base + adapter.
        """
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        self.unmerge()
        if not is_quantized(self.base_layer):
            self.merge(names, safe_merge=True)
            self.merged_adapters.clear()  # the layer is about to leave this wrapper
            return self.base_layer
        base = self.base_layer
        base_rows = base.dequantize(torch.float32)  # [out, in]
        weight = base_rows
        held = self.adapter_names()
        for name in names:
            if name in held:
                weight = self._merged_rows(weight, name, base_rows)
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
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.adapter_rank(n)}{self._repr_note(n)}" for n in self.adapter_names())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={self.active_adapters}"

    def _repr_note(self, name: str) -> str:
        return ""


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


__all__ = ["AdapterLinear", "ModulesToSaveWrapper", "base_layer_shape", "is_quantized"]
