"""Where a benchmark's JSON goes, and the machine it names: ``benchmarks/results/<name>.<kind>.json``.

Figures from an AMX Xeon, an AVX512_BF16 EPYC and an AVX2-only desktop differ by up to 70x wherever bf16 is
involved, so every results file records the machine (:func:`lorakit.hardware.machine_summary`) and is named after
its kind: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2``, or ``avx2-emulated`` when torch and oneDNN were capped at
AVX2 on a wider CPU (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``). A run on one kind never overwrites
another kind's figures. The emulation caps torch's and oneDNN's kernels only: bitsandbytes' own C kernels still
use whatever the CPU has.

Call :func:`write_results` after ``torch.set_num_threads`` (the record includes torch's thread count).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from lorakit.hardware import machine_summary

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The variables that make torch / oneDNN behave as on an AVX2-only CPU; bitsandbytes ignores both.
EMULATION_VARIABLES = {"ONEDNN_MAX_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2"}
_KINDS = {"AMX": "amx", "AVX512_BF16": "avx512_bf16", "AVX512": "avx512", "AVX2": "avx2"}


def emulation() -> dict[str, str] | None:
    """The ISA-capping variables set in this process's environment (None: neither is set)."""
    found = {name: os.environ[name] for name in EMULATION_VARIABLES if os.environ.get(name)}
    return found or None


def avx2_emulated() -> bool:
    """Whether torch and oneDNN are both capped at AVX2 here (both variables set to AVX2)."""
    found = emulation() or {}
    return all(found.get(name, "").lower() == value for name, value in EMULATION_VARIABLES.items())


def machine_record() -> dict:
    """:func:`lorakit.hardware.machine_summary` plus the emulation variables and ``OMP_NUM_THREADS``."""
    machine = machine_summary()
    machine["avx2_emulated"] = avx2_emulated()
    machine["isa_caps"] = emulation()
    machine["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return machine


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-")


def kind(machine: dict, device: str = "cpu") -> str:
    """The file-name slug of a machine record: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2``, ``avx2-emulated``
    (else the ISA lower-cased, e.g. ``default`` on ARM; ``-capped`` appended when only part of the caps is set).
    A benchmark run on ``device="cuda"`` is named after the GPU instead: ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.startswith("cuda"):
        return f"cuda-{_slug(machine.get('gpu', 'unknown'))}"
    if machine.get("avx2_emulated"):
        return "avx2-emulated"
    slug = _KINDS.get(machine["isa"]) or _slug(machine["isa"])
    return f"{slug}-capped" if machine.get("isa_caps") else slug


def results_path(name: str, machine: dict, device: str = "cpu") -> Path:
    """``benchmarks/results/<name>.<kind>.json`` for ``machine``."""
    return RESULTS_DIR / f"{name}.{kind(machine, device)}.json"


def read_results(name: str, out: Path | None = None) -> dict | None:
    """The results file this machine would write (or ``out``), None if there is none: for scripts that rerun part
    of a benchmark and keep the rest."""
    path = out or results_path(name, machine_record())
    return json.loads(path.read_text()) if path.is_file() else None


def write_results(name: str, document: dict, out: Path | None = None, device: str = "cpu") -> Path:
    """Write ``{"machine": ..., **document}`` to ``out`` (default :func:`results_path`), atomically.

    The JSON goes to a temporary file in the same directory, then replaces the target (``os.replace``), so a run
    killed half-way leaves the previous figures intact.

    Args:
        name (str): The benchmark: ``quant``, ``dora``, ... (the file-name stem).
        document (dict): The figures; a ``machine`` key in it is replaced.
        out (Path | None): Another destination (its kind is then up to the caller). Default None.
        device (str): Where the benchmark ran: ``"cpu"`` or ``"cuda"`` (names the kind). Default ``"cpu"``.

    Returns:
        Path: Where the file was written.
    """
    machine = machine_record()
    path = out or results_path(name, machine, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"machine": machine, **{k: v for k, v in document.items() if k != "machine"}}, indent=2)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path} ({kind(machine, device)}: {machine['cpu']}, {machine['threads']} threads)")
    return path
