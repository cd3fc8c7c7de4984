"""Page "CNN Benchmark Results": microbatch sweep, Opacus physical batches, JAXPR evidence."""

import copy

import numpy as np
import pandas as pd
import pytest
import yaml

from privbench import config, records, studies
from privbench.studies.curves import make_run_spec
from privbench.studies.cnn_microbatch import plan as cnn_microbatch, report as cnn_report
from privbench.memory import PROCESS_PEAK
from privbench.report import pages, tables
from privbench.training import make_trainer


@pytest.mark.parametrize("batch", [2, 4])
def test_clipped_program_folds_the_batch_into_feature_groups(batch):
    from privbench import jaxpr_evidence

    captured = jaxpr_evidence.capture("small", batch, microbatch_size=None, l2_clip_norm=1.0)
    standard = captured["programs"]["standard"]["weight_gradient_convs"]
    clipped = captured["programs"]["clipped"]["weight_gradient_convs"]
    assert [c["layer"] for c in standard] == [c["layer"] for c in clipped] == ["convs.0.kernel", "convs.1.kernel"]
    for std, dp in zip(standard, clipped):
        features = std["kernel_shape"][3]
        assert (std["feature_group_count"], std["shape"][3]) == (1, features)
        assert (dp["feature_group_count"], dp["shape"][3]) == (batch, batch * features)
    # the published excerpt: second convolution, f32[3,3,32,64] vs f32[3,3,32,64*B]
    assert standard[1]["shape_text"] == "f32[3,3,32,64]"
    assert clipped[1]["shape_text"] == f"f32[3,3,32,{64 * batch}]"
    assert f"feature_group_count={batch}" in clipped[1]["equation"]


def test_microbatched_program_loops_over_microbatches():
    from privbench import jaxpr_evidence

    captured = jaxpr_evidence.capture("tiny", 4, microbatch_size=2, l2_clip_norm=1.0)
    for conv in captured["programs"]["clipped_microbatch"]["weight_gradient_convs"]:
        assert conv["feature_group_count"] == 2 and conv["inside_loops"]


def test_opacus_physical_batches_give_the_same_update():
    """BatchMemoryManager's physical batches change memory and speed, not the update."""
    settings = {"poisson_sampling": False, "noise_std": 0.0}
    whole, split = (make_trainer("torch", "cnn", "tiny", "clipped", batch_size=8, microbatch_size=m,
                                 settings=settings) for m in (None, 2))
    for trainer in (whole, split):
        for _ in range(2):
            trainer.sync(trainer.step())
    assert split.description["microbatch_size"] == 2
    for a, b in zip(whole.param_arrays(), split.param_arrays()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _raw(repo_root):
    return yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s["cases"][0].update(microbatch_sizes=[4, 3]),
     "'cnn_microbatch.cases.0.microbatch_sizes' [3] do not divide batch_size 4"),
    (lambda s: s["cases"].append(copy.deepcopy(s["cases"][0])), "'cnn_microbatch.cases.1' repeats size tiny"),
    (lambda s: s["jaxpr"].update(batch_start=8), "'cnn_microbatch.jaxpr.batch_cap' (4) is smaller"),
    (lambda s: s["jaxpr"].update(microbatch_size=3), "'cnn_microbatch.jaxpr.microbatch_size' (3) does not divide"),
    (lambda s: s["cases"][0].update(microbatch=[2]), "unknown key 'microbatch' under 'cnn_microbatch.cases.0'"),
])
def test_invalid_section_is_rejected_naming_the_key(repo_root, mutate, expected):
    raw = _raw(repo_root)
    mutate(raw["cnn_microbatch"])
    with pytest.raises(config.ConfigError) as info:
        studies.validate(raw)
    assert expected in str(info.value)


def test_fast_dp_is_one_run_per_case_and_framework_and_can_be_turned_off(repo_root):
    raw = _raw(repo_root)
    with_fast = cnn_microbatch.curves(studies.validate(copy.deepcopy(raw)))
    raw["cnn_microbatch"]["fast_dp"] = False
    without = cnn_microbatch.curves(studies.validate(raw))
    added = sorted(set(with_fast) - set(without))
    assert added == ["jax-cnn-tiny-b4-fast_dp", "torch-cnn-tiny-b4-fast_dp"]
    for curve_id in added:
        run = with_fast[curve_id]["run"]
        assert (run["mode"], run["microbatch_size"]) == ("fast_dp", None)
        assert with_fast[curve_id]["batch_start"] == with_fast[curve_id]["batch_cap"] == 4
    # the other runs keep their ids and specs, so their existing records are reused
    assert set(without) <= set(with_fast)
    for curve_id, curve in without.items():
        if "points" in curve:  # a repeat round: the claim runs, none of them fast_dp
            assert with_fast[curve_id] == curve
            continue
        assert make_run_spec(with_fast[curve_id], curve["batch_start"]) == \
            make_run_spec(curve, curve["batch_start"])


