"""4-bit storage for frozen base weights (QLoRA): NF4 / FP4 codes, double quantization, a 4-bit linear layer.

Pure PyTorch, byte-compatible with bitsandbytes on CPU; the same code runs on CUDA.
"""

from lorakit.quant.linear4bit import Linear4bit
from lorakit.quant.nf4 import (
    DYNAMIC_MAP_SIGNED,
    FP4_CODE,
    NF4_CODE,
    QUANT_TYPES,
    QuantState,
    code_book,
    create_dynamic_map,
    dequantize_4bit,
    dequantize_absmax,
    quantize_4bit,
)

__all__ = [
    "DYNAMIC_MAP_SIGNED",
    "FP4_CODE",
    "NF4_CODE",
    "QUANT_TYPES",
    "Linear4bit",
    "QuantState",
    "code_book",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_absmax",
    "quantize_4bit",
]
