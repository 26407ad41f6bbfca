"""A frozen linear layer whose weight is stored in 4 bits and dequantized just in time (QLoRA, arXiv 2305.14314).

``y = x · dequant(W)ᵀ + b`` in the compute dtype. Autograd saves only the 4-bit codes and the block scales, and
backward dequantizes again to return ``∂L/∂x = g · dequant(W)``; there is no weight gradient (the base is frozen),
as in bitsandbytes' ``MatMul4Bit``. Quantization is an explicit call (:meth:`Linear4bit.from_linear`), never a side
effect of ``.to()``.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import QuantizationError
from lorakit.quant.nf4 import (
    NESTED_BLOCKSIZE,
    QuantState,
    QuantType,
    check_blocksize,
    check_quant_type,
    dequantize_4bit,
    quantize_4bit,
)

# (shape, blocksize, quant_type): what the autograd function needs besides the saved tensors
_Layout = tuple[torch.Size, int, str]


def _state(
    layout: _Layout, absmax: torch.Tensor, nested: torch.Tensor | None, offset: torch.Tensor | None
) -> QuantState:
    shape, blocksize, quant_type = layout
    return QuantState(shape, torch.float32, blocksize, quant_type, absmax, nested, offset)


_scratch = threading.local()


def _dequantize_scratch(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize for one matmul. On CPU, into a per-thread buffer reused across calls and layers.

    glibc hands buffers of more than 32 MB back to the OS when they are freed, so a fresh weight-sized tensor
    page-faults on every call (about 10 ms per 32 MB on an idle 2-core machine, 2 to 3 times that on a busy one).
    The buffer grows to the largest layer's weight and stays: steady-state memory rises by one layer's weight per
    thread and compute dtype, and the peak does not change. The result must not outlive the matmul it feeds.
    """
    if packed.device.type != "cpu":
        return dequantize_4bit(packed, state, dtype)  # the CUDA caching allocator already reuses memory
    buffers = _scratch.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].numel() < state.numel:
        buffers[dtype] = torch.empty(state.numel, dtype=dtype)
    out = buffers[dtype][: state.numel].view(state.shape)
    return dequantize_4bit(packed, state, dtype, out=out)


