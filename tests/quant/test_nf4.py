"""NF4 / FP4 quantization: byte-for-byte parity with bitsandbytes on CPU, the fast kernels vs the reference, errors."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from lorakit.errors import QuantizationError
from lorakit.quant import fast, nf4

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# random, odd, not divisible by 64, smaller than one block, one row
SHAPES = [(64, 128), (300, 301), (33, 100), (7,), (65,), (1, 63)]
_bnb_dequantize_reference = _dequantize_4bit_compute.__wrapped__


def _bnb_quantize(w, blocksize, quant_type, double_quant):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def _bnb_dequantize(packed, state):
    """bnb's dequantize_4bit through its pure-torch reference (blocks over the flat tensor).

    Its public CPU path runs a C kernel whose result, on some CPUs and bnb versions, is wrong when a block straddles
    two rows (bnb 0.50.2 on AVX-512 machines), so that path is only compared where blocks align with rows.
    The reference is called unwrapped: bnb wraps it in torch.compile, which would recompile for every shape.
    """
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnbf.get_4bit_type(state.quant_type, device="cpu")
    flat = packed.view(-1)
    values = _bnb_dequantize_reference(flat, absmax, code, state.blocksize, state.shape, state.dtype)
    shape = state.shape
    if len(shape) == 2 and shape[-1] % 2 == 0 and shape[-1] % state.blocksize == 0:
        assert torch.equal(bnbf.dequantize_4bit(packed, state), values)
    return values


def _assert_same_as_bnb(w, blocksize, quant_type, double_quant, reference):
    packed, state = nf4.quantize_4bit(w, blocksize, quant_type, double_quant, reference=reference)
    bnb_packed, bnb_state = _bnb_quantize(w, blocksize, quant_type, double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(packed, bnb_packed.view(-1))  # bnb stores [(n + 1) // 2, 1]
    assert torch.equal(state.absmax, bnb_state.absmax)
    if double_quant:
        assert state.absmax.dtype == torch.uint8
        assert torch.equal(state.nested_absmax, bnb_state.state2.absmax)
        assert torch.equal(state.offset, bnb_state.offset)
    ours = nf4.dequantize_4bit(packed, state, reference=reference)
    assert ours.shape == w.shape and ours.dtype == w.dtype
    assert torch.equal(ours.reshape(-1), _bnb_dequantize(bnb_packed, bnb_state).reshape(-1))


def test_code_books_equal_bnb():
    assert torch.equal(nf4.NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.FP4_CODE, bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(nf4.create_dynamic_map(signed=True), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(nf4.create_dynamic_map(signed=False), bnbf.create_dynamic_map(signed=False))
    signed = nf4.DYNAMIC_MAP_SIGNED
    assert signed.shape == (256,) and signed[-1] == 1.0 and (signed == 0).sum() == 1 and signed[0] > -1.0


def test_nf4_zero_is_exact_and_codes_sorted():
    assert nf4.NF4_CODE[7] == 0.0 and nf4.NF4_CODE[0] == -1.0 and nf4.NF4_CODE[15] == 1.0
    assert torch.all(nf4.NF4_CODE[1:] > nf4.NF4_CODE[:-1])
    values, midpoints, order = nf4.sorted_code_book("fp4")
    assert torch.equal(nf4.FP4_CODE[order], values)
    assert order[:9].tolist() == [11, 10, 13, 12, 15, 14, 9, 0, 8]  # +0 (code 0) sorts before -0 (code 8)
    assert torch.equal(midpoints, (values[1:] + values[:-1]) / 2)


def test_first_element_goes_in_the_high_nibble():
    w = torch.tensor([-1.0, 1.0, 0.0, 0.5] + [0.0] * 60)
    packed, _ = nf4.quantize_4bit(w, double_quant=False)
    assert packed[:2].tolist() == [0x0F, 0x7C]  # codes (0, 15), (7, 12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_parity_with_bnb(shape, quant_type, double_quant, blocksize):
    for i, dtype in enumerate(DTYPES):
        w = (torch.randn(shape) * (0.02 + i)).to(dtype)
        for reference in (True, False):
            _assert_same_as_bnb(w, blocksize, quant_type, double_quant, reference)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_parity_with_bnb_real_shapes(quant_type):
    # TinyLlama's MLP (5632 x 2048) and a head-sized odd tensor, bf16 like a checkpoint
    for shape in [(5632, 2048), (32001, 96)]:
        w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        _assert_same_as_bnb(w, 64, quant_type, double_quant=True, reference=False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_and_cell_edges_match_reference_and_bnb(quant_type):
    """Values exactly on midpoints go to the lower code; the fast kernel's cells must not change that."""
    _, midpoints, _ = nf4.sorted_code_book(quant_type)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    # points near the fast kernel's cell edges
    grid = torch.arange(-(2**17), 2**17 + 1, 3, dtype=torch.float32) / 2**17
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])
    near = [midpoints, midpoints.nextafter(up), midpoints.nextafter(down), grid, grid.nextafter(up)]
    u = torch.cat([special, *near])
    u = torch.cat([u.clamp(-1, 1), torch.zeros(-u.numel() % 63)]).view(-1, 63)
    blocks = torch.cat([torch.ones(u.shape[0], 1), u], dim=1)  # absmax 1: the scaled value is u itself
    for scale in (1.0, 3.7, 1e-20):
        w = blocks.reshape(-1) * scale
        _assert_same_as_bnb(w, 64, quant_type, double_quant=False, reference=True)
        _assert_same_as_bnb(w, 64, quant_type, double_quant=False, reference=False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_and_tiny_blocks(quant_type):
    w = torch.zeros(64 * 40 + 5)
    w[64:128] = 1e-36 * torch.randn(64)  # r * K overflows: the fast kernel must redo this block exactly
    w[300] = 1e-37
    for double_quant in (False, True):
        _assert_same_as_bnb(w, 64, quant_type, double_quant, reference=False)
    packed, state = nf4.quantize_4bit(torch.zeros(64, 64))
    assert torch.equal(nf4.dequantize_4bit(packed, state), torch.zeros(64, 64))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blocks_that_straddle_rows_decode_with_their_own_scales(quant_type):
    """Blocks run over the flat tensor, not per row: an [8, 96] weight with 64-element blocks has blocks that
    start in one row and end in the next. Each element must decode as code[nibble] x the absmax of its flat
    block (high nibble first), and equal bnb's pure-torch reference decode of bnb's own bytes."""
    w = torch.randn(8, 96)
    packed, state = nf4.quantize_4bit(w, 64, quant_type, double_quant=False)
    ours = nf4.dequantize_4bit(packed, state)
    nibbles = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: w.numel()].long()
    code = nf4.NF4_CODE if quant_type == "nf4" else nf4.FP4_CODE
    scales = state.absmax.repeat_interleave(64)[: w.numel()]
    torch.testing.assert_close(ours.reshape(-1), code[nibbles] * scales, rtol=0, atol=0)
    # The largest gap between neighbouring codes bounds the rounding error of each block.
    half_gap = float((code.sort().values.diff().max()) / 2)
    assert ((ours - w).abs().reshape(-1) <= half_gap * scales + 1e-6).all()
    bnb_packed, bnb_state = _bnb_quantize(w, 64, quant_type, double_quant=False)
    assert torch.equal(ours, _bnb_dequantize(bnb_packed, bnb_state))


