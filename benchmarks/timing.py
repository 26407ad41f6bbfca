"""Round-robin timing for the side-by-side benchmarks: every variant sees the same machine load."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Run each function ``warmup`` times untimed, then all of them ``repeats`` times round-robin.

    Args:
        fns (dict[str, Callable[[], object]]): Name -> the work to time (synchronize inside if it runs async).
        repeats (int): Timed runs per function.
        warmup (int): Untimed runs per function first. Default 1.

    Returns:
        dict[str, dict[str, float]]: Name -> ``{"median_s", "min_s"}``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}
