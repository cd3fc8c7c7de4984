"""Plan-side helpers shared by every study: a curve, its runs' specs, its resources.

A curve is one Snakemake job: the runs of one configuration at the batch sizes
``batch_start`` doubling up to ``batch_cap`` (one size for a single run). Its
``run`` holds the configuration every run gets (plus its batch size and seed).
"""

from __future__ import annotations

from privbench import harness

# Memory a curve job needs beyond its runs' budgets (the harness, the framework's imports).
JOB_MEMORY_SLACK_MB = 4096
# Minutes a curve job needs beyond its runs' time limits (process start, writing records).
JOB_RUNTIME_SLACK_MIN = 5


def curve(config: dict, experiment: str, curve_id: str, run: dict, batch_start: int, batch_cap: int,
          limits: dict | None = None, run_id: str | None = None) -> dict:
    """One curve of ``experiment``: ``run`` is the configuration of every run, ``limits``
    the run limits (default: the preset's ``run`` section), ``run_id`` the id of a single
    run if it is not ``<curve_id>-b<batch>``."""
    out = {"curve_id": curve_id, "experiment": experiment, "preset": config["preset"],
           "platform": config["platform"], "runner": config["runner"],
           "limits": dict(limits if limits is not None else config["run"]),
           "batch_start": batch_start, "batch_cap": batch_cap, "run": run}
    if run_id is not None:
        out["run_id"] = run_id
    return out


def make_run_spec(curve: dict, batch: int) -> dict:
    """The spec of the curve's run at ``batch`` (its ``spec_hash`` identifies it)."""
    limits = dict(curve["limits"])
    config = {**curve["run"], "batch_size": batch, "seed": limits.pop("seed")}
    run_id = curve.get("run_id", f"{curve['curve_id']}-b{batch}")
    return harness.make_spec(curve["experiment"], curve["preset"], run_id, config, limits, curve["platform"])


def memory_mb(curve: dict) -> int:
    """What the curve job may hold: every party of a run (the worker, or each Flower
    client) may use the memory budget."""
    return curve["run"].get("num_clients", 1) * curve["limits"]["memory_budget_mb"] + JOB_MEMORY_SLACK_MB


def runtime_min(curve: dict) -> int:
    """Every run of the curve at its time limit, plus slack for the harness."""
    runs = len(harness.batch_sizes(curve["batch_start"], curve["batch_cap"]))
    return int(runs * curve["limits"]["timeout_s"] / 60) + JOB_RUNTIME_SLACK_MIN