def test_absmax_codes_use_bnb_cpu_rounding():
    """The 8-bit absmax quantizer equals bnb's CPU quantize_blockwise (grid of 65536 points), partial block included."""
    x = torch.cat([torch.randn(256 * 20 + 77), torch.zeros(256)])
    codes, absmax = nf4.quantize_blockwise_8bit(x)
    bnb_codes, bnb_state = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, bnb_codes) and torch.equal(absmax, bnb_state.absmax)
    decoded = nf4.dequantize_blockwise_8bit(codes, absmax)
    assert torch.equal(decoded, bnbf.dequantize_blockwise(bnb_codes, bnb_state))


def test_bits_per_parameter():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    _, dq = nf4.quantize_4bit(w)
    _, plain = nf4.quantize_4bit(w, double_quant=False)
    assert dq.bits_per_parameter() == pytest.approx(4.127, abs=1e-3)
    assert plain.bits_per_parameter() == 4.5
    assert dq.double_quant and not plain.double_quant


def test_dequantize_shape_dtype_and_out():
    w = torch.randn(3, 5, 7, dtype=torch.float16)
    packed, state = nf4.quantize_4bit(w, blocksize=32)
    assert state.shape == w.shape and state.dtype == torch.float16
    full = nf4.dequantize_4bit(packed, state, torch.float32)
    assert full.shape == (3, 5, 7) and full.dtype == torch.float32
    assert torch.equal(nf4.dequantize_4bit(packed, state), full.half())
    out = torch.empty(3, 5, 7, dtype=torch.bfloat16)
    assert nf4.dequantize_4bit(packed, state, torch.bfloat16, out=out) is out
    assert torch.equal(out, full.bfloat16())
    # NF4 keeps the error small relative to each block's absmax
    assert (full - w.float()).abs().max() < 0.2 * w.abs().max()


@pytest.mark.parametrize("chunk", [1024, fast._CPU_CHUNK])
def test_fast_and_reference_agree_on_many_blocks(monkeypatch, chunk):
    monkeypatch.setattr(fast, "_CPU_CHUNK", chunk)  # 1024: hundreds of chunks shared by the worker threads
    w = torch.randn(1000, 1030) * torch.rand(1000, 1)  # rows of very different scales
    w[5, :64] = 0.0  # an all-zero block
    for quant_type in ("nf4", "fp4"):
        ours = nf4.quantize_4bit(w, quant_type=quant_type)
        ref = nf4.quantize_4bit(w, quant_type=quant_type, reference=True)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1].absmax, ref[1].absmax)
        for dtype in DTYPES:
            assert torch.equal(
                nf4.dequantize_4bit(*ours, dtype), nf4.dequantize_4bit(*ref, dtype, reference=True)
            )


