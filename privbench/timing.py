"""Timing of training steps: warm-up (compilation) apart, every step kept."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_steps(step: Callable[[], object], sync: Callable[[object], None], warmup_steps: int,
               timed_steps: int, metrics: dict, progress: Callable[[str], None]) -> None:
    """Run warm-up then timed steps, writing into ``metrics`` as it goes.

    Filling ``metrics`` progressively means that a run which fails part-way
    still reports what it measured. Each step is synchronised so its time is
    the device's, not the dispatcher's.
    """
    start = time.perf_counter()
    for i in range(warmup_steps):
        sync(step())
        progress(f"warm-up step {i + 1}/{warmup_steps} done")
    metrics["warmup_s"] = time.perf_counter() - start
    times = metrics.setdefault("step_times_s", [])
    report_every = max(1, timed_steps // 10)
    for i in range(timed_steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
        if (i + 1) % report_every == 0 or i + 1 == timed_steps:
            progress(f"step {i + 1}/{timed_steps}: {times[-1]:.4f} s (mean so far {statistics.fmean(times):.4f} s)")


def summarise(step_times: list[float], batch_size: int) -> dict:
    """Throughput and spread of a list of step times."""
    if not step_times:
        return {"throughput_sps": None}
    mean = statistics.fmean(step_times)
    std = statistics.pstdev(step_times) if len(step_times) > 1 else 0.0
    ordered = sorted(step_times)
    return {
        "mean_step_s": mean,
        "median_step_s": statistics.median(step_times),
        "std_step_s": std,
        "cv_step": std / mean if mean else None,
        "min_step_s": ordered[0],
        "max_step_s": ordered[-1],
        "p10_step_s": ordered[int(0.1 * (len(ordered) - 1))],
        "p90_step_s": ordered[int(0.9 * (len(ordered) - 1))],
        "throughput_sps": batch_size / mean,
    }
