"""Data parallel under torchrun (CPU, gloo, 2 ranks, tiny fp32 model): the single-process adapter, a killed rank
stopping every rank, and --resume finishing the run (lorakit.distributed, docs/distributed.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lorakit.distributed import Ranks, check_strategy
from lorakit.errors import ConfigError
from lorakit.methods import METHODS
from lorakit.train import train
from train_fixtures import make_workspace, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as each rank runs (torchrun: OMP_NUM_THREADS=1)
ROOT = Path(__file__).resolve().parents[1]
# 20 steps of a global batch of 8 (4 x 2 micro-batches; each rank runs one micro-batch of 4 per step), no dropout
# (each rank draws its own masks), a checkpoint every step, exact match on 5 held-out rows before and after (each
# rank answers its share).
RUN = ["train.max_steps=20", "train.batch_size=4", "train.grad_accum=2", "adapter.lora_dropout=0.0",
       "train.save_every=1", "train.keep_last=2", "train.eval_generate=5", "train.max_new_tokens=6"]  # fmt: skip


def _cli_args(root: Path, out: Path) -> list[str]:
    return [str(root / "recipe.yaml"), f"output_dir={out}"]


def _lorakit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def _final_loss(out: Path) -> float:
    return json.loads((out / "train_summary.json").read_text())["final_train_loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process run (in this process) and the same recipe file on 2 ranks (torchrun)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    root = tmp_path_factory.mktemp("runs")
    (root / "recipe.yaml").write_text(tiny_recipe(ws, *RUN).to_yaml())
    # One thread, as each rank (one_torch_thread): Adam turns last-bit differences of tiny gradients into lr-sized
    # steps, so the comparison needs the same kernels.
    assert torch.get_num_threads() == 1
    train(tiny_recipe(ws, *RUN, f"output_dir={root / 'single'}"), progress=False)
    ranked = _lorakit("train", *_cli_args(root, root / "ranks"), "--no-progress", "--nproc", "2")
    output = ranked.communicate(timeout=300)[0]
    assert ranked.returncode == 0, output
    return root, output


def test_two_ranks_reach_the_single_process_adapter(runs):
    root, output = runs
    single = load_file(root / "single" / "adapter_model.safetensors")
    ranked = load_file(root / "ranks" / "adapter_model.safetensors")
    assert single.keys() == ranked.keys()
    for key, value in single.items():
        torch.testing.assert_close(ranked[key], value, atol=1e-5, rtol=0)
    lines = [json.loads(line) for line in (root / "ranks" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 21))  # rank 0 alone wrote the metrics
    assert output.count("steps: 20") == 1  # and printed the summary
    summaries = [json.loads((root / name / "train_summary.json").read_text()) for name in ("single", "ranks")]
    assert abs(summaries[1]["final_train_loss"] - summaries[0]["final_train_loss"]) < 1e-5
    # Evaluation ran on both ranks, reduced: the loss of the whole validation set, every row's answer in order.
    assert summaries[1]["eval_loss"] == pytest.approx(summaries[0]["eval_loss"], abs=1e-5)
    for when in ("before", "after"):
        assert [a["got"] for a in summaries[1][when]["answers"]] == [
            a["got"] for a in summaries[0][when]["answers"]
        ]
        assert summaries[1][when]["n"] == 5


def test_a_killed_rank_stops_every_rank_and_resume_finishes_the_run(runs):
    root, _ = runs
    out = root / "killed"
    launcher = _lorakit("train", *_cli_args(root, out), "--no-progress", "--nproc", "2")
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-000002").exists() and launcher.poll() is None:
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    workers = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children(recursive=True)
               if "RANK" in p.environ()}  # fmt: skip
    assert sorted(workers) == [0, 1]
    workers[1].send_signal(signal.SIGKILL)
    killed = time.time()
    output = launcher.communicate(timeout=60)[0]
    _, alive = psutil.wait_procs(list(workers.values()), timeout=max(1, 60 - (time.time() - killed)))
    assert not alive and time.time() - killed < 60
    assert launcher.returncode != 0, output
    assert not (out / "train_summary.json").exists()  # it really died mid-run
    assert "rank      : 1" in output and "SIGKILL" in output  # torchrun names the failed rank
    assert "rank 0: " in output  # rank 0 says why it stopped
    assert "--resume --nproc 2" in output  # and how to continue

    resumed = _lorakit("train", *_cli_args(root, out), "--no-progress", "--resume", "--nproc", "2")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert abs(_final_loss(out) - _final_loss(root / "ranks")) < 1e-4


def test_ranks_share_each_step_and_refuse_what_they_cannot_split():
    ranks = Ranks(rank=1, world_size=2)
    assert ranks.mine(["a", "b", "c", "d"]) == ["b", "d"]
    assert ranks.mine(["a"]) == []  # a rank without a micro-batch (an epoch's end) still joins the reduction
    fsdp = Ranks(rank=1, world_size=2, strategy="fsdp", joined=True)
    assert fsdp.mine(["a"]) == [None]  # FSDP: every rank runs as many forward passes
    with pytest.raises(ConfigError, match=r"train\.grad_accum: expected a multiple of the 2 ranks"):
        ranks.check_grad_accum(3)
    with pytest.raises(ConfigError, match=r"train\.optimizer one of adamw"):
        check_strategy("fsdp", "lora", "adamw_8bit")


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp_takes_the_methods_with_plain_lora_factors_and_refuses_the_rest(method):
    check_strategy("ddp", method, "adamw")  # ddp takes every method
    if METHODS[method].lora_factors:
        check_strategy("fsdp", method, "adamw")
        return
    shardable = ", ".join(name for name, record in METHODS.items() if record.lora_factors)
    with pytest.raises(
        ConfigError, match=rf"train\.strategy=fsdp: expected adapter.method one of {shardable}, got"
    ):
        check_strategy("fsdp", method, "adamw")


def _fsdp_world_of_one(ws: Path, out: Path, device: str, *overrides: str):
    """train.strategy=fsdp in this process: a process group of one (lorakit.distributed.start), sharded groups."""
    recipe = tiny_recipe(ws, "train.max_steps=4", "adapter.lora_dropout=0.0", "train.save_every=2",
                         "train.strategy=fsdp", f"output_dir={out}", *overrides)  # fmt: skip
    return train(recipe, progress=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fsdp_on_one_rank_trains_saves_and_resumes_as_ddp(tmp_path, device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ws = make_workspace(tmp_path / "ws")
    plain = train(tiny_recipe(ws, "train.max_steps=4", "adapter.lora_dropout=0.0", "train.save_every=2",
                              f"output_dir={tmp_path / 'plain'}"), progress=False)  # fmt: skip
    sharded = _fsdp_world_of_one(ws, tmp_path / "fsdp", device)
    assert not torch.distributed.is_initialized()  # the run left its process group
    assert sharded.final_train_loss == pytest.approx(plain.final_train_loss, abs=1e-5)
    single = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    for key, value in load_file(tmp_path / "fsdp" / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, single[key], atol=1e-5, rtol=0)
    # A checkpoint written from the shards (whole tensors) resumes a sharded run to the same end.
    again = train(
        tiny_recipe(ws, "train.max_steps=4", "adapter.lora_dropout=0.0", "train.save_every=2",
                    "train.strategy=fsdp", f"output_dir={tmp_path / 'fsdp'}"),
        resume=str(tmp_path / "fsdp" / "checkpoints" / "step-000002"), progress=False,
    )  # fmt: skip
    assert again.final_train_loss == pytest.approx(sharded.final_train_loss, abs=1e-5)


def test_a_failed_collective_names_the_ranks_that_stopped_answering(monkeypatch):
    """Without torchrun noticing (another launcher, a hung rank): the error names who no longer checks in through
    the run's store, and says how to continue."""
    from lorakit import distributed

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setattr(distributed, "PROBE_S", 0.5)
    store.set("lorakit/alive/2", "1")  # rank 2 is alive and checks in; rank 1 is gone

    def broken() -> None:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")

    with pytest.raises(distributed.RankError, match=r"rank 0: all-reducing the gradients failed: rank\(s\) 1 "
                       r"stopped answering \(\[gloo.*Connection closed by peer.*--resume"):  # fmt: skip
        Ranks(rank=0, world_size=3, joined=True)._collective("all-reducing the gradients", broken)