def _runs(sps_by_microbatch: dict, cv: float) -> pd.DataFrame:
    rows = [{"framework": "jax", "size": "small", "batch_size": 32, "mode": "standard", "microbatch_size": None,
             "status": "ok", "throughput_sps": 200.0, "cv_step": cv, "peak_memory_mb": 500.0,
             "rss_after_import_mb": 200.0, "memory_source": PROCESS_PEAK}]
    for microbatch, sps in sps_by_microbatch.items():
        rows.append({**rows[0], "mode": "clipped", "microbatch_size": microbatch, "throughput_sps": sps,
                     "peak_memory_mb": 400.0 + 10 * microbatch})
    return pd.DataFrame(rows)


def _recommend(sps_by_microbatch: dict, cv: float) -> str:
    case = {"size": "small", "batch_size": 32, "microbatch_sizes": sorted(sps_by_microbatch, reverse=True)}
    findings = cnn_report._microbatch_findings(cnn_report._Case(_runs(sps_by_microbatch, cv), "jax", case))
    return cnn_report._recommendation([findings], {"recommended_microbatch": "largest"})


def test_fast_dp_row_and_summary_are_computed_from_its_run():
    case = {"size": "small", "batch_size": 32, "microbatch_sizes": [32, 8]}
    runs = _runs({32: 50.0, 8: 40.0}, cv=0.02)
    runs = pd.concat([runs, pd.DataFrame([{**runs.iloc[0].to_dict(), "mode": "fast_dp", "microbatch_size": None,
                                           "throughput_sps": 150.0, "peak_memory_mb": 450.0}])])
    view = cnn_report._Case(runs, "jax", case)
    table = view.table({"standard": 100.0, "clipped": {32: 60.0}})
    assert "| Fast DP (kit) | - | 150.0 ±2% | 0.75x | 75.0% | 450 (+250) | - | - |" in table  # samples/s: 1 decimal
    assert table.index("| Clipped | 8 |") < table.index("| Fast DP (kit) |")
    assert cnn_report._fast_dp_lines([view]) == [
        "JAX: CNN small at batch 32: 75.0% of standard, 3.00x the throughput of the fastest jax-privacy "
        "clipped run (microbatch 32)."]
    failed = runs.copy()
    failed.loc[failed["mode"] == "fast_dp", ["status", "throughput_sps"]] = ["oom", None]
    line = cnn_report._fast_dp_lines([cnn_report._Case(failed, "jax", case)])[0]
    assert line.startswith("JAX: CNN small at batch 32: no share computed (fast DP: OOM;")
    # not configured: no row
    assert "Fast DP" not in cnn_report._Case(_runs({32: 50.0, 8: 40.0}, cv=0.02), "jax", case).table(None)


def test_recommendation_follows_the_measurements():
    smaller_faster = _recommend({32: 15.0, 8: 30.0, 1: 20.0}, cv=0.02)
    assert "In 1 of 1 cases a smaller microbatch was faster" in smaller_faster
    assert "JAX (jax-privacy), CNN small at batch 32: microbatch 8" in smaller_faster
    assert "contrary to the published advice" in smaller_faster
    assert "Smaller microbatches lowered peak memory in every case measured." in smaller_faster
    whole_fastest = _recommend({32: 30.0, 8: 20.0, 1: 10.0}, cv=0.02)
    assert "use the largest microbatch that fits in memory, as the published page advised" in whole_fastest
    # a gain within the spread of the step times is not called faster
    assert "use the largest microbatch" in _recommend({32: 15.0, 8: 18.0}, cv=0.2)


# --------------------------------------------------------------------------- the tiny workflow

