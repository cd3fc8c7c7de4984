"""The SLURM profile on a real one-node cluster (slurmctld, slurmd, MUNGE on this machine).

The tiny preset, cut to one curve, runs through profiles/slurm: the benchmark job must go
through sbatch (its records carry the SLURM job id, which the controller knows as a
finished batch job), while tables, pages and the index are built locally.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_workflow
from privbench import records

REPO_ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("slurmctld", "slurmd", "munged")


def _why_not_here() -> str | None:
    missing = [tool for tool in (*DAEMONS, "sbatch", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (make test-infra installs slurm-wlm and munge, as root, on Debian)"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs its daemons as root"
    return None


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _why_not_here()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    subprocess.run(["scripts/slurm-cluster.sh", "start", str(folder)], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    pids = {daemon: int((folder / f"{daemon}.pid").read_text()) for daemon in DAEMONS
            if (folder / f"{daemon}.pid").exists()}
    try:
        yield folder
    finally:
        subprocess.run(["scripts/slurm-cluster.sh", "stop", str(folder)], cwd=REPO_ROOT, check=True)
        for daemon, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists(), f"{daemon} (pid {pid}) still runs"


def test_tiny_preset_through_the_slurm_profile(slurm_cluster, tmp_path, monkeypatch):
    preset = yaml.safe_load((REPO_ROOT / "config" / "tiny.yaml").read_text())
    preset["experiments"] = ["throughput"]
    preset["throughput"].update(frameworks=["jax"], models=["cnn"], modes=["standard"])
    preset_file = tmp_path / "preset.yaml"
    preset_file.write_text(yaml.safe_dump(preset))
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster / "slurm.conf"))
    monkeypatch.setenv("PRIVBENCH_SLURM_PARTITION", "debug")
    monkeypatch.setenv("PRIVBENCH_SLURM_ACCOUNT", "")  # no accounting here: no account

    logs = tmp_path / "slurm_logs"
    run_workflow(tmp_path, "all", "--profile", "profiles/slurm", "--cores", "2",
                 # without accounting, job states come from squeue; status checks start early
                 "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "3",
                 "--slurm-logdir", str(logs), "--slurm-keep-successful-logs", configfile=str(preset_file))

    run_records = [records.read_record(p) for p in sorted((tmp_path / "results/runs/throughput").glob("*.json"))]
    assert [r["config"]["batch_size"] for r in run_records] == [2, 4]
    assert all(r["status"] == "ok" for r in run_records)
    job_ids = {r["system"]["slurm_job_id"] for r in run_records}
    assert len(job_ids) == 1 and None not in job_ids  # one curve, one batch job
    job = subprocess.run(["scontrol", "show", "job", job_ids.pop()], capture_output=True, text=True,
                         check=True).stdout
    assert "JobState=COMPLETED" in job and "Partition=debug" in job
    # only the benchmark rule was submitted; table, page and index ran here (localrules)
    assert [p.name for p in logs.iterdir()] == ["rule_throughput_curve"]
    page = (tmp_path / "docs" / "benchmark_results.md").read_text()
    assert f"{run_records[0]['metrics']['throughput_sps']:.2f}" in page
    assert (tmp_path / "docs" / "index.md").exists()
