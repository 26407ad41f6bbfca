"""lorakit: parameter-efficient fine-tuning from a 4-bit base to a served adapter.

The public API::

    cfg = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05)
    model = lorakit.wrap(model, cfg)              # in place; returns the same model
    lorakit.print_trainable_parameters(model)
    lorakit.save_adapter(model, "out/")           # PEFT format
    lorakit.load_adapter(model, "out/", adapter_name="legal")
    lorakit.set_adapter(model, "legal")
    with lorakit.disable_adapters(model): ...
    lorakit.merge(model); lorakit.unmerge(model)
    base = lorakit.merge_and_unload(model)
"""

from lorakit.config import LoraConfig
from lorakit.errors import (
    AdapterFileError,
    AdapterMismatchError,
    ConfigError,
    LorakitError,
    MergeError,
    QuantizationError,
    TargetModuleError,
)
from lorakit.inject import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_requantize,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
    wrap,
)
from lorakit.io import load_adapter, save_adapter
from lorakit.loading import load_model, prepare_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "ConfigError",
    "LoraConfig",
    "LorakitError",
    "MergeError",
    "QuantizationError",
    "TargetModuleError",
    "active_adapters",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "load_model",
    "merge",
    "merge_and_requantize",
    "merge_and_unload",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
    "wrap",
]