@pytest.mark.e2e
def test_page_is_built_from_the_records(tiny_workflow):
    results = tiny_workflow / "results"
    table = pd.read_csv(results / "tables" / "cnn_microbatch.csv")
    page = (tiny_workflow / "docs" / "cnn_benchmark_results.md").read_text()
    # the speed-up claim's runs (JAX) in a second process (tiny: repeats 2); the page shows the first
    repeats = table[table.repeat == 1]
    assert set(repeats.framework) == {"jax"} and len(repeats) == 1 + 2  # standard, clipped per microbatch
    runs = table[(table.task == "throughput") & (table.repeat == 0)]
    # jax and torch: one standard run, one clipped run per microbatch size, one fast_dp run
    assert len(runs) == 2 * (1 + 2 + 1) and set(runs.status) == {"ok"}
    for row in runs.itertuples():
        assert f"{tables.fmt_sps(row.throughput_sps)} ±{100 * row.cv_step:.0f}%" in page
        assert f"{row.peak_memory_mb:,.0f} (+{row.peak_memory_mb - row.rss_after_import_mb:,.0f})" in page
    for framework in ("jax", "torch"):  # the kit's fast DP-SGD: its own row, computed against standard
        mine = runs[runs.framework == framework]
        fast = mine[mine["mode"] == "fast_dp"].iloc[0]
        assert pd.isna(fast.microbatch_size) and fast.batch_size == 4
        share = fast.throughput_sps / mine[mine["mode"] == "standard"].iloc[0].throughput_sps
        assert (f"| Fast DP (kit) | - | {tables.fmt_sps(fast.throughput_sps)} ±{100 * fast.cv_step:.0f}%"
                f"{pages.noise_mark(fast)} | {share:.2f}x | "
                f"{100 * share:.1f}% |") in page
        assert f"CNN tiny at batch 4: {100 * share:.1f}% of standard" in page
    assert "**The kit's fast DP-SGD**" in page
    torch_mb1 = records.read_record(runs[(runs.framework == "torch") & (runs.microbatch_size == 1)].record_path.iloc[0])
    assert torch_mb1["metrics"]["microbatch_size"] == 1  # the Opacus physical batch was applied
    assert "| Mode | Microbatch Size | Throughput (samples/s) | Speedup vs Standard | % of Standard |" in page
    assert "**Recommendation, from these measurements.**" in page
    chart = tiny_workflow / "assets" / "cnn_microbatch_tiny_b4.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "../assets/cnn_microbatch_tiny_b4.png" in page
    assert "(cnn_benchmark_results.md)" in (tiny_workflow / "docs" / "index.md").read_text()
    assert (tiny_workflow / "site" / "cnn_benchmark_results.html").exists()


@pytest.mark.e2e
def test_jaxpr_section_shows_what_the_workflow_captured(tiny_workflow):
    """Captured in a workflow job at batch 2 and 4; the page quotes the records, not a pasted text."""
    page = (tiny_workflow / "docs" / "cnn_benchmark_results.md").read_text()
    runs = tiny_workflow / "results" / "runs" / "cnn_microbatch"
    for batch in (2, 4):
        capture = records.read_record(runs / f"jaxpr-cnn-small-b{batch}.json")["metrics"]["jaxpr"]
        for conv in capture["programs"]["clipped"]["weight_gradient_convs"]:
            assert conv["feature_group_count"] == batch
            assert conv["shape"][3] == batch * conv["kernel_shape"][3]
            assert f"`{conv['shape_text']}`, {batch}" in page
        for conv in capture["programs"]["standard"]["weight_gradient_convs"]:
            assert (conv["feature_group_count"], conv["shape"][3]) == (1, conv["kernel_shape"][3])
    first = records.read_record(runs / "jaxpr-cnn-small-b2.json")["metrics"]["jaxpr"]["programs"]
    assert first["clipped"]["weight_gradient_convs"][1]["equation"] in page
    assert first["standard"]["weight_gradient_convs"][1]["equation"] in page
    assert "The captured values match the published ones." in page


@pytest.mark.e2e
def test_a_run_past_its_time_limit_is_shown_not_dropped(tiny_workflow, tmp_path, tiny_config):
    table = pd.read_csv(tiny_workflow / "results" / "tables" / "cnn_microbatch.csv", dtype={"message": object})
    clipped = (table.framework == "jax") & (table["mode"] == "clipped") & (table.microbatch_size == 1)
    table.loc[clipped, ["status", "message", "throughput_sps"]] = ["timeout", "did not finish in 60 s", None]
    table.to_csv(tmp_path / "table.csv", index=False)
    cfg = {**tiny_config, "docs_dir": str(tmp_path / "docs"), "assets_dir": str(tmp_path / "assets")}
    cnn_report.report(cfg, tmp_path / "table.csv")
    page = (tmp_path / "docs" / "cnn_benchmark_results.md").read_text()
    shown = table[clipped & (table.repeat == 0)].iloc[0]  # the page's run; † if taken under load
    assert f"| Clipped | 1 | did not finish in 60 s{pages.noise_mark(shown)} | - | - | - |" in page
    assert "1 timeout" in page
