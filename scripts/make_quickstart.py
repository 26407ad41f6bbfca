"""Build the bundled quickstart assets: a tiny base model, its tokenizer, and a task it cannot do yet.

Everything is made on this machine from text that ships with Python, so the build needs no network::

    python scripts/make_quickstart.py                       # writes src/lorakit/quickstart/{model,data}

Steps, each printed with its time:

1. Corpus: the documentation of the running Python's standard library (the ``pydoc`` topics of the language
   reference, module, class and function docstrings), its source code, and the month calendars of
   1900-2099 as :mod:`calendar` prints them, each headed ``July 2031 (2031-07)``: all under the PSF License.
   The calendars give the model what a real base model knows about dates (month names, their numbers).
2. Tokenizer: a byte-level BPE (every string round-trips) trained on that corpus, digits split one by one as
   Llama does, with ``<|endoftext|>`` (EOS), ``<|pad|>`` and a ChatML chat template; saved as a
   :class:`transformers.PreTrainedTokenizerFast`.
3. Model: a small :class:`transformers.LlamaForCausalLM` built from a config and pre-trained as a plain
   next-token language model on the corpus (a quarter of the windows are short spans written twice, so it
   learns to copy from its context early), saved with ``save_pretrained``.
4. Task: an Alpaca-format dataset: write a date such as ``July 4, 2031`` in ISO form, ``2031-07-04``. The
   base model cannot: it has never seen an instruction prompt nor a full date in that form (its calendars
   only say ``2031-07``). LoRA learns to copy the year, map the month name to its number and zero-pad the
   day; the rule is scored on held-out dates. (Year first suits a small model: once the first digit is
   out, its copying heads continue the year; the US form ``07/04/2031`` learned markedly slower.)

The output is deterministic for a given Python version and thread count (seeds are fixed; the corpus is
read in sorted order). ``scripts/quickstart_check.py`` fine-tunes on the result and prints the gain.
"""

from __future__ import annotations

import argparse
import ast
import calendar
import datetime
import json
import math
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "lorakit" / "quickstart"

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"

# ChatML: each turn ends with <|im_end|>, which generation_config.json also lists as a stop token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Standard-library folders left out: the test suite (huge, repetitive fixtures), GUI and demo code, vendored
# packages, and pydoc_data (its topics are read as prose below instead of as one giant source file).
SKIPPED_DIRS = {
    "__pycache__",
    "distutils",
    "ensurepip",
    "idlelib",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "test",
    "tests",
    "tkinter",
    "turtledemo",
}

# English month names, hard-coded: calendar.month_name follows the locale.
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
TASK_INSTRUCTION = "Write the date in ISO 8601 format (YYYY-MM-DD)."


@dataclass
class ModelSize:
    """Shape of the base model (about 3.4M parameters, 13.6 MB in fp32 with the defaults).

    Attributes:
        vocab_size (int): BPE vocabulary, special tokens included. Default 4096.
        hidden_size (int): Residual width. Default 256.
        intermediate_size (int): SwiGLU MLP width. Default 512.
        num_hidden_layers (int): Decoder layers. Default 4.
        num_attention_heads (int): Query heads (head dim = hidden / heads = 64). Default 4.
        num_key_value_heads (int): Key/value heads (grouped-query attention, as in Llama 2/3). Default 2.
        max_position_embeddings (int): Longest sequence the config admits (RoPE has no position table).
            Default 512.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


@dataclass
class PretrainConfig:
    """How the base model is pre-trained (the defaults built the bundled model).

    Attributes:
        steps (int): Optimizer steps. Default 800.
        batch_size (int): Windows per step. Default 16.
        seq_len (int): Tokens per window. Default 128.
        lr (float): Peak learning rate. Default 3e-3.
        copy_fraction (float): Share of the windows made of repeated spans (:func:`copy_window`). Default 0.25.
        calendar_fraction (float): Share of the windows cut from the calendar stream. Default 0.25.
        seed (int): Seeds the initialisation, the document order and the window sampler. Default 0.
    """

    steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    copy_fraction: float = 0.25
    calendar_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.copy_fraction < 0
            or self.calendar_fraction < 0
            or self.copy_fraction + self.calendar_fraction > 1
        ):
            raise ValueError(
                f"copy_fraction + calendar_fraction must lie in [0, 1], got "
                f"{self.copy_fraction} + {self.calendar_fraction}"
            )


def read_corpus(stdlib: Path) -> list[str]:
    """The text documents of the pre-training corpus, in a fixed order.

    Args:
        stdlib (Path): The standard library folder (``sysconfig.get_paths()["stdlib"]``).

    Returns:
        list[str]: The ``pydoc`` topics (the language reference), every docstring of at least 40
        characters, then every source file; folders in :data:`SKIPPED_DIRS` are left out.
    """
    from pydoc_data.topics import topics  # the language reference, as plain text

    prose = [topics[key] for key in sorted(topics)]
    docstrings: list[str] = []
    sources: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        if set(path.relative_to(stdlib).parts[:-1]) & SKIPPED_DIRS:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately invalid or not UTF-8
        sources.append(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docstrings.append(doc)
    return prose + docstrings + sources


def month_calendars() -> list[str]:
    """The month calendars of 1900-2099 as :class:`calendar.TextCalendar` prints them, each headed
    ``July 2031 (2031-07)``: what a base model trained on web text knows about dates (month names, their
    numbers, days and years), which the fine-tuned task builds on.
    """
    printer = calendar.TextCalendar()  # English names: Python leaves LC_TIME at the C locale
    return [
        f"{MONTHS[month - 1]} {year} ({year}-{month:02d})\n{printer.formatmonth(year, month)}"
        for year in range(1900, 2100)
        for month in range(1, 13)
    ]


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it for transformers.

    Args:
        documents (list[str]): Training text.
        vocab_size (int): Vocabulary size including the 256 byte tokens and the 4 special tokens.

    Returns:
        PreTrainedTokenizerFast: ``<|endoftext|>`` is EOS (and BOS, never added: as GPT-2, samples start
        without one), ``<|pad|>`` is PAD, ``<|im_start|>``/``<|im_end|>`` frame ChatML turns.
    """
    backend = Tokenizer(models.BPE())
    # Digits one by one (as Llama): numbers are copied digit by digit and " 7" shares the token "7".
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def token_stream(documents: list[str], tokenizer: PreTrainedTokenizerFast, seed: int) -> torch.Tensor:
    """Shuffle the documents and join them, each followed by EOS, into one stream of token ids.

    Returns:
        torch.Tensor: ``[n_tokens]`` int64.
    """
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    shuffled = [documents[i] for i in order]
    encoded = tokenizer.backend_tokenizer.encode_batch(shuffled, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in encoded for t in [*doc.ids, eos]], dtype=torch.long)


