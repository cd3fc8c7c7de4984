"""Plan-side helpers shared by every study: a curve, its runs' specs, its resources.

A curve is one Snakemake job: the runs of one configuration at the batch sizes
``batch_start`` doubling up to ``batch_cap`` (one size for a single run). Its
``run`` holds the configuration every run gets (plus its batch size and seed).

A repeat round is a curve job too (``repeat-r<k>``): the study's claim points (the
runs a published claim is judged on) once more each, every one in a new process, as
repeat ``k``. Rounds are jobs of their own, and each runs every claim point once before
the next reruns any: the repeats of one point are interleaved with other runs, and a
claim's ratio pairs runs of one round, taken minutes apart.
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


def make_run_spec(curve: dict, batch: int, repeat: int = 0) -> dict:
    """The spec of the curve's run at ``batch`` (its ``spec_hash`` identifies it); ``repeat``
    k >= 1 is the k-th rerun of that run in a new process, run id suffixed ``-r<k>``."""
    limits = dict(curve["limits"])
    config = {**curve["run"], "batch_size": batch, "seed": limits.pop("seed"), "repeat": repeat}
    run_id = curve.get("run_id", f"{curve['curve_id']}-b{batch}") + (f"-r{repeat}" if repeat else "")
    return harness.make_spec(curve["experiment"], curve["preset"], run_id, config, limits, curve["platform"])


def repeat_rounds(config: dict, experiment: str, points: list[tuple[dict, int]]) -> dict[str, dict]:
    """The repeat rounds of ``experiment``: ``<experiment>.repeats`` - 1 curve jobs, round k
    running every claim point ``(curve, batch size)`` once as repeat k. Round k starts k points
    further along the list (a rotation): no point always runs first, and where two rounds run
    one after the other, none of three or more points runs twice in a row."""
    out = {}
    for k in range(1, config[experiment]["repeats"] if points else 1):
        ordered = points[k % len(points):] + points[:k % len(points)]
        out[f"repeat-r{k}"] = {"curve_id": f"repeat-r{k}", "experiment": experiment, "preset": config["preset"],
                               "platform": config["platform"], "runner": config["runner"], "repeat": k,
                               "points": [{"curve": c, "batch_size": b} for c, b in ordered]}
    return out


def planned_runs(curve: dict) -> list[tuple[dict, int, int]]:
    """``(curve, batch size, repeat)`` of every run a curve job may make, in order: a batch
    sweep's sizes (repeat 0; a sweep stops at its first failure), or a repeat round's points."""
    if "points" in curve:
        return [(point["curve"], point["batch_size"], curve["repeat"]) for point in curve["points"]]
    return [(curve, batch, 0) for batch in harness.batch_sizes(curve["batch_start"], curve["batch_cap"])]


def memory_mb(curve: dict) -> int:
    """What the curve job may hold: every party of a run (the worker, or each Flower
    client) may use the memory budget; runs come one at a time."""
    return max(c["run"].get("num_clients", 1) * c["limits"]["memory_budget_mb"]
               for c, _, _ in planned_runs(curve)) + JOB_MEMORY_SLACK_MB


def runtime_min(curve: dict) -> int:
    """Every run of the curve job at its time limit, plus slack for the harness."""
    return int(sum(c["limits"]["timeout_s"] for c, _, _ in planned_runs(curve)) / 60) + JOB_RUNTIME_SLACK_MIN
