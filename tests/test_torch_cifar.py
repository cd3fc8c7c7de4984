"""Page "Torch benchmarks": the CIFAR-100 pull, the Flower federation and the page.

No internet: archives in the exact CIFAR-100 format are generated and served
on 127.0.0.1 (tests/cifar_archive.py).
"""

import os
import pickle
import signal
import threading
import time

import pandas as pd
import psutil
import pytest

from cifar_archive import serve
from conftest import run_workflow
from privbench import config as config_mod, harness, records
from privbench.data import cifar100
from privbench.studies.curves import make_run_spec
from privbench.studies import validate as validate_with_studies
from privbench.studies.torch_cifar import plan as torch_cifar, report as torch_report


@pytest.fixture
def served_archive(tmp_path):
    """A generated archive, a corrupted copy and a truncated copy, served over HTTP."""
    folder = tmp_path / "served"
    md5 = cifar100.write_archive(folder / "good.tar.gz", 40, 10)
    data = (folder / "good.tar.gz").read_bytes()
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    (folder / "corrupted.tar.gz").write_bytes(bytes(corrupted))
    (folder / "truncated.tar.gz").write_bytes(data[: len(data) // 3])
    return serve(folder), md5


def test_pull_verifies_extracts_and_reads_the_official_format(served_archive, tmp_path):
    base, md5 = served_archive
    folder = cifar100.fetch(f"{base}/good.tar.gz", md5, tmp_path / "data", progress=lambda _: None)
    assert sorted(p.name for p in folder.iterdir()) == ["archive.json", "meta", "test", "train"]
    with open(folder / "train", "rb") as handle:  # as the CIFAR page documents reading it
        train = pickle.load(handle, encoding="bytes")
    assert set(train) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
    assert train[b"data"].shape == (40, 3072)
    with open(folder / "meta", "rb") as handle:
        assert len(pickle.load(handle, encoding="bytes")[b"fine_label_names"]) == 100
    images, labels = cifar100.load(tmp_path / "data")  # torchvision's reader
    assert images.shape == (40, 32, 32, 3) and images.dtype.name == "uint8"
    assert labels.tolist() == train[b"fine_labels"]
    # no archive, no leftovers: the data and the marker of its MD5 (the workflow rule's output)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "cifar-100-python", cifar100.verified_marker(tmp_path / "data", md5).name]


@pytest.mark.parametrize("name", ["corrupted", "truncated"])
def test_bad_archive_is_rejected_without_leftovers_and_a_retry_works(served_archive, tmp_path, name):
    base, md5 = served_archive
    with pytest.raises(cifar100.DataError, match=f"has MD5 .* but data.cifar100.md5 is {md5}"):
        cifar100.fetch(f"{base}/{name}.tar.gz", md5, tmp_path / "data", progress=lambda _: None)
    assert list((tmp_path / "data").iterdir()) == []
    cifar100.fetch(f"{base}/good.tar.gz", md5, tmp_path / "data", progress=lambda _: None)
    assert cifar100.is_extracted(tmp_path / "data")


def test_unreachable_url_names_the_config_key(tmp_path):
    with pytest.raises(cifar100.DataError, match="could not download .*data.cifar100.url"):
        cifar100.fetch("http://127.0.0.1:9/cifar-100-python.tar.gz", "0" * 32, tmp_path, progress=lambda _: None)


@pytest.mark.e2e
def test_workflow_rule_rejects_a_corrupted_archive(served_archive, tmp_path):
    base, _ = served_archive
    bad = f"data={{'dir': '{tmp_path}/data', 'cifar100': {{'url': '{base}/corrupted.tar.gz', 'md5': '{'0' * 32}'}}}}"
    result = run_workflow(tmp_path, "cifar100", check=False, overrides=(bad,))
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "cifar100.log").read_text()
    assert "privbench fetch-cifar100: error: the archive from" in log and "data.cifar100.md5" in log
    assert not list((tmp_path / "data").glob("**/*"))  # nothing partial (Snakemake may drop the folder too)


def test_configuration_batch_range_is_checked(tiny_config):
    bad = {**tiny_config, "torch_cifar": {**tiny_config["torch_cifar"],
                                          "configurations": {"opacus": {"batch_start": 8, "batch_cap": 4}}}}
    with pytest.raises(config_mod.ConfigError, match="torch_cifar.configurations.opacus.batch_cap' .4. is smaller"):
        validate_with_studies(bad)


def test_privacy_levels():
    assert [torch_report.privacy_level(dp, iso) for dp, iso in [(False, False), (True, False), (False, True),
                                                               (True, True)]] == ["None", "Incomplete",
                                                                                  "Incomplete", "OK"]


@pytest.fixture
def tiny_data_config(tiny_config, tmp_path):
    """The tiny preset reading a small generated CIFAR-100 from tmp_path/data."""
    md5 = cifar100.write_archive(tmp_path / "a.tar.gz", 32, 8)
    cifar100.fetch(f"file://{tmp_path}/a.tar.gz", md5, tmp_path / "data", progress=lambda _: None)
    tiny_config["data"]["dir"] = str(tmp_path / "data")
    return tiny_config


def test_a_batch_past_the_memory_budget_is_recorded_as_oom(tiny_data_config, tmp_path):
    curve = torch_cifar.curves(tiny_data_config)["opacus"]
    curve["limits"]["memory_budget_mb"] = 512  # per-sample gradients of 4.1M parameters x 32 examples do not fit
    record = harness.run_isolated(make_run_spec(curve, 32), tmp_path / "r.json")
    assert record["status"] == "oom", record["message"]


# --------------------------------------------------------------------------- the kit's fast DP-SGD

def test_fast_dp_trains_with_the_opacus_rows_model_sampling_and_accountant():
    import numpy as np
    import torch

    from privbench.training.cifar import LocalTrainer

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, 16)
    settings = {"learning_rate": 1e-3, "l2_clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
                "accountant": "rdp"}
    fast, opacus = (LocalTrainer(method, images, labels, 4, settings, "cpu", 0) for method in ("fast_dp", "opacus"))
    assert fast.privacy() == opacus.privacy() and fast.privacy()["epsilon"] > 0
    assert fast.steps_per_epoch == opacus.steps_per_epoch == 4
    assert fast.description["param_count"] == opacus.description["param_count"]  # GroupNorm alike
    assert fast.description["dp_fallback"] == [] and len(fast.description["dp_layers"]) > 100
    before = [p.detach().clone() for p in fast.model.parameters()]
    fast.sync(fast.step())
    assert any(not torch.equal(a, b) for a, b in zip(before, fast.model.parameters()))


