"""Check the bundled quickstart assets: LoRA on the base model must turn ~0% exact match into >= 80%.

A plain loop with lorakit's LoRA layers (no 4-bit base, no trainer), the same recipe ``lorakit train`` runs
by default: r=16, alpha=32, dropout 0.05 on all seven Llama projections, AdamW, loss on the response
tokens only, the Stanford Alpaca prompt with EOS after the response::

    python scripts/quickstart_check.py                     # uses src/lorakit/quickstart/{model,data}

It prints the held-out loss and greedy exact match before and after, a few answers side by side, and the
time each phase took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import lorakit
from lorakit.data.formats import format_alpaca_prompt

DEFAULT_ASSETS = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "quickstart"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Example(NamedTuple):
    """One tokenized row: prompt ids, response ids with EOS appended, and the row's input and output text."""

    prompt: list[int]
    response: list[int]
    input: str
    output: str


def load_examples(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Read Alpaca JSONL rows and tokenize prompt and response separately.

    The Alpaca prompt ends with a newline and the response starts with a word, which the byte-level
    pre-tokenizer splits apart anyway, so the separate pieces are the tokens of the joined text.
    """
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt = format_alpaca_prompt(row["instruction"], row.get("input", ""))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        examples.append(
            Example(prompt_ids, [*response_ids, tokenizer.eos_token_id], row.get("input", ""), row["output"])
        )
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt + response; labels are -100 on the prompt and the padding.

    Returns:
        dict[str, torch.Tensor]: ``input_ids``, ``attention_mask``, ``labels``, each ``[B, T]`` int64.
    """
    width = max(len(e.prompt) + len(e.response) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, (prompt, response, _, _) in enumerate(examples):
        ids = torch.tensor(prompt + response)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, len(prompt) : len(ids)] = torch.tensor(response)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def eval_loss(model: PreTrainedModel, examples: list[Example], pad_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy per response token (EOS included) over all examples."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # [B, T-1]: position t predicts token t+1
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((targets != -100).sum())
    return total / count


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers to the prompts, decoded up to EOS (left-padded batch)."""
    pad_id = tokenizer.pad_token_id
    width = max(len(e.prompt) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, (prompt, _, _, _) in enumerate(examples):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[i, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> tuple[float, float, list[str]]:
    """Held-out loss, greedy exact match (fraction) and the answers."""
    model.eval()
    loss = eval_loss(model, examples, tokenizer.pad_token_id)
    answers = generate(model, tokenizer, examples)
    exact = sum(answer == e.output for answer, e in zip(answers, examples)) / len(examples)
    return loss, exact, answers


def finetune(model: PreTrainedModel, examples: list[Example], args: argparse.Namespace, pad_id: int) -> None:
    """AdamW on the LoRA weights: shuffled batches, linear warmup then linear decay to zero, clipping at 1.

    Evaluation stays in fp32; ``--bf16`` runs only the training forward passes under bf16 autocast.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup)))
    )
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:  # a new epoch: reshuffle
            order = torch.randperm(len(examples), generator=generator).tolist()
        batch = collate([examples[i] for i in order[: args.batch_size]], pad_id)
        order = order[args.batch_size :]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps:
            print(f"  step {step}/{args.steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")


def seconds_since(start: float) -> str:
    """Elapsed wall time, for the progress lines: ``"[12.3s]"``."""
    return f"[{time.perf_counter() - start:.1f}s]"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the quickstart recipe."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS, help="holds model/ and data/")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--show", type=int, default=6, help="held-out answers to print side by side")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load, evaluate the base, fine-tune with LoRA, evaluate again, print the comparison and timings."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    total = time.perf_counter()

    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.assets / "model")
    model = AutoModelForCausalLM.from_pretrained(args.assets / "model", dtype=torch.float32)
    train = load_examples(args.assets / "data" / "train.jsonl", tokenizer)
    held_out = load_examples(args.assets / "data" / "eval.jsonl", tokenizer)
    print(f"loaded model, {len(train)} train and {len(held_out)} held-out rows {seconds_since(t)}")

    t = time.perf_counter()
    base_loss, base_exact, base_answers = evaluate(model, tokenizer, held_out)
    print(f"base:  eval loss {base_loss:.3f}  exact match {base_exact:.0%}  {seconds_since(t)}")

    t = time.perf_counter()
    config = lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LLAMA_PROJECTIONS)
    lorakit.wrap(model, config)
    lorakit.print_trainable_parameters(model)
    finetune(model, train, args, tokenizer.pad_token_id)
    train_time = time.perf_counter() - t
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"fine-tuning: {args.steps} steps x {args.batch_size} rows, {precision} [{train_time:.1f}s]")

    t = time.perf_counter()
    tuned_loss, tuned_exact, tuned_answers = evaluate(model, tokenizer, held_out)
    print(f"tuned: eval loss {tuned_loss:.3f}  exact match {tuned_exact:.0%}  {seconds_since(t)}")

    print(f"\n{'input':<20} {'expected':<12} {'base answer':<32} tuned answer")
    for example, base, tuned in list(zip(held_out, base_answers, tuned_answers))[: args.show]:
        print(f"{example.input:<20} {example.output:<12} {base[:30]!r:<32} {tuned!r}")
    print(
        f"\nexact match {base_exact:.0%} -> {tuned_exact:.0%}, eval loss {base_loss:.3f} -> {tuned_loss:.3f}; "
        f"fine-tuning {train_time:.0f}s, total {time.perf_counter() - total:.0f}s on {args.threads} thread(s)"
    )


if __name__ == "__main__":
    main()