class Linear4bitFunction(torch.autograd.Function):
    """``F.linear(x, dequant(W), bias)`` that saves only the 4-bit data for backward."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, nested_absmax, offset, layout: _Layout):
        state = _state(layout, absmax, nested_absmax, offset)
        weight = _dequantize_scratch(packed, state, x.dtype)  # [out, in], only alive during this matmul
        ctx.layout = layout
        ctx.save_for_backward(packed, absmax, nested_absmax, offset)  # 4-bit codes + scales, never `weight`
        return F.linear(x, weight, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, nested_absmax, offset = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            state = _state(ctx.layout, absmax, nested_absmax, offset)
            if torch.is_grad_enabled():  # create_graph=True: autograd may keep `weight`, so no shared buffer
                weight = dequantize_4bit(packed, state, grad_out.dtype)
            else:
                weight = _dequantize_scratch(packed, state, grad_out.dtype)
            grad_x = grad_out @ weight  # [..., out] @ [out, in] -> [..., in]
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None


class Linear4bit(nn.Module):
    """A frozen ``nn.Linear`` with its weight in NF4 / FP4 (optionally double-quantized) and a bias in the compute dtype.

    Build one from a float layer with :meth:`from_linear`. The constructor allocates zero-filled storage of the right
    shapes, for loading a ``state_dict`` into.

    Buffers (moved by ``.to(device)``; ``.to(dtype)`` / ``.half()`` leave them untouched and change
    ``compute_dtype`` instead, so the fp32 scales are never rounded):

    - ``weight_packed``: ``[(out * in + 1) // 2]`` uint8, two codes per byte (high nibble first).
    - ``weight_absmax``: ``[ceil(out * in / blocksize)]`` fp32 block scales, or uint8 codes with double quantization.
    - ``weight_nested_absmax``: ``[ceil(len(weight_absmax) / 256)]`` fp32 (double quantization only).
    - ``weight_offset``: 0-d fp32 mean of the block scales (double quantization only).

    Args:
        in_features (int): Input size.
        out_features (int): Output size.
        bias (bool): Whether the layer has a (frozen) bias. Default: True.
        quant_type (str): ``"nf4"`` or ``"fp4"``. Default: ``"nf4"``.
        blocksize (int): Elements per absmax block, a power of two in 32..4096. Default: 64.
        double_quant (bool): Quantize the block scales to 8 bits. Default: True.
        compute_dtype (torch.dtype): Dtype of the dequantized weight, the input cast and the output. Default: bf16.
        device (torch.device | str | None): Where to allocate the storage. Default: None (CPU).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: QuantType = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise QuantizationError(
                f"compute_dtype={compute_dtype} is not supported; expected bf16, fp16 or fp32"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        blocks = math.ceil(n / blocksize)
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        scale_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=scale_dtype, device=device))
        nested = torch.zeros(math.ceil(blocks / NESTED_BLOCKSIZE), device=device) if double_quant else None
        self.register_buffer("weight_nested_absmax", nested)
        self.register_buffer("weight_offset", torch.zeros((), device=device) if double_quant else None)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: QuantType = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        *,
        name: str | None = None,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (any float dtype, any device; left unchanged) into a new frozen 4-bit layer.

        Args:
            linear (nn.Linear): The layer to quantize; its weight is ``[out, in]``.
            quant_type (str): ``"nf4"`` or ``"fp4"``. Default: ``"nf4"``.
            blocksize (int): Elements per absmax block. Default: 64.
            double_quant (bool): Quantize the block scales to 8 bits. Default: True.
            compute_dtype (torch.dtype): Compute dtype. Default: bf16.
            name (str | None): Module name used in error messages. Default: None.

        Returns:
            Linear4bit: On the weight's device; the bias is cast to ``compute_dtype`` and frozen.

        Raises:
            QuantizationError: Not an ``nn.Linear``, NaN / Inf weights, unsupported dtype or blocksize.
        """
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(
                f"cannot quantize {name or 'module'}: expected nn.Linear, got {type(linear).__name__}"
            )
        weight_name = f"{name}.weight" if name else None
        packed, state = quantize_4bit(linear.weight, blocksize, quant_type, double_quant, name=weight_name)
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            device="meta",  # no throw-away allocation: every tensor is replaced below
        )
        module.weight_packed = packed
        module.weight_absmax = state.absmax
        module.weight_nested_absmax = state.nested_absmax
        module.weight_offset = state.offset
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).clone(), requires_grad=False)
        return module

    @property
    def weight_numel(self) -> int:
        """Number of logical weights (``out * in``), for parameter counters; the packed buffer holds half as many bytes."""
        return self.in_features * self.out_features

    @property
    def quant_state(self) -> QuantState:
        """The :class:`QuantState` of the weight, viewing this module's buffers (dtype = compute dtype)."""
        shape = torch.Size((self.out_features, self.in_features))
        return QuantState(
            shape,
            self.compute_dtype,
            self.blocksize,
            self.quant_type,
            self.weight_absmax,
            self.weight_nested_absmax,
            self.weight_offset,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight ``[out, in]`` in ``dtype`` (default: the compute dtype)."""
        return dequantize_4bit(self.weight_packed, self.quant_state, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` (any float dtype, cast to the compute dtype) -> ``[..., out]`` in the compute dtype."""
        x = x.to(self.compute_dtype)
        layout = (torch.Size((self.out_features, self.in_features)), self.blocksize, self.quant_type)
        return Linear4bitFunction.apply(
            x,
            self.bias,
            self.weight_packed,
            self.weight_absmax,
            self.weight_nested_absmax,
            self.weight_offset,
            layout,
        )

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() cast every float buffer; the fp32 scales must stay exact, so keep them and
        # let the cast change the compute dtype instead (the bias, a float parameter, follows it).
        before = {key: buf for key, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for key, buf in before.items():
            if self._buffers[key].dtype != buf.dtype:
                self._buffers[key] = buf.to(self._buffers[key].device)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict would silently cast fp32 scales into uint8 codes (or back); refuse a mismatched format.
        for key, buf in self._buffers.items():
            incoming = state_dict.get(prefix + key)
            if buf is not None and incoming is not None and incoming.dtype != buf.dtype:
                raise QuantizationError(
                    f"cannot load {prefix + key!r}: the checkpoint stores {incoming.dtype}, this layer expects "
                    f"{buf.dtype} (double_quant={self.double_quant}); build the layer with the checkpoint's settings"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}, bits_per_parameter={self.quant_state.bits_per_parameter():.3f}"
        )
