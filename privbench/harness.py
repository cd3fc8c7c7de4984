"""The parent side of the run harness: one configuration, one process, one record.

``run_isolated`` starts the worker in a fresh process (through the configured
runner), enforces the time limit, streams the worker's progress into the log,
and writes the record atomically whatever happened: ``ok``, ``oom``,
``timeout`` or ``error`` with a message.

``run_sweep`` runs a curve job: a batch-size curve, whose batch doubles until a
run fails (which ends the curve and is recorded) or the cap is reached, or a
repeat round (claim points rerun in new processes). Runs whose record already
exists are kept, not redone.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from privbench import progress, records, runners, system
from privbench.memory import looks_like_oom, oom_evidence


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


_STEP_LINE = re.compile(r"step (\d+)/(\d+): ([0-9.]+) s")


def _pump(stream, sink: collections.deque) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write("    | " + line)
        sys.stdout.flush()
        sink.append(line.rstrip("\n"))
    stream.close()


def run_isolated(spec: dict, record_path: str | Path, runner_config: dict | None = None) -> dict:
    """Run one configuration in its own process and write its record."""
    record_path = Path(record_path)
    work_dir = record_path.parent.resolve() / ".work"  # absolute: the same path inside a container
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_file = work_dir / f"{spec['run_id']}.spec.json"
    result_file = work_dir / f"{spec['run_id']}.result.json"
    result_file.unlink(missing_ok=True)
    runner_config = runner_config or {}
    # the worker applies the attestation policy of a cvm run (privbench.tee)
    records.write_json_atomic(spec_file, {**spec, "attestation": runner_config.get("attestation", "required")})

    runner = runners.get(runner_config)
    command = runner.wrap([str(spec_file), str(result_file)], runner_config,
                          spec.get("platform", "cpu"), mounts=[str(record_path.parent.resolve())])
    env = {**os.environ, **runner.environment(runner_config), "PYTHONUNBUFFERED": "1"}
    timeout_s = spec["limits"]["timeout_s"]
    started_at = _now()
    log(f"run {spec['run_id']}: starting (time limit {timeout_s:g} s)")
    tail: collections.deque = collections.deque(maxlen=400)
    noise = system.NoiseProbe()
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no process is left behind
        proc.wait()
        runner.stop(command, runner_config)  # nor a container, which outlives its client
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        runner.stop(command, runner_config)
        raise
    reader.join(timeout=10)
    wall_s = time.perf_counter() - t0
    noise_fields = noise.fields()

    result = _read_result(result_file)
    status, message = _classify(result, timed_out, proc.returncode, timeout_s, tail)
    metrics = result.get("metrics", {}) if result else {}
    phases = result.get("phases", {}) if result else {}
    if status == "timeout" and not metrics.get("step_times_s"):
        # the worker was killed: recover the steps it reported before the limit
        metrics["completed_steps_before_timeout"] = [float(m.group(3)) for m in map(_STEP_LINE.search, tail) if m]

    record = {
        "schema_version": records.SCHEMA_VERSION,
        "run_id": spec["run_id"],
        "experiment": spec["experiment"],
        "preset": spec["preset"],
        "config": {**spec["config"], **spec["limits"], "platform": spec.get("platform", "cpu"),
                   "runner": runner_config.get("kind", "local")},
        "status": status,
        "message": message,
        "metrics": metrics,
        "estimated": bool(metrics.pop("estimated", False)),
        "system": {**system.describe_system(), **noise_fields, **(result or {}).get("system_extra", {})},
        "started_at": started_at,
        "finished_at": _now(),
    }
    t_write = time.perf_counter()
    _add_overhead(record, phases, wall_s)
    records.write_record(record_path, record)
    record["metrics"]["record_write_s"] = time.perf_counter() - t_write
    spec_file.unlink(missing_ok=True)
    result_file.unlink(missing_ok=True)
    progress.run_finished(record)  # the log and the terminal where snakemake runs
    return record


def _add_overhead(record: dict, phases: dict, wall_s: float) -> None:
    """The harness's own time: everything in the run's wall time that is not measured work."""
    measured = sum(v for k, v in phases.items() if k != "import_s")
    metrics = record["metrics"]
    metrics["wall_s"] = wall_s
    metrics["phases_s"] = phases
    metrics["harness_overhead_s"] = max(0.0, wall_s - measured)


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _classify(result, timed_out, returncode, timeout_s, tail) -> tuple[str, str | None]:
    text = "\n".join(tail)
    if timed_out:
        return "timeout", f"did not finish in {timeout_s:g} s"
    if result is not None:
        # An error the worker could not tell from its exception (a bare INTERNAL error) may
        # still show, in the worker's output, that it ran out of memory.
        evidence = oom_evidence(text) if result["status"] == "error" else None
        if evidence:
            return "oom", f"{result.get('message')} (the run's output shows: '{evidence}')"
        return result["status"], result.get("message")
    # The worker died without writing its result.
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode).name
        if -returncode == signal.SIGKILL or looks_like_oom(text):
            return "oom", f"worker killed by {sig} (most likely the system ran out of memory)"
        return "error", f"worker killed by {sig}: {_last_line(text)}"
    if looks_like_oom(text):
        return "oom", f"worker exited with code {returncode}: {_last_line(text)}"
    return "error", f"worker exited with code {returncode} without a result: {_last_line(text)}"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"


def make_spec(experiment: str, preset: str, run_id: str, config: dict, limits: dict,
              platform: str = "cpu") -> dict:
    """A run's full specification; ``spec_hash`` identifies it so a changed setting is rerun."""
    identity = json.dumps({"experiment": experiment, "config": config, "limits": limits,
                           "platform": platform}, sort_keys=True)
    spec_hash = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return {"experiment": experiment, "preset": preset, "run_id": run_id, "platform": platform,
            "config": {**config, "spec_hash": spec_hash}, "limits": limits}