def _outcome(configuration: str, seconds: float, batch: int) -> torch_report.Outcome:
    row = pd.Series({"configuration": configuration, "seconds_per_epoch": seconds, "batch_size": batch,
                     "estimated": True, "timed_steps": 2, "epsilon": 3.5, "delta": 1e-5})
    return torch_report.Outcome(row, f"batch cap {batch} reached", False)


def test_fast_dp_row_ratio_and_batch_lines():
    from privbench.report import pages

    published = pages.published(torch_cifar.PUBLISHED)
    outcomes = {"baseline": _outcome("baseline", 10.0, 64), "opacus": _outcome("opacus", 80.0, 16),
                "fast_dp": _outcome("fast_dp", 20.0, 16)}
    rows = torch_report._table_rows(published, outcomes, set(outcomes))
    labels = [r[0] for r in rows]
    assert labels[:3] == ["PyTorch (baseline)", "PyTorch + Opacus", "PyTorch + fast DP (kit)"]
    fast = rows[2]
    assert fast[1] == "Incomplete" and fast[2:6] == ["-"] * 4  # privacy as Opacus; nothing published
    assert fast[6] == "≈20.00 (16)" and fast[7] == "3.50 (δ=1e-05)"
    assert "PyTorch + 2-party Flower + fast DP (kit)" not in labels  # not configured, nothing published
    lines = torch_report._ratio_lines(published, outcomes)
    assert ("PyTorch + fast DP (kit): 2.0x the baseline's time per epoch (batch 16 against 64); 0.25x the "
            "time per epoch of PyTorch + Opacus (batch 16)") in lines[1]
    assert "PyTorch + fast DP (kit): batch 16 fitted; batch cap 16 reached (PyTorch + Opacus: batch 16)." in \
        torch_report._batch_lines(outcomes)


# --------------------------------------------------------------------------- Flower

def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def _flower_processes(since: float) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["create_time"] >= since and ("flower-" in cmdline or "flwr" in cmdline):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:  # ended meanwhile
                pass
    return found


@pytest.mark.e2e
def test_flower_with_the_kits_fast_dp(tiny_data_config, tmp_path, monkeypatch):
    """Not in the tiny preset (it would add a federation): one run, each client with fast_dp.

    The data folder is given relative to the working folder, as the presets give it: the
    Flower processes, which run elsewhere, must still find it."""
    monkeypatch.chdir(tmp_path)
    tiny_data_config["data"]["dir"] = "data"
    tiny_data_config["torch_cifar"]["configurations"]["flower_fast_dp"] = {"batch_start": 2, "batch_cap": 2}
    curve = torch_cifar.curves(tiny_data_config)["flower_fast_dp"]
    record = harness.run_isolated(make_run_spec(curve, 2), tmp_path / "r.json")
    assert record["status"] == "ok", record["message"]
    metrics = record["metrics"]
    assert len(metrics["round_times_s"]) == 2 and metrics["epsilon"] > 0 and record["estimated"]
    assert sum(c["train_examples"] for c in metrics["clients"]) == 32


