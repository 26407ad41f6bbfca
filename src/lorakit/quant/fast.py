"""Fast 4-bit kernels in plain PyTorch ops; they return the same bytes and values as the reference in nf4.py.

Both kernels walk the tensor in chunks of whole blocks and replace per-element searches with table lookups:

- quantize: ``u * K + K`` lands in one of ``2K + 2`` cells of width ``1 / K`` (``K = 2**16``). A cell that no
  midpoint can reach holds its 4-bit code directly; the few cells that touch a midpoint hold 255, and the 8-element
  words holding them are redone at the end with the reference formula (``bucketize`` against the midpoints), so
  ties and rounding stay exact.
- dequantize: one byte indexes a 256-entry table holding both nibbles' code values (two fp32 = one int64), then
  ``values * absmax`` is computed in fp32 and written straight into the output dtype.

Threads on CPU. ``torch.get_num_threads()`` worker threads take chunks of 2**18 elements (a few MB of temporaries,
cache-resident) from one shared iterator; torch ops release the GIL, so the workers run in parallel. Each worker
runs its ops single-threaded: a chunked kernel whose every op forks and joins torch's OpenMP team stalls badly
when other processes share the cores (measured on a loaded 2-core box: a 4096x4096 dequantize went from ~15 ms to
a ~250 ms median), while workers that never wait for each other mid-call degrade gracefully. Making a worker
single-threaded goes through ``torch.set_num_threads(1)``, which also sets the process-wide default; the pool is
built once, and the default is put back right after (see ``_cpu_pool``). Results never depend on this, only speed.
On accelerators the chunks are large and run in order on the calling thread.

A fresh CPU output of several MB is advised for transparent huge pages (``madvise(MADV_HUGEPAGE)``, Linux): its first
touch then faults 2 MB at a time instead of 4 KB, which took a 32 MB bf16 output's allocate-and-fill from ~8.5 ms to
~1.5 ms here, more than the dequantization itself (~4 ms). Where the kernel ignores the advice, nothing changes.

The code tables come in as arguments (this module imports nothing from lorakit) so that nf4.py can use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

CELLS_PER_UNIT = 2**16
AMBIGUOUS = 255
# u * K + K is computed in fp32 with an error below 2**-6 cells; marking every cell within 0.05 cell of a midpoint
# keeps each u whose computed cell is not marked strictly between the same two midpoints as the cell's center.
_MARGIN = 0.05
_TOP_BITS = int.from_bytes(b"\x80" * 8, "little", signed=True)  # 0x8080...80: the top bit of each byte
_CPU_CHUNK = 2**18  # elements per chunk on CPU
_DEVICE_CHUNK = 2**26  # accelerators prefer few large kernels

_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14  # linux/mman.h
_libc: list = []  # [CDLL or None], resolved once

_tables: dict[tuple, torch.Tensor] = {}
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads): a forked child gets no threads
_pool_lock = threading.Lock()


class _NonFinite(Exception):
    """A block's absmax is NaN or Inf: stop quantizing (the caller reports it with the tensor's name)."""


def _cpu_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers whose torch ops run single-threaded (built once per thread count)."""
    key = (os.getpid(), threads)
    with _pool_lock:
        if key not in _pools:
            started = threading.Barrier(threads)

            def single_threaded() -> None:
                torch.get_num_threads()  # run torch's lazy per-thread setup first, so it cannot undo the next line
                torch.set_num_threads(1)

            pool = ThreadPoolExecutor(
                threads, thread_name_prefix="lorakit-quant", initializer=single_threaded
            )
            for future in [pool.submit(started.wait) for _ in range(threads)]:  # start every worker now
                future.result()
            torch.set_num_threads(threads)  # the workers changed the process-wide default too: put it back
            _pools[key] = pool
        return _pools[key]


def _madvise() -> Callable[..., int] | None:
    if not _libc:
        lib = None
        if platform.system() == "Linux":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
            except (OSError, AttributeError):
                lib = None
        _libc.append(lib)
    return _libc[0]


