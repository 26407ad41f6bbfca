"""Per-sample attention over padding-free rows (lorakit.attention) against transformers' SDPA with its mask."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM

import lorakit
from lorakit.attention import (
    KEYWORD,
    NAME,
    disable_segment_attention,
    enable_segment_attention,
    segment_spans,
    uses_segment_attention,
)
from lorakit.loss import causal_lm_loss_sum
from lorakit.train import train
from train_fixtures import make_workspace, tiny_recipe

from tiny_models import BUILDERS

LENGTHS = [5, 9, 1, 7, 4]  # a one-token sample too: its only key is itself


def padding_free_batch(lengths: list[int], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt without loss
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The query lengths of every SDPA call the model makes."""
    lengths: list[int] = []
    original = sdpa_module.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        lengths.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", spy)  # what lorakit.attention calls
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)  # what the "sdpa" models call
    return lengths


def test_spans_follow_the_position_resets():
    positions = torch.tensor([[0, 1, 2, 0, 0, 1]])
    assert segment_spans(positions) == ((0, 3), (3, 4), (4, 6))
    assert segment_spans(positions.repeat(3, 1)) == ((0, 3), (3, 4), (4, 6))  # a pack's copies of one row
    assert segment_spans(torch.tensor([[0, 1, 2, 0], [0, 1, 0, 1]])) is None  # rows laid out differently
    assert segment_spans(torch.arange(6)[None]) == ((0, 6),)  # one sample: one span
    assert segment_spans(torch.tensor([[2, 3, 0, 1]])) is None  # does not start a sample


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # qwen2: grouped-query attention
def test_per_sample_attention_gives_the_loss_and_gradients_of_sdpa(arch, sdpa_calls):
    base = BUILDERS[arch]()
    model = lorakit.wrap(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = padding_free_batch(LENGTHS, base.config.vocab_size)
    results = []
    for enabled in (False, True):
        if enabled:
            assert enable_segment_attention(model) and uses_segment_attention(model)
        sdpa_calls.clear()
        loss_sum, count = causal_lm_loss_sum(model, batch)
        results.append((loss_sum / count, torch.autograd.grad(loss_sum / count, params), list(sdpa_calls)))
    (ref, ref_grads, ref_calls), (ours, grads, calls) = results
    layers = base.config.num_hidden_layers
    assert ref_calls == [sum(LENGTHS)] * layers  # SDPA: the whole row, with the block mask
    assert calls == LENGTHS * layers  # per sample: one call of each sample's length per layer
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_shorter_than_a_sample_keeps_the_mask(sdpa_calls):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0,
    )  # fmt: skip
    base = Qwen2ForCausalLM(config).eval()
    assert set(base.config.layer_types) == {"sliding_attention"}
    batch = padding_free_batch(LENGTHS, base.config.vocab_size)
    with torch.no_grad():
        ref = causal_lm_loss_sum(base, batch)[0]
        assert enable_segment_attention(base)
        sdpa_calls.clear()
        ours = causal_lm_loss_sum(base, batch)[0]
    assert sdpa_calls == [sum(LENGTHS)] * base.config.num_hidden_layers  # 9 > 4: SDPA's windowed mask
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_other_attention_implementations_are_left_alone_and_disable_restores_sdpa():
    eager = BUILDERS["llama"]()
    eager.config._attn_implementation = "eager"
    assert not enable_segment_attention(eager) and eager.config._attn_implementation == "eager"
    deaf = BUILDERS["llama"]()  # a decoder that drops the keyword: no call takes the per-sample path
    forward = deaf.model.forward
    deaf.model.forward = lambda *args, **kwargs: forward(
        *args, **{k: v for k, v in kwargs.items() if k != KEYWORD}
    )
    assert not enable_segment_attention(deaf) and deaf.config._attn_implementation == "sdpa"
    model = BUILDERS["llama"]()
    assert enable_segment_attention(model) and model.config._attn_implementation == NAME
    disable_segment_attention(model)
    assert model.config._attn_implementation == "sdpa" and not uses_segment_attention(model)


def test_the_training_loop_runs_attention_per_sample(tmp_path, sdpa_calls):
    recipe = tiny_recipe(make_workspace(tmp_path / "ws"), "train.max_steps=2", "train.batch_size=4")
    train(recipe, progress=False)
    assert sdpa_calls and min(sdpa_calls) < max(sdpa_calls)  # per-sample calls, not one per padded row


def test_under_bf16_autocast_the_per_sample_attention_runs_in_fp32_and_stays_close(monkeypatch):
    base = BUILDERS["qwen2"]().to(torch.bfloat16)
    model = lorakit.wrap(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = padding_free_batch(LENGTHS, base.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = causal_lm_loss_sum(model, batch)[0]
        assert enable_segment_attention(model)
        dtypes = []
        original = sdpa_module.sdpa_attention_forward
        spy = lambda module, query, *a, **k: dtypes.append(query.dtype) or original(module, query, *a, **k)  # noqa: E731
        monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", spy)
        ours = causal_lm_loss_sum(model, batch)[0]
    assert dtypes and set(dtypes) == {torch.float32}  # CPU: fp32 inside (faster backward), bf16 out
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0)
