"""Adapter layers: one file per method, each an ``nn.Module`` that wraps its base layer."""

from lorakit.adapters.lora import LoraLinear, ModulesToSaveWrapper

__all__ = ["LoraLinear", "ModulesToSaveWrapper"]
