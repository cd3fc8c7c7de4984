"""Timing of training steps, warm-up (compilation) apart.

Two loops:

- :func:`time_blocks`, the published benchmark's loop: steps dispatched back to
  back and synchronised once, at the end of a block. The number of steps is
  calibrated per run (at least ``min_steps`` steps and, at the first block's pace,
  ``min_seconds`` of timed work), split into a few blocks whose per-step times give the spread; the
  throughput is every timed example over the whole timed time.
- :func:`time_steps`: every step synchronised and timed on its own (the memory
  page meters each step; the CIFAR-100 page times its own epochs).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable


def _warm_up(step, sync, warmup_steps: int, metrics: dict, progress) -> None:
    start = time.perf_counter()
    for i in range(warmup_steps):
        sync(step())
        progress(f"warm-up step {i + 1}/{warmup_steps} done")
    metrics["warmup_s"] = time.perf_counter() - start


def time_blocks(step: Callable[[], object], sync: Callable[[object], None], warmup_steps: int,
                min_steps: int, min_seconds: float, blocks: int, metrics: dict,
                progress: Callable[[str], None]) -> None:
    """Run warm-up, then ``blocks`` blocks of back-to-back steps, each synchronised
    once at its end (on its last step's output only), into ``metrics["block_steps"]``
    and ``metrics["block_times_s"]`` as it goes.

    The first block has ceil(min_steps / blocks) steps; its time per step sizes the
    other blocks (all equal) so that all blocks together hold at least ``min_steps``
    steps and, at the first block's pace, ``min_seconds`` of timed work: a 20 ms step
    is not judged on 5 samples, and a slow step is not run longer than ``min_steps`` asks. Filling
    ``metrics`` progressively means that a run which fails part-way still reports
    what it measured.
    """
    _warm_up(step, sync, warmup_steps, metrics, progress)
    block_steps = metrics.setdefault("block_steps", [])
    block_times = metrics.setdefault("block_times_s", [])
    size = math.ceil(min_steps / blocks)
    planned = size * blocks
    for k in range(blocks):
        t0 = time.perf_counter()
        handle = None
        for _ in range(size):
            handle = step()
        sync(handle)
        block_times.append(time.perf_counter() - t0)
        block_steps.append(size)
        if k == 0 and blocks > 1:  # calibrate the remaining blocks on the first one
            per_step = block_times[0] / size
            total = max(min_steps, math.ceil(min_seconds / per_step) if per_step > 0 else min_steps)
            size = max(1, math.ceil((total - size) / (blocks - 1)))
            planned = block_steps[0] + size * (blocks - 1)
        # "step i/n: t s" is the line the harness reads back from a run it had to kill
        progress(f"step {sum(block_steps)}/{planned}: {block_times[-1] / block_steps[-1]:.4f} s per step "
                 f"(block {k + 1}/{blocks}: {block_steps[-1]} back-to-back steps in {block_times[-1]:.3f} s)")


def time_steps(step: Callable[[], object], sync: Callable[[object], None], warmup_steps: int,
               timed_steps: int, metrics: dict, progress: Callable[[str], None]) -> None:
    """Run warm-up then timed steps, each synchronised and timed on its own, into
    ``metrics["step_times_s"]`` as it goes (see :func:`time_blocks`)."""
    _warm_up(step, sync, warmup_steps, metrics, progress)
    times = metrics.setdefault("step_times_s", [])
    report_every = max(1, timed_steps // 10)
    for i in range(timed_steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
        if (i + 1) % report_every == 0 or i + 1 == timed_steps:
            progress(f"step {i + 1}/{timed_steps}: {times[-1]:.4f} s (mean so far {statistics.fmean(times):.4f} s)")


def _spread(per_step: list[float], mean: float, batch_size: int) -> dict:
    """Throughput from the mean step time, spread from a list of per-step times."""
    std = statistics.pstdev(per_step) if len(per_step) > 1 else 0.0
    return {
        "mean_step_s": mean,
        "median_step_s": statistics.median(per_step),
        "std_step_s": std,
        "cv_step": std / mean if mean else None,
        "min_step_s": min(per_step),
        "max_step_s": max(per_step),
        "throughput_sps": batch_size / mean,
    }


def summarise(step_times: list[float], batch_size: int) -> dict:
    """Throughput and spread of a list of step times (:func:`time_steps`)."""
    if not step_times:
        return {"throughput_sps": None}
    ordered = sorted(step_times)
    return {
        **_spread(step_times, statistics.fmean(step_times), batch_size),
        "p10_step_s": ordered[int(0.1 * (len(ordered) - 1))],
        "p90_step_s": ordered[int(0.9 * (len(ordered) - 1))],
    }


def summarise_blocks(block_steps: list[int], block_times: list[float], batch_size: int) -> dict:
    """Throughput of timed blocks (:func:`time_blocks`): every timed example over the
    whole timed time; the spread (std, cv, min, max) is that of the blocks' times per step."""
    if not block_steps:
        return {"throughput_sps": None}
    per_step = [t / n for n, t in zip(block_steps, block_times)]
    return {
        **_spread(per_step, sum(block_times) / sum(block_steps), batch_size),
        "timed_steps_done": sum(block_steps),
        "timing_blocks": len(block_steps),
    }
