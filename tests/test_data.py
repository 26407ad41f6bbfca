"""Tests of lorakit.data: formats, masks, EOS, truncation, guard, batching, packing parity, workers, cache."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit
import lorakit.data.dataset as dataset_module
from lorakit.data import (
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataConfig,
    DataError,
    TokenizedDataset,
    additive_mask,
    block_causal_mask,
    format_alpaca_prompt,
    load_dataset,
    make_collator,
    make_dataloader,
    pack_dataset,
    real_token_count,
    render_masked_sample,
    stop_token_ids,
    supports_padding_free,
    training_collator,
)
from lorakit.errors import ConfigError, LorakitError
from lorakit.loss import causal_lm_loss_sum

from tiny_models import BUILDERS
from tokenizer_factory import CORPUS, PLAIN_CHAT_TEMPLATE, build_tokenizer

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
    {"instruction": "Add the numbers", "input": "12 and 30", "output": "The sum is 42."},
    {"instruction": "Reverse the word cat", "input": "", "output": "tac"},
    {"instruction": "Translate to German: good morning.", "output": "Guten Morgen."},
]
CHAT_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "The quick brown fox."},
]
SHAREGPT = [
    {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
    for m in CHAT_MESSAGES
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def many_alpaca_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Add the numbers {i} and {2 * i}.", "output": f"The sum is {3 * i}."}
        for i in range(n)
    ]


def target_runs(tokenizer, sample) -> list[str]:
    """Decoded text of each contiguous run of target tokens."""
    pairs = zip(sample["input_ids"].tolist(), sample["labels"].tolist())
    return [
        tokenizer.decode([i for i, _ in run], clean_up_tokenization_spaces=False)
        for is_target, run in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX)
        if is_target
    ]


@pytest.fixture
def tok():
    return build_tokenizer()


# -- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": "d.csv"}, "data.path"),
        ({"format": "csv"}, "data.format"),
        ({"path": "d.txt", "format": "alpaca"}, "data.format"),
        ({"train_on": "prompt"}, "data.train_on"),
        ({"max_length": 0}, "data.max_length"),
        ({"max_length": True}, "data.max_length"),
        ({"val_size": 1.5}, "data.val_size"),
        ({"val_size": -1}, "data.val_size"),
        ({"val_path": "v.jsonl", "val_size": 2}, "data.val_size"),
        ({"on_bad_row": "warn"}, "data.on_bad_row"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"min_label_fraction": 1.0}, "data.min_label_fraction"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ConfigError, match="expected") as info:
        DataConfig(**{"path": "d.jsonl", **kwargs})
    assert str(info.value).startswith(field + ":")


def test_config_reads_a_whole_float_val_size_as_a_count():
    assert DataConfig("d.jsonl", val_size=5.0).val_size == 5
    assert DataConfig("d.jsonl", val_size=0.1).val_size == 0.1


# -- formats --------------------------------------------------------------------------------------------------


def test_alpaca_prompt_is_the_standard_template():
    assert format_alpaca_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert format_alpaca_prompt("Do X.", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\nctx\n\n### Response:\n"
    )
    assert format_alpaca_prompt("Do X.", "") == ALPACA_PROMPT_NO_INPUT.format(instruction="Do X.")


@pytest.mark.parametrize(
    ("name", "rows", "expected"),
    [
        ("a.jsonl", [{"instruction": "q", "input": "", "output": "a"}], "alpaca"),
        ("a.json", [{"instruction": "q", "output": "a"}], "alpaca"),
        ("c.jsonl", [{"messages": CHAT_MESSAGES}], "chat"),
        ("c.json", [{"conversations": SHAREGPT}], "chat"),
        ("t.jsonl", [{"text": "hello there"}], "text"),
        ("t.txt", None, "text"),
    ],
)
def test_format_is_detected_from_the_first_row(tmp_path, tok, name, rows, expected):
    path = tmp_path / name
    if rows is None:
        path.write_text("hello there\n")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        write_jsonl(path, rows)
    _, _, stats = load_dataset(DataConfig(path), tok)
    assert stats.format == expected


def test_alpaca_loss_is_on_the_response_and_eos_only(tmp_path, tok):
    train, _, stats = load_dataset(DataConfig(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)), tok)
    assert len(train) == stats.train_samples == len(ALPACA_ROWS)
    for row, sample in zip(ALPACA_ROWS, train):
        prompt = format_alpaca_prompt(row["instruction"], row.get("input", ""))
        text = tok.decode(sample["input_ids"], clean_up_tokenization_spaces=False)
        assert text == "<s>" + prompt + row["output"] + "</s>"
        assert target_runs(tok, sample) == [row["output"] + "</s>"]
    assert stats.train_target_tokens == sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in train)


def test_train_on_all_targets_every_token_but_the_first(tmp_path, tok):
    train, _, _ = load_dataset(
        DataConfig(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS), train_on="all"), tok
    )
    for sample in train:
        assert sample["labels"][0] == IGNORE_INDEX  # nothing predicts the first token
        assert torch.equal(sample["labels"][1:], sample["input_ids"][1:])


def test_eos_is_not_doubled_when_the_output_ends_with_it(tmp_path, tok):
    rows = [{"instruction": "Say hi.", "output": "hello</s>"}]
    train, _, _ = load_dataset(DataConfig(write_jsonl(tmp_path / "a.jsonl", rows)), tok)
    ids = train[0]["input_ids"].tolist()
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_chat_loss_covers_assistant_turns_with_their_end_of_turn(tmp_path, tok):
    train, _, _ = load_dataset(
        DataConfig(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT_MESSAGES}])), tok
    )
    sample = train[0]
    assert target_runs(tok, sample) == [
        "I am fine, thank you.<|im_end|>\n",
        "The quick brown fox.<|im_end|>\n",
    ]
    # The template's own end-of-turn ends the sample, so no EOS is added.
    assert tok.eos_token_id not in sample["input_ids"].tolist()
    expected = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False)
    assert tok.decode(sample["input_ids"], clean_up_tokenization_spaces=False) == expected


def test_chat_ending_on_a_user_turn_gets_no_eos(tmp_path):
    tok = build_tokenizer(PLAIN_CHAT_TEMPLATE)  # no end-of-turn token: EOS would be added after a final reply
    rows = [{"messages": CHAT_MESSAGES[:4]}]
    train, _, _ = load_dataset(DataConfig(write_jsonl(tmp_path / "c.jsonl", rows)), tok)
    assert target_runs(tok, train[0]) == [" I am fine, thank you.\n"]
    assert tok.eos_token_id not in train[0]["input_ids"].tolist()


def test_sharegpt_encodes_like_openai_messages(tmp_path, tok):
    openai, _, _ = load_dataset(
        DataConfig(write_jsonl(tmp_path / "o.jsonl", [{"messages": CHAT_MESSAGES}])), tok
    )
    sharegpt, _, _ = load_dataset(
        DataConfig(write_jsonl(tmp_path / "s.jsonl", [{"conversations": SHAREGPT}])), tok
    )
    assert torch.equal(openai[0]["input_ids"], sharegpt[0]["input_ids"])
    assert torch.equal(openai[0]["labels"], sharegpt[0]["labels"])


def test_chat_template_without_end_of_turn_gets_eos(tmp_path):
    tok = build_tokenizer(PLAIN_CHAT_TEMPLATE)
    train, _, _ = load_dataset(
        DataConfig(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT_MESSAGES}])), tok
    )
    runs = target_runs(tok, train[0])
    assert runs == [" I am fine, thank you.\n", " The quick brown fox.\n</s>"]
    assert train[0]["input_ids"].tolist().count(tok.eos_token_id) == 1


def test_stop_token_ids_include_the_chat_end_of_turn():
    chatml = build_tokenizer()
    assert stop_token_ids(chatml) == [chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")]
    assert stop_token_ids(build_tokenizer(PLAIN_CHAT_TEMPLATE)) == [chatml.eos_token_id]
    assert stop_token_ids(build_tokenizer(None)) == [chatml.eos_token_id]


def test_text_file_samples_are_blank_line_separated_and_fully_targeted(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox\njumps over the lazy dog.\n\n\nHello there.\n")
    train, _, _ = load_dataset(DataConfig(path), tok)
    texts = [tok.decode(s["input_ids"], skip_special_tokens=True) for s in train]
    assert texts == ["The quick brown fox\njumps over the lazy dog.", "Hello there."]
    for sample in train:
        assert sample["input_ids"][-1] == tok.eos_token_id
        assert torch.equal(sample["labels"][1:], sample["input_ids"][1:])


def test_chat_template_that_rewrites_history_is_refused_for_response_masks(tmp_path):
    # Like templates that drop past reasoning: the last assistant turn renders differently from earlier ones,
    # so rendered prefixes are not prefixes of the conversation and the turns cannot be located.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if loop.last and m['role'] == 'assistant' %}<think></think>{% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = build_tokenizer(template)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT_MESSAGES}])
    with pytest.raises(DataError, match=f"{path}:1: the chat template does not render conversation prefixes"):
        load_dataset(DataConfig(path), tok)
    train, _, _ = load_dataset(DataConfig(path, train_on="all"), tok)
    assert "<think></think>The quick brown fox." in tok.decode(train[0]["input_ids"])


def test_chat_data_needs_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT_MESSAGES}])
    with pytest.raises(DataError, match="no chat template"):
        load_dataset(DataConfig(path), build_tokenizer(None))


# -- truncation and the label guard ---------------------------------------------------------------------------


def test_truncation_is_counted_and_drops_the_eos(tmp_path, tok):
    rows = [*ALPACA_ROWS, {"instruction": "Hi", "output": " ".join(["The quick brown fox."] * 40)}]
    config = DataConfig(write_jsonl(tmp_path / "a.jsonl", rows), max_length=140)
    train, _, stats = load_dataset(config, tok)
    lengths = train.lengths().tolist()
    assert max(lengths) == stats.longest == 140
    assert stats.truncated == sum(n == 140 for n in lengths) == 1
    long_sample = train[lengths.index(140)]
    assert long_sample["input_ids"][-1] != tok.eos_token_id  # a cut answer must not teach stopping


def test_samples_left_without_targets_are_dropped_and_counted(tmp_path, tok):
    rows = [{"instruction": "word " * 100, "output": "lost"}, *ALPACA_ROWS]
    train, _, stats = load_dataset(DataConfig(write_jsonl(tmp_path / "a.jsonl", rows), max_length=140), tok)
    assert stats.dropped_no_target == 1 and len(train) == stats.train_samples == len(ALPACA_ROWS)
    assert all(int((s["labels"] != IGNORE_INDEX).sum()) > 0 for s in train)


def test_guard_stops_when_almost_no_token_is_a_target(tmp_path, tok):
    # Every prompt is longer than max_length, so truncation masks every label: the zero-loss trap.
    rows = [{"instruction": "word " * 60, "output": "answer"}] * 3
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(path, max_length=32), tok)
    message = str(info.value)
    assert "0.00%" in message and "train_on=all" in message and "max_length" in message
    assert "[masked]<s>Below is an instruction" in message  # the decoded sample with its mask
    _, _, stats = load_dataset(DataConfig(path, max_length=32, train_on="all"), tok)
    assert stats.target_fraction > 0.9


def test_guard_threshold_is_min_label_fraction(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    _, _, stats = load_dataset(DataConfig(path), tok)
    assert 0.01 < stats.target_fraction < 0.5
    with pytest.raises(DataError, match=r"\[masked\]"):
        load_dataset(DataConfig(path, min_label_fraction=0.5), tok)


def test_render_masked_sample_marks_masked_spans(tok):
    ids = tok("Hello there.")["input_ids"]  # <s> Hello there.
    labels = [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]
    head = tok.decode(ids[:2], clean_up_tokenization_spaces=False)
    tail = tok.decode(ids[2:], clean_up_tokenization_spaces=False)
    rendered = render_masked_sample(tok, {"input_ids": ids, "labels": labels})
    assert rendered == f"[masked]{head}[/masked]{tail}"
    assert head.startswith("<s>")


# -- batching and packing -------------------------------------------------------------------------------------


def test_collator_pads_to_the_longest_in_the_batch(tok):
    items = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
        {"input_ids": torch.arange(1, 8), "labels": torch.arange(1, 8)},
    ]
    batch = make_collator(tok)(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 7)
    assert batch["input_ids"][0, 3:].tolist() == [tok.pad_token_id] * 4
    assert batch["labels"][0].tolist() == [-100, 5, 6, -100, -100, -100, -100]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]


def test_dataloader_batches_are_padded_and_shuffled_by_seed(tmp_path, tok):
    train, _, _ = load_dataset(DataConfig(write_jsonl(tmp_path / "a.jsonl", many_alpaca_rows(8))), tok)
    order = [
        [
            b["input_ids"][:, -8:].tolist()
            for b in make_dataloader(train, make_collator(tok), 3, shuffle=True, seed=s)
        ]
        for s in (0, 0, 1)
    ]
    assert order[0] == order[1] != order[2]
    batch = next(iter(make_dataloader(train, make_collator(tok), batch_size=3)))
    assert batch["input_ids"].shape == (3, int(train.lengths()[:3].max()))


def test_pack_dataset_fills_rows_in_order_and_restarts_positions():
    samples = [
        (list(range(10 * k, 10 * k + n)), [-100, *range(10 * k + 1, 10 * k + n)])
        for k, n in enumerate([5, 4, 3, 6, 9])
    ]
    packed = pack_dataset(TokenizedDataset.from_samples(samples), max_length=10)
    assert packed.lengths().tolist() == [9, 9, 9]  # [5+4], [3+6], [9]
    assert torch.equal(packed.input_ids, TokenizedDataset.from_samples(samples).input_ids)  # nothing lost
    assert packed[0]["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packed[1]["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert packed[1]["labels"][3] == IGNORE_INDEX  # the 2nd sample is not trained to follow the 1st


def test_block_causal_mask_is_causal_within_samples_only():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], expected)


def tiny_llama(vocab_size: int, attn_implementation: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


TEXT_ROWS = [{"text": line} for line in CORPUS[3:]]


@pytest.mark.parametrize(
    ("attn_implementation", "packed_attention"),
    [("sdpa", "mask"), ("eager", "mask"), ("sdpa", "position_ids"), ("eager", "position_ids")],
)
@pytest.mark.parametrize(
    ("rows", "max_length", "add_bos"),
    [(ALPACA_ROWS, 256, True), (TEXT_ROWS, 128, False)],  # no BOS: each sample's first token is plain text
    ids=["alpaca", "text-no-bos"],
)
def test_packed_rows_give_the_same_logits_and_loss_as_separate_samples(
    tmp_path, rows, max_length, add_bos, attn_implementation, packed_attention
):
    tok = build_tokenizer(add_bos=add_bos)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    packed, _, _ = load_dataset(DataConfig(path, max_length=max_length, packing=True), tok)
    separate, _, _ = load_dataset(DataConfig(path, max_length=max_length), tok)
    # The first two rows, of unequal length (so the batch pads one), hold several samples.
    starts = [(b, t) for b in range(2) for t in (packed[b]["position_ids"] == 0).nonzero().flatten().tolist()]
    assert len(starts) > 2 and packed.lengths()[0] != packed.lengths()[1]
    separate = [separate[k] for k in range(len(starts))]
    model = tiny_llama(len(tok), attn_implementation)
    batch = make_collator(tok, packed_attention)([packed[0], packed[1]])
    if attn_implementation == "eager" and packed_attention == "mask":
        batch["attention_mask"] = additive_mask(batch["attention_mask"])  # eager adds the mask to the scores
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        alone = [
            model(input_ids=s["input_ids"][None], labels=s["labels"][None], use_cache=False) for s in separate
        ]
    for k, (b, t) in enumerate(starts):
        n = len(separate[k]["input_ids"])
        assert torch.equal(batch["input_ids"][b, t : t + n], separate[k]["input_ids"])
        torch.testing.assert_close(out.logits[b, t : t + n], alone[k].logits[0], atol=1e-5, rtol=1e-5)
    # Loss: the packed mean over all targets equals the token-weighted mean of the per-sample losses.
    counts = [int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in separate]
    expected = sum(o.loss * c for o, c in zip(alone, counts)) / sum(counts)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_packed_row_without_the_mask_leaks_across_samples(tmp_path, tok):
    # The control for the parity test above: plain causal attention over a packed row is NOT equal.
    alpaca = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    packed, _, _ = load_dataset(DataConfig(alpaca, max_length=256, packing=True), tok)
    separate, _, _ = load_dataset(DataConfig(alpaca, max_length=256), tok)
    model = tiny_llama(len(tok), "sdpa")
    n0, n1 = len(separate[0]["input_ids"]), len(separate[1]["input_ids"])
    with torch.no_grad():
        leaky = model(input_ids=packed[0]["input_ids"][None], use_cache=False).logits[0, n0 : n0 + n1]
        alone = model(input_ids=separate[1]["input_ids"][None], use_cache=False).logits[0]
    assert not torch.allclose(leaky, alone, atol=1e-3)


# -- workers, cache, validation split -------------------------------------------------------------------------


def test_worker_processes_give_the_same_result(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [*many_alpaca_rows(30), {"instruction": "bad"}])
    serial, _, serial_stats = load_dataset(DataConfig(path, on_bad_row="skip"), tok)
    parallel, _, parallel_stats = load_dataset(DataConfig(path, on_bad_row="skip", num_workers=2), tok)
    assert torch.equal(serial.input_ids, parallel.input_ids)
    assert torch.equal(serial.labels, parallel.labels)
    assert torch.equal(serial.offsets, parallel.offsets)
    assert serial_stats == parallel_stats and serial_stats.skipped_rows == 1


def test_cache_is_reused_and_keyed_by_data_tokenizer_and_settings(tmp_path, tok, monkeypatch):
    calls = []
    real_encode_all = dataset_module.encode_all
    monkeypatch.setattr(
        dataset_module, "encode_all", lambda *a, **k: calls.append(1) or real_encode_all(*a, **k)
    )
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    cache_dir = tmp_path / "cache"
    first, _, first_stats = load_dataset(DataConfig(path, cache_dir=cache_dir), tok)
    second, _, second_stats = load_dataset(DataConfig(path, cache_dir=cache_dir), tok)
    assert len(calls) == 1 and not first_stats.cache_hit and second_stats.cache_hit
    assert torch.equal(first.input_ids, second.input_ids) and torch.equal(first.labels, second.labels)
    assert [p.suffix for p in cache_dir.iterdir()] == [".safetensors"]  # no pickle, no temp file left
    # Settings that do not change the tokens (split, packing, workers) reuse the entry.
    load_dataset(DataConfig(path, cache_dir=cache_dir, val_size=1, packing=True), tok)
    assert len(calls) == 1
    # Each of these must miss.
    load_dataset(DataConfig(path, cache_dir=cache_dir, max_length=200), tok)
    load_dataset(DataConfig(path, cache_dir=cache_dir, train_on="all"), tok)
    other_template = build_tokenizer()
    other_template.chat_template = PLAIN_CHAT_TEMPLATE
    load_dataset(DataConfig(path, cache_dir=cache_dir), other_template)
    load_dataset(DataConfig(path, cache_dir=cache_dir), build_tokenizer(vocab_size=300))
    write_jsonl(path, ALPACA_ROWS[:3])
    _, _, changed = load_dataset(DataConfig(path, cache_dir=cache_dir), tok)
    assert len(calls) == 6 and changed.train_samples == 3


def test_unreadable_cache_entry_is_rebuilt(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    config = DataConfig(path, cache_dir=tmp_path / "cache")
    load_dataset(config, tok)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(b"garbage")
    train, _, stats = load_dataset(config, tok)
    assert not stats.cache_hit and len(train) == len(ALPACA_ROWS)
    assert load_dataset(config, tok)[2].cache_hit


def sample_set(dataset) -> set[tuple[int, ...]]:
    return {tuple(s["input_ids"].tolist()) for s in dataset}


def test_validation_split_by_count_or_fraction_is_deterministic(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", many_alpaca_rows(20))
    everything = sample_set(load_dataset(DataConfig(path), tok)[0])
    train, val, stats = load_dataset(DataConfig(path, val_size=5, seed=1), tok)
    assert (len(train), len(val), stats.val_samples) == (15, 5, 5)
    assert sample_set(train) | sample_set(val) == everything and not sample_set(train) & sample_set(val)
    assert sample_set(load_dataset(DataConfig(path, val_size=5, seed=1), tok)[1]) == sample_set(val)
    assert sample_set(load_dataset(DataConfig(path, val_size=5, seed=2), tok)[1]) != sample_set(val)
    train, val, _ = load_dataset(DataConfig(path, val_size=0.25, seed=1), tok)
    assert (len(train), len(val)) == (15, 5)
    with pytest.raises(DataError, match="leaves none to train on"):
        load_dataset(DataConfig(path, val_size=20), tok)


def test_validation_from_a_separate_file_is_not_packed(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    val_path = write_jsonl(tmp_path / "v.jsonl", ALPACA_ROWS[:2])
    train, val, stats = load_dataset(DataConfig(path, val_path=val_path, packing=True), tok)
    assert stats.val_samples == len(val) == 2 and "position_ids" not in val[0]
    assert "position_ids" in train[0] and stats.train_samples == len(ALPACA_ROWS)


# -- bad input ------------------------------------------------------------------------------------------------

BAD_JSONL = [
    json.dumps(ALPACA_ROWS[0]),
    json.dumps({"instruction": "q"}),
    json.dumps({"instruction": "q", "output": 42}),
    json.dumps({"instruction": "q", "output": "  "}),
    '{"instruction": "q", "output": ',
    json.dumps(ALPACA_ROWS[1]),
]


def test_bad_rows_are_fatal_by_default_with_file_line_and_count(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(BAD_JSONL))
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(path), tok)
    message = str(info.value)
    assert "4 bad row(s)" in message and "on_bad_row=skip" in message
    assert f"{path}:2: missing field 'output'" in message
    assert f"{path}:3: field 'output': expected a string, got int" in message
    assert f"{path}:4: field 'output' is empty" in message
    assert f"{path}:5: not valid JSON" in message


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(BAD_JSONL))
    train, _, stats = load_dataset(DataConfig(path, on_bad_row="skip"), tok)
    assert len(train) == stats.train_samples == 2 and stats.skipped_rows == 4
    assert stats.bad_rows[0] == f"{path}:2: missing field 'output'"


def test_json_list_rows_are_reported_by_index(tmp_path, tok):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ALPACA_ROWS[0], "not an object", {"conversations": []}]))
    with pytest.raises(DataError, match=r"2 bad row\(s\)") as info:
        load_dataset(DataConfig(path, format="alpaca"), tok)
    assert f"{path}[1]: expected a JSON object, got str" in str(info.value)


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"from": "robot", "value": "hi"}], "unknown speaker 'robot'"),
        ([{"from": "human", "value": "hi"}], "no assistant message"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}], "empty assistant message"),
        ([{"from": "human"}], "expected string 'from' and 'value'"),
    ],
)
def test_bad_chat_rows_say_what_is_wrong(tmp_path, tok, turns, message):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": SHAREGPT}, {"conversations": turns}])
    with pytest.raises(DataError, match="1 bad row") as info:
        load_dataset(DataConfig(path), tok)
    assert f"{path}:2: " in str(info.value) and message in str(info.value)


def test_unreadable_json_reports_the_line(tmp_path, tok):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]')
    with pytest.raises(DataError, match=rf"{path}:3:\d+: not valid JSON"):
        load_dataset(DataConfig(path), tok)


@pytest.mark.parametrize(
    ("name", "content", "message"), [("none.jsonl", None, "not found"), ("e.jsonl", "\n\n", "no rows")]
)
def test_missing_or_empty_file_is_a_clear_error(tmp_path, tok, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(DataConfig(path, cache_dir=tmp_path / "cache"), tok)
    assert isinstance(info.value, LorakitError) and isinstance(info.value, ValueError)


def test_unknown_keys_cannot_be_detected(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"a.jsonl:1: cannot detect the data format from the keys \['answer', 'question'\]"
    ):
        load_dataset(DataConfig(path), tok)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_free_batch_gives_the_loss_and_gradients_of_the_padded_batch(
    tmp_path, arch, attn_implementation
):
    tok = build_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    data, _, _ = load_dataset(DataConfig(path, max_length=256), tok)
    items = [data[i] for i in range(len(data))]
    assert len({len(item["input_ids"]) for item in items}) > 1  # unequal lengths: the padded batch pads
    torch.manual_seed(0)
    if arch == "gpt2":  # learned positions: room for the padded batch's length
        base = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256)
        )
    else:
        base = BUILDERS[arch]()
        base.resize_token_embeddings(len(tok))
    base.config._attn_implementation = attn_implementation
    model = lorakit.wrap(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()  # GPT-2's own dropout would make the two passes differ; gradients flow all the same
    params = [p for p in model.parameters() if p.requires_grad]
    padded = make_collator(tok)(items)
    fast = training_collator(tok, model)(items)
    assert supports_padding_free(model) and fast["input_ids"].shape == (1, real_token_count(padded))
    assert real_token_count(fast) == real_token_count(padded) < padded["input_ids"].numel()
    results = []
    for batch in (padded, fast):
        loss_sum, count = causal_lm_loss_sum(model, batch)
        results.append((loss_sum / count, count, torch.autograd.grad(loss_sum / count, params)))
    (ref, ref_count, ref_grads), (ours, count, grads) = results
    assert count == ref_count
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padding_free_is_the_training_default_and_can_be_turned_off(tmp_path):
    tok = build_tokenizer()
    model = BUILDERS["llama"]()
    assert training_collator(tok, model).padding_free
    assert not training_collator(tok, model, padding_free=False).padding_free
    assert DataConfig(tmp_path / "d.jsonl").padding_free
    with pytest.raises(ConfigError, match="padding_free"):
        DataConfig(tmp_path / "d.jsonl", padding_free="yes")
    encoder = BUILDERS["bert"]()  # no causal LM: a model without position_ids in forward would fall back
    encoder.forward = lambda input_ids=None, attention_mask=None: None
    assert not training_collator(tok, encoder).padding_free

    class Leaky(torch.nn.Module):  # takes position_ids but lets every token see all earlier ones
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 4)

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return SimpleNamespace(logits=self.embed(input_ids).cumsum(1))

    assert not supports_padding_free(Leaky()) and not training_collator(tok, Leaky()).padding_free
