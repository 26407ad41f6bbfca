"""What every non-LoRA adapter layer shares: the frozen-base frame, merging, and target-field validation.

An :class:`AdapterLinear` wraps its base layer (``nn.Linear``, GPT-2 ``Conv1D`` or a lorakit 4-bit layer)
and never dissolves it. A subclass stores its adapters in name-keyed dicts and says only two things: the
adapter's output for an input (:meth:`AdapterLinear.adapter_delta`) and its dense weight delta
(:meth:`AdapterLinear.delta_weight`); forward, merge, unmerge and the exact merge into a 4-bit base live here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.lora import base_layer_shape, is_quantized
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, MergeError


class AdapterLinear(nn.Module):
    """A frozen linear-like base layer plus named adapters of one method (subclasses fill in the math).

    Args:
        base_layer (nn.Module): ``nn.Linear``, transformers ``Conv1D`` (weight ``[in, out]``) or a quantized
            linear exposing ``in_features``, ``out_features`` and ``dequantize()``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = base_layer_shape(base_layer)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.train(base_layer.training)  # a wrapper added to a model in eval mode stays in eval mode

    # ------------------------------------------------------------------------------- what a method defines
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        raise NotImplementedError

    def adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s output for ``x`` [..., in] (already in the adapter dtype): [..., out]."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s dense update ``ΔW`` [out, in] in fp32 (nn.Linear layout, also for Conv1D)."""
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- shared
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
        if is_quantized(self.base_layer):
            return self.base_layer.dequantize(torch.float32)
        weight = self.base_layer.weight.detach().float()
        return weight.T if self.fan_in_fan_out else weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., in]  ->  [..., out]
        if self.adapters_disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # [..., out]
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.adapter_names():
                continue
            dtype = self.adapter_parameters(name)[0].dtype
            delta = self.adapter_delta(name, x.to(dtype))  # [..., out] in the adapter dtype (fp32)
            result = result + delta.to(result.dtype)
        return result

    def _layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta  # Conv1D stores W^T

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the deltas of ``adapter_names`` (default: the active ones) into the float base weight.

        Raises:
            MergeError: The merged weight is not finite (with ``safe_merge``), or the base is quantized.
        """
        if is_quantized(self.base_layer):
            raise MergeError(
                "cannot merge into a quantized base layer in place; use lorakit.variants.merge_and_unload(model), "
                "which dequantizes the base once and merges exactly"
            )
        weight = self.base_layer.weight
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.merged_adapters or name not in self.adapter_names():
                continue
            merged = weight.data.float() + self._layout(self.delta_weight(name))
            if safe_merge and not torch.isfinite(merged).all():
                raise MergeError(
                    f"merging adapter {name!r} gives NaN or Inf weights; the base was left unchanged"
                )
            weight.data.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged delta from the base weight, in reverse merge order."""
        weight = self.base_layer.weight if self.merged_adapters else None
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data.copy_((weight.data.float() - self._layout(self.delta_weight(name))).to(weight.dtype))

    def merged_base_layer(self, adapter_names: list[str] | None = None) -> nn.Module:
        """The base layer with the adapters' deltas merged in, as its original class.

        A 4-bit base is dequantized once into an ``nn.Linear`` in its compute dtype; the deltas are added in
        fp32 before the single rounding, so the result equals dequantized base + adapter.
        """
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        self.unmerge()
        if not is_quantized(self.base_layer):
            self.merge(names, safe_merge=True)
            self.merged_adapters.clear()  # the layer is about to leave this wrapper
            return self.base_layer
        base = self.base_layer
        weight = base.dequantize(torch.float32)  # [out, in]
        for name in names:
            if name in self.adapter_names():
                weight = weight + self.delta_weight(name)
        if not torch.isfinite(weight).all():
            raise MergeError(f"merging adapters {names} gives NaN or Inf weights")
        linear = nn.Linear(
            self.in_features, self.out_features, bias=base.bias is not None, device=weight.device
        )
        linear = linear.to(base.compute_dtype)
        linear.weight.data.copy_(weight.to(base.compute_dtype))
        if base.bias is not None:
            linear.bias.data.copy_(base.bias.data.to(base.compute_dtype))
        return linear.requires_grad_(False)


def validated_targets(owner: str, **fields) -> dict:
    """Validate and normalize the target-selection fields exactly as :class:`LoraConfig` does.

    Args:
        owner (str): Config class name used in error messages (``"AdaLoraConfig"``).
        **fields: ``target_modules``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform``,
            ``layers_pattern``.

    Returns:
        dict: The same fields, normalized (sets sorted into lists ...).

    Raises:
        ConfigError: A field is invalid; the message names ``owner.field``.
    """
    try:
        checked = LoraConfig(**fields)
    except ConfigError as err:
        raise ConfigError(str(err).replace("LoraConfig.", f"{owner}.")) from None
    return {key: getattr(checked, key) for key in fields}


def config_fields(cls) -> set[str]:
    """Field names of a config dataclass."""
    return {f.name for f in dataclasses.fields(cls)}


__all__ = ["AdapterLinear", "config_fields", "validated_targets"]
