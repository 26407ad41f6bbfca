"""What this machine is and which precision suits it: the ``auto`` in ``compute_dtype`` and ``precision``.

bf16 halves memory traffic, but on a CPU it is only fast where the hardware multiplies bf16 natively (Intel AMX,
AVX512_BF16 on Intel Cooper Lake+ and AMD Zen 4+). Elsewhere (AVX2-only parts: most AMD Zen 2/3 and consumer
Intel CPUs) oneDNN emulates it, about 70x slower than fp32. So ``auto`` is decided in two steps, as
transformers' ``torch_dtype="auto"`` and llama.cpp's run-time ISA dispatch decide theirs:

1. what torch says: oneDNN's bf16 support on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported``);
2. a timing probe confirms it: one small bf16 and one fp32 matmul, a few tens of ms, once per process. bf16 counts
   as native when it reaches at least half the fp32 rate (measured: 2.3x faster on an AVX512_BF16 EPYC, 60-80x
   slower where emulated, so the threshold sits far from both).

CUDA: bf16 where ``torch.cuda.is_bf16_supported()``, else fp16 (with loss scaling in training).

The probe is injectable (:func:`set_bf16_probe`, or ``LORAKIT_NATIVE_BF16=0|1`` in the environment) so tests and
users can force either answer. ``lorakit env`` prints all of it.
"""

from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The names users write for a dtype / a training precision; "auto" is resolved here.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_PRECISION_OF_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# bf16 is native when its matmul reaches this fraction of fp32's (native: >= 1x, emulated: ~1/70).
NATIVE_RATIO = 0.5
_PROBE_SIZE = 256  # [256, 256] @ [256, 256]: 34 MFLOP, ~0.5 ms in fp32, ~25 ms in emulated bf16


@dataclass(frozen=True)
class Bf16Report:
    """Whether bf16 matmul is native on a device, and the evidence.

    Attributes:
        native (bool): bf16 matmul runs at least ``NATIVE_RATIO`` x the fp32 rate.
        device (str): ``"cpu"`` or ``"cuda"``.
        reason (str): One line: what decided it.
        fp32_gflops (float | None): Measured fp32 matmul rate of the probe (one thread), None if not timed.
        bf16_gflops (float | None): Measured bf16 matmul rate of the probe, None if not timed.
    """

    native: bool
    device: str
    reason: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    @property
    def slowdown(self) -> float | None:
        """How many times slower bf16 matmul is than fp32 here (None if not timed)."""
        if not self.fp32_gflops or not self.bf16_gflops:
            return None
        return self.fp32_gflops / self.bf16_gflops


def matmul_gflops(dtype: torch.dtype, n: int = 512, seconds: float = 0.2, device: str = "cpu") -> float:
    """The measured rate of an ``[n, n] @ [n, n]`` matmul in ``dtype`` on ``device``, in GFLOP/s.

    Runs for about ``seconds`` after one warm-up product, with torch's current thread count.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: oneDNN builds its kernel on the first call
    if device == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed / 1e9


def _timed_probe(rounds: int = 3) -> tuple[float, float]:
    """fp32 and bf16 GFLOP/s of the probe product on one thread: the best of ``rounds`` interleaved timings,
    so a burst of load on a shared machine slows both dtypes alike instead of one of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(_PROBE_SIZE, _PROBE_SIZE)
        pairs = {
            dtype: (a.to(dtype), a.t().contiguous().to(dtype)) for dtype in (torch.float32, torch.bfloat16)
        }
        best = dict.fromkeys(pairs, float("inf"))
        for x, y in pairs.values():
            x @ y  # warm-up: oneDNN builds its kernel on the first call
        for _ in range(rounds):
            for dtype, (x, y) in pairs.items():
                start = time.perf_counter()
                x @ y
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    flop = 2 * _PROBE_SIZE**3
    return flop / best[torch.float32] / 1e9, flop / best[torch.bfloat16] / 1e9