def batch_sizes(start: int, cap: int) -> list[int]:
    sizes, batch = [], start
    while batch <= cap:
        sizes.append(batch)
        batch *= 2
    return sizes


def run_sweep(curve: dict, records_dir: str | Path, make_spec: Callable[..., dict],
              runner_config: dict | None = None) -> dict:
    """Run one curve job; return its summary (run ids, statuses, why it stopped).

    A batch sweep runs ``make_spec(curve, batch)`` for each batch size until a run fails.
    A repeat round (a curve with ``points``, privbench.studies.curves.repeat_rounds) runs
    ``make_spec(point_curve, batch, repeat)`` for every point; a failure ends nothing there.
    """
    records_dir = Path(records_dir)
    summary = {"curve_id": curve["curve_id"], "runs": [], "stopped_by": None}
    if "points" in curve:
        for point in curve["points"]:
            spec = make_spec(point["curve"], point["batch_size"], curve["repeat"])
            _kept_or_run(spec, point["batch_size"], records_dir, runner_config, summary)
        summary["stopped_by"] = f"repeat round {curve['repeat']}: every point ran once"
        return summary
    for batch in batch_sizes(curve["batch_start"], curve["batch_cap"]):
        record = _kept_or_run(make_spec(curve, batch), batch, records_dir, runner_config, summary)
        if record["status"] != "ok":
            summary["stopped_by"] = f"{record['status']} at batch {batch}"
            log(f"curve {curve['curve_id']}: ends at batch {batch} ({record['status']})")
            break
    else:
        summary["stopped_by"] = f"reached batch cap {curve['batch_cap']}"
    return summary


def _kept_or_run(spec: dict, batch: int, records_dir: Path, runner_config: dict | None, summary: dict) -> dict:
    """The run's record: kept if one exists for this very spec, else the run is made now.
    Listed in the curve job's ``summary``."""
    path = records_dir / f"{spec['run_id']}.json"
    record = records.existing_record(path)
    if record is not None and record["config"].get("spec_hash") == spec["config"]["spec_hash"]:
        log(f"run {spec['run_id']}: kept existing record ({record['status']})")
    else:
        if path.exists():
            log(f"run {spec['run_id']}: existing record is stale or unreadable, redoing it")
        record = run_isolated(spec, path, runner_config)
    summary["runs"].append({"run_id": spec["run_id"], "batch_size": batch,
                            "status": record["status"], "record": str(path)})
    return record