def build_model(tokenizer: PreTrainedTokenizerFast, size: ModelSize, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with the tokenizer's special-token ids.

    The input embedding and the output head are tied, which keeps the file small (vocab x hidden once).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        **vars(size),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def copy_window(stream: torch.Tensor, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Short corpus spans, each written twice in a row, until the window is full.

    The second copy of a span is predictable only by copying from the first, which grows induction heads
    (Olsson et al., 2022, "In-context learning and induction heads") within a few hundred steps instead of
    the many thousands plain text needs. Spans of 4 to 48 tokens train copying over many distances; tasks
    that move input into the answer (dates, names, numbers) lean on exactly that.

    Returns:
        torch.Tensor: ``[seq_len]`` int64.
    """
    pieces: list[torch.Tensor] = []
    filled = 0
    while filled < seq_len:
        n = int(torch.randint(4, 49, (1,), generator=generator))
        start = int(torch.randint(0, len(stream) - n, (1,), generator=generator))
        span = stream[start : start + n]
        pieces += [span, span]
        filled += 2 * n
    return torch.cat(pieces)[:seq_len]


def random_window(stream: torch.Tensor, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """A window of ``seq_len`` consecutive tokens at a random offset: ``[seq_len]`` int64."""
    start = int(torch.randint(0, len(stream) - seq_len, (1,), generator=generator))
    return stream[start : start + seq_len]


def sample_batch(
    text: torch.Tensor, calendars: torch.Tensor, config: PretrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """One pre-training batch: copy windows, calendar windows, then text windows.

    Args:
        text (torch.Tensor): ``[n_text]`` int64, the training part of the text stream.
        calendars (torch.Tensor): ``[n_calendar]`` int64, the calendar stream.
        config (PretrainConfig): Batch size, window length and the shares of each kind of window.
        generator (torch.Generator): Source of all offsets.

    Returns:
        torch.Tensor: ``[batch_size, seq_len]`` int64.
    """
    n_copy = int(config.batch_size * config.copy_fraction)
    n_calendar = int(config.batch_size * config.calendar_fraction)
    n_text = config.batch_size - n_copy - n_calendar
    rows = [copy_window(text, config.seq_len, generator) for _ in range(n_copy)]
    rows += [random_window(calendars, config.seq_len, generator) for _ in range(n_calendar)]
    rows += [random_window(text, config.seq_len, generator) for _ in range(n_text)]
    return torch.stack(rows)


def pretrain(
    model: LlamaForCausalLM, text: torch.Tensor, calendars: torch.Tensor, config: PretrainConfig
) -> list[float]:
    """Next-token pre-training on a mixture of text, copy and calendar windows.

    AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup over 5% of the steps then cosine
    decay to a tenth of the peak, gradient clipping at 1.0, bf16 autocast.

    Args:
        model (LlamaForCausalLM): Trained in place.
        text (torch.Tensor): ``[n_tokens]`` int64 text stream; its last 2% are held out for validation.
        calendars (torch.Tensor): ``[n_tokens]`` int64 calendar stream.
        config (PretrainConfig): Steps, batch shape, learning rate, mixture and seed.

    Returns:
        list[float]: The validation loss (held-out text) before training and after.
    """
    split = int(len(text) * 0.98)
    train, val = text[:split], text[split:]
    generator = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    seq_len, steps = config.seq_len, config.steps
    val_windows = val[: (len(val) // seq_len) * seq_len].view(-1, seq_len)[:32]  # [<=32, seq_len]

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=val_windows, labels=val_windows).loss.item()
        model.train()
        return loss

    losses = [val_loss()]
    print(f"  validation loss before: {losses[0]:.3f}")
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        batch = sample_batch(train, calendars, config, generator)  # [B, T]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, config.lr, warmup=max(1, steps // 20))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # ~2.5x faster than fp32 on AVX512-BF16 CPUs
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            n = (step % 50) + 1
            elapsed = time.perf_counter() - start
            print(f"  step {step + 1}/{steps}  train loss {running / n:.3f}  {elapsed:.0f}s", flush=True)
            running = 0.0
    model.eval()
    losses.append(val_loss())
    print(f"  validation loss after: {losses[1]:.3f}")
    return losses


def date_row(day: datetime.date) -> dict[str, str]:
    """One Alpaca row: ``July 4, 2031`` -> ``2031-07-04``."""
    return {
        "instruction": TASK_INSTRUCTION,
        "input": f"{MONTHS[day.month - 1]} {day.day}, {day.year}",
        "output": day.isoformat(),
    }


def task_rows(n_train: int, n_eval: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Distinct random dates from 1900-01-01 to 2099-12-31, split into train and held-out eval rows.

    Returns:
        tuple[list[dict], list[dict]]: Train and eval rows; no date appears in both.
    """
    first, last = datetime.date(1900, 1, 1).toordinal(), datetime.date(2099, 12, 31).toordinal()
    ordinals = random.Random(seed).sample(range(first, last + 1), n_train + n_eval)
    rows = [date_row(datetime.date.fromordinal(o)) for o in ordinals]
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as JSON Lines (UTF-8, one object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """``save_pretrained`` the model (safetensors), its generation config and the tokenizer into ``out``."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PretrainConfig]:
    """Command-line flags; every default is what the bundled assets were built with.

    Returns:
        tuple[argparse.Namespace, PretrainConfig]: The output and task flags, and the pre-training config.
    """
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT/model and OUT/data")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="pre-training optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--copy-fraction", type=float, default=defaults.copy_fraction)
    parser.add_argument("--calendar-fraction", type=float, default=defaults.calendar_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it)")
    parser.add_argument("--n-train", type=int, default=1000, help="task rows in data/train.jsonl")
    parser.add_argument("--n-eval", type=int, default=100, help="held-out task rows in data/eval.jsonl")
    args = parser.parse_args(argv)
    config = PretrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        copy_fraction=args.copy_fraction,
        calendar_fraction=args.calendar_fraction,
        seed=args.seed,
    )
    return args, config


def seconds_since(start: float) -> str:
    """Elapsed wall time, for the progress lines: ``"[12.3s]"``."""
    return f"[{time.perf_counter() - start:.1f}s]"


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, tokenizer, model and task data; print each step with its time."""
    args, config = parse_args(argv)
    torch.set_num_threads(args.threads)
    total = time.perf_counter()
    size = ModelSize()

    t = time.perf_counter()
    documents = read_corpus(Path(sysconfig.get_paths()["stdlib"]))
    calendars = month_calendars()
    chars = sum(map(len, documents + calendars)) / 1e6
    python = sys.version.split()[0]
    print(
        f"corpus: {len(documents)} documents + {len(calendars)} calendars, {chars:.1f}M characters, Python {python} {seconds_since(t)}"
    )

    t = time.perf_counter()
    tokenizer = train_tokenizer(documents + calendars, size.vocab_size)
    text = token_stream(documents, tokenizer, config.seed)
    calendar_stream = token_stream(calendars, tokenizer, config.seed)
    tokens = (len(text) + len(calendar_stream)) / 1e6
    print(f"tokenizer: {len(tokenizer)} tokens; corpus: {tokens:.2f}M tokens {seconds_since(t)}")

    t = time.perf_counter()
    model = build_model(tokenizer, size, config.seed)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    seen = config.steps * config.batch_size * config.seq_len / 1e6
    print(f"pre-training a {n_params:.2f}M-parameter Llama on {seen:.2f}M tokens, {args.threads} thread(s)")
    pretrain(model, text, calendar_stream, config)
    print(f"pre-training done {seconds_since(t)}")

    save_model(model, tokenizer, args.out / "model")
    train_rows, eval_rows = task_rows(args.n_train, args.n_eval, config.seed)
    write_jsonl(args.out / "data" / "train.jsonl", train_rows)
    write_jsonl(args.out / "data" / "eval.jsonl", eval_rows)
    for folder in ("model", "data"):
        for path in sorted((args.out / folder).iterdir()):
            print(f"  wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print(f"done {seconds_since(total)}")


if __name__ == "__main__":
    main()
