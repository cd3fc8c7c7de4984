"""The run harness: one process per run, every outcome recorded (real worker processes)."""

import json
import os

import pytest

from privbench import harness, records
from privbench.cli import main as cli_main
from privbench.studies.curves import make_run_spec
from privbench.studies.throughput import plan as throughput


def _spec(tiny_config, curve_id="jax-cnn-tiny-standard", batch=2, **limits):
    curve = throughput.curves(tiny_config)[curve_id]
    curve["limits"] = {**curve["limits"], **limits}
    return make_run_spec(curve, batch)


def test_ok_run_writes_a_complete_record(tmp_path, tiny_config):
    record = harness.run_isolated(_spec(tiny_config), tmp_path / "r.json")
    assert record["status"] == "ok", record["message"]
    stored = records.read_record(tmp_path / "r.json")
    metrics = stored["metrics"]
    # timed as published: blocks of back-to-back steps, at least timed_steps in all
    section = tiny_config["throughput"]
    assert len(metrics["block_times_s"]) == section["timing_blocks"]
    assert metrics["timed_steps_done"] == sum(metrics["block_steps"]) >= section["timed_steps"]
    assert metrics["throughput_sps"] == pytest.approx(2 * sum(metrics["block_steps"]) / sum(metrics["block_times_s"]))
    assert metrics["warmup_s"] > 0 and metrics["peak_memory_mb"] > 0
    # the harness's own time is reported apart from the measured work
    assert metrics["harness_overhead_s"] > 0 and metrics["phases_s"]["import_s"] > 0
    assert stored["config"]["batch_size"] == 2 and stored["config"]["memory_budget_mb"] == 2048
    assert not list((tmp_path / ".work").iterdir())  # no leftovers


def test_memory_budget_turns_an_oversize_run_into_oom(tmp_path, tiny_config):
    spec = _spec(tiny_config, "torch-cnn-tiny-standard", memory_budget_mb=1024)
    spec["config"]["size"] = "small"
    spec["config"]["batch_size"] = 16384
    record = harness.run_isolated(spec, tmp_path / "r.json")
    assert record["status"] == "oom", record["message"]
    assert record["message"]


def test_time_limit_is_recorded_as_timeout(tmp_path, tiny_config):
    spec = _spec(tiny_config, timeout_s=1.5)
    record = harness.run_isolated(spec, tmp_path / "r.json")
    assert record["status"] == "timeout"
    assert record["message"] == "did not finish in 1.5 s"


def test_crash_is_recorded_as_error_with_its_message(tmp_path, tiny_config):
    spec = _spec(tiny_config, "jax-cnn-tiny-clipped", batch=4)
    spec["config"]["microbatch_size"] = 3
    record = harness.run_isolated(spec, tmp_path / "r.json")
    assert record["status"] == "error"
    assert "not divisible by microbatch size 3" in record["message"]


def test_sweep_stops_at_first_failure_and_keeps_finished_runs(tmp_path, tiny_config):
    curve = throughput.curves(tiny_config)["torch-cnn-tiny-standard"]
    curve.update(batch_start=2, batch_cap=64)
    curve["limits"] = {**curve["limits"], "memory_budget_mb": 1024}

    def spec_for(c, batch):  # batch 8 needs far more than the budget: a "small" model
        spec = make_run_spec(c, batch)
        if batch >= 8:
            spec["config"]["size"] = "small"
            spec["config"]["batch_size"] = 16384
        return spec

    summary = harness.run_sweep(curve, tmp_path, spec_for)
    assert [r["status"] for r in summary["runs"]] == ["ok", "ok", "oom"]
    assert summary["stopped_by"] == "oom at batch 8"
    before = (tmp_path / "torch-cnn-tiny-standard-b2.json").read_text()
    again = harness.run_sweep({**curve, "batch_cap": 4}, tmp_path, spec_for)
    assert [r["status"] for r in again["runs"]] == ["ok", "ok"]
    assert (tmp_path / "torch-cnn-tiny-standard-b2.json").read_text() == before


def test_unknown_model_and_unwritable_results_give_one_clear_message(tmp_path, capsys, tiny_config):
    from privbench import models

    with pytest.raises(models.UnknownModelError, match="unknown model 'resnet'"):
        models.build("torch", "resnet", "small")
    with pytest.raises(models.UnknownModelError, match="unknown size 'huge'"):
        models.build("torch", "cnn", "huge")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    curve = throughput.curves(tiny_config)["jax-cnn-tiny-standard"]
    if os.geteuid() == 0:  # root ignores permissions: use a path under a file instead
        blocker = tmp_path / "file"
        blocker.write_text("")
        records_dir = blocker / "runs"
    else:
        records_dir = locked / "runs"
    code = cli_main(["sweep", "--curve-json", json.dumps(curve), "--records-dir", str(records_dir),
                     "--output", str(tmp_path / "s.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "results_dir" in err


def test_missing_optional_dependency_names_package_and_fix(monkeypatch):
    import sys

    from privbench.errors import MissingDependencyError, require

    monkeypatch.setitem(sys.modules, "opacus", None)  # what an absent package looks like to import
    with pytest.raises(MissingDependencyError, match="'opacus' is needed.*envs/requirements.txt"):
        require("opacus")


def test_allocation_failures_on_stderr_make_an_internal_error_an_oom():
    # JAX on CPU (YNNPACK) prints the failed allocation and raises a bare INTERNAL error.
    tail = ["allocate of <13> failed.", "jax.errors.JaxRuntimeError: INTERNAL: YNNPACK operation failed: error"]
    result = {"status": "error", "message": "JaxRuntimeError: INTERNAL: YNNPACK operation failed: error"}
    status, message = harness._classify(result, False, 1, 60, tail)
    assert status == "oom" and "allocate of <13> failed" in message and "YNNPACK" in message
    # without the allocation failures it stays an error, with its message
    assert harness._classify(result, False, 1, 60, tail[1:]) == ("error", result["message"])
