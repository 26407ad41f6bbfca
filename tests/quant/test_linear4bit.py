"""Linear4bit: forward / backward against the dequantized reference and bitsandbytes, saved tensors, dtype moves, files."""

import io
import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import QuantizationError
from lorakit.quant import Linear4bit, quantize_4bit

COMPUTE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# tolerance of the 4-bit layer's input gradient (in its compute dtype) against an fp32 matmul
GRAD_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _layer(in_features=192, out_features=80, bias=True, **kwargs):
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, Linear4bit.from_linear(linear, **kwargs)


def test_from_linear_builds_a_frozen_4bit_layer():
    linear, layer = _layer(quant_type="fp4", blocksize=32)
    assert (layer.in_features, layer.out_features, layer.quant_type, layer.blocksize) == (192, 80, "fp4", 32)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight_numel == 192 * 80
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.shape == (192 * 80 // 2,)
    assert layer.weight_absmax.dtype == torch.uint8  # double quantization on by default
    assert layer.weight_nested_absmax.dtype == torch.float32 and layer.weight_offset.shape == ()
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not layer.bias.requires_grad and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.bias, linear.bias.detach().bfloat16())
    text = repr(layer)
    for part in ("in_features=192", "out_features=80", "quant_type=fp4", "blocksize=32", "double_quant=True"):
        assert part in text
    assert "bits_per_parameter=4.2" in text  # 4 + 8/32 + 32/(32*256) + the offset


def test_dequantize_equals_the_functional_api():
    linear, layer = _layer(double_quant=False)
    packed, state = quantize_4bit(linear.weight, double_quant=False)
    assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.weight_absmax, state.absmax)
    weight = layer.dequantize(torch.float32)
    assert weight.shape == (80, 192)
    assert (weight - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()
    assert layer.dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_gradient(compute_dtype, bias):
    _, layer = _layer(bias=bias, compute_dtype=compute_dtype)
    x = torch.randn(3, 5, 192, requires_grad=True)  # fp32 input: cast to the compute dtype inside
    y = layer(x)
    assert y.dtype == compute_dtype and y.shape == (3, 5, 80)
    weight = layer.dequantize()
    assert torch.equal(y, F.linear(x.detach().to(compute_dtype), weight, layer.bias))
    g = torch.randn_like(y)
    y.backward(g)
    expected = g.float() @ layer.dequantize(torch.float32)  # [3, 5, 80] @ [80, 192]
    torch.testing.assert_close(x.grad, expected, rtol=GRAD_TOL[compute_dtype], atol=GRAD_TOL[compute_dtype])
    assert all(buf.grad is None for buf in layer.buffers())


def test_layers_sharing_the_cpu_scratch_buffer_stay_independent():
    # training order: forward A, forward B, backward B, backward A; every matmul reuses one dequant buffer
    _, a = _layer(192, 80, compute_dtype=torch.float32)
    _, b = _layer(80, 300, compute_dtype=torch.float32)
    x = torch.randn(6, 192, requires_grad=True)
    h = a(x)
    y = b(h)
    y.sum().backward()
    weight_a, weight_b = a.dequantize(), b.dequantize()
    torch.testing.assert_close(y, (x @ weight_a.T + a.bias) @ weight_b.T + b.bias)
    torch.testing.assert_close(x.grad, torch.ones(6, 300) @ weight_b @ weight_a)


def test_double_backward_does_not_keep_the_scratch_buffer():
    _, a = _layer(192, 80, compute_dtype=torch.float32)
    _, b = _layer(192, 80, compute_dtype=torch.float32)
    x = torch.randn(3, 192, requires_grad=True)
    (grad,) = torch.autograd.grad((a(x) ** 2).sum(), x, create_graph=True)
    b(x).sum().backward(retain_graph=True)  # reuses the CPU scratch buffer for b's weight
    x.grad = None
    grad.sum().backward()  # needs a's weight again
    weight = a.dequantize()  # [80, 192]
    # grad = 2 (x Wᵀ + b) W, so d sum(grad) / dx = 2 (W 1)ᵀ W for every row
    torch.testing.assert_close(x.grad, (2 * weight.sum(dim=1) @ weight).expand(3, 192))


def test_unfrozen_bias_gets_its_gradient():
    _, layer = _layer(compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 192)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((80,), 4.0))


