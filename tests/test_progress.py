"""Progress lines: one per finished run with its figure, to the log and to a second stream."""

from __future__ import annotations

import os

import pytest

from privbench import progress
from privbench.data import cifar100


@pytest.mark.parametrize("metrics, estimated, figure", [
    ({"throughput_sps": 123.456}, False, "123.46 samples/s"),
    ({"seconds_per_epoch": 289.41, "throughput_sps": 9.0, "peak_memory_mb": 781.6}, True,
     "289.4 s/epoch (estimated), peak 782 MB"),
    ({"throughput_sps": 5.0, "peak_memory_mb": 64.2}, False, "5.00 samples/s, peak 64 MB"),
    ({}, False, ""),
])
def test_headline_is_the_runs_figure(metrics, estimated, figure):
    assert progress.headline({"metrics": metrics, "estimated": estimated}) == figure


def test_a_finished_run_is_one_line_in_the_log_and_on_the_terminal(capsys, monkeypatch):
    read_end, write_end = os.pipe()
    monkeypatch.setattr(progress, "_terminal", None)
    progress.open_terminal(write_end)
    progress.run_finished({"run_id": "jax-cnn-b8", "status": "ok", "metrics": {"throughput_sps": 10.0}})
    progress.run_finished({"run_id": "jax-cnn-b16", "status": "oom", "message": "x" * 500, "metrics": {}})
    os.close(write_end)
    with os.fdopen(read_end) as terminal:
        shown = terminal.read().splitlines()
    assert shown == capsys.readouterr().out.splitlines()  # the same lines in the log
    assert shown[0] == "privbench: jax-cnn-b8 ok: 10.00 samples/s"
    assert shown[1].startswith("privbench: jax-cnn-b16 oom: xxx") and shown[1].endswith("...")
    assert len(shown[1]) < 200  # a long message is cut on the terminal (the record keeps it)


def test_download_reports_bytes_and_rate_at_most_every_few_seconds(tmp_path, monkeypatch):
    archive = tmp_path / cifar100.ARCHIVE_NAME
    md5 = cifar100.write_archive(archive, 40, 10)
    monkeypatch.setattr(cifar100, "_CHUNK", 1024)  # many chunks
    clock = iter(range(0, 10_000, 2))  # each reading of the clock is 2 s later
    monkeypatch.setattr(cifar100.time, "monotonic", lambda: next(clock))
    lines = []
    digest, size = cifar100._download(archive.as_uri(), tmp_path / "copy.part", lines.append)
    assert (digest, size) == (md5, archive.stat().st_size)
    *during, last = lines
    assert len(during) >= 2 and all(line.startswith("downloaded ") and line.endswith(" MB/s)") for line in during)
    assert f" of {size / 1e6:.1f} MB (" in during[0]
    assert last.startswith(f"downloaded {size / 1e6:.1f} MB in ") and last.endswith(" MB/s)")
    # 2 s per chunk and at most one report per 5 s: about one chunk in three
    chunks = -(-size // 1024)
    assert len(during) <= chunks // 2
