"""NF4 / FP4 block-wise 4-bit quantization with double quantization: the pure-PyTorch reference.

QLoRA (arXiv 2305.14314, §3) stores a frozen weight as 4-bit codes plus one scale per block. This module is the
definition lorakit's tests trust; :mod:`lorakit.quant.fast` holds faster kernels that must match it bit for bit.
The layout and the rounding are byte-compatible with bitsandbytes 0.50.2 on CPU (its ``quantize_4bit`` /
``dequantize_4bit``), which the tests check byte for byte.

Format of one tensor with ``n`` elements (``shape`` flattened row-major):

- blocks of ``blocksize`` consecutive elements (64 by default); the last block may be partial and has its own scale.
- ``absmax[b] = max |w|`` over block ``b`` (fp32). ``u = w * (1 / absmax[b])`` (bnb divides in the partial block).
- each ``u`` is rounded to the nearest of the 16 code values; a ``u`` exactly on the midpoint between two codes goes
  to the lower one (``torch.bucketize(..., right=False)`` against the 15 midpoints, as bnb does).
- two codes per byte: element ``2j`` in the HIGH nibble, ``2j + 1`` in the LOW nibble; an odd ``n`` is padded with
  the code of 0.0 (as bnb does). ``packed`` is a flat uint8 tensor of ``(n + 1) // 2`` bytes (bnb returns the same bytes as ``[.., 1]``).

Double quantization (QLoRA §3 "Double Quantization") compresses the fp32 ``absmax``: ``offset = mean(absmax)``, then
``absmax - offset`` is quantized with the signed 8-bit dynamic map in blocks of 256, keeping uint8 codes, one fp32
``nested_absmax`` per 256 blocks and the fp32 ``offset``. Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter
with it, 4 + 32/64 = 4.5 without (blocksize 64).

The 8-bit codes follow bnb 0.50.2's CPU kernel (``quantize_cpu`` in ``csrc/cpu_ops.cpp``), which is not an exact
nearest-code search: it rounds ``u`` to a grid of 65536 points over [-1, 1] and takes the code nearest to the grid
point. Matching it keeps the absmax codes equal to bnb's on CPU; bnb's CUDA kernel searches exactly and differs from
both in about 0.15% of the absmax codes (by one step of the dynamic map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lorakit.errors import QuantizationError
from lorakit.quant import fast

QuantType = Literal["nf4", "fp4"]

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4", "fp4")  # the 4-bit code books below (a recipe's model.quantize, the CLI's --quantize)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

# NF4 (QLoRA §3): quantiles of N(0, 1) normalized to [-1, 1], 7 negative levels, an exact 0, 8 positive levels.
# bnb builds it with create_normal_map(offset=0.9677083); the values are bnb's, copied exactly.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4 (bnb): 1 sign bit (0b1000) + 2 exponent bits + 1 mantissa bit, exponent bias 2, indexed by bit pattern
# (not sorted). Divided by the largest magnitude in fp32, like bnb's get_4bit_type("fp4").
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12.0

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def code_book(quant_type: QuantType) -> torch.Tensor:
    """The 16 code values of a 4-bit type, indexed by the 4-bit code.

    Args:
        quant_type (str): ``"nf4"`` or ``"fp4"``.

    Returns:
        torch.Tensor: ``[16]`` float32 on CPU (a copy).
    """
    return _CODES[quant_type].clone()


def sorted_code_book(quant_type: QuantType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code values in ascending order, the midpoints between them, and each sorted slot's 4-bit code.

    FP4 holds +0 (code 0) and -0 (code 8); a stable sort keeps +0 first, as bnb's ``argsort`` does on CPU. The
    midpoint between them is 0, so ``u == 0`` maps to code 0 and a tiny positive ``u`` to code 8 (-0), like bnb.

    Args:
        quant_type (str): ``"nf4"`` or ``"fp4"``.

    Returns:
        tuple: ``values`` [16] float32 ascending, ``midpoints`` [15] float32, ``order`` [16] int64 (sorted slot ->
        4-bit code; the identity for NF4).
    """
    values, order = torch.sort(_CODES[quant_type], stable=True)
    return values, (values[:-1] + values[1:]) / 2, order


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic quantization map (bnb ``create_dynamic_map(signed)``, 7 exponent bits).

    For ``i`` in 0..6 it holds ``10**(i - 6)`` times the midpoints of ``linspace(0.1, 1, k + 1)`` with ``k = 2**i``
    (signed, both signs) or ``k = 2**(i + 1)`` (unsigned), plus exactly 0 and 1.0. The signed map spans
    [-0.99297, 1.0] (-1 is absent); the unsigned map spans [0, 1.0]. Computed with the same fp32 torch ops as bnb,
    so the values are bit-identical.

    Args:
        signed (bool): Signed map (double quantization, Adam's first moment) or unsigned (second moment).
            Default: True.

    Returns:
        torch.Tensor: ``[256]`` float32, ascending.
    """
    data: list[float] = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP_SIGNED = create_dynamic_map(signed=True)
_GRID_POINTS = 65536  # bnb's CPU 8-bit quantizer rounds u to this many points over [-1, 1]


def _grid_lut(code: torch.Tensor) -> torch.Tensor:
    """``[65536]`` int64: the code nearest to each grid point ``-1 + 2 i / 65535`` (ties to the lower code)."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_GRID_POINTS, dtype=torch.float32)) / (_GRID_POINTS - 1)
    return torch.bucketize(grid, midpoints)


_CACHE: dict[tuple[int, str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _cached_on(code: torch.Tensor, device: torch.device, kind: str) -> torch.Tensor:
    """``code`` itself (``"map"``) or its uint8 grid table (``"grid"``) on ``device``, built once per code tensor.

    The key holds the code tensor's id and the entry keeps the tensor alive, so a key is never reused by another.
    """
    key = (id(code), kind, device)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not code:
        value = _grid_lut(code.cpu()).to(torch.uint8) if kind == "grid" else code
        hit = _CACHE[key] = (code, value.to(device))
    return hit[1]


@dataclass
class QuantState:
    """Everything besides the packed codes that is needed to dequantize one 4-bit tensor.

    Attributes:
        shape (torch.Size): Shape of the original tensor.
        dtype (torch.dtype): Dtype :func:`dequantize_4bit` returns by default (the original weight's dtype).
        blocksize (int): Elements per block (a power of two in 32..4096).
        quant_type (str): ``"nf4"`` or ``"fp4"``.
        absmax (torch.Tensor): ``[ceil(n / blocksize)]``: fp32 block scales, or their uint8 codes with double
            quantization.
        nested_absmax (torch.Tensor | None): ``[ceil(len(absmax) / 256)]`` fp32 scales of the absmax codes, or
            None without double quantization.
        offset (torch.Tensor | None): 0-d fp32 mean of the fp32 absmax (added back after decoding), or None.
        nested_blocksize (int): Absmax values per nested block. Default: 256.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized to 8 bits."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    def bits_per_parameter(self) -> float:
        """Storage in bits per original element: packed codes + scales (+ nested scales and offset).

        The constant code books (16 and 256 floats, shared by every tensor) are not counted.
        """
        scale_bits = self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            scale_bits += self.nested_absmax.numel() * 32 + 32
        return (8 * ((self.numel + 1) // 2) + scale_bits) / self.numel

    def to(self, device: torch.device | str) -> QuantState:
        """A copy whose tensors live on ``device`` (fp32 / uint8 dtypes are kept)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, absmax=move(self.absmax), nested_absmax=move(self.nested_absmax), offset=move(self.offset)
        )


# --------------------------------------------------------------------------------------------------------------
# Boundary checks


def _where(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def check_blocksize(blocksize: int, name: str | None = None) -> None:
    """Raise :class:`QuantizationError` unless ``blocksize`` is a power of two in 32..4096."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise QuantizationError(
            f"cannot quantize {_where(name)}: blocksize={blocksize!r} is not supported; "
            f"expected a power of two from 32 to 4096 ({', '.join(map(str, BLOCKSIZES))})"
        )


def check_quant_type(quant_type: str, name: str | None = None) -> None:
    """Raise :class:`QuantizationError` unless ``quant_type`` is ``"nf4"`` or ``"fp4"``."""
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(
            f"cannot quantize {_where(name)}: quant_type={quant_type!r} is not supported; expected 'nf4' or 'fp4'"
        )


def _check_weight(weight: torch.Tensor, name: str | None) -> None:
    if not isinstance(weight, torch.Tensor):
        raise QuantizationError(
            f"cannot quantize {_where(name)}: expected a torch.Tensor, got {type(weight).__name__}"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(
            f"cannot quantize {_where(name)}: dtype {weight.dtype} is not supported; expected bfloat16, float16 or "
            f"float32 (cast it first, e.g. weight.float())"
        )
    if weight.numel() == 0:
        raise QuantizationError(f"cannot quantize {_where(name)}: it is empty (shape {tuple(weight.shape)})")


def _raise_non_finite(weight: torch.Tensor, name: str | None) -> None:
    bad = ~torch.isfinite(weight)
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist()) if weight.dim() else ()
    found = {"NaN": bool(torch.isnan(weight).any()), "Inf": bool(torch.isinf(weight).any())}
    kinds = " and ".join(kind for kind, present in found.items() if present)
    raise QuantizationError(
        f"cannot quantize {_where(name)}: {int(bad.sum())} of {weight.numel()} values are not finite ({kinds}); "
        f"first at index {first} of shape {tuple(weight.shape)}. Fix the checkpoint or the step that produced it"
    )


# --------------------------------------------------------------------------------------------------------------
# Reference kernels (flat tensors, any device)


def quantize_codes_reference(
    flat: torch.Tensor, blocksize: int, quant_type: QuantType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 4-bit quantization of a flat tensor, written as plainly as bnb's torch backend.

    Args:
        flat (torch.Tensor): ``[n]`` bf16 / fp16 / fp32, finite.
        blocksize (int): Elements per block.
        quant_type (str): ``"nf4"`` or ``"fp4"``.

    Returns:
        tuple: ``packed`` ``[(n + 1) // 2]`` uint8 and ``absmax`` ``[ceil(n / blocksize)]`` fp32.
    """
    _, midpoints, order = (t.to(flat.device) for t in sorted_code_book(quant_type))
    x = flat.float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)  # [nb, bs]
    absmax = blocks.abs().amax(dim=1)  # [nb]
    u = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:  # the partial block: bnb clamps its stored absmax and divides instead of multiplying
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        u = torch.cat([u, torch.clamp(x[full:] / tail_max, -1, 1)])
    if n % 2:  # bnb pads the scaled values with 0.0, so the spare low nibble holds the code of zero
        u = torch.cat([u, u.new_zeros(1)])
    codes = order[torch.bucketize(u, midpoints)].to(torch.uint8)  # nearest code, ties to the lower value
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_codes_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    blocksize: int,
    quant_type: QuantType,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`quantize_codes_reference`: ``code[idx] * absmax`` in fp32, then cast to ``dtype``.

    Args:
        packed (torch.Tensor): ``[(n + 1) // 2]`` uint8.
        absmax (torch.Tensor): ``[ceil(n / blocksize)]`` fp32.
        n (int): Number of elements.
        blocksize (int): Elements per block.
        quant_type (str): ``"nf4"`` or ``"fp4"``.
        dtype (torch.dtype): Output dtype.

    Returns:
        torch.Tensor: ``[n]`` in ``dtype``.
    """
    code = _CODES[quant_type].to(packed.device)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()  # [n] high nibble first
    values = code[idx]
    pad = (-n) % blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize) * absmax[:, None]  # fp32 product
    return values.reshape(-1)[:n].to(dtype)


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization with bnb 0.50.2's CPU rounding (grid of 65536 points, then nearest code).

    Args:
        x (torch.Tensor): ``[n]`` fp32, finite.
        blocksize (int): Elements per block. Default: 256.
        code (torch.Tensor | None): ``[256]`` ascending map. Default: the signed dynamic map.

    Returns:
        tuple: ``codes`` ``[n]`` uint8 and ``absmax`` ``[ceil(n / blocksize)]`` fp32 (0 for an all-zero block,
        whose codes are all 0).
    """
    lut = _cached_on(code if code is not None else DYNAMIC_MAP_SIGNED, x.device, "grid")
    n = x.numel()
    pad = (-n) % blocksize
    flat = x.reshape(-1).float()
    # zero padding leaves every absmax as it is
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)  # [nb, bs]
    absmax = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=1)  # [nb] max |x|, one pass, no temporary
    zero = absmax == 0
    inv = 1.0 / torch.where(zero, 1.0, absmax)  # an all-zero block gets codes 0 below, like bnb
    grid = blocks * inv[:, None]
    # ((clamp(v) + 1) * 0.5) * 65535 + 0.5, op for op in place (the same fp32 roundings), then truncation as in C
    grid.clamp_(-1, 1).add_(1.0).mul_(0.5).mul_(_GRID_POINTS - 1).add_(0.5)
    codes = lut.index_select(0, grid.view(-1).to(torch.int32)).view(-1, blocksize)  # [nb, bs] uint8
    if bool(zero.any()):
        codes[zero] = 0
    return codes.view(-1)[:n], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int = NESTED_BLOCKSIZE,
    code: torch.Tensor | None = None,
) -> torch.Tensor:
    """``code[codes] * absmax`` per block, in fp32.

    Args:
        codes (torch.Tensor): ``[n]`` uint8.
        absmax (torch.Tensor): ``[ceil(n / blocksize)]`` fp32.
        blocksize (int): Elements per block. Default: 256.
        code (torch.Tensor | None): ``[256]`` map. Default: the signed dynamic map.

    Returns:
        torch.Tensor: ``[n]`` fp32.
    """
    table = _cached_on(code if code is not None else DYNAMIC_MAP_SIGNED, codes.device, "map")
    n = codes.numel()
    pad = (-n) % blocksize
    values = table.index_select(0, codes.reshape(-1).to(torch.int32))  # [n] fp32
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values.view(-1, blocksize).mul_(absmax[:, None])
    return values[:n]


