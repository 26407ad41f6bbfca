"""Data-parallel training on PyTorch's own engine: one process per device, started by ``torchrun``.

``torchrun --nproc-per-node N -m lorakit train RECIPE`` (or ``lorakit train RECIPE --nproc N``, which starts
torchrun) runs N copies of one training run. torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`start`
joins the process group (gloo on CPU, NCCL on CUDA, collectives time out after :data:`TIMEOUT_S`) and returns the
:class:`Ranks` the loop asks. What each rank does (docs/distributed.md):

- data: an optimizer step is the recipe's ``grad_accum`` micro-batches of ``batch_size`` samples, whatever the
  number of ranks, and rank r runs micro-batches r, r + N, ... of it (:meth:`Ranks.mine`). The global batch, the
  samples of every micro-batch and their order are those of the single-process run.
- loss: every rank divides its summed token loss by the target tokens of the *whole step*, all ranks together
  (:meth:`Ranks.sum`), so the gradients summed over ranks are the single-process gradient exactly (not a mean of
  per-rank means, which would over-weight ranks with short samples).
- gradients, ``ddp``: every rank holds the whole model; after the step's backward passes, one all-reduce (SUM)
  of every trainable gradient in one flat fp32 bucket (:meth:`Ranks.reduce_gradients`). This is what
  ``DistributedDataParallel`` computes, without its wrapper: adapter gradients are megabytes, so there is nothing to
  overlap with backward, the model keeps its module names (checkpoints, ``save_adapter``), a rank that gets no
  micro-batch at an epoch's end still joins, and frozen and 4-bit weights (buffers) are never touched.
- ``fsdp``: FSDP2 ``fully_shard`` on every decoder layer and the root (:meth:`Ranks.shard_model`): each rank keeps
  1/N of every *parameter* (adapter and frozen compute-dtype weights: embeddings, norms, the head, and the base
  Linears of plain LoRA) and of the optimizer states; 4-bit weights are buffers and stay whole on every rank.
  Gradients are reduce-scattered (summed) in backward.
- files: rank 0 writes checkpoints, metrics, plots and the adapter; every rank reads the checkpoint on resume.
- failure: torchrun stops every rank when one dies; a collective that fails names the ranks that stopped
  answering (:class:`RankError`); a rank stopped by the launcher says so (:func:`start`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lorakit.checkpoint import prune_checkpoints, save_checkpoint
from lorakit.errors import ConfigError, LorakitError
from lorakit.files import write_adapter_dir
from lorakit.io import save_adapter
from lorakit.methods import METHODS, TrainingHooks
from lorakit.plot import MetricsLog

T = TypeVar("T")
TIMEOUT_S = int(os.environ.get("LORAKIT_DIST_TIMEOUT", "300"))  # a collective waits this long for a hung rank
PROBE_S = 3.0  # after a failed collective, how long the live ranks wait for each other to answer
FSDP_OPTIMIZERS = ("adamw",)  # 8-bit and paged states are not shaped like their parameters


class RankError(LorakitError, RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or cannot be reached."""


