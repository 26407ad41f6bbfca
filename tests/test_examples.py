"""The example the README points to runs as shipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_examples_demo_trains_saves_and_reloads():
    # One intra-op thread (as conftest.one_torch_thread): on a loaded 2-core machine a second one only adds
    # OpenMP spinning: the demo took 71 s with two threads and 7 s with one, and failed in busy suite runs
    # (likely its timeout).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trainable params: 131,072 || all params: 787,584 || trainable%: 16.6423" in done.stdout
    assert "ok: trained, saved in PEFT format, reloaded with identical loss" in done.stdout
