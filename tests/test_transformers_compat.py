"""A wrapped model stays an ordinary transformers model: Trainer, save_pretrained and generate work."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import lorakit

from tiny_models import BUILDERS, sample_ids


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_transformers_trainer_trains_only_the_adapter(tmp_path):
    model = lorakit.wrap(BUILDERS["llama"]().train(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=_Rows(sample_ids(batch=8, length=12))).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_B." in n for n in changed)


def test_save_pretrained_on_wrapped_model_keeps_adapter_weights(tmp_path):
    model = lorakit.wrap(BUILDERS["llama"](), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys


def test_generate_greedy_equals_manual_argmax_loop():
    model = lorakit.wrap(
        BUILDERS["qwen2"](), lorakit.LoraConfig(r=4, target_modules="all", init_lora_weights=False)
    )
    prompt = sample_ids(batch=1, length=5)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(4):
        next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(out, ids)