@dataclass
class Ranks:
    """This process's place in a data-parallel run; a single process is rank 0 of 1.

    Attributes:
        rank (int): This process's rank. Default 0.
        world_size (int): Processes in the run. Default 1.
        strategy (str): ``"ddp"`` or ``"fsdp"`` (``train.strategy``). Default ``"ddp"``.
        joined (bool): This process is in a process group: the collectives run. Default False.
        owns_group (bool): :func:`start` created the group (and :meth:`close` destroys it). Default False.
    """

    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"
    joined: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters are FSDP shards (DTensors)."""
        return self.joined and self.strategy == "fsdp"

    def print(self, *args: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, flush=True)

    def mine(self, items: list[T]) -> list[T]:
        """This rank's share of ``items``: items ``rank``, ``rank + world_size``, ...; under FSDP, padded with
        ``None`` to the largest share, because every rank must run as many forward passes as the others."""
        share = items[self.rank :: self.world_size]
        if self.sharded:
            share += [None] * (-(-len(items) // self.world_size) - len(share))
        return share

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over ranks (float64: exact for token counts)."""
        if not self.joined:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        self._collective("summing over ranks", lambda: dist.all_reduce(total))
        return total.tolist()

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (JSON data), in rank order. Sent as UTF-8 JSON in uint8 tensors, not with
        ``all_gather_object``, which unpickles what other processes send."""
        if not self.joined:
            return [value]
        device = _collective_device()
        data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        self._collective("gathering results", lambda: dist.all_gather(sizes, size))
        longest = int(max(sizes).item())
        buffers = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(self.world_size)]
        padded = torch.cat([data, data.new_zeros(longest - data.numel())])
        self._collective("gathering results", lambda: dist.all_gather(buffers, padded))
        return [json.loads(bytes(b[: int(n)].tolist()).decode()) for b, n in zip(buffers, sizes)]

    def barrier(self, what: str) -> None:
        """Wait for every rank (``what`` names the point in the error)."""
        if self.joined:
            self._collective(what, dist.barrier)

    def check_grad_accum(self, grad_accum: int) -> None:
        """Ranks split each step's ``grad_accum`` micro-batches: refuse a count that leaves some rank idle.

        Raises:
            ConfigError: ``grad_accum`` is not a multiple of the number of ranks.
        """
        if self.world_size > 1 and grad_accum % self.world_size:
            raise ConfigError(
                f"train.grad_accum: expected a multiple of the {self.world_size} ranks (each rank runs "
                f"grad_accum / {self.world_size} of every step's micro-batches), got {grad_accum}; e.g. "
                f"grad_accum={self.world_size * max(1, grad_accum // self.world_size)}, with batch_size chosen "
                "to keep the global batch batch_size x grad_accum"
            )

    def spread(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before the first step: under ddp every rank takes rank 0's trainable values (as
        ``DistributedDataParallel`` does); under fsdp the model and optimizer are sharded (:meth:`shard_model`)."""
        if self.sharded:
            self.shard_model(model, optimizer)
        elif self.joined:
            for param in [p for p in model.parameters() if p.requires_grad]:
                self._collective("broadcasting the adapter", lambda p=param: dist.broadcast(p.data, src=0))

    def seed_step(self, seed: int, step: int) -> None:
        """Seed this rank's dropout for optimizer step ``step``: ranks draw different masks, and a resumed run
        draws the same ones as an uninterrupted run."""
        if self.joined:
            torch.manual_seed(seed * 1_000_003 + step * 7919 + self.rank)

    def loss_denominator(self, targets: int) -> float | None:
        """What each rank divides its summed token loss by, given its ``targets`` (tokens with a loss): the
        target tokens of all ranks; under FSDP, divided by ``world_size`` too, because FSDP averages the
        gradients over ranks (gloo has no pre-multiplied sum for ``set_gradient_divide_factor(1)``). None in a
        single process (the loop counts its own)."""
        if not self.joined:
            return None
        total = max(1.0, self.sum([float(targets)])[0])
        return total / self.world_size if self.sharded else total

    def reduce_gradients(self, params: list[nn.Parameter], loss: float) -> float:
        """Sum the gradients of ``params`` and the step's ``loss`` over ranks; returns the global loss.

        Under ddp one all-reduce moves every gradient at once (a flat fp32 bucket, the adapter's size), plus one
        flag per tensor so a tensor without a gradient on every rank stays without one (the optimizer skips it, as
        in a single process). Under FSDP the gradients were reduce-scattered in backward; only the loss is summed.
        """
        if not self.joined:
            return loss
        if self.sharded:
            return self.sum([loss])[0] / self.world_size  # see loss_denominator
        device = params[0].device if params else _collective_device()
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        flags = [float(p.grad is not None) for p in params]
        flat = torch.cat([*pieces, torch.tensor([*flags, loss], dtype=torch.float32, device=device)])
        self._collective("all-reducing the gradients", lambda: dist.all_reduce(flat))
        offset = 0
        for param, flag in zip(params, flat[-len(params) - 1 : -1].tolist()):
            grad = flat[offset : offset + param.numel()].view_as(param)
            param.grad = grad.to(param.dtype) if flag else None
            offset += param.numel()
        return float(flat[-1])

    def shard_model(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """FSDP2: shard every decoder layer and the root across the ranks, and move ``optimizer`` (parameters and
        any state, e.g. a resumed checkpoint's) onto the shards. A no-op unless :attr:`sharded`."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        before = {id(p): name for name, p in model.named_parameters()}
        for module, ignored in _shard_groups(model):
            fully_shard(module, ignored_params=ignored)
        after = dict(model.named_parameters())
        old_state, optimizer.state = optimizer.state, type(optimizer.state)(dict)
        for group in optimizer.param_groups:
            shards = [after[before[id(p)]] for p in group["params"]]
            for old, new in zip(group["params"], shards):
                if old in old_state:
                    optimizer.state[new] = {
                        key: distribute_tensor(value, new.device_mesh, new.placements, src_data_rank=None)
                        if isinstance(value, torch.Tensor) and value.shape == new.shape else value
                        for key, value in old_state[old].items()
                    }  # fmt: skip
            group["params"] = shards

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module) -> Iterator[None]:
        """Inside, every parameter of ``model`` is whole (FSDP: all-gathered on every rank; call it on all
        ranks), so the adapter can be read and saved. A no-op unless :attr:`sharded`."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self._collective("gathering the parameters", lambda: [m.unshard() for m in modules])
        try:
            yield
        finally:
            for module in modules:
                module.reshard()

    def full_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """``optimizer``, or under FSDP an object whose ``state_dict()`` holds whole tensors (gathered here, on
        every rank) for rank 0's checkpoint."""
        if not self.sharded:
            return optimizer
        from torch.distributed.tensor import DTensor

        state = optimizer.state_dict()
        whole = {
            index: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in values.items()}
            for index, values in state["state"].items()
        }
        return _StateDict({"state": whole, "param_groups": state["param_groups"]})

    def close(self, wait: bool = True) -> None:
        """Leave the process group: with ``wait``, after a last barrier, so no rank leaves while another still
        reduces; without (a failing rank), at once: its exit makes torchrun stop the others."""
        if self.owns_group and dist.is_initialized():
            if wait:
                self.barrier("finishing")
            dist.destroy_process_group()
        self.joined = self.owns_group = False

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        self.close(wait=kind is None)

    def _collective(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except RuntimeError as err:  # DistBackendError / DistNetworkError / a timeout
            missing = _unresponsive_ranks(self.rank, self.world_size)
            who = (
                f"rank(s) {', '.join(map(str, missing))} stopped answering"
                if missing
                else "another rank failed"
            )
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RankError(
                f"rank {self.rank}: {what} failed: {who} ({first}). The run stops on every rank; continue it "
                "from the last complete checkpoint with --resume"
            ) from None


def _shard_groups(model: nn.Module) -> list[tuple[nn.Module, set[nn.Parameter] | None]]:
    """What ``fully_shard`` wraps, innermost first, with the parameters each group leaves whole.

    Every decoder layer (the classes transformers lists in ``_no_split_modules``), then the decoder (embeddings,
    final norm) and the output head: lorakit's chunked loss calls the decoder and the head separately, never the
    root's forward, so each needs its own hooks. A head tied to the embeddings stays whole on every rank.
    """
    layers = set(getattr(model, "_no_split_modules", None) or ())
    groups: list[tuple[nn.Module, set[nn.Parameter] | None]] = [
        (m, None) for m in model.modules() if type(m).__name__ in layers
    ]
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return [*groups, (model, None)]
    tied = {
        p
        for p in (head.parameters() if head is not None else ())
        if any(p is q for q in decoder.parameters())
    }
    groups.append((decoder, tied or None))
    if head is not None and not tied:
        groups.append((head, None))
    return groups


@dataclass
class _StateDict:
    """An optimizer stand-in for :func:`lorakit.checkpoint.save_checkpoint`: only ``state_dict()``."""

    state: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.state


def _collective_device() -> torch.device:
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _unresponsive_ranks(rank: int, world_size: int) -> list[int]:
    """The ranks that do not check in within :data:`PROBE_S` through torchrun's store (which outlives the
    workers: torchrun's agent holds it), or [] when there is no store to ask."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return []
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=PROBE_S))
        store.set(f"lorakit/alive/{rank}", "1")
        deadline = time.monotonic() + PROBE_S
        keys = [f"lorakit/alive/{r}" for r in range(world_size)]
        while time.monotonic() < deadline and not store.check(keys):
            time.sleep(0.1)
        return [r for r, key in enumerate(keys) if not store.check([key])]
    except Exception:  # the store itself is gone: nothing more to learn
        return []


def start(strategy: str = "ddp") -> Ranks:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), or for FSDP in any case.

    Sets the CUDA device to ``LOCAL_RANK``, picks NCCL on CUDA and gloo on CPU, sets the collective timeout
    (:data:`TIMEOUT_S`), and makes a rank that torchrun stops (SIGTERM: another rank failed) say so and exit.

    Args:
        strategy (str): ``train.strategy``. Default ``"ddp"``.

    Returns:
        Ranks: Rank 0 of 1 (nothing joined) for a plain single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and strategy != "fsdp":
        return Ranks(strategy=strategy)
    if dist.is_initialized():  # started by the caller (a test, a notebook under torchrun)
        return Ranks(dist.get_rank(), dist.get_world_size(), strategy, joined=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:  # torchrun's (or another launcher's) env://
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    else:  # one process without torchrun (FSDP on one device): a private in-memory store
        dist.init_process_group(
            "nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), strategy, joined=True, owns_group=True)
    if world_size > 1:
        signal.signal(signal.SIGTERM, lambda *_: _stopped_by_launcher(ranks.rank))
    return ranks


def _stopped_by_launcher(rank: int) -> None:
    sys.stderr.write(
        f"rank {rank}: stopped by the launcher (SIGTERM): another rank failed, torchrun's report names it; "
        "continue from the last complete checkpoint with --resume\n"
    )
    sys.stderr.flush()
    os._exit(143)


def check_strategy(strategy: str, method: str, optimizer: str) -> None:
    """Refuse what FSDP cannot shard, naming the field and what works.

    Raises:
        ConfigError: ``train.strategy=fsdp`` with an adapter method or optimizer it does not support.
    """
    if strategy != "fsdp":
        return
    shardable = [name for name, record in METHODS.items() if record.lora_factors]  # plain A and B factors
    if method not in shardable:
        raise ConfigError(
            f"train.strategy=fsdp: expected adapter.method one of {', '.join(shardable)}, got {method!r} "
            "(its training edits adapter tensors between steps, outside what FSDP gathers); use strategy=ddp"
        )
    if optimizer not in FSDP_OPTIMIZERS:
        raise ConfigError(
            f"train.strategy=fsdp: expected train.optimizer one of {', '.join(FSDP_OPTIMIZERS)}, got "
            f"{optimizer!r} (8-bit and paged states are not shaped like the parameter shards); use strategy=ddp"
        )


class _SilentLog:
    """What ranks other than 0 log to: nothing (rank 0 writes ``metrics.jsonl``)."""

    def write(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_log(ranks: Ranks, out: Any, tensorboard: bool) -> Any:
    """Rank 0's :class:`~lorakit.plot.MetricsLog`; a log that writes nothing on the other ranks."""
    return MetricsLog(out, tensorboard) if ranks.is_main else _SilentLog()


def save_checkpoint_on_main(
    ranks: Ranks, directory: Any, run: Any, state: dict[str, Any], keep_last: int
) -> None:
    """Rank 0 writes a checkpoint of ``run`` (model, optimizer, hooks) and prunes the old ones; every rank must
    call it, because under FSDP the adapter and the optimizer states are gathered from all ranks first."""
    optimizer = ranks.full_optimizer(run.optimizer)
    with ranks.full_parameters(run.model):
        if ranks.is_main:
            save_checkpoint(directory, run.model, optimizer, state, run.adapter, hooks=run.hooks)
            prune_checkpoints(directory.parent, keep_last)


def save_adapter_on_main(
    ranks: Ranks,
    model: nn.Module,
    directory: Any,
    hooks: TrainingHooks | None = None,
    adapter: str = "default",
) -> None:
    """Rank 0 writes the adapter named ``adapter`` into ``directory`` (and, given ``hooks``, the directories they export, e.g.
    PiSSA's ``as_lora/``); every rank must call it (FSDP gathers the adapter from all ranks first)."""
    with ranks.full_parameters(model):
        if ranks.is_main:
            save_adapter(model, directory, adapter)
            for subdir, (tensors, config) in (hooks.exports(model) if hooks else {}).items():
                write_adapter_dir(directory / subdir, tensors, config)
