"""The real workflow on the tiny preset: records, table, charts and pages agree."""

import json
import time

import pandas as pd
import pytest

from conftest import run_workflow
from privbench import records
from privbench.report import tables

pytestmark = pytest.mark.e2e


def test_records_table_chart_and_page_agree(tiny_workflow):
    results = tiny_workflow / "results"
    table = pd.read_csv(results / "tables" / "throughput.csv")
    record_files = sorted((results / "runs" / "throughput").glob("*.json"))
    # frameworks x models x modes x batches, and a second process (tiny: repeats 2) for the
    # scorecard's runs: PyTorch standard and clipped, CNN, Transformer, StateSpace, largest batch
    assert len(table) == len(record_files) == 2 * 4 * 3 * 2 + 3 * 2
    assert sorted(table.repeat.unique()) == [0, 1] and (table.repeat == 1).sum() == 3 * 2
    assert set(table.status) == {"ok"}
    page = (tiny_workflow / "docs" / "benchmark_results.md").read_text()
    for path in record_files:
        record = records.read_record(path)
        assert record["system"]["python"] and record["metrics"]["block_times_s"]  # timed in blocks
        assert record["system"]["load_avg_1m_start"] >= 0 and 0 <= record["system"]["cpu_steal_pct"] <= 100
        row = table[table.run_id == record["run_id"]].iloc[0]
        assert row.throughput_sps == pytest.approx(record["metrics"]["throughput_sps"])
        if record["config"]["repeat"] == 0:  # the page's tables show the sweeps' own runs
            # the page shows each measured throughput, formatted as in its table
            assert tables.fmt_sps(record["metrics"]["throughput_sps"]) in page
    for model in ("cnn", "transformer", "state_space", "diffusion"):
        chart = tiny_workflow / "assets" / f"throughput_{model}_tiny.png"
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"../assets/throughput_{model}_tiny.png" in page
    assert "Published" in page and "1270.55" not in page  # tiny figures are not compared with published ones
    index = (tiny_workflow / "docs" / "index.md").read_text()
    assert "(benchmark_results.md)" in index
    assert (tiny_workflow / "site" / "benchmark_results.html").exists()
    assert (tiny_workflow / "site" / "assets" / "throughput_cnn_tiny.png").exists()


def test_second_invocation_does_nothing(tiny_workflow):
    started = time.perf_counter()
    result = run_workflow(tiny_workflow, "all", "site", "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr
    assert time.perf_counter() - started < 30


def test_pages_without_results_are_rebuilt(tiny_workflow, tmp_path):
    """A fresh clone holds the committed pages of a reference run and no results: a run makes them anew."""
    import shutil

    for folder in ("docs", "assets"):
        shutil.copytree(tiny_workflow / folder, tmp_path / folder)
    result = run_workflow(tmp_path, "all", "--dry-run")
    plan = result.stdout + result.stderr
    assert "Nothing to be done" not in plan
    for rule in ("throughput_curve", "throughput_table", "throughput_page", "memory_profile_page"):
        assert f"rule {rule}:" in plan


def test_killed_run_is_redone_and_finished_runs_are_kept(tiny_workflow):
    """A record missing (as after a kill) is redone; the others are not touched."""
    runs = tiny_workflow / "results" / "runs" / "throughput"
    lost = runs / "jax-cnn-tiny-standard-b4.json"
    kept = runs / "jax-cnn-tiny-standard-b2.json"
    kept_before = kept.read_text()
    lost.unlink()
    # What a first invocation killed halfway leaves: its curve job has no summary
    # (Snakemake removes the output of a failed job), and no table or page yet.
    (tiny_workflow / "results" / "curves" / "throughput" / "jax-cnn-tiny-standard.json").unlink()
    (tiny_workflow / "results" / "tables" / "throughput.csv").unlink()
    (tiny_workflow / "docs" / "benchmark_results.md").unlink()
    result = run_workflow(tiny_workflow, "all")
    log = (tiny_workflow / "results" / "logs" / "throughput" / "jax-cnn-tiny-standard.log").read_text()
    assert "jax-cnn-tiny-standard-b2: kept existing record" in log
    assert lost.exists() and kept.read_text() == kept_before
    summary = json.loads((tiny_workflow / "results" / "curves" / "throughput" / "jax-cnn-tiny-standard.json").read_text())
    assert [r["batch_size"] for r in summary["runs"]] == [2, 4]
    assert result.returncode == 0


def test_invalid_config_fails_before_any_job_naming_the_key(tmp_path):
    result = run_workflow(tmp_path, check=False, overrides=(
        "throughput={'models': ['cnn'], 'frameworks': ['jax'], 'sizes': ['tiny'], 'modes': ['standard'], "
        "'batch_sizee': 2}",))
    assert result.returncode != 0
    assert "unknown key 'batch_sizee' under 'throughput'" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
