"""GGUF in and out: round trips through transformers' GGUF reader, the llama.cpp LoRA layout, bad files.

Every model here is a tiny random Llama (GQA: 4 query heads, 2 key/value heads, untied output head) with a
byte-level BPE tokenizer, written by the test; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.export import merged_model
from lorakit.gguf_read import permute_qk
from lorakit.loading import load_tokenizer

from tokenizer_factory import build_tokenizer

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tiny_models import write_causal_lm_dir  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 40, 77, 100, 3, 250, 17]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base directory, a trained-looking LoRA adapter on all seven projections (B nonzero), and the exports."""
    root = tmp_path_factory.mktemp("gguf")
    base = write_causal_lm_dir(root / "base", build_tokenizer())
    model = lorakit.load_model(base, quantize=None, compute_dtype="float32")
    lorakit.wrap(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    lorakit.save_adapter(model, root / "adapter")
    for quant in ("f16", "q8_0"):
        args = ["export", "--model", str(base), "--adapter", str(root / "adapter"), "--format", "gguf"]
        assert main([*args, "--quant", quant, "--out", str(root / f"{quant}.gguf")]) == 0
    assert main([*args, "--adapter-only", "--out", str(root / "lora.gguf")]) == 0
    return root


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _reference(run, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The merged lorakit model's logits, its weights optionally rounded to ``dtype`` as the file stores them."""
    merged, _ = merged_model(str(run / "base"), [str(run / "adapter")], None)
    if dtype is not None:
        with torch.no_grad():
            for param in merged.parameters():
                if param.ndim >= 2:  # matrices are stored in dtype; norms stay f32 in the file
                    param.copy_(param.to(dtype).float())
    return _logits(merged)


def _transformers_gguf(run, name: str):
    return AutoModelForCausalLM.from_pretrained(str(run), gguf_file=name, dtype=torch.float32).eval()


def test_f16_export_loads_back_through_transformers_with_the_merged_logits(run):
    got = _logits(_transformers_gguf(run, "f16.gguf"))
    # The file stores each matrix rounded to f16 once (relative error <= 2^-11); with the same rounding applied to
    # the merged model the two compute the same function, so they agree to float32 round-off.
    torch.testing.assert_close(got, _reference(run, torch.float16), atol=1e-5, rtol=1e-5)
    # Against the float32 merged model the only difference is that rounding: 2^-11 relative per weight, through
    # two layers, stays well under 1e-2 on logits of magnitude ~2.
    torch.testing.assert_close(got, _reference(run), atol=1e-2, rtol=0)


def test_q8_0_export_is_within_its_quantization_error(run):
    got, exact = _logits(_transformers_gguf(run, "q8_0.gguf")), _reference(run)
    # Q8_0: 32-weight blocks, one f16 scale, int8 codes: at most 1/254 of a block's max per weight. Measured on
    # this model: max logit error ~0.05 with logits up to ~2; the bound below is 2x that and still catches a
    # wrong permutation or scale (errors of order 1).
    assert (got - exact).abs().max() < 0.1
    assert (got - exact).abs().max() > 0  # it is quantized


def test_lorakit_reads_its_gguf_as_transformers_does(run):
    mine = lorakit.load_model(run / "f16.gguf", quantize=None, compute_dtype="float32")
    torch.testing.assert_close(_logits(mine), _logits(_transformers_gguf(run, "f16.gguf")), atol=0, rtol=0)
    same = lorakit.load_model(run, gguf_file="f16.gguf", quantize=None, compute_dtype="float32")
    torch.testing.assert_close(_logits(same), _logits(mine), atol=0, rtol=0)


def test_gguf_loads_straight_to_nf4(run):
    """Streamed to NF4 tensor by tensor = the dense GGUF model quantized afterwards, bit for bit."""
    from lorakit.quantize import quantize_model

    streamed = lorakit.load_model(run / "f16.gguf", quantize="nf4", compute_dtype="float32")
    assert isinstance(streamed.model.layers[0].self_attn.q_proj, lorakit.quant.Linear4bit)
    dense = lorakit.load_model(run / "f16.gguf", quantize=None, compute_dtype="float32")
    after = quantize_model(dense, "nf4", compute_dtype=torch.float32)
    torch.testing.assert_close(_logits(streamed), _logits(after), atol=0, rtol=0)


def test_the_tokenizer_and_chat_template_travel_in_the_file(run):
    original = AutoTokenizer.from_pretrained(run / "base")
    read = load_tokenizer(run / "f16.gguf")
    text = "Hello, how are you? <|im_start|>user"
    assert read(text).input_ids == original(text).input_ids
    assert read.chat_template == original.chat_template
    assert read.eos_token == original.eos_token


def _adapter_tensors(adapter) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def test_gguf_lora_file_has_llama_cpp_names_shapes_and_values(run):
    reader = gguf.GGUFReader(run / "lora.gguf")
    assert reader.fields[gguf.Keys.General.TYPE].contents() == gguf.GGUFType.ADAPTER
    assert reader.fields[gguf.Keys.Adapter.TYPE].contents() == "lora"
    assert reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents() == 8.0
    assert reader.fields[gguf.Keys.General.ARCHITECTURE].contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    weights, names = _adapter_tensors(run / "adapter"), gguf.TENSOR_NAMES
    projections = {"self_attn.q_proj": (gguf.MODEL_TENSOR.ATTN_Q, 4), "self_attn.k_proj": (gguf.MODEL_TENSOR.ATTN_K, 2),
                   "self_attn.v_proj": (gguf.MODEL_TENSOR.ATTN_V, None), "self_attn.o_proj": (gguf.MODEL_TENSOR.ATTN_OUT, None),
                   "mlp.gate_proj": (gguf.MODEL_TENSOR.FFN_GATE, None), "mlp.up_proj": (gguf.MODEL_TENSOR.FFN_UP, None),
                   "mlp.down_proj": (gguf.MODEL_TENSOR.FFN_DOWN, None)}  # fmt: skip
    assert len(tensors) == 2 * 2 * len(projections)  # 2 layers, A and B each
    for layer in range(2):
        for module, (kind, heads) in projections.items():
            stem = names[kind].format(bid=layer) + ".weight"
            a, b = tensors[stem + ".lora_a"], tensors[stem + ".lora_b"]
            peft = f"base_model.model.model.layers.{layer}.{module}"
            want_a, want_b = weights[f"{peft}.lora_A.weight"], weights[f"{peft}.lora_B.weight"]
            # llama.cpp: ggml shapes A [in, r] and B [r, out] (numpy [r, in] and [out, r]).
            assert list(a.shape) == [want_a.shape[1], want_a.shape[0]]
            assert list(b.shape) == [want_b.shape[1], want_b.shape[0]]
            assert np.array_equal(np.asarray(a.data), want_a.numpy())
            if heads is not None:  # B's rows follow the base's q / k rows, which llama.cpp stores permuted
                want_b = permute_qk(want_b, heads)
            assert np.array_equal(np.asarray(b.data), want_b.numpy())


def test_gguf_lora_applied_to_the_gguf_base_gives_the_merged_weights(run):
    """llama.cpp adds (alpha / r) * B @ A to the file's base weight: that must equal our merged q weight."""
    reader = gguf.GGUFReader(run / "lora.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    base = lorakit.load_model(run / "base", quantize=None, compute_dtype="float32")
    merged, _ = merged_model(str(run / "base"), [str(run / "adapter")], None)
    scale = (
        reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()
        / tensors["blk.0.attn_q.weight.lora_a"].shape[0]
    )
    delta = (
        torch.from_numpy(tensors["blk.0.attn_q.weight.lora_b"] @ tensors["blk.0.attn_q.weight.lora_a"])
        * scale
    )
    file_base = permute_qk(base.model.layers[0].self_attn.q_proj.weight, 4)
    want = permute_qk(merged.model.layers[0].self_attn.q_proj.weight, 4)
    torch.testing.assert_close(file_base + delta, want, atol=1e-6, rtol=1e-6)


def test_export_safetensors_and_peft(run, tmp_path):
    args = ["export", "--model", str(run / "base"), "--adapter", str(run / "adapter")]
    assert main([*args, "--format", "safetensors", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), _reference(run), atol=1e-5, rtol=1e-5)
    assert main([*args, "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    copied = _adapter_tensors(tmp_path / "peft")
    assert copied.keys() == _adapter_tensors(run / "adapter").keys()
    assert all(torch.equal(copied[k], v) for k, v in _adapter_tensors(run / "adapter").items())


def test_export_refuses_an_existing_out_and_a_non_llama_model(run, tmp_path, capsys):
    args = ["export", "--model", str(run / "base"), "--adapter", str(run / "adapter"), "--format", "gguf"]
    assert main([*args, "--out", str(run / "f16.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2)
    from lorakit.gguf_write import check_architecture

    with pytest.raises(ConfigError, match="model_type llama"):
        check_architecture(config)


def _rewrite(run, path, arch: str = "llama", keep=lambda key: True, cut: int = 0):
    """Copy f16.gguf with another architecture name and / or without some keys, or cut off its last bytes."""
    from lorakit.gguf_write import _finish

    source = gguf.GGUFReader(run / "f16.gguf")
    writer = gguf.GGUFWriter(path, arch)
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or not keep(key):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace("llama.", f"{arch}."), field.contents(), kind, sub_type=sub)
    for tensor in source.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    _finish(writer)
    if cut:
        data = path.read_bytes()
        path.write_bytes(data[:-cut])
    return path


def test_unsupported_architecture_is_a_clear_error(run, tmp_path):
    path = _rewrite(run, tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ConfigError, match=r"general.architecture is 'falcon'.*llama"):
        lorakit.load_model(path, quantize=None)


def test_truncated_gguf_is_a_clear_error(run, tmp_path):
    path = _rewrite(run, tmp_path / "cut.gguf", cut=100)
    with pytest.raises(AdapterFileError, match=r"cut\.gguf is not a complete GGUF file: truncated"):
        lorakit.load_model(path, quantize=None)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes((run / "f16.gguf").read_bytes()[:40])
    with pytest.raises(AdapterFileError, match=r"header\.gguf is not a complete GGUF file: truncated"):
        lorakit.load_model(header_only, quantize=None)


def test_gguf_without_tokenizer_is_a_clear_error(run, tmp_path):
    path = _rewrite(run, tmp_path / "bare.gguf", keep=lambda key: not key.startswith("tokenizer."))
    lorakit.load_model(path, quantize=None)  # the weights alone load
    with pytest.raises(AdapterFileError, match="has no tokenizer"):
        load_tokenizer(path)


def test_a_gguf_lora_file_is_not_a_model(run):
    with pytest.raises(ConfigError, match="is a GGUF LoRA adapter"):
        lorakit.load_model(run / "lora.gguf", quantize=None)
