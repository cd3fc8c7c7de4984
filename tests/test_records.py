"""Records are written atomically and validated; malformed ones are reported by path."""

import json
import os

import pytest

from privbench import aggregate, records, system


def make_record(run_id="r1", status="ok", throughput=10.0):
    return {
        "schema_version": 1, "run_id": run_id, "experiment": "throughput", "preset": "test",
        "config": {"framework": "jax", "model": "cnn", "size": "tiny", "mode": "standard", "batch_size": 2,
                   "settings": {"noise_std": 0.1}},
        "status": status, "message": None if status == "ok" else "boom",
        "metrics": {"step_times_s": [0.1, 0.2], "throughput_sps": throughput, "peak_memory_mb": 100.0,
                    "phases_s": {"import_s": 1.0}},
        "estimated": False, "system": system.describe_system(),
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01+00:00",
    }


def test_round_trip(tmp_path):
    path = tmp_path / "r1.json"
    records.write_record(path, make_record())
    assert records.read_record(path)["metrics"]["throughput_sps"] == 10.0
    assert [p.name for p in tmp_path.iterdir()] == ["r1.json"]  # no temporary file left


def test_system_description_has_what_a_reader_needs():
    desc = system.describe_system()
    for key in ("platform", "processor", "cpu_count", "python", "libraries", "gpu", "git_commit", "container_image"):
        assert key in desc
    assert desc["libraries"]["torch"] and desc["libraries"]["jax"]


def test_rewritten_pages_do_not_make_the_checkout_dirty(tmp_path):
    """A run rewrites the committed pages and charts; only a change to anything else is "+dirty"."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for name in ("docs/page.md", "assets/chart.png", "privbench/code.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("committed")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "reference run")
    clean = system.checkout_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "docs" / "page.md").write_text("this machine's figures")
    (tmp_path / "assets" / "chart.png").write_text("this machine's chart")
    assert system.checkout_commit(tmp_path) == clean
    (tmp_path / "privbench" / "code.py").write_text("changed")
    assert system.checkout_commit(tmp_path) == clean + "+dirty"


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "r1.json"
    records.write_record(path, make_record(throughput=1.0))

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        records.write_record(path, make_record(throughput=2.0))
    assert records.read_record(path)["metrics"]["throughput_sps"] == 1.0  # the old record is intact
    assert os.listdir(tmp_path) == ["r1.json"]


def test_invalid_record_is_refused_on_write(tmp_path):
    bad = make_record()
    bad["status"] = "fine"
    with pytest.raises(records.MalformedRecordError):
        records.write_record(tmp_path / "x.json", bad)


def test_aggregation_reports_malformed_records_by_path(tmp_path):
    good = tmp_path / "good.json"
    records.write_record(good, make_record())
    broken = tmp_path / "broken.json"
    broken.write_text('{"run_id": ')
    wrong = tmp_path / "wrong.json"
    data = make_record("r3")
    del data["system"]
    wrong.write_text(json.dumps(data))
    with pytest.raises(records.MalformedRecordError) as info:
        aggregate.build_table([good, broken, wrong])
    message = str(info.value)
    assert str(broken) in message and str(wrong) in message and "2 malformed" in message


def test_tidy_table_has_parameter_metric_and_environment_columns(tmp_path):
    paths = []
    for i, status in enumerate(["ok", "oom"]):
        path = tmp_path / f"r{i}.json"
        records.write_record(path, make_record(f"r{i}", status))
        paths.append(path)
    frame = aggregate.build_table(paths)
    assert len(frame) == 2
    for column in ("framework", "batch_size", "settings_noise_std", "throughput_sps", "timed_steps_done",
                   "phases_s_import_s", "sys_platform", "sys_torch", "status", "message", "record_path"):
        assert column in frame.columns, column
    assert list(frame.status) == ["ok", "oom"]


def test_noise_fields_come_from_proc_stat_and_old_records_still_load(tmp_path):
    stat = "cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n"
    assert system.cpu_ticks(stat) == (40, 1000)
    assert system.cpu_ticks("cpu  100 0 50 800\n") == (0, 950)  # a kernel without a steal column
    probe = system.NoiseProbe()
    probe.ticks_start = (0, 0)
    fields = probe.fields()
    assert set(fields) == {"load_avg_1m_start", "load_avg_1m_end", "cpu_steal_pct"}
    assert 0 <= fields["cpu_steal_pct"] <= 100 and fields["load_avg_1m_end"] >= 0
    new = make_record()
    new["system"].update(fields)
    records.write_record(tmp_path / "new.json", new)
    old = make_record()  # written before the noise fields existed
    assert "cpu_steal_pct" not in old["system"]
    records.write_record(tmp_path / "old.json", old)
    frame = aggregate.build_table([tmp_path / "new.json", tmp_path / "old.json"])
    assert frame.sys_cpu_steal_pct.notna().tolist() == [True, False]
    assert frame.started_at.tolist() == ["2026-01-01T00:00:00+00:00"] * 2


def test_a_generic_processor_name_gets_its_family_and_model():
    generic = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nstepping\t: 1\n\n"
    assert system.cpu_model(generic) == "AMD EPYC (family 25, model 1, stepping 1)"
    named = generic.replace("AMD EPYC\n", "AMD EPYC 7763 64-Core Processor\n")
    assert system.cpu_model(named) == "AMD EPYC 7763 64-Core Processor"
