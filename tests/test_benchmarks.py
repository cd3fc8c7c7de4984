"""The benchmark scripts run end to end and print the columns their docstrings
promise (their figures are read by people, so only their form is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dp_overhead_prints_the_targets_columns_for_both_frameworks():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "dp_overhead.py"), "--workloads", "cnn", "--size", "tiny",
         "--rounds", "1", "--memory-steps", "0"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines() if not line.startswith("#")]
    header, rows = lines[0], lines[1:]
    assert header[:7] == ["workload", "framework", "nonprivate_sps", "dp_sps", "ratio", "tensor_memory_ratio",
                          "clipping_ratio"]
    assert [row[:2] for row in rows] == [["cnn", "jax"], ["cnn", "torch"]]
    for row in rows:
        figures = dict(zip(header, row))
        assert all(float(figures[column]) > 0 for column in header[2:7])
        assert figures["nonprivate_peak_rss_mb"] == figures["dp_peak_rss_mb"] == "-"  # --memory-steps 0