# --------------------------------------------------------------------------------------------------------------
# Public API


def quantize_4bit(
    weight: torch.Tensor,
    blocksize: int = 64,
    quant_type: QuantType = "nf4",
    double_quant: bool = True,
    *,
    name: str | None = None,
    reference: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a tensor to 4 bits, block by block (QLoRA NF4 by default, with double quantization).

    Args:
        weight (torch.Tensor): Any shape, bf16 / fp16 / fp32, finite; any device.
        blocksize (int): Elements per absmax block, a power of two in 32..4096. Default: 64.
        quant_type (str): ``"nf4"`` (QLoRA) or ``"fp4"``. Default: ``"nf4"``.
        double_quant (bool): Quantize the fp32 block scales to 8 bits as well (4.127 instead of 4.5 bits per
            parameter). Default: True.
        name (str | None): Tensor name used in error messages. Default: None.
        reference (bool): Use the plain reference kernel instead of the fast one (same bytes). Default: False.

    Returns:
        tuple: ``packed`` ``[(n + 1) // 2]`` uint8 (high nibble = even element) and its :class:`QuantState`.

    Raises:
        QuantizationError: Unsupported dtype or quant_type, bad blocksize, empty tensor, NaN or Inf values.
    """
    _check_weight(weight, name)
    check_blocksize(blocksize, name)
    check_quant_type(quant_type, name)
    flat = weight.detach().reshape(-1)
    full = flat.numel() - flat.numel() % blocksize
    if reference or full == 0:
        packed, absmax = quantize_codes_reference(flat, blocksize, quant_type)
    else:
        _, midpoints, order = sorted_code_book(quant_type)
        packed, absmax = fast.quantize_4bit_codes(flat[:full], blocksize, midpoints, order)
        if full < flat.numel() and bool(torch.isfinite(absmax).all()):  # the partial block, by the reference
            tail_packed, tail_absmax = quantize_codes_reference(flat[full:], blocksize, quant_type)
            packed, absmax = torch.cat([packed, tail_packed]), torch.cat([absmax, tail_absmax])
    if not bool(torch.isfinite(absmax).all()):  # a NaN or Inf anywhere makes its block's absmax non-finite
        _raise_non_finite(weight, name)
    state = QuantState(
        shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, quant_type=quant_type, absmax=absmax
    )
    if double_quant:
        offset = absmax.mean()  # QLoRA §3: center the positive scales so the signed map's range is used
        codes, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        state = replace(state, absmax=codes, nested_absmax=nested_absmax, offset=offset)
    return packed, state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 block scales of a state, decoding the 8-bit codes when it is double-quantized.

    Returns:
        torch.Tensor: ``[ceil(n / blocksize)]`` fp32.
    """
    if not state.double_quant:
        return state.absmax
    decoded = dequantize_blockwise_8bit(state.absmax, state.nested_absmax, state.nested_blocksize)
    return decoded + state.offset


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    reference: bool = False,
) -> torch.Tensor:
    """Decode a 4-bit tensor: ``code[idx] * absmax`` in fp32, cast to ``dtype``.

    Args:
        packed (torch.Tensor): ``[(n + 1) // 2]`` uint8 (any shape with that many bytes, e.g. bnb's ``[.., 1]``).
        state (QuantState): From :func:`quantize_4bit`, on the same device as ``packed``.
        dtype (torch.dtype | None): Output dtype. Default: ``state.dtype``.
        out (torch.Tensor | None): Optional contiguous output of ``state.shape`` and ``dtype`` to write into.
        reference (bool): Use the plain reference kernel instead of the fast one (same values). Default: False.

    Returns:
        torch.Tensor: ``state.shape`` in ``dtype``.

    Raises:
        QuantizationError: ``packed`` is not uint8 or has the wrong number of bytes for ``state.shape``.
    """
    dtype = state.dtype if dtype is None else dtype
    n = state.numel
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise QuantizationError(
            f"cannot dequantize: expected {(n + 1) // 2} uint8 bytes for shape {tuple(state.shape)}, "
            f"got {packed.numel()} {packed.dtype} values"
        )
    absmax = dequantize_absmax(state)
    flat = packed.reshape(-1)
    if reference:
        values = dequantize_codes_reference(flat, absmax, n, state.blocksize, state.quant_type, dtype)
        return values.view(state.shape) if out is None else out.copy_(values.view(state.shape))
    return fast.dequantize_4bit_codes(
        flat, absmax, state.shape, state.blocksize, _CODES[state.quant_type], dtype, out=out
    )