def test_autograd_saves_only_the_4bit_data():
    _, layer = _layer(in_features=256, out_features=128)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(8, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (torch.uint8, 256 * 128 // 2) in saved  # the packed codes
    assert all(not dtype.is_floating_point or numel < 256 * 128 // 8 for dtype, numel in saved), saved
    y.sum().backward()
    assert x.grad.shape == (8, 256)


def test_matches_bnb_matmul_4bit_forward_and_backward():
    linear = nn.Linear(256, 128).to(torch.bfloat16)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    bnb_packed, bnb_state = bnbf.quantize_4bit(linear.weight.data, quant_type="nf4", compress_statistics=True)
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    x_ours, x_bnb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours = layer(x_ours)
    y_bnb = bnb.matmul_4bit(x_bnb, bnb_packed.t(), bnb_state, bias=layer.bias)
    assert torch.equal(y_ours, y_bnb)
    g = torch.randn_like(y_ours)
    y_ours.backward(g)
    y_bnb.backward(g)
    assert torch.equal(x_ours.grad, x_bnb.grad)


def test_half_and_to_dtype_keep_the_quant_storage_exact():
    _, layer = _layer()
    before = {name: buf.clone() for name, buf in layer.named_buffers()}
    weight = layer.dequantize(torch.float32)
    layer.half()
    assert layer.compute_dtype == torch.float16 and layer.bias.dtype == torch.float16
    for name, buf in layer.named_buffers():
        assert buf.dtype == before[name].dtype and torch.equal(buf, before[name]), name
    assert torch.equal(layer.dequantize(torch.float32), weight)
    assert layer(torch.randn(2, 192)).dtype == torch.float16
    layer.to(torch.float32)
    assert layer.compute_dtype == torch.float32 and torch.equal(layer.weight_offset, before["weight_offset"])
    layer.to("cpu")  # a device move keeps the compute dtype
    assert layer.compute_dtype == torch.float32


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    _, layer = _layer(double_quant=double_quant, quant_type="fp4")
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = Linear4bit(192, 80, quant_type="fp4", double_quant=double_quant)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 192)
    assert torch.equal(fresh(x), layer(x))
    other = Linear4bit(192, 80, quant_type="fp4", double_quant=not double_quant)
    with pytest.raises((QuantizationError, RuntimeError)):  # dtype mismatch, or missing / unexpected keys
        other.load_state_dict(layer.state_dict())


def test_loading_scales_of_the_wrong_dtype_is_refused():
    _, layer = _layer(double_quant=False)
    state = layer.state_dict()
    state["weight_absmax"] = state["weight_absmax"].to(torch.uint8)
    with pytest.raises(QuantizationError, match=r"'weight_absmax': the checkpoint stores torch\.uint8"):
        Linear4bit(192, 80, double_quant=False).load_state_dict(state)


def test_errors():
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[3, 5] = float("inf")
    where = re.escape("'model.layers.0.mlp.up_proj.weight': ")
    with pytest.raises(QuantizationError, match=where + r".*first at index \(3, 5\)"):
        Linear4bit.from_linear(linear, name="model.layers.0.mlp.up_proj")
    with pytest.raises(QuantizationError, match=r"expected nn\.Linear, got Conv1d"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(QuantizationError, match="blocksize=100"):
        Linear4bit(64, 32, blocksize=100)
    with pytest.raises(QuantizationError, match="compute_dtype"):
        Linear4bit(64, 32, compute_dtype=torch.int8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
def test_cuda_forward_backward_match_cpu(compute_dtype):
    linear = nn.Linear(1024, 384)
    cpu = Linear4bit.from_linear(linear, compute_dtype=compute_dtype)
    gpu = Linear4bit.from_linear(linear.cuda(), compute_dtype=compute_dtype)
    assert torch.equal(gpu.weight_packed.cpu(), cpu.weight_packed)
    # quantized on CPU, then moved: .cuda() must carry every buffer
    moved = Linear4bit.from_linear(linear.cpu(), compute_dtype=compute_dtype).cuda()
    assert moved.weight_packed.is_cuda and torch.equal(moved.dequantize().cpu(), cpu.dequantize())
    x = torch.randn(32, 1024)
    x_cpu, x_gpu = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    y_cpu, y_gpu = cpu(x_cpu), moved(x_gpu)
    tol = GRAD_TOL[compute_dtype] * 5
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=tol, atol=tol)
    g = torch.randn_like(y_cpu)
    y_cpu.backward(g)
    y_gpu.backward(g.cuda())
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=tol, atol=tol)
