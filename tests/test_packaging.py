"""The package works installed (not editable): schemas, templates and published
figures are package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_installed_package_validates_a_preset_from_another_folder(tmp_path):
    target, elsewhere, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    elsewhere.mkdir()
    # a copy of what the build reads, so that the build leaves nothing in the checkout
    shutil.copytree(REPO / "privbench", source / "privbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True, cwd=elsewhere)
    installed = target / "privbench"
    assert (installed / "schemas" / "config.schema.yaml").is_file()
    assert (installed / "report" / "templates" / "benchmark_results.md.j2").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-m", "privbench", "validate", str(REPO / "config" / "config.yaml")],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "valid (preset 'default')" in result.stdout
    where = subprocess.run([sys.executable, "-c", "import privbench; print(privbench.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))  # the installed copy ran, not the checkout
