"""``lorakit train --nproc N``: start ``torchrun`` with N copies of the same ``lorakit train`` command.

It runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m lorakit train ...`` (a free port on
this machine, so runs side by side do not collide), and gives each rank ``cores / N`` threads unless
``OMP_NUM_THREADS`` is set. torchrun stops every rank when one fails and names it in its report; this command then
says how to continue (docs/distributed.md).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from lorakit.errors import ConfigError


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """The command line that runs ``lorakit <train_args>`` on ``nproc`` ranks of this machine.

    Raises:
        ConfigError: ``nproc`` below 1.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc: expected a number of processes >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorakit", *train_args]  # fmt: skip


def launch(nproc: int, train_args: list[str]) -> int:
    """Run ``lorakit <train_args>`` under torchrun on ``nproc`` ranks; returns torchrun's exit status."""
    command = torchrun_command(nproc, train_args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"starting {nproc} ranks: torchrun --standalone --nproc-per-node={nproc} -m lorakit "
          f"{shlex.join(train_args)}", flush=True)  # fmt: skip
    status = subprocess.call(command, env=env)
    if status != 0:
        again = [a for a in train_args if a != "--resume"] + ["--resume", "--nproc", str(nproc)]
        print(f"error: the {nproc}-rank run failed (torchrun exit status {status}); the report above names the "
              f"rank. Continue from the last complete checkpoint with:\n  lorakit {shlex.join(again)}",
              file=sys.stderr)  # fmt: skip
    return status
