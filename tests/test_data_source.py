"""The data source, set once and never lost, through the real workflow.

A mirror is configured once in a local settings file (``config/local.yaml``; here
one named by ``PRIVBENCH_LOCAL_CONFIG``, so that the checkout's own is untouched),
the data is pulled from it and a curve runs on it. Then the mirror goes away (its
URL points at a closed port of 127.0.0.1; the official site is out of reach too):
a plain invocation finds nothing to do, and forcing the data rule downloads nothing,
because the data's identity is its MD5, not its URL. Another MD5 that cannot be
downloaded fails on the terminal, naming ``data.cifar100.url``, and leaves the
verified data as it was. Snakemake's own output (what the user sees) is checked,
not only the logs: failed logs are shown (profiles/default) and each finished run
prints one ``privbench:`` line.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from cifar_archive import session_archive
from conftest import REPO_ROOT, VENV_BIN
from privbench.data import cifar100

pytestmark = pytest.mark.e2e

CURVE = "results/curves/torch_cifar/baseline.json"  # under the settings' results_dir


def _unreachable_url() -> str:
    """A URL on a port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{cifar100.ARCHIVE_NAME}"


def _settings(tmp_path: Path, url: str, md5: str) -> Path:
    """This machine's settings file: every output under ``tmp_path``, the data from ``url``."""
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({
        "results_dir": f"{tmp_path}/results", "assets_dir": f"{tmp_path}/assets",
        "docs_dir": f"{tmp_path}/docs", "site_dir": f"{tmp_path}/site",
        "data": {"dir": f"{tmp_path}/data", "cifar100": {"url": url, "md5": md5}}}))
    return local


def _preset(tmp_path: Path) -> str:
    """The tiny preset, cut to the Torch page with one cheap curve (one run)."""
    preset = yaml.safe_load((REPO_ROOT / "config" / "tiny.yaml").read_text())
    preset["experiments"] = ["torch_cifar"]
    preset["torch_cifar"]["configurations"] = {"baseline": {"batch_start": 2, "batch_cap": 2}}
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return str(path)


def _snakemake(tmp_path: Path, local: Path, *args: str) -> subprocess.CompletedProcess:
    """A plain invocation (no --cores: the default profile gives them) reading ``local``."""
    env = {**os.environ, "PRIVBENCH_LOCAL_CONFIG": str(local)}
    # --configfile takes every item after it: targets and flags come first
    return subprocess.run([str(VENV_BIN / "snakemake"), *args, "--configfile", _preset(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_bad_url_fails_on_the_terminal_naming_the_key(tmp_path):
    local = _settings(tmp_path, _unreachable_url(), "0" * 32)
    result = _snakemake(tmp_path, local, "cifar100")
    assert result.returncode != 0
    shown = result.stdout + result.stderr
    assert "could not download" in shown and "data.cifar100.url" in shown, shown[-3000:]
    assert not list((tmp_path / "data").glob(f"{cifar100.FOLDER}*"))  # nothing partial, no marker


def test_a_mirror_set_once_and_lost_later_costs_neither_data_nor_runs(tmp_path):
    mirror, md5 = session_archive()
    local = _settings(tmp_path, mirror, md5)
    curve = f"{tmp_path}/{CURVE}"
    first = _snakemake(tmp_path, local, curve)
    assert first.returncode == 0, first.stderr[-4000:]
    # the terminal shows the download and one line per finished run, with its figure
    assert f"privbench: downloading {mirror}" in first.stderr
    assert "privbench: baseline-b2 ok: " in first.stderr and " s/epoch" in first.stderr
    data, runs = _files(tmp_path / "data"), _files(tmp_path / "results" / "runs")
    assert cifar100.verified_md5(tmp_path / "data") == md5 and len(runs) == 1

    # the mirror is gone; only its URL changed in this machine's settings
    local = _settings(tmp_path, _unreachable_url(), md5)
    dry = _snakemake(tmp_path, local, curve, "--dry-run")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout + dry.stderr
    plain = _snakemake(tmp_path, local, curve)
    assert plain.returncode == 0 and "Nothing to be done" in plain.stdout + plain.stderr, plain.stderr[-4000:]
    assert _files(tmp_path / "data") == data and _files(tmp_path / "results" / "runs") == runs

    # even the data rule forced again downloads nothing: its data is verified already
    forced = _snakemake(tmp_path, local, curve, "--forcerun", "cifar100")
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert "nothing to download" in forced.stderr
    assert {name: content for name, (content, _) in _files(tmp_path / "data").items()} == {
        name: content for name, (content, _) in data.items()}
    assert {name: content for name, (content, _) in _files(tmp_path / "results" / "runs").items()} == {
        name: content for name, (content, _) in runs.items()}

    # another archive that cannot be had: the failure says so and the verified data stays
    other = _snakemake(tmp_path, _settings(tmp_path, _unreachable_url(), "f" * 32), curve)
    assert other.returncode != 0 and "data.cifar100.url" in other.stdout + other.stderr
    assert cifar100.verified_md5(tmp_path / "data") == md5 and cifar100.is_extracted(tmp_path / "data")
    assert cifar100.verified_marker(tmp_path / "data", md5).exists()
