"""Honest uncertainty: the claims' runs in independent processes (repeat rounds in the plan, the
harness and the pages), and the machine's noise flagged on the pages."""

import copy

import pandas as pd
import pytest

from privbench import harness, studies
from privbench.report import pages
from privbench.studies.curves import make_run_spec, planned_runs


def test_every_study_plans_repeat_rounds_of_its_claim_points(tiny_config):
    for name in tiny_config["experiments"]:
        curves = studies.plan(name).curves(tiny_config)
        rounds = {curve_id: c for curve_id, c in curves.items() if "points" in c}
        assert list(rounds) == ["repeat-r1"], name  # tiny: 2 processes per claim run
        points = planned_runs(rounds["repeat-r1"])
        assert len(points) >= 2 and all(repeat == 1 for _, _, repeat in points)
        for curve, batch, _ in points:  # each point is a run its study's sweeps make too
            assert curve == curves[curve["curve_id"]]
            assert batch in [b for _, b, _ in planned_runs(curve)]


def test_rounds_alternate_their_order_and_repeats_are_runs_of_their_own(tiny_config):
    config = copy.deepcopy(tiny_config)
    config["memory_profile"]["repeats"] = 3
    curves = studies.plan("memory_profile").curves(config)
    first = [c["curve_id"] for c, _, _ in planned_runs(curves["repeat-r1"])]
    second = [c["curve_id"] for c, _, _ in planned_runs(curves["repeat-r2"])]
    assert first == ["ghost-tiny", "fast_dp-tiny", "vanilla-tiny"]  # each round one point further on
    assert second == ["fast_dp-tiny", "vanilla-tiny", "ghost-tiny"] and first[-1] != second[0]
    sweep = curves["vanilla-tiny"]
    own, again = make_run_spec(sweep, 4), make_run_spec(sweep, 4, repeat=2)
    assert (own["run_id"], again["run_id"]) == ("vanilla-tiny-b4", "vanilla-tiny-b4-r2")
    assert (own["config"]["repeat"], again["config"]["repeat"]) == (0, 2)
    assert own["config"]["spec_hash"] != again["config"]["spec_hash"]
    config["memory_profile"]["repeats"] = 1
    assert not [c for c in studies.plan("memory_profile").curves(config) if c.startswith("repeat-")]


def test_a_repeat_round_runs_every_point_once_and_a_failure_ends_nothing(tmp_path, tiny_config, monkeypatch):
    curves = studies.plan("memory_profile").curves(tiny_config)
    made = []

    def fake_run(spec, path, runner_config=None):
        made.append(spec["run_id"])
        return {"status": "oom" if spec["run_id"].startswith("ghost") else "ok"}

    monkeypatch.setattr(harness, "run_isolated", fake_run)
    summary = harness.run_sweep(curves["repeat-r1"], tmp_path, make_run_spec)
    assert made == ["ghost-tiny-b4-r1", "fast_dp-tiny-b4-r1", "vanilla-tiny-b4-r1"]
    assert [r["status"] for r in summary["runs"]] == ["oom", "ok", "ok"]
    assert summary["stopped_by"] == "repeat round 1: every point ran once"


def _runs(rows):
    return pd.DataFrame(rows, columns=["run_id", "mode", "batch_size", "repeat", "status", "throughput_sps"])