def _onednn_bf16() -> bool:
    """oneDNN's own answer: does this CPU have a bf16 ISA (AVX512_BF16 / AMX) it will use."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_bf16_probe(device: str = "cpu") -> Bf16Report:
    """Decide whether bf16 is native on ``device``: torch's capability check, confirmed by a timing probe."""
    if device == "cuda":
        native = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name()
        return Bf16Report(native, "cuda", f"torch.cuda.is_bf16_supported() is {native} on {name}")
    forced = os.environ.get("LORAKIT_NATIVE_BF16")
    if forced in ("0", "1"):
        return Bf16Report(forced == "1", "cpu", f"LORAKIT_NATIVE_BF16={forced} in the environment")
    if not _onednn_bf16():
        # Timed anyway: the slowdown is what the warning for an explicit bf16 quotes.
        fp32, bf16 = _timed_probe()
        capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
        isa = f"{cpu_isa()}, ONEDNN_MAX_CPU_ISA={capped}" if capped else cpu_isa()
        reason = f"no bf16 instructions for oneDNN on this CPU ({isa}): bf16 is emulated"
        return Bf16Report(False, "cpu", reason, fp32, bf16)
    fp32, bf16 = _timed_probe()
    native = bf16 >= NATIVE_RATIO * fp32
    verdict = "native" if native else "slower than fp32 despite the ISA"
    reason = f"{cpu_isa()}: bf16 matmul {bf16:.1f} vs fp32 {fp32:.1f} GFLOP/s (1 thread): {verdict}"
    return Bf16Report(native, "cpu", reason, fp32, bf16)


_probe: Callable[[str], Bf16Report] = default_bf16_probe


@functools.cache
def bf16_report(device: str = "cpu") -> Bf16Report:
    """The bf16 verdict for ``device`` (``"cpu"`` or ``"cuda"``), probed once per process."""
    return _probe(device)


def set_bf16_probe(probe: Callable[[str], Bf16Report] | None) -> None:
    """Replace the bf16 probe (None: the default one) and forget cached verdicts and warnings.

    Args:
        probe (Callable[[str], Bf16Report] | None): Called with ``"cpu"`` or ``"cuda"``.
    """
    global _probe
    _probe = probe or default_bf16_probe
    bf16_report.cache_clear()
    _warned.clear()


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def auto_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The compute dtype ``auto`` means on ``device`` (default: CUDA if present, else CPU).

    CUDA: bf16 where supported, else fp16. CPU: bf16 where bf16 matmul is native, else fp32.
    """
    kind = _device_type(device)
    if kind == "cuda":
        return torch.bfloat16 if bf16_report("cuda").native else torch.float16
    if kind == "cpu":
        return torch.bfloat16 if bf16_report("cpu").native else torch.float32
    return torch.float32


def resolve_dtype(value: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """A dtype name (``"auto"``, ``"bfloat16"``, ``"float16"``, ``"float32"``) or dtype as a ``torch.dtype``.

    An explicit bf16 on a CPU without native bf16 is honoured, with one warning (:func:`warn_if_emulated`).

    Raises:
        ValueError: An unknown name.
    """
    if isinstance(value, torch.dtype):
        dtype = value
    elif value == "auto":
        return auto_dtype(device)
    elif value in DTYPE_NAMES:
        dtype = DTYPE_NAMES[value]
    else:
        raise ValueError(f"unknown dtype {value!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    warn_if_emulated(dtype, device)
    return dtype


def resolve_precision(value: str, device: torch.device | str | None = None) -> str:
    """A training precision (``"auto"``, ``"bf16"``, ``"fp16"``, ``"fp32"``) with ``auto`` resolved."""
    if value == "auto":
        return _PRECISION_OF_DTYPE[auto_dtype(device)]
    if value == "bf16":
        warn_if_emulated(torch.bfloat16, device)
    return value


_warned: set[str] = set()


def warn_if_emulated(dtype: torch.dtype, device: torch.device | str | None = None) -> None:
    """Warn once per process when bf16 is asked for on a CPU that only emulates it."""
    if dtype != torch.bfloat16 or _device_type(device) != "cpu" or "cpu" in _warned:
        return
    report = bf16_report("cpu")
    if report.native:
        return
    _warned.add("cpu")
    slower = f"about {report.slowdown:.0f}x slower than fp32" if report.slowdown else "much slower than fp32"
    warnings.warn(
        f"bf16 was asked for, but this CPU has no native bf16 matmul ({report.reason}); it runs {slower} "
        "here. Use compute_dtype=auto / precision=auto (fp32 on this machine), or float32 / fp32 explicitly.",
        stacklevel=3,
    )


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as a bug report names it."""

    model: str
    isa: str
    cores: int
    threads: int


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa() -> str:
    """The widest vector ISA of this CPU that matters here: ``"AMX"``, ``"AVX512_BF16"``, ``"AVX512"``,
    ``"AVX2"`` (else what torch reports, e.g. ``"NO AVX"`` or ``"DEFAULT"`` on ARM)."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    if "avx512f" in flags:
        return "AVX512"
    if "avx2" in flags:
        return "AVX2"
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def cpu_info() -> CpuInfo:
    """Model name, ISA level, physical cores and the threads torch uses."""
    model = platform.processor() or platform.machine()
    cores: set[tuple[str, str]] = set()
    try:
        physical = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value
            elif key == "physical id":
                physical = value
            elif key == "core id":
                core = value
                cores.add((physical, core))
    except OSError:
        pass
    return CpuInfo(model, cpu_isa(), len(cores) or (os.cpu_count() or 1), torch.get_num_threads())


def machine_summary() -> dict:
    """The machine in a few fields, for every benchmark's JSON and every published figure."""
    cpu = cpu_info()
    out = {"cpu": cpu.model, "isa": cpu.isa, "cores": cpu.cores, "threads": torch.get_num_threads()}
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["bf16_native_cpu"] = bf16_report("cpu").native
    out["auto_dtype"] = str(auto_dtype()).removeprefix("torch.")
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    out["versions"] = versions()
    return out


