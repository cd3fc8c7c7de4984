"""Helpers of the infrastructure tests (SLURM nodes, Docker and Podman engines)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from privbench import records

REPO_ROOT = Path(__file__).resolve().parents[1]


def processes_using(folder: Path) -> list[int]:
    """Processes with a file open under ``folder``: a daemon started there (logs, sockets, state)
    or one of its children still alive."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            targets = [os.readlink(fd) for fd in Path(f"/proc/{entry}/fd").iterdir()]
        except OSError:
            continue
        if any(target.startswith(f"{folder}/") for target in targets):
            found.append(int(entry))
    return found


def sweep_single_run(curve: dict, folder: Path) -> dict:
    """Run a one-run curve with the sweep rule's command (``python -m privbench sweep``) into
    ``folder``; return its record, checked against the record schema."""
    sweep = subprocess.run(
        [sys.executable, "-m", "privbench", "sweep", "--curve-json", json.dumps(curve),
         "--records-dir", str(folder / "runs"), "--output", str(folder / "curve.json")],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-4000:]
    [run] = json.loads((folder / "curve.json").read_text())["runs"]
    return records.read_record(run["record"])
