"""The SLURM profile on a real three-node cluster (slurmctld, three slurmd, MUNGE on this machine).

Debian's SLURM runs several ``slurmd`` on one host, each a node with its own name, port and
spool folder (scripts/slurm-cluster.sh), which is what a real cluster looks like to the
controller and to Snakemake; containers per node would add a hostname each but also a
network and image build per test run, for no behaviour this workflow depends on.

The tiny preset, cut to a few curves, runs through profiles/slurm: benchmark jobs go
through sbatch (their records carry the SLURM job id and node), tables, pages and the index
are built locally. Then a node is powered off while one of its jobs runs: the controller
fails that job (NODE_FAIL), Snakemake reports it, and a second invocation redoes only the
run that was lost, keeping every finished record as it was.
"""

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_workflow
from infrastructure import processes_using
from privbench import records
from privbench.report import tables

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("slurmctld", "slurmd", "munged")
NODES = ("n1", "n2", "n3")
# A silent node is set DOWN (and its jobs failed) after this many seconds.
SLURMD_TIMEOUT_S = 10


def _why_not_here() -> str | None:
    missing = [tool for tool in (*DAEMONS, "sbatch", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (make test-infra installs slurm-wlm and munge, as root, on Debian)"
    if os.geteuid() != 0:
        return "the SLURM cluster runs its daemons as root"
    return None


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _why_not_here()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMD_TIMEOUT": str(SLURMD_TIMEOUT_S)}
    subprocess.run(["scripts/slurm-cluster.sh", "start", str(folder), str(len(NODES))], cwd=REPO_ROOT,
                   env=env, check=True, capture_output=True)
    try:
        yield folder
    finally:
        subprocess.run(["scripts/slurm-cluster.sh", "stop", str(folder)], cwd=REPO_ROOT, check=True)
        assert processes_using(folder) == [], "daemons or job steps of the cluster still run"


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster / "slurm.conf"))
    monkeypatch.setenv("PRIVBENCH_SLURM_PARTITION", "debug")
    monkeypatch.setenv("PRIVBENCH_SLURM_ACCOUNT", "")  # no accounting here: no account
    return slurm_cluster


def _throughput_preset(tmp_path: Path, **throughput) -> str:
    preset = yaml.safe_load((REPO_ROOT / "config" / "tiny.yaml").read_text())
    preset["experiments"] = ["throughput"]
    preset["throughput"].update(frameworks=["jax"], **throughput)
    preset_file = tmp_path / "preset.yaml"
    preset_file.write_text(yaml.safe_dump(preset))
    return str(preset_file)


def _profile_args(logs: Path, *extra: str) -> tuple[str, ...]:
    # a workflow profile: it replaces profiles/default (whose cores: all would override a --profile's)
    return ("all", "--workflow-profile", "profiles/slurm", "--cores", "2",
            # without accounting, job states come from squeue; status checks start early
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "3",
            "--slurm-logdir", str(logs), *extra)


