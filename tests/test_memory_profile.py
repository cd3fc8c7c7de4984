"""Page "Memory Profiling Analysis": the memory meter, the config section, the page from the tiny preset."""

import contextlib

import pandas as pd
import pytest
import torch
import yaml

from privbench import config, records
from privbench.report import pages
from privbench.studies import validate as validate_with_studies
from privbench.studies.memory_profile import measure as memory_measure, plan as memory_profile, report as memory_report
from privbench.profiling import SavedTensors, StepMeter, held_bytes

MIB = 2**20


def test_held_bytes_counts_a_shared_storage_once_in_its_first_group():
    base = torch.zeros(MIB // 4)  # 1 MiB of float32
    view = base[10:]
    held = held_bytes({"first": [base], "second": [view, torch.zeros(10)]})
    assert held == {"first": MIB, "second": 40}


def test_saved_tensors_are_tracked_without_being_kept_alive():
    saved = SavedTensors()
    x = torch.randn(64, requires_grad=True)
    with saved.tracking():
        loss = (x.exp() * 2).sum()  # exp saves its output
    assert held_bytes({"saved": saved.alive()})["saved"] >= 64 * 4
    loss.backward()
    assert saved.alive() == []  # freed by the backward pass: the tracking held no reference


def test_cpu_meter_sees_allocations_and_frees_inside_sections():
    meter = StepMeter(torch.device("cpu"), start_bytes=1000)
    with meter:
        with meter.section("outer"):
            with meter.section("inner"):
                temporary = torch.ones(MIB // 4)
                del temporary
            kept = torch.ones(MIB // 16)
    sections = {s.name: s for s in meter.sections}
    assert meter.start == 1000 and kept.numel()
    assert sections["inner"].peak - sections["inner"].before >= MIB
    assert sections["inner"].after - sections["inner"].before < MIB // 64
    assert MIB // 4 <= sections["outer"].after - sections["outer"].before < MIB // 4 + MIB // 64
    assert sections["outer"].peak >= sections["inner"].peak


def test_fast_dp_cut_into_phases_is_the_kits_own_step():
    """The page times and meters fast_dp's step in the engine's phases; the update stays ``DPOptimizer.step``'s."""
    from privbench import models
    from privbench.dp.torch_engine import make_private
    from privbench.training import DEFAULT_SETTINGS

    cpu, batch, clip = torch.device("cpu"), 4, DEFAULT_SETTINGS["l2_clip_norm"]
    run = memory_measure.build_method("fast_dp", "tiny", batch, seed=0, device=cpu)
    assert run.description["noise_multiplier"] == DEFAULT_SETTINGS["noise_std"] * batch / clip
    assert "gram" in run.description["dp_methods"] and run.description["dp_fallback"] == []
    family = models.family("transformer")
    reference = models.build("torch", "transformer", "tiny", 0)
    dp = make_private(reference, torch.optim.AdamW(reference.parameters(), lr=DEFAULT_SETTINGS["learning_rate"]),
                      max_grad_norm=clip, noise_multiplier=run.description["noise_multiplier"],
                      expected_batch_size=batch, noise_generator=torch.Generator(cpu).manual_seed(0))
    for _ in range(2):
        run.zero_grad()
        memory_measure._run_step(run, memory_measure._Parts(lambda _key: contextlib.nullcontext()))
        dp.optimizer.zero_grad(set_to_none=True)
        dp.step(family.loss_torch, run.inputs, run.targets)
    for mine, theirs in zip(run.model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)

    profiled = memory_measure.profile_step(run, cpu)
    # every layer input the engine keeps after the forward pass is one autograd saves anyway
    assert profiled["components_after_forward_mb"]["hook_inputs"] == 0
    assert profiled["components_after_forward_mb"]["saved_activations"] > 0
    assert profiled["components_after_backward_mb"]["gradients"] > 0  # the clipped sums, before noise
    assert {c["route"] for c in profiled["norm_calls"]} >= {"gram", "segment", "elementwise"}
    assert all(c["peak_mb"] >= c["before_mb"] for c in profiled["norm_calls"])
    # the engine's backward phase, cut by its observer where the norms are done
    assert {"backward: norms", "backward: clipped sum"} <= set(profiled["part_levels_mb"])


def test_engine_observer_meters_every_layer_with_its_route():
    """Each layer's norm computation is its own meter section, reported by the engine's phase
    observer with the route the engine took (the routes ``describe()`` lists)."""
    from privbench import models

    cpu = torch.device("cpu")
    run = memory_measure.build_method("fast_dp", "tiny", 4, 0, cpu)
    metrics = memory_measure.profile_step(run, cpu)
    model = models.build("torch", memory_profile.MODEL, "tiny", 0)
    with_params = [name for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    assert sorted(c["layer"] for c in metrics["norm_calls"]) == sorted(with_params)
    assert all(f"norm: {c['layer']}" in metrics["part_levels_mb"] for c in metrics["norm_calls"])
    described = {line.split(" (")[0]: line.rsplit(": ", 1)[1] for line in run.description["dp_layers"]}
    assert {c["layer"]: c["route"] for c in metrics["norm_calls"]} == described
    routes = memory_report._routes_by_type(metrics)
    assert sum(int(part.split()[0]) for part in routes.split("; ")) == len(with_params)
    # 8 tokens per example: a linear layer's per-example gradients would not fit; its route is named
    assert "Linear: gram" in routes or "Linear: direct" in routes
    assert "LayerNorm: elementwise" in routes


def test_kit_norms_in_opacus_ghost_path_note_their_form():
    """flash_two_pass: Opacus' registry wrapped, each kit norm sampler's call noted with its form."""
    from privbench.dp import opacus_norms

    cpu = torch.device("cpu")
    with opacus_norms.registered():  # puts Opacus' own samplers back for the other tests
        run = memory_measure.build_method("flash_two_pass", "tiny", 4, 0, cpu)
        metrics = memory_measure.profile_step(run, cpu)
    forms = {c["type"]: c.get("form") for c in metrics["norm_calls"]}
    assert forms["Linear"] in ("gram", "direct") and forms["Embedding"] is None
    assert memory_report._kit_norm_facts({"flash_two_pass": metrics})["forms"] == forms["Linear"]


def test_unknown_method_is_named_in_the_config_error(repo_root):
    raw = yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())
    raw["memory_profile"]["methods"] = ["vanilla", "ghostt"]
    with pytest.raises(config.ConfigError, match="memory_profile.methods.1"):
        validate_with_studies(raw)


@pytest.mark.e2e
def test_records_table_charts_and_page_agree(tiny_workflow):
    results = tiny_workflow / "results"
    all_runs = pd.read_csv(results / "tables" / "memory_profile.csv")
    # the claims' runs in a second process (tiny: repeats 2); the page's tables show the first
    assert sorted(all_runs[all_runs.repeat == 1].method) == sorted(memory_profile.CLAIM_METHODS)
    table = all_runs[all_runs.repeat == 0]
    assert sorted(table.method) == sorted(memory_profile.METHODS)
    assert set(table.status) == {"ok"}
    page = (tiny_workflow / "docs" / memory_profile.PAGE).read_text()
    for _, row in table.iterrows():
        metrics = records.read_record(row.record_path)["metrics"]
        timeline = metrics["timeline_mb"]
        assert metrics["peak_memory_mb"] == max(metrics["phase_peak_mb"].values())
        assert metrics["peak_memory_mb"] >= max(timeline.values())
        for point in memory_profile.POINTS:  # components add up to the measured level
            assert sum(metrics[f"components_{point}_mb"].values()) == pytest.approx(timeline[point])
        assert metrics["components_after_forward_mb"]["saved_activations"] > 0
        label = memory_profile.METHOD_LABELS[row.method]
        peak = memory_report._mb(metrics["peak_memory_mb"])
        assert f"| {label}{pages.noise_mark(row)} |" in page and f"| {peak} |" in page
    ghost = records.read_record(table[table.method == "ghost"].iloc[0].record_path)["metrics"]
    assert {c["type"] for c in ghost["norm_calls"]} == {"Linear", "Embedding"}
    # the kit engine: its own row (no published figures), its phases, its per-layer norms
    fast = records.read_record(table[table.method == "fast_dp"].iloc[0].record_path)["metrics"]
    assert {"backward: norms", "backward: clipped sum"} <= set(fast["part_times_s"])
    assert f"(here: {memory_report._routes_by_type(fast)})" in page  # each layer's route, as recorded
    assert set(fast["part_times_s"]) == {"forward", "backward: norms", "backward: clipped sum", "step"}
    assert {c["type"] for c in fast["norm_calls"]} == {"Linear", "Embedding", "LayerNorm"}
    vanilla = records.read_record(table[table.method == "vanilla"].iloc[0].record_path)["metrics"]
    label = memory_profile.METHOD_LABELS["fast_dp"]
    marked = label + pages.noise_mark(table[table.method == "fast_dp"].iloc[0])  # † if taken under load
    assert (f"| {marked} | - | - | - | - | {memory_report._mb(fast['peak_memory_mb'])} | "
            f"{1000 * fast['mean_step_s']:,.1f} | {fast['peak_memory_mb'] / vanilla['peak_memory_mb']:.2f}x | "
            f"{fast['mean_step_s'] / vanilla['mean_step_s']:.2f}x |") in page
    assert f"**The phases of {label}.**" in page
    assert f"(here: {fast['dp_methods']})" in page  # each layer's route, as the run recorded it
    for name in ("memory_breakdown_tiny.png", "memory_timeline_tiny.png"):
        assert (tiny_workflow / "assets" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"../assets/{name}" in page
    assert "| 52,347 | 6,727 |" in page  # published figures beside the reproduced ones
    assert "## 4. Is DP's extra memory made in the forward pass?" in page
    assert "## 5. Do the Gram products of Opacus' linear norm sampler set a new peak?" in page
    assert (tiny_workflow / "site" / "memory_profiling_analysis.html").exists()


def test_targets_are_judged_on_the_median_over_processes_with_their_range():
    """The kit engine's targets: with repeats, the median of the per-process ratios (each
    paired with vanilla's run of the same round) and their range, not the sweep's run alone."""
    results = {"vanilla": {"mean_step_s": 0.200, "peak_memory_mb": 100.0},
               "fast_dp": {"mean_step_s": 0.198, "peak_memory_mb": 100.0}}  # the sweep's own run: 0.99x
    runs = pd.DataFrame([
        {"method": method, "repeat": repeat, "status": "ok", "run_id": f"{method}-r{repeat}",
         "mean_step_s": step, "peak_memory_mb": 100.0}
        for repeat, (vanilla_s, engine_s) in enumerate([(0.200, 0.198), (0.200, 0.228), (0.200, 0.240)])
        for method, step in (("vanilla", vanilla_s), ("fast_dp", engine_s))])
    targets = memory_report._target_facts(results, runs)
    assert (targets["time_ratio"], targets["time_verdict"]) == ("1.14x", "missed")
    assert targets["time_range"] == "median of 3 processes, 0.99x-1.20x"
    alone = memory_report._target_facts(results, runs[runs.repeat == 0])
    assert (alone["time_ratio"], alone["time_range"], alone["time_verdict"]) == ("0.99x", None, "met")
