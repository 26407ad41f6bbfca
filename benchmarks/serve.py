"""lorakit serve under load: concurrent clients over loopback vs the same requests one at a time.

Builds a small Llama (4 layers, hidden 256) from a config with a freshly trained byte-level BPE tokenizer, saves
it and 4 random LoRA adapters (r=16, all linear layers) to a temporary directory, starts the real server
(``lorakit serve --model ... --adapter-root ... --adapter NAME=DIR ... --port 0``, a separate process bound to
127.0.0.1) and sends the same request list twice with httpx:

- batched: ``--clients`` threads, each with its own connection, share the list (continuous batching mixes
  the adapters and the base in one forward per decode step);
- sequential: one client sends the requests one after another (every decode step has one row).

Requests cycle over the 4 adapters and the base, are greedy and generate exactly ``--tokens`` tokens each
(``ignore_eos``). Reported: requests/s, generated tokens/s, latency p50/p95, the mean and peak rows per decode
step (from the server's ``GET /v1/stats``), and the batching speedup (batched / sequential tokens/s). The server
runs with ``OMP_NUM_THREADS=--threads``. A table on stdout, JSON on disk.

Usage:
    .venv/bin/python benchmarks/serve.py [--requests 64] [--clients 32] [--tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from results_file import write_results

ADAPTERS = ["support", "legal", "medical", "code"]
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "What is the capital of France? The capital of France is Paris. Translate to German: good morning.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) , . ! ?",
    "Summarize the contract: the tenant pays rent on the first day of each month.",
    "def add(a, b): return a + b  # a tiny function; print(add(2, 3))",
]


def build_workspace(directory: Path, hidden: int, layers: int, rank: int) -> tuple[Path, Path]:
    """Save the base model (with its tokenizer) and the adapters; returns (model_dir, adapter_root)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    model_dir, root = directory / "base", directory / "adapters"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model = lorakit.load_model(model_dir, quantize=None, compute_dtype=torch.float32)
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(1 + i)
        cfg = lorakit.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights="gaussian"
        )
        lorakit.wrap(model, cfg, adapter_name=name)
        with torch.no_grad():  # gaussian init leaves B = 0; give every adapter a real, different delta
            for _, layer in lorakit.inject.lora_layers(model):
                layer.lora_B[name].weight.normal_(0, 0.02)
        lorakit.save_adapter(model, root / name, adapter_name=name)
    return model_dir, root


def request_list(n: int, tokens: int) -> list[dict]:
    """``n`` completions cycling over the adapters and the base, with prompts of different lengths."""
    names = ["base", *ADAPTERS]
    return [
        {"model": names[i % len(names)], "prompt": CORPUS[i % len(CORPUS)][: 20 + (i * 37) % 80],
         "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        for i in range(n)
    ]  # fmt: skip


def run(url: str, requests: list[dict], clients: int) -> dict:
    """Send ``requests`` over ``clients`` connections; wall time, throughput and latency percentiles."""

    def worker(http: httpx.Client, chunk: list[dict]) -> list[tuple[float, int]]:
        out = []
        for body in chunk:
            start = time.perf_counter()
            response = http.post("/v1/completions", json=body)
            response.raise_for_status()
            out.append((time.perf_counter() - start, response.json()["usage"]["completion_tokens"]))
        return out

    # clients are made before the clock starts: each one builds an SSL context, which costs milliseconds
    https = [httpx.Client(base_url=url, timeout=600) for _ in range(clients)]
    chunks = [requests[i::clients] for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for chunk in pool.map(worker, https, chunks) for item in chunk]
    wall = time.perf_counter() - start
    for http in https:
        http.close()
    latencies = sorted(seconds for seconds, _ in results)
    generated = sum(tokens for _, tokens in results)
    return {
        "clients": clients, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
        "generated_tokens": generated, "tokens_per_s": generated / wall,
        "latency_p50_s": statistics.median(latencies), "latency_p95_s": latencies[int(0.95 * (len(latencies) - 1))],
    }  # fmt: skip


def start_server(
    model_dir: Path, root: Path, args: argparse.Namespace, log: Path
) -> tuple[subprocess.Popen, str]:
    """``lorakit serve`` in its own process on a free loopback port; returns it and its URL once it answers."""
    command = [
        str(Path(sys.executable).with_name("lorakit")), "serve", "--model", str(model_dir),
        "--adapter-root", str(root), *[f"--adapter={name}={name}" for name in ADAPTERS], "--port", "0",
        "--max-batch", str(args.max_batch), "--max-queue", str(args.requests),
        "--max-tokens-limit", str(args.tokens), "--dtype", "float32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {process.returncode}:\n{log.read_text()}")
        for (
            line
        ) in log.read_text().splitlines():  # "serving ['base', ...] on http://127.0.0.1:PORT (Ctrl-C ...)"
            if line.startswith("serving ") and " on http://" in line:
                url = line.split(" on ", 1)[1].split()[0]
                if httpx.get(f"{url}/health").status_code == 200:
                    return process, url
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"lorakit serve did not start within 300 s:\n{log.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    """Ctrl-C (the server answers in-flight requests and stops), then kill if it does not exit."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients in the batched run")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS (CPU)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/serve.<kind>.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # building the workspace

    requests = request_list(args.requests, args.tokens)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, root = build_workspace(Path(tmp), args.hidden, args.layers, args.rank)
        process, url = start_server(model_dir, root, args, Path(tmp) / "server.log")
        try:
            run(url, requests[:4], 1)  # warm-up
            before = httpx.get(f"{url}/v1/stats").json()
            batched = run(url, requests, args.clients)
            after = httpx.get(f"{url}/v1/stats").json()
            steps = after["decode_steps"] - before["decode_steps"]
            batched.update(
                peak_batch=after["peak_batch"],
                mean_batch=(after["decoded_rows"] - before["decoded_rows"]) / max(steps, 1),
            )
            sequential = run(url, requests, 1)
        finally:
            stop_server(process)
    load_after = os.getloadavg()
    speedup = batched["tokens_per_s"] / sequential["tokens_per_s"]

    print(
        f"lorakit serve (own process), cpu, {args.threads} torch thread(s), Llama hidden={args.hidden} "
        f"layers={args.layers}, fp32, 4 adapters "
        f"r={args.rank} + base, {args.requests} requests x {args.tokens} tokens, max_batch={args.max_batch}"
    )
    print(
        f"1-minute load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores"
    )
    print(f"{'run':<12} {'clients':>7} {'wall s':>8} {'req/s':>8} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7}")
    for name, row in (("batched", batched), ("sequential", sequential)):
        print(
            f"{name:<12} {row['clients']:>7} {row['wall_s']:>8.2f} {row['requests_per_s']:>8.2f} "
            f"{row['tokens_per_s']:>9.1f} {row['latency_p50_s']:>7.3f} {row['latency_p95_s']:>7.3f}"
        )
    print(
        f"rows per decode step (batched run): mean {batched['mean_batch']:.1f}, peak {batched['peak_batch']}"
    )
    print(f"batching speedup (tokens/s): {speedup:.2f}x")

    meta = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    meta["loadavg_1min_before_after"] = [load_before[0], load_after[0]]
    result = {"meta": meta, "batched": batched, "sequential": sequential, "speedup_tokens_per_s": speedup}
    write_results("serve", result, args.out)


if __name__ == "__main__":
    main()