def empty_output(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``; on CPU, its whole 2 MB pages advised for transparent huge pages when it spans several."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if device.type == "cpu" and nbytes >= 4 * _HUGE_PAGE else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the aligned pages inside the tensor only
        stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        # only advice: a kernel without THP (or an error) leaves the ordinary pages
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_HUGEPAGE)
    return out


def _run_chunks(work: Callable[[int, int], None], n: int, blocksize: int, device: torch.device) -> None:
    """Call ``work(start, stop)`` once for each chunk of whole blocks covering ``[0, n)``, in any order."""
    step = max(blocksize, (_CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK) // blocksize * blocksize)
    starts: Iterator[int] = iter(
        range(0, n, step)
    )  # shared: CPython's range iterator hands out each chunk once
    threads = torch.get_num_threads()

    def drain() -> None:
        for start in starts:
            work(start, min(start + step, n))

    if device.type != "cpu" or threads == 1 or n <= step:
        drain()
        return
    futures = [_cpu_pool(threads).submit(drain) for _ in range(threads)]
    errors = [future.exception() for future in futures]  # wait for every worker before returning
    for error in errors:
        if error is not None:
            raise error


def _cell_table(midpoints: torch.Tensor, order: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[2K + 2]`` uint8: the 4-bit code of every cell, or 255 where a midpoint is within reach of the cell."""
    key = ("cells", tuple(midpoints.tolist()), tuple(order.tolist()), device)
    if key not in _tables:
        k = CELLS_PER_UNIT
        centers = ((torch.arange(2 * k + 2, dtype=torch.float64) + 0.5) - k) / k  # u at each cell's center
        table = order[torch.bucketize(centers.float(), midpoints)].to(torch.uint8)
        for reach in (midpoints.double() * k + k).tolist():  # the midpoint's position in cell units
            for c in range(math.ceil(reach - 1 - _MARGIN), math.floor(reach + _MARGIN) + 1):
                table[min(max(c, 0), 2 * k + 1)] = AMBIGUOUS
        _tables[key] = table.to(device)
    return _tables[key]


def _pair_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[256]`` int64: for each byte, the fp32 code values of its high and low nibble, bit-cast to one int64."""
    key = ("pairs", tuple(code.tolist()), device)
    if key not in _tables:
        pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()  # [256, 2]
        _tables[key] = pairs.view(torch.int64).reshape(256).to(device)
    return _tables[key]


def quantize_4bit_codes(
    flat: torch.Tensor, blocksize: int, midpoints: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 4-bit quantization of whole blocks, equal to ``nf4.quantize_codes_reference``.

    Args:
        flat (torch.Tensor): ``[n]`` bf16 / fp16 / fp32 with ``n % blocksize == 0``.
        blocksize (int): Elements per block (even).
        midpoints (torch.Tensor): ``[15]`` fp32 midpoints between the code values in ascending order.
        order (torch.Tensor): ``[16]`` int64, sorted slot -> 4-bit code.

    Returns:
        tuple: ``packed`` ``[n // 2]`` uint8 and ``absmax`` ``[n // blocksize]`` fp32. If some block's absmax is
        NaN or Inf, the kernel stops: ``absmax`` then holds that value and ``packed`` is incomplete; the caller
        must check ``absmax``.
    """
    n = flat.numel()
    device = flat.device
    x = flat.view(-1, blocksize)  # [blocks, bs]
    packed = torch.empty(n // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n // blocksize, dtype=torch.float32, device=device)
    scale = torch.empty(n // blocksize, dtype=torch.float32, device=device)  # 1 / absmax, as the reference
    table = _cell_table(midpoints, order, device)
    offset = torch.tensor(float(CELLS_PER_UNIT), device=device)
    flagged: list[torch.Tensor] = []  # int64 words (8 codes each) to redo exactly; list.append is thread-safe

    def work(start: int, stop: int) -> None:
        rows = slice(start // blocksize, stop // blocksize)
        xs = x[rows]  # [rows, bs]
        am = torch.maximum(xs.amax(dim=1), -xs.amin(dim=1)).float()  # [rows] exact; NaN / Inf propagate
        absmax[rows] = am
        if not bool(torch.isfinite(am).all()):
            raise _NonFinite
        r = 1.0 / am.clamp(min=1e-38)  # the reference's expression, so fix-ups match bit for bit
        scale[rows] = r
        r_cells = r * CELLS_PER_UNIT  # exact (power of two) unless it overflows for a tiny absmax
        degenerate = ~torch.isfinite(r_cells)  # all-zero blocks or absmax < ~5e-35
        cells = torch.addcmul(offset, xs, torch.where(degenerate, 0.0, r_cells)[:, None]).to(torch.int32)
        codes = table.index_select(0, cells.view(-1))  # [rows * bs] uint8, in [0, 2K + 1] -> code or 255
        if bool(degenerate.any()):
            codes.view(-1, blocksize)[degenerate] = AMBIGUOUS
        # a uint8 255 sets the top bit of its byte within an int64 word: find the flags 8 codes at a time
        words = torch.nonzero(codes.view(torch.int64) & _TOP_BITS)  # [k, 1]
        if words.numel():
            flagged.append(words.view(-1) + start // 8)
        pairs = codes.view(-1, 2)  # (high, low) nibble of each byte; a flagged byte is rewritten below
        torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=packed[start // 2 : stop // 2])

    try:
        _run_chunks(work, n, blocksize, device)
    except _NonFinite:
        return packed, absmax
    if flagged:  # redo each flagged word's 8 codes with the reference formula and rewrite its 4 bytes
        words = torch.cat(flagged)  # [k]
        pos = words[:, None] * 8 + torch.arange(8, device=device)  # [k, 8] element positions
        u = torch.clamp(flat[pos].float() * scale[pos // blocksize], -1, 1)
        codes = order.to(device)[torch.bucketize(u, midpoints.to(device))].to(torch.uint8)  # [k, 8]
        packed[words[:, None] * 4 + torch.arange(4, device=device)] = codes[:, 0::2] * 16 + codes[:, 1::2]
    return packed, absmax


def dequantize_4bit_codes(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size,
    blocksize: int,
    code: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``code[idx] * absmax`` in fp32, cast to ``dtype``; equal to ``nf4.dequantize_codes_reference``.

    Args:
        packed (torch.Tensor): ``[(n + 1) // 2]`` uint8, high nibble = even element.
        absmax (torch.Tensor): ``[ceil(n / blocksize)]`` fp32.
        shape (torch.Size): Output shape (``n`` elements).
        blocksize (int): Elements per block (even).
        code (torch.Tensor): ``[16]`` fp32 code values indexed by 4-bit code.
        dtype (torch.dtype): Output dtype.
        out (torch.Tensor | None): Contiguous ``shape`` tensor of ``dtype`` to write into. Default: a new one.

    Returns:
        torch.Tensor: ``shape`` in ``dtype``.
    """
    device = packed.device
    if out is None:
        out = empty_output(shape, dtype, device)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    flat_out = out.view(-1)
    n = flat_out.numel()
    full = n - n % blocksize
    pairs = _pair_table(code, device)
    scales = absmax[:, None]  # [blocks, 1]
    out_blocks = flat_out[:full].view(-1, blocksize)  # [full blocks, bs]

    def work(start: int, stop: int) -> None:
        rows = slice(start // blocksize, stop // blocksize)
        idx = packed[start // 2 : stop // 2].to(torch.int32)
        values = pairs.index_select(0, idx).view(torch.float32).view(-1, blocksize)  # [rows, bs] fp32
        torch.mul(values, scales[rows], out=out_blocks[rows])  # fp32 product, one rounding to dtype

    _run_chunks(work, full, blocksize, device)
    if full < n:  # the partial last block
        tail = packed[full // 2 :]
        idx = torch.stack([tail >> 4, tail & 0xF], dim=1).view(-1)[: n - full].long()
        flat_out[full:] = code.to(device)[idx] * absmax[-1]
    return out