def test_claim_values_pair_processes_by_repeat_and_give_median_and_range():
    runs = _runs([
        ("s", "standard", 32, 0, "ok", 100.0), ("c", "clipped", 32, 0, "ok", 50.0),
        ("s-r1", "standard", 32, 1, "ok", 80.0), ("c-r1", "clipped", 32, 1, "ok", 20.0),
        ("s-r2", "standard", 32, 2, "ok", 90.0), ("c-r2", "clipped", 32, 2, "ok", 36.0),
        ("s-r3", "standard", 32, 3, "oom", None), ("c-r3", "clipped", 32, 3, "ok", 30.0),
        ("s16", "standard", 16, 0, "ok", 70.0),
    ])
    spread = pages.claim_values(runs, {"mode": "clipped", "batch_size": 32}, {"mode": "standard", "batch_size": 32})
    assert spread == pages.Spread(pytest.approx(0.4), pytest.approx(0.25), pytest.approx(0.5), 3)
    alone = pages.claim_values(runs, {"mode": "standard", "batch_size": 32})
    assert (alone.median, alone.low, alone.high, alone.n) == (90.0, 80.0, 100.0, 3)
    assert pages.claim_values(runs, {"mode": "fast_dp"}) == pages.Spread(None, None, None, 0)
    with pytest.raises(ValueError, match="several of one repeat: s, s16"):  # which batch?
        pages.claim_values(runs, {"mode": "standard", "repeat": 0})
    assert list(pages.sweep_runs(runs).run_id) == ["s", "c", "s16"]  # the pages' other figures
    old = runs.drop(columns="repeat")  # a table from before repeats: every run is repeat 0
    assert pages.claim_values(old, {"mode": "standard", "batch_size": 16}).n == 1
    assert len(pages.sweep_runs(old)) == len(old)


def test_runs_under_load_or_steal_are_flagged_and_old_ones_not_recorded():
    runs = pd.DataFrame({
        "run_id": ["quiet", "loaded", "stolen", "flower", "old"],
        "sys_cpu_count": [2, 2, 2, 2, 2],
        "num_clients": [None, None, None, 2, None],  # a Flower run's clients use every core each
        "sys_load_avg_1m_start": [2.4, 2.6, 1.0, 4.4, None],
        "sys_load_avg_1m_end": [2.0, 1.0, 1.0, 4.0, None],
        "sys_cpu_steal_pct": [0.0, 0.1, 5.5, 0.0, None],
    })
    assert [pages.noise_mark(row) for _, row in runs.iterrows()] == ["", pages.NOISE_MARK, pages.NOISE_MARK, "", ""]
    summary = pages.noise_summary(runs)
    assert [f["run_id"] for f in summary["flagged"]] == ["loaded", "stolen"]
    assert summary["flagged"][0]["load_start"] == 2.6 and summary["flagged"][0]["load_end"] is None
    assert summary["flagged"][1]["steal_pct"] == 5.5
    assert (summary["runs"], summary["not_recorded"], summary["load_max"]) == (5, 1, 4.4)


def test_the_noise_sentence_names_the_flagged_runs_and_the_unrecorded_ones():
    runs = pd.DataFrame({"run_id": ["a", "b", "old"], "sys_cpu_count": [2, 2, None],
                         "sys_load_avg_1m_start": [2.0, 3.0, None], "sys_load_avg_1m_end": [2.1, 2.7, None],
                         "sys_cpu_steal_pct": [0.0, 6.0, None]})
    text = " ".join(pages._env.get_template("_noise.md.j2").render(noise=pages.noise_summary(runs)).split())
    assert "1 of 3 runs were taken under load or CPU steal; where the tables show them, they are marked †" in text
    assert ("`b` (2 threads of its own): load average 3.0 at its start, load average 2.7 at its end; "
            "CPU steal 6.0%") in text
    assert "Load averages seen: 2.0 to 3.0; CPU steal at most 6.0%." in text
    assert "Noise not recorded for 1 run (records written before the kit kept it)." in text
    quiet = " ".join(pages._env.get_template("_noise.md.j2").render(noise=pages.noise_summary(runs[:1])).split())
    assert "The run was not taken under load or CPU steal." in quiet


def test_page_wording_helpers():
    assert pages.data_source("file:///home/me/cifar-100-python.tar.gz") == "a local copy"
    assert pages.data_source("/data/cifar-100-python.tar.gz") == "a local copy"
    assert pages.data_source("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz") == "www.cs.toronto.edu"
    assert [pages.plural(n, "step") for n in (0, 1, 5)] == ["0 steps", "1 step", "5 steps"]
    frame = pd.DataFrame({"started_at": ["2026-11-30T21:00:00+00:00", "2026-11-30T20:00:05+00:00"],
                          "finished_at": ["2026-11-30T21:05:00+00:00", "2026-11-30T20:01:00+00:00"]})
    assert pages.run_dates(frame) == "2026-11-30 20:00 to 2026-11-30 21:05 UTC"
    assert pages.run_dates(pd.DataFrame({"run_id": ["old"]})) == "not recorded"