@pytest.mark.e2e
def test_a_client_dying_mid_round_fails_the_run_and_leaves_no_process(tiny_data_config, tmp_path):
    curve = torch_cifar.curves(tiny_data_config)["flower"]
    curve.update(rounds=1, timed_steps=200)  # a round far longer than the test waits
    spec = make_run_spec(curve, 2)
    started = time.time()
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(record=harness.run_isolated(spec, tmp_path / "r.json")))
    runner.start()
    victim = None
    while victim is None and runner.is_alive():  # once a ClientApp trains, kill client 1 (its SuperNode's group)
        procs = psutil.Process().children(recursive=True)
        if any("flwr-clientapp" in _cmdline(p) for p in procs):
            victim = next(p for p in procs if "partition-id=1" in _cmdline(p))
        time.sleep(0.2)
    assert victim is not None, "the federation ended before a ClientApp started"
    os.killpg(victim.pid, signal.SIGKILL)
    runner.join(timeout=300)
    record = records.read_record(tmp_path / "r.json")
    assert record["status"] == "error"
    assert record["message"].startswith("FederationError: client 1 (its SuperNode) stopped during the run "
                                        "(killed by SIGKILL)")
    assert time.time() - started < 240  # failed at once, not at the time limit
    time.sleep(1)
    assert _flower_processes(started) == []


# --------------------------------------------------------------------------- the tiny workflow

@pytest.mark.e2e
def test_page_agrees_with_the_records(tiny_workflow, tiny_config):
    results = tiny_workflow / "results"
    all_runs = pd.read_csv(results / "tables" / "torch_cifar.csv")
    # the claims' runs in a second process (tiny: repeats 2); the page's tables show the first
    assert sorted(all_runs[all_runs.repeat == 1].configuration) == sorted(torch_cifar.CLAIM_CONFIGURATIONS)
    table = all_runs[all_runs.repeat == 0]
    tiny = tiny_config["torch_cifar"]
    assert set(table.configuration) == set(tiny["configurations"])
    assert set(table.status) == {"ok"} and table.estimated.all()
    page = (tiny_workflow / "docs" / "torch_benchmarks.md").read_text()
    for row in table.itertuples():
        record = records.read_record(row.record_path)
        metrics = record["metrics"]
        assert metrics["seconds_per_epoch"] == pytest.approx(row.seconds_per_epoch)
        assert f"≈{metrics['seconds_per_epoch']:,.2f}" in page  # shown, and marked as an estimate
        if row.configuration in ("opacus", "fast_dp", "flower_opacus", "flower_fast_dp", "expanded_weights"):
            assert metrics["epsilon"] > 0 and f"{metrics['epsilon']:.2f} (δ=1e-05)" in page
        if row.federated:
            assert len(metrics["round_times_s"]) == 2 and len(metrics["clients"]) == 2
            assert sum(c["train_examples"] for c in metrics["clients"]) == tiny["train_subset"]
    # the published figures beside the reproduced ones; BastionLab kept, with its stand-ins
    assert "6,787.58 (16)" in page and "105.71 (256)" in page
    assert page.count(torch_report.NOT_REPRODUCIBLE) == 4
    assert page.count("not measured (no confidential VM)") == 2
    baseline = table[table.configuration == "baseline"].sort_values("batch_size").iloc[-1]
    opacus = table[table.configuration == "opacus"].iloc[0]
    assert f"PyTorch + Opacus: {opacus.seconds_per_epoch / baseline.seconds_per_epoch:.1f}x the baseline" in page
    # the kit's fast DP-SGD: its own row (nothing published), its ratios, its bar
    fast = table[table.configuration == "fast_dp"].iloc[0]
    assert fast.epsilon == pytest.approx(opacus.epsilon)  # the same sampling and accountant
    assert (f"| PyTorch + fast DP (kit) | Incomplete | - | - | - | - | ≈{fast.seconds_per_epoch:,.2f} "
            f"({int(fast.batch_size)}) |") in page
    assert (f"PyTorch + fast DP (kit): {fast.seconds_per_epoch / baseline.seconds_per_epoch:.1f}x the baseline's "
            f"time per epoch") in page
    assert f"{fast.seconds_per_epoch / opacus.seconds_per_epoch:.2f}x the time per epoch of PyTorch + Opacus" in page
    chart = torch_cifar.chart_name("cpu")  # reproduced and published bars in one chart
    assert (tiny_workflow / "assets" / chart).read_bytes()[:4] == b"\x89PNG"
    assert f"../assets/{chart}" in page
    assert (tiny_workflow / "site" / "torch_benchmarks.html").exists()


def test_full_epoch_is_timed_whole_and_not_labelled_an_estimate(tiny_data_config, tmp_path):
    """The full preset's path: every step of one epoch timed, no extrapolation."""
    tiny_data_config["torch_cifar"]["full_epoch"] = True
    curve = torch_cifar.curves(tiny_data_config)["baseline"]
    record = harness.run_isolated(make_run_spec(curve, 16), tmp_path / "r.json")
    assert record["status"] == "ok", record["message"]
    metrics = record["metrics"]
    assert not record["estimated"]
    assert len(metrics["step_times_s"]) == metrics["train_examples"] // 16  # 32 images: 2 steps
    assert metrics["seconds_per_epoch"] >= sum(metrics["step_times_s"])
