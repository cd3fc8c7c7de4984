"""Two invocations of the workflow at once in one checkout, on the same outputs.

Snakemake locks the outputs of a running invocation (.snakemake/locks): a second invocation
on the same outputs is refused with a message, and the first finishes as if alone. (Runs of
other presets or into other folders do not conflict and are not refused.)
"""

import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, run_workflow
from privbench import records

pytestmark = pytest.mark.cluster

LOCKS = REPO_ROOT / ".snakemake" / "locks"


def _locked(folder: Path) -> bool:
    """Whether a running invocation holds a lock on outputs under ``folder``."""
    for lock in LOCKS.glob("*.output.lock") if LOCKS.is_dir() else ():
        try:
            if str(folder) in lock.read_text():
                return True
        except OSError:  # released while read
            continue
    return False


def test_a_second_invocation_is_refused_and_the_first_finishes(tmp_path):
    preset = yaml.safe_load((REPO_ROOT / "config" / "tiny.yaml").read_text())
    preset["experiments"] = ["throughput"]
    # four curves of one run each, in sequence (--cores 1): long enough to overlap the second
    preset["throughput"].update(frameworks=["jax"], models=["cnn", "transformer"], modes=["standard", "fast_dp"],
                                batch_cap=2)
    preset_file = tmp_path / "preset.yaml"
    preset_file.write_text(yaml.safe_dump(preset))

    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(
        result=run_workflow(tmp_path, "all", "--cores", "1", configfile=str(preset_file), check=False)))
    thread.start()
    deadline = time.monotonic() + 300
    while not _locked(tmp_path) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _locked(tmp_path), "the first invocation never locked its outputs"

    second = run_workflow(tmp_path, "all", "--cores", "1", configfile=str(preset_file), check=False)
    assert thread.is_alive(), "the first invocation ended before the second was refused: nothing tested"
    assert second.returncode != 0
    assert "Directory cannot be locked" in second.stderr

    thread.join()
    first = first["result"]
    assert first.returncode == 0, first.stderr[-4000:]
    run_records = [records.read_record(p) for p in (tmp_path / "results/runs/throughput").glob("*.json")]
    assert len(run_records) == 4 and all(r["status"] == "ok" for r in run_records)
    assert (tmp_path / "docs" / "benchmark_results.md").exists()
    assert not _locked(tmp_path)  # released