def _records(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.json"))}


def _squeue(job_id: str) -> tuple[str, str]:
    """(state, node) of a job as the controller sees it."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T %N"], capture_output=True,
                         text=True).stdout.split()
    return (out + ["", ""])[0], (out + ["", ""])[1]


def test_tiny_preset_through_the_slurm_profile(slurm_env, tmp_path):
    preset_file = _throughput_preset(tmp_path, models=["cnn"], modes=["standard"])
    logs = tmp_path / "slurm_logs"
    run_workflow(tmp_path, *_profile_args(logs, "--slurm-keep-successful-logs"), configfile=preset_file)

    run_records = [records.read_record(p) for p in sorted((tmp_path / "results/runs/throughput").glob("*.json"))]
    assert [r["config"]["batch_size"] for r in run_records] == [2, 4]
    assert all(r["status"] == "ok" for r in run_records)
    job_ids = {r["system"]["slurm_job_id"] for r in run_records}
    assert len(job_ids) == 1 and None not in job_ids  # one curve, one batch job
    assert {r["system"]["slurm_node"] for r in run_records} <= set(NODES)
    job = subprocess.run(["scontrol", "show", "job", job_ids.pop()], capture_output=True, text=True,
                         check=True).stdout
    assert "JobState=COMPLETED" in job and "Partition=debug" in job
    # only the benchmark rule was submitted; table, page and index ran here (localrules)
    assert [p.name for p in logs.iterdir()] == ["rule_throughput_curve"]
    page = (tmp_path / "docs" / "benchmark_results.md").read_text()
    assert tables.fmt_sps(run_records[0]['metrics']['throughput_sps']) in page
    assert (tmp_path / "docs" / "index.md").exists()


def test_unset_site_variables_never_reach_sbatch(slurm_cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster / "slurm.conf"))
    monkeypatch.delenv("PRIVBENCH_SLURM_PARTITION", raising=False)
    monkeypatch.setenv("PRIVBENCH_SLURM_ACCOUNT", "")
    preset_file = _throughput_preset(tmp_path, models=["cnn"], modes=["standard"], batch_cap=2)
    # --verbose: the plugin logs each sbatch call it makes
    result = run_workflow(tmp_path, *_profile_args(tmp_path / "slurm_logs", "--verbose"), configfile=preset_file)

    calls = re.findall(r"sbatch call: (.*)", result.stdout + result.stderr)
    assert calls, (result.stdout + result.stderr)[-4000:]
    assert [call for call in calls if "$" in call or "PRIVBENCH" in call or "--account" in call] == []
    run_records = [records.read_record(p) for p in (tmp_path / "results/runs/throughput").glob("*.json")]
    assert run_records and all(r["status"] == "ok" for r in run_records)
    for job_id in {r["system"]["slurm_job_id"] for r in run_records}:
        job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
        assert "Partition=debug" in job  # the cluster's default partition


def test_jobs_spread_over_nodes_and_a_lost_node_is_redone(slurm_env, tmp_path):
    models = ["cnn", "transformer", "state_space", "diffusion"]
    # enough timed steps that a job is still running when its node is killed
    preset_file = _throughput_preset(tmp_path, models=models, modes=["standard"], timed_steps=10)
    runs_dir = tmp_path / "results/runs/throughput"
    args = _profile_args(tmp_path / "slurm_logs", "--slurm-no-requeue")

    first: dict = {}
    workflow = threading.Thread(target=lambda: first.update(
        result=run_workflow(tmp_path, *args, configfile=preset_file, check=False)))
    workflow.start()
    # wait for a job that has finished a run and is running its next one; power its node off
    victim = None
    deadline = time.monotonic() + 600
    while victim is None and workflow.is_alive() and time.monotonic() < deadline:
        for path in runs_dir.glob("*.json"):
            job_id = records.read_record(path)["system"]["slurm_job_id"]
            state, node = _squeue(job_id)
            if state == "RUNNING":
                victim = {"job": job_id, "node": node, "curve_run": path.name}
                break
        time.sleep(0.5)
    assert victim, "no job was seen running after one of its runs"
    subprocess.run(["scripts/slurm-cluster.sh", "kill-node", str(slurm_env), victim["node"]], cwd=REPO_ROOT,
                   check=True)
    workflow.join()

    first = first["result"]
    assert first.returncode != 0  # the lost job is reported, not hidden
    assert "node failure" in first.stderr and victim["job"] in first.stderr
    assert _squeue(victim["job"])[0] == "NODE_FAIL"
    before = _records(runs_dir)
    lost_curve = {name for name, raw in before.items()
                  if records.read_record(runs_dir / name)["system"]["slurm_job_id"] == victim["job"]}
    assert victim["curve_run"] in lost_curve and len(lost_curve) == 1  # its next run was lost
    assert len(before) == 2 * len(models) - 1  # every other curve finished on the other nodes

    second = run_workflow(tmp_path, *args, configfile=preset_file)
    after = _records(runs_dir)
    assert len(after) == 2 * len(models)
    assert {name: after[name] for name in before} == before  # kept as they were: not lost, not redone
    [redone] = set(after) - set(before)
    redone_record = records.read_record(runs_dir / redone)
    assert redone_record["status"] == "ok" and redone_record["system"]["slurm_node"] != victim["node"]
    assert redone.rsplit("-", 1)[0] == victim["curve_run"].rsplit("-", 1)[0]  # the same curve
    assert re.search(r"^throughput_curve\s+1$", second.stdout + second.stderr, re.M)  # one job resubmitted
    nodes = {records.read_record(runs_dir / name)["system"]["slurm_node"] for name in after}
    assert len(nodes) >= 2 and nodes <= set(NODES)
    page = (tmp_path / "docs" / "benchmark_results.md").read_text()
    assert tables.fmt_sps(redone_record['metrics']['throughput_sps']) in page
