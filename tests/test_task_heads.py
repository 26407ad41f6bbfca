"""Classification heads: never wrapped by all-linear, never quantized, newly initialized over a base checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

import lorakit
from lorakit.adapters.pissa import quantize_model
from lorakit.errors import ConfigError
from lorakit.inject import lora_layers
from lorakit.quant import Linear4bit

from tiny_models import VOCAB, tiny_bert


def bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def qwen2_classifier(seed: int = 0) -> Qwen2ForSequenceClassification:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return Qwen2ForSequenceClassification(config).eval()


def _wrapped_paths(model) -> set[str]:
    return {path for path, _ in lora_layers(model)}


@pytest.mark.parametrize(("build", "head"), [(bert_classifier, "classifier"), (qwen2_classifier, "score")])
def test_all_linear_skips_the_classification_head_like_peft_seq_cls(build, head):
    ours = lorakit.wrap(build(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    theirs = get_peft_model(build(), PeftLoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    peft_paths = {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, LoraLayer)
    }
    assert head not in _wrapped_paths(ours)
    assert _wrapped_paths(ours) == peft_paths


def test_quantize_model_keeps_the_classification_head_and_honours_kept_module_paths():
    model = lorakit.wrap(bert_classifier(), lorakit.LoraConfig(r=4, target_modules=["query", "value"]))
    quantize_model(model, compute_dtype=torch.float32, keep_modules=["bert.encoder.layer.1"])
    assert type(model.classifier) is nn.Linear
    layer0, layer1 = model.bert.encoder.layer
    assert isinstance(layer0.intermediate.dense, Linear4bit)
    assert isinstance(layer0.attention.self.query.base_layer, Linear4bit)
    assert type(layer1.intermediate.dense) is nn.Linear  # a kept path covers everything inside it
    assert type(layer1.attention.self.query.base_layer) is nn.Linear


def test_load_model_keeps_the_head_of_a_classifier_in_compute_dtype(tmp_path):
    bert_classifier().save_pretrained(tmp_path)
    model = lorakit.load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32,
                               model_class=AutoModelForSequenceClassification)  # fmt: skip
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, Linear4bit)
    torch.testing.assert_close(model.classifier.weight, bert_classifier().classifier.weight)


def test_a_base_checkpoint_loads_under_a_fresh_classification_head(tmp_path, caplog):
    base = tiny_bert()
    base.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lorakit.loading"):
        model = lorakit.load_model(tmp_path, quantize=None, compute_dtype=torch.float32,
                                   model_class=AutoModelForSequenceClassification)  # fmt: skip
    assert "newly initialized" in caplog.text and "classifier.weight" in caplog.text
    weight = model.classifier.weight
    assert torch.isfinite(weight).all() and 0.005 < weight.std() < 0.05  # initializer_range 0.02
    assert torch.count_nonzero(model.classifier.bias) == 0
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight
    )
    logits = model(input_ids=torch.tensor([[1, 5, 7, 2]])).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_a_missing_body_weight_is_still_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    bert_classifier().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["bert.encoder.layer.0.output.dense.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"no tensor for 'bert\.encoder\.layer\.0\.output\.dense\.weight'"):
        lorakit.load_model(tmp_path, quantize=None, model_class=AutoModelForSequenceClassification)