def test_fast_kernels_keep_torch_thread_count():
    threads = torch.get_num_threads()
    nf4.dequantize_4bit(*nf4.quantize_4bit(torch.randn(1024, 1024)))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("weight", "kwargs", "message"),
    [
        (torch.tensor([1.0, float("nan"), 2.0]), {}, "not finite \\(NaN\\); first at index \\(1,\\)"),
        (torch.full((4, 70), float("inf")), {}, "280 of 280 values are not finite \\(Inf\\)"),
        (torch.arange(64), {}, "dtype torch.int64 is not supported"),
        (torch.randn(64, dtype=torch.float64), {}, "dtype torch.float64 is not supported"),
        (torch.randn(64), {"blocksize": 48}, "blocksize=48 is not supported"),
        (torch.randn(64), {"blocksize": 8192}, "blocksize=8192"),
        (torch.randn(64), {"quant_type": "int4"}, "quant_type='int4'"),
        (torch.empty(0, 4), {}, "it is empty"),
    ],
)
def test_errors_name_the_tensor(weight, kwargs, message):
    with pytest.raises(QuantizationError, match=f"'layers.0.q_proj.weight': .*{message}"):
        nf4.quantize_4bit(weight, name="layers.0.q_proj.weight", **kwargs)


def test_nan_in_a_later_block_is_caught_by_the_fast_kernel():
    w = torch.randn(2048, 512)
    w[1500, 7] = float("nan")
    with pytest.raises(QuantizationError, match="first at index \\(1500, 7\\)"):
        nf4.quantize_4bit(w)
    with pytest.raises(ValueError):  # QuantizationError is also a ValueError
        nf4.quantize_4bit(w)


def test_dequantize_rejects_wrong_storage():
    packed, state = nf4.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(QuantizationError, match="expected 2048 uint8 bytes"):
        nf4.dequantize_4bit(packed[:-1], state)
    with pytest.raises(QuantizationError, match="expected 2048 uint8 bytes"):
        nf4.dequantize_4bit(packed.float(), state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_matches_cpu(quant_type):
    w = (torch.randn(1000, 333) * 0.02).to(torch.bfloat16)
    for reference in (True, False):
        packed, state = nf4.quantize_4bit(w, 64, quant_type, double_quant=False, reference=reference)
        packed_gpu, state_gpu = nf4.quantize_4bit(
            w.cuda(), 64, quant_type, double_quant=False, reference=reference
        )
        assert torch.equal(packed_gpu.cpu(), packed) and torch.equal(state_gpu.absmax.cpu(), state.absmax)
        for dtype in DTYPES:
            expected = nf4.dequantize_4bit(packed, state, dtype)
            assert torch.equal(
                nf4.dequantize_4bit(packed_gpu, state_gpu, dtype, reference=reference).cpu(), expected
            )
    # with double quantization the offset is a mean, whose summation order differs on CUDA by an ulp or so
    packed, state = nf4.quantize_4bit(w, 64, quant_type)
    packed_gpu, state_gpu = nf4.quantize_4bit(w.cuda(), 64, quant_type)
    assert torch.equal(packed_gpu.cpu(), packed)
    torch.testing.assert_close(state_gpu.offset.cpu(), state.offset, rtol=1e-6, atol=0)
    absmax, absmax_gpu = nf4.dequantize_absmax(state), nf4.dequantize_absmax(state_gpu).cpu()
    torch.testing.assert_close(absmax_gpu, absmax, rtol=1e-2, atol=0)


def test_large_fresh_outputs_are_advised_for_huge_pages_within_their_own_bytes(monkeypatch):
    calls = []
    monkeypatch.setattr(
        fast, "_libc", [lambda start, length, advice: calls.append((start.value, length.value, advice))]
    )
    small = fast.empty_output(
        torch.Size([1024, 1024]), torch.bfloat16, torch.device("cpu")
    )  # 2 MB: left alone
    assert calls == []
    big = fast.empty_output(torch.Size([4096, 1024]), torch.bfloat16, torch.device("cpu"))  # 8 MB
    ((start, length, advice),) = calls
    assert advice == 14 and start % (1 << 21) == 0 and length % (1 << 21) == 0 and length >= 3 << 21
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + big.numel() * 2
    assert small.shape == (1024, 1024) and big.dtype == torch.bfloat16
    # the advice changes no value: dequantizing into an advised output equals the reference
    weight = torch.randn(4096, 1024)
    packed, state = nf4.quantize_4bit(weight)
    torch.testing.assert_close(
        nf4.dequantize_4bit(packed, state), nf4.dequantize_4bit(packed, state, reference=True), rtol=0, atol=0
    )