def versions() -> dict[str, str | None]:
    """Versions of lorakit and the libraries whose behaviour it depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("lorakit", "torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def environment_report(measure_seconds: float = 0.3) -> dict:
    """Everything ``lorakit env`` prints: versions, devices, CPU, measured matmul rates, bf16 and ``auto``.

    Args:
        measure_seconds (float): Time per matmul measurement (fp32 and bf16, with torch's thread count).
    """
    cpu = cpu_info()
    report = bf16_report("cpu")
    fp32 = matmul_gflops(torch.float32, seconds=measure_seconds)
    # Emulated bf16 is ~70x slower: a smaller product keeps the measurement short there.
    bf16 = matmul_gflops(torch.bfloat16, 512 if report.native else 256, seconds=measure_seconds)
    out = {
        "versions": versions(),
        "platform": platform.platform(),
        "cpu": asdict(cpu) | {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "cpu_matmul_gflops": {"float32": round(fp32, 1), "bfloat16": round(bf16, 1), "threads": cpu.threads},
        "bf16_native": {"cpu": report.native, "reason": report.reason},
        "auto": {"cpu": str(auto_dtype("cpu")).removeprefix("torch.")},
        "cuda": None,
    }
    if torch.cuda.is_available():
        cuda = bf16_report("cuda")
        out["cuda"] = {
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "version": torch.version.cuda,
            "bf16_native": cuda.native,
        }
        out["auto"]["cuda"] = str(auto_dtype("cuda")).removeprefix("torch.")
    out["auto"]["default_device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return out


def format_environment(report: dict) -> str:
    """:func:`environment_report` as the lines ``lorakit env`` prints (paste them into a bug report)."""
    cpu, rates = report["cpu"], report["cpu_matmul_gflops"]
    versions_line = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None)
    missing = [k for k, v in report["versions"].items() if v is None]
    lines = [
        f"versions:      {versions_line}" + (f" (not installed: {', '.join(missing)})" if missing else ""),
        f"platform:      {report['platform']}",
        f"cpu:           {cpu['model']}",
        f"isa:           {cpu['isa']} (torch kernels: {cpu['torch_cpu_capability']}), {cpu['cores']} cores, "
        f"torch uses {cpu['threads']} threads",
        f"cpu matmul:    float32 {rates['float32']} GFLOP/s, bfloat16 {rates['bfloat16']} GFLOP/s "
        f"({rates['threads']} threads)",
        f"bf16 native:   {'yes' if report['bf16_native']['cpu'] else 'no'} ({report['bf16_native']['reason']})",
    ]
    cuda = report["cuda"]
    if cuda:
        lines.append(
            f"cuda:          {cuda['version']}, {', '.join(cuda['devices'])}, bf16 {cuda['bf16_native']}"
        )
    else:
        lines.append("cuda:          none")
    auto = ", ".join(f"{k} -> {v}" for k, v in report["auto"].items() if k != "default_device")
    lines.append(f"auto:          {auto} (runs on {report['auto']['default_device']} by default)")
    return "\n".join(lines)
