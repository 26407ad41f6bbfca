"""The chunked loss equals transformers' loss and gradients, and never builds the full fp32 logits."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.loss import causal_lm_loss_sum, causal_lm_loss_sums

from tiny_models import BUILDERS, sample_ids


def _batch(seed: int = 3):
    ids = sample_ids(seed=seed, batch=3, length=12)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 9:] = -100  # padding at the end of one row
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_loss_and_grads_equal_transformers(arch, chunk):
    model = lorakit.wrap(
        BUILDERS[arch](), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**batch).loss
    ref_grads = torch.autograd.grad(reference, params)
    loss_sum, count = causal_lm_loss_sum(model, batch, chunked=True, chunk_tokens=chunk)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / count, reference, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(torch.autograd.grad(loss_sum / count, params), ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_chunked_path_projects_only_target_tokens():
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    batch = _batch()
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    causal_lm_loss_sum(model, batch, chunked=True, chunk_tokens=4)
    handle.remove()
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert sum(rows) == n_targets and max(rows) <= 4  # never [batch x seq x vocab]
    # and the backward recomputes chunk by chunk instead of keeping every chunk's logits alive
    rows.clear()
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    loss_sum, _ = causal_lm_loss_sum(model, batch, chunked=True, chunk_tokens=4)
    loss_sum.backward()
    handle.remove()
    assert sum(rows) == 2 * n_targets


@pytest.mark.parametrize("chunk", [4, 7, 1024])
def test_block_sums_equal_each_block_alone_with_chunks_across_blocks(chunk):
    """A pack's loss: each block's sum (and its gradient) is that block's own loss, while the output head's chunks
    run across block boundaries (fewer, larger products)."""
    model = lorakit.wrap(
        BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    blocks = [_batch(seed) for seed in (3, 4, 5)]  # different tokens, the same target layout
    for block in blocks[1:]:
        block["labels"] = torch.where(blocks[0]["labels"] == -100, -100, block["input_ids"])
    packed = {k: torch.cat([b[k] for b in blocks]) for k in ("input_ids", "labels")}
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    sums, count = causal_lm_loss_sums(model, packed, len(blocks), chunked=True, chunk_tokens=chunk)
    handle.remove()
    assert count == int((blocks[0]["labels"][:, 1:] != -100).sum())
    assert len(rows) == -(-len(blocks) * count // chunk)  # chunks over all blocks' targets together
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.tensor([1.0, -2.0, 0.5])  # each block's gradient weighted apart
    ours = torch.autograd.grad((sums * weights).sum(), params)
    expected_sums = [causal_lm_loss_sum(model, block, chunked=True, chunk_tokens=chunk)[0] for block in blocks]
    torch.testing.assert_close(sums, torch.stack(expected_sums).detach(), atol=1e-5, rtol=1e-6)
    theirs = torch.autograd.grad(sum(w * s for w, s in zip(weights, expected_sums)), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_plain_path_for_heads_with_softcapping():
    model = BUILDERS["llama"]()
    model.config.final_logit_softcapping = 30.0  # not a plain projection: the chunked path must not be used
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    causal_lm_loss_sum(model, _batch(), chunked=True)
    handle.remove()
    assert rows == [(3, 12, 32)]
