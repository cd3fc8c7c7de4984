"""Sizing a preset before submitting it: jobs, runs, worst-case wall time, core and GPU hours.

Every figure is an upper bound from the preset's time limits, as a scheduler sees them:
each curve job asks for its runs' time limits plus slack (``studies.curves.runtime_min``,
what the rules request), runs every batch size up to its cap (a real curve stops at its
first out-of-memory run), and holds its cores and GPU throughout. Wall time assumes
``parallel_jobs`` jobs at once (the SLURM profile's ``jobs:``), longest jobs first.
"""

from __future__ import annotations

import heapq

from privbench import studies
from privbench.studies import curves as curves_mod


def estimate(config: dict, cores_per_job: int, parallel_jobs: int) -> dict:
    """Per experiment and in total: jobs, runs, job hours, core hours, GPU hours, worst-case wall time."""
    gpus_per_job = 1 if config["platform"] == "cuda" else 0
    rows, all_minutes = [], []
    for name in config["experiments"]:
        minutes, runs = [], 0
        for curve in studies.plan(name).curves(config).values():
            minutes.append(curves_mod.runtime_min(curve))
            runs += len(curves_mod.planned_runs(curve))
        all_minutes += minutes
        rows.append(_row(name, minutes, runs, cores_per_job, gpus_per_job))
    total = _row("total", all_minutes, sum(row["runs"] for row in rows), cores_per_job, gpus_per_job)
    return {"experiments": rows, "total": total, "cores_per_job": cores_per_job, "gpus_per_job": gpus_per_job,
            "parallel_jobs": parallel_jobs, "wall_hours": _makespan(all_minutes, parallel_jobs) / 60,
            "serial_wall_hours": sum(all_minutes) / 60}


def _row(name: str, minutes: list[int], runs: int, cores: int, gpus: int) -> dict:
    hours = sum(minutes) / 60
    return {"experiment": name, "jobs": len(minutes), "runs": runs, "job_hours": hours,
            "longest_job_hours": max(minutes, default=0) / 60, "core_hours": hours * cores,
            "gpu_hours": hours * gpus}


def _makespan(minutes: list[int], slots: int) -> float:
    """Minutes until the last job ends with ``slots`` at once, each job to the first free slot, longest first."""
    free_at = [0.0] * max(1, slots)
    for duration in sorted(minutes, reverse=True):
        heapq.heappush(free_at, heapq.heappop(free_at) + duration)
    return max(free_at)


def format_estimate(result: dict) -> str:
    """The estimate as a table and a closing summary, for the command line."""
    header = f"{'experiment':<16}{'jobs':>6}{'runs':>7}{'job h':>10}{'longest h':>11}{'core h':>10}{'GPU h':>9}"
    lines = [header]
    for row in [*result["experiments"], result["total"]]:
        lines.append(f"{row['experiment']:<16}{row['jobs']:>6}{row['runs']:>7}{row['job_hours']:>10.1f}"
                     f"{row['longest_job_hours']:>11.1f}{row['core_hours']:>10.1f}{row['gpu_hours']:>9.1f}")
    lines.append(
        f"worst case (every run at its time limit, every curve to its batch cap): {result['wall_hours']:.1f} h "
        f"of wall time with {result['parallel_jobs']} jobs at once ({result['serial_wall_hours']:.1f} h one at a "
        f"time); each job {result['cores_per_job']} cores and {result['gpus_per_job']} GPU(s)")
    return "\n".join(lines)
