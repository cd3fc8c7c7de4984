"""plan --estimate: a preset's jobs, runs and worst-case hours, from its time limits."""

import subprocess
import sys

from privbench import sizing, studies
from privbench.studies import curves as curves_mod


def test_estimate_counts_every_curve_and_run_at_its_limit(tiny_config):
    result = sizing.estimate(tiny_config, cores_per_job=4, parallel_jobs=1)
    curves = [curve for name in tiny_config["experiments"] for curve in studies.plan(name).curves(tiny_config).values()]
    minutes = [curves_mod.runtime_min(curve) for curve in curves]
    total = result["total"]
    assert total["jobs"] == len(curves) == sum(row["jobs"] for row in result["experiments"])
    assert total["runs"] == sum(len(curves_mod.planned_runs(c)) for c in curves)
    assert total["job_hours"] == sum(minutes) / 60 and total["core_hours"] == 4 * total["job_hours"]
    assert total["gpu_hours"] == 0  # platform cpu
    assert result["wall_hours"] == result["serial_wall_hours"] == sum(minutes) / 60  # one job at a time
    assert sizing.estimate(tiny_config, 4, 1000)["wall_hours"] == max(minutes) / 60  # all at once


def test_wall_time_fills_free_slots_longest_first():
    assert sizing._makespan([60, 50, 40, 30, 20], 2) == 110  # 60+30+20 | 50+40


def test_plan_estimate_on_the_full_preset(repo_root):
    out = subprocess.run([sys.executable, "-m", "privbench", "plan", str(repo_root / "config" / "full.yaml"),
                          "--estimate"], capture_output=True, text=True, check=True).stdout
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert int(total[1]) > 0 and float(total[6]) == float(total[3])  # one GPU per job: GPU h = job h
    assert "worst case" in out and "with 50 jobs at once" in out and "8 cores and 1 GPU(s)" in out
