"""Page "Memory Profiling Analysis", report: peak and held memory per method and phase,
time per step, the kit engine's targets met or missed, charts and the page.

Every number, comparison and verdict of the page is computed here, formatted;
the template only words them."""

from __future__ import annotations

from pathlib import Path

from privbench import models
from privbench.report import charts, pages, scorecard, tables
from privbench.studies.memory_profile.plan import (COMPONENTS, MB, METHOD_LABELS, METHODS, MODEL, NAME, PAGE,
                                                   PHASES, POINT_LABELS, POINTS, PUBLISHED, PUBLISHED_ONLY_LABELS,
                                                   SHORT_LABELS, TITLE, breakdown_chart_name, timeline_chart_name)

# Issue 12's targets for the kit engine's row (fast_dp), on the default preset.
TARGETS = {"time_vs_vanilla": 1.10, "peak_vs_vanilla": 1.05}
GRAM_ITEMSIZE = 4  # float32: the kit's models train in float32


def _timeline_chart(results: dict[str, dict], title: str, machine: str, path: Path) -> None:
    fig, ax = charts.plt.subplots(figsize=(7.5, 4.2))
    for i, (method, metrics) in enumerate(results.items()):
        color = f"C{i % 10}"
        ax.plot(range(len(POINTS)), [metrics["timeline_mb"][p] for p in POINTS], marker="o", color=color,
                label=METHOD_LABELS[method])
        ax.scatter([k + 0.5 for k in range(len(PHASES))], [metrics["phase_peak_mb"][p] for p in PHASES],
                   marker="^", facecolors="none", edgecolors=color, s=60, zorder=5)
    ax.set_xticks([0, 0.5, 1, 1.5, 2, 2.5, 3],
                  ["start", "forward\n(peak)", "after\nforward", "backward\n(peak)", "after\nbackward",
                   "step\n(peak)", "after\nstep"], fontsize=8)
    ax.set_ylabel("memory held by tensors (MB)")
    ax.set_ylim(bottom=0)
    charts.titles(ax, title, machine)
    ax.grid(alpha=0.3)
    charts.legend_outside(ax)
    charts.save(fig, path)


def _breakdown_chart(results: dict[str, dict], title: str, machine: str, path: Path) -> None:
    points = ("after_forward", "after_backward")
    fig, ax = charts.plt.subplots(figsize=(max(8, 1.5 * len(results) + 1), 4.5))
    width = 0.38
    for i, (method, metrics) in enumerate(results.items()):
        for j, point in enumerate(points):
            x, bottom = i + (j - 0.5) * width, 0.0
            for k, (component, label) in enumerate(COMPONENTS.items()):
                value = max(0.0, metrics[f"components_{point}_mb"][component])
                ax.bar(x, value, width * 0.95, bottom=bottom, color=f"C{k}", label=label if i == j == 0 else None)
                bottom += value
            ax.text(x, bottom, "F" if point == "after_forward" else "B", ha="center", va="bottom", fontsize=7)
        ax.hlines(metrics["peak_memory_mb"], i - width, i + width, colors="black", linestyles="--",
                  label="peak of the step" if i == 0 else None)
    ax.set_xticks(range(len(results)), [SHORT_LABELS[m] for m in results], fontsize=8)
    ax.set_ylabel("MB")
    charts.titles(ax, title, machine)
    charts.legend_outside(ax)
    charts.save(fig, path)


def _mb(value) -> str:
    """Megabytes, with enough decimals for the tiny preset's small figures to differ."""
    return tables.fmt(value, 1 if tables.is_missing(value) or abs(value) >= 10 else 3)


def _mb_change(value: float) -> str:
    return ("+" if value >= 0 else "-") + _mb(abs(value))


def _ms(seconds: float) -> str:
    return tables.fmt(1000 * seconds, 1)


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def _forward_facts(results: dict[str, dict]) -> dict:
    """Question 1, per DP method: extra memory after forward and at the peak, against vanilla."""
    vanilla = results["vanilla"]
    methods, more, max_hook_inputs = [], [], 0.0
    forward_equal = peaks_in_backward = True
    for method, metrics in results.items():
        if method == "vanilla":
            continue
        extra_forward = metrics["timeline_mb"]["after_forward"] - vanilla["timeline_mb"]["after_forward"]
        hook_inputs = metrics["components_after_forward_mb"]["hook_inputs"]
        same = abs(extra_forward) <= 0.01 * vanilla["timeline_mb"]["after_forward"]
        forward_equal &= same
        if not same and extra_forward > 0:
            more.append(METHOD_LABELS[method])
        peaks_in_backward &= metrics["peak_phase"] == "backward"
        max_hook_inputs = max(max_hook_inputs, hook_inputs)
        per_example = metrics["components_after_backward_mb"]["per_example"]
        norm_pass = metrics["part_levels_mb"].get("backward: norms")
        methods.append({
            "label": METHOD_LABELS[method],
            "forward_change": _mb_change(extra_forward),
            "hook_inputs": _mb(hook_inputs),
            "peak_change": _mb_change(metrics["peak_memory_mb"] - vanilla["peak_memory_mb"]),
            "peak_phase": metrics["peak_phase"],
            "per_example_after_backward": _mb(per_example) if per_example > 0.01 * metrics["peak_memory_mb"] else None,
            "norm_pass_end": _mb(norm_pass["after"]) if norm_pass else None,
        })
    return {"methods": methods, "forward_equal": forward_equal, "peaks_in_backward": peaks_in_backward,
            "max_hook_inputs": _mb(max_hook_inputs), "more": ", ".join(more), "engine": "fast_dp" in results}


def _gram_facts(metrics: dict) -> dict | None:
    """Question 2, from the ghost run: the memory around each call of Opacus' linear norm sampler."""
    calls = [c for c in metrics["norm_calls"] if c["type"] == "Linear" and len(c["input_shape"]) == 3]
    if not calls:
        return None
    highest = max(calls, key=lambda c: c["peak_mb"])
    n, rows, _ = highest["input_shape"]
    lowest_start = min(c["before_mb"] for c in calls)
    return {
        "calls": len(calls),
        "max_rise_mb": _mb(max(c["peak_mb"] - c["before_mb"] for c in calls)),
        "gram_mb": _mb(n * rows * rows * GRAM_ITEMSIZE / MB),
        "rows": rows, "batch": n,
        "highest_layer": highest["layer"], "highest_mb": _mb(highest["peak_mb"]),
        "step_peak_mb": _mb(metrics["peak_memory_mb"]),
        "sets_peak": highest["peak_mb"] >= metrics["peak_memory_mb"] - 1e-6,
        "below_peak_mb": _mb(metrics["peak_memory_mb"] - highest["peak_mb"]),
        "lowest_start_mb": _mb(lowest_start),
        "after_forward_mb": _mb(metrics["timeline_mb"]["after_forward"]),
        "nothing_given_back": lowest_start >= metrics["timeline_mb"]["after_forward"],
    }


def _kit_norm_facts(results: dict[str, dict]) -> dict | None:
    """The kit's norm samplers inside Opacus' ghost path: their calls on linear layers."""
    calls = [c for c in results.get("flash_two_pass", {}).get("norm_calls", []) if c.get("form")]
    if not calls:
        return None
    return {"method": METHOD_LABELS["flash_two_pass"], "forms": ", ".join(sorted({c["form"] for c in calls})),
            "max_rise_mb": _mb(max(c["peak_mb"] - c["before_mb"] for c in calls))}


def _routes_by_type(metrics: dict) -> str:
    """The engine's route per layer type, as metered, e.g. "9 Linear: kept; 5 LayerNorm: elementwise"."""
    counts: dict[tuple[str, str], int] = {}
    for call in metrics["norm_calls"]:
        counts[call["type"], call["route"]] = counts.get((call["type"], call["route"]), 0) + 1
    return "; ".join(f"{n} {layer_type}: {route}" for (layer_type, route), n in counts.items())


def _engine_facts(metrics: dict) -> dict:
    """The kit engine's run: the route of each layer's norm and the memory around those computations."""
    calls = metrics["norm_calls"]
    fallback = metrics.get("dp_fallback") or []
    return {
        "routes": metrics.get("dp_methods", ""),
        "routes_by_type": _routes_by_type(metrics),
        "calls": len(calls),
        "max_rise_mb": _mb(max((c["peak_mb"] - c["before_mb"] for c in calls), default=None)),
        "fallback": "; ".join(fallback) or None,
    }


def _target_facts(results: dict[str, dict], all_runs) -> dict | None:
    """Issue 12's targets for the kit engine's row: time and peak against vanilla, peak against ghost.
    Judged on the median over the independent processes (``all_runs``: the repeats, paired with
    vanilla's of the same round, as the scorecard pairs them), whose range is shown; one process:
    its own ratio."""
    if not {"vanilla", "fast_dp"} <= set(results):
        return None
    vanilla, engine = results["vanilla"], results["fast_dp"]

    def ratio(column: str) -> tuple[float, str | None]:
        spread = pages.claim_values(all_runs, {"method": "fast_dp"}, {"method": "vanilla"}, column)
        if spread.n > 1:
            return spread.median, (f"median of {spread.n} processes, "
                                   f"{tables.fmt_ratio(spread.low)}-{tables.fmt_ratio(spread.high)}")
        return engine[column] / vanilla[column], None

    (time_ratio, time_range), (peak_ratio, peak_range) = ratio("mean_step_s"), ratio("peak_memory_mb")
    ghost = results.get("ghost")
    return {
        "time_limit": tables.fmt_ratio(TARGETS["time_vs_vanilla"]), "time_ratio": tables.fmt_ratio(time_ratio),
        "time_range": time_range, "time_verdict": _verdict(time_ratio <= TARGETS["time_vs_vanilla"]),
        "peak_limit": tables.fmt_ratio(TARGETS["peak_vs_vanilla"]), "peak_ratio": tables.fmt_ratio(peak_ratio),
        "peak_range": peak_range, "peak_verdict": _verdict(peak_ratio <= TARGETS["peak_vs_vanilla"]),
        "engine_peak_mb": _mb(engine["peak_memory_mb"]),
        "ghost_peak_mb": _mb(ghost["peak_memory_mb"]) if ghost else None,
        "ghost_verdict": _verdict(engine["peak_memory_mb"] <= ghost["peak_memory_mb"]) if ghost else None,
    }


def _pass_times(results: dict[str, dict]) -> dict | None:
    """Time per step of ghost clipping (two passes), kit norms in it (two) and the kit engine (one)."""
    compared = ("ghost", "flash_two_pass", "fast_dp")
    if not set(compared) <= set(results):
        return None
    return {method: _ms(results[method]["mean_step_s"]) for method in compared}


def _published_row(label: str, ref: dict | None, ref_vanilla: dict) -> list[str]:
    """A method's published figures and their ratios to the published vanilla row ("-" where none)."""
    return [label, tables.fmt(ref.get("peak_memory_mb") if ref else None), tables.fmt(ref.get("step_ms") if ref else None),
            tables.fmt_ratio(ref["peak_memory_mb"] / ref_vanilla["peak_memory_mb"] if ref else None),
            tables.fmt_ratio(ref["step_ms"] / ref_vanilla["step_ms"] if ref else None)]


# Each published method: its name, and the run that reproduces it (the kit engine stands in for
# the kit's former Flash Clipping, which it supersedes).
PUBLISHED_METHODS = {"ghost": ("Ghost Clipping (Opacus)", "ghost"), "flash": ("Flash Clipping", "fast_dp")}
# The published figures' keys: what they are and the table's column measuring them.
RATIOS = {"peak_memory_mb": ("peak memory", "peak_memory_mb"), "step_ms": ("time per step", "mean_step_s")}


def claims(config: dict, runs, published: dict) -> list[scorecard.Claim]:
    """The scorecard's claims: each published DP method's peak memory and time per step over
    vanilla's. The published page names neither model nor batch, so none is comparable."""
    gpu = () if config["platform"] == "cuda" else ("published on a GPU (allocator peak), this run on a CPU",)
    refs = published["methods"]
    out = []
    for method, (name, run) in PUBLISHED_METHODS.items():
        stand_in = (f"measured by the {METHOD_LABELS[run]}",) if run != method else ()
        for key, (what, column) in RATIOS.items():
            out.append(scorecard.Claim(
                f"{name}: {what} / vanilla's", refs[method][key] / refs["vanilla"][key],
                pages.claim_values(runs, {"method": run}, {"method": "vanilla"}, column),
                scorecard.differences(*gpu, "the published page states no model or batch size", *stand_in), TITLE))
    return out


def report(config: dict, table_path: str | Path) -> None:
    from privbench import records
    from privbench.dp.cost import TILE

    section, frame, published, assets_dir, docs_dir, all_runs = pages.study_inputs(config, NAME, PUBLISHED,
                                                                                   table_path)
    by_method = {row["method"]: row for _, row in frame.iterrows()}
    ordered = [m for m in METHODS if m in by_method]
    results = {m: records.read_record(by_method[m]["record_path"])["metrics"]
               for m in ordered if by_method[m]["status"] == "ok"}
    vanilla = results.get("vanilla")

    ref_vanilla = published["methods"]["vanilla"]
    summary_rows = []
    for method in ordered:
        metrics = results.get(method)
        row = _published_row(METHOD_LABELS[method] + pages.noise_mark(by_method[method]),
                             published["methods"].get(method), ref_vanilla)
        if metrics is None:
            row += [tables.STATUS_LABELS[by_method[method]["status"]]] + ["-"] * 3
        else:
            row += [_mb(metrics["peak_memory_mb"]), _ms(metrics["mean_step_s"]),
                    tables.fmt_ratio(metrics["peak_memory_mb"] / vanilla["peak_memory_mb"] if vanilla else None),
                    tables.fmt_ratio(metrics["mean_step_s"] / vanilla["mean_step_s"] if vanilla else None)]
        summary_rows.append(row)
    for method, label in PUBLISHED_ONLY_LABELS.items():
        summary_rows.append(_published_row(label, published["methods"][method], ref_vanilla) + ["not run"] + ["-"] * 3)

    timeline_rows, time_rows, component_rows = [], [], []
    for method, metrics in results.items():
        timeline_rows.append([METHOD_LABELS[method], _mb(metrics["timeline_mb"]["start"]),
                              *[f"{_mb(metrics['phase_peak_mb'][p])} / {_mb(metrics['timeline_mb'][f'after_{p}'])}"
                                for p in PHASES], metrics["peak_phase"]])
        parts = metrics["part_times_s"]
        backward = sum(v for k, v in parts.items() if k.startswith("backward"))
        split = [f"{k.split(': ')[1]} {1000 * v:.1f}" for k, v in parts.items() if k.startswith("backward: ")]
        time_rows.append([METHOD_LABELS[method], _ms(parts["forward"]),
                          _ms(backward) + (f" ({', '.join(split)})" if split else ""),
                          _ms(parts["step"]), _ms(metrics["mean_step_s"])])
        for point in ("after_forward", "after_backward"):
            component_rows.append([METHOD_LABELS[method], POINT_LABELS[point],
                                   *[_mb(metrics[f"components_{point}_mb"][c]) for c in COMPONENTS]])

    title = f"{models.DISPLAY_NAMES[MODEL]} {section['size']}, batch {section['batch_size']}"
    if results:
        machine = charts.machine_label(frame)
        _timeline_chart(results, f"{title}: memory through one step", machine,
                        assets_dir / timeline_chart_name(section["size"]))
        _breakdown_chart(results, f"{title}: what the memory holds after forward (F) and after backward (B)",
                         machine, assets_dir / breakdown_chart_name(section["size"]))
    else:  # every run failed: the page says so, the charts say so
        for name in (timeline_chart_name(section["size"]), breakdown_chart_name(section["size"])):
            fig, ax = charts.plt.subplots(figsize=(6, 2))
            ax.text(0.5, 0.5, "no successful run", ha="center", va="center")
            ax.axis("off")
            charts.save(fig, assets_dir / name)

    any_metrics = next(iter(results.values()), None)
    spec = models.family(MODEL).SIZES[section["size"]]
    noise_multiplier = next((m["noise_multiplier"] for m in results.values() if m.get("noise_multiplier")), None)
    context = {
        "title": TITLE,
        "preset": config["preset"],
        "published": published,
        "system": [(name, value, published["system"]["device"] if name == "GPU" else "not stated")
                   for name, value in pages.system_rows(all_runs)],
        **pages.runs_context(all_runs),
        "status_summary": ", ".join(f"{n} {status}" for status, n in frame.status.value_counts().items()),
        "failures": [f"{METHOD_LABELS[m]}: {tables.STATUS_LABELS[by_method[m]['status']]} "
                     f"({by_method[m]['message']})" for m in ordered if by_method[m]["status"] != "ok"],
        "methods": [(METHOD_LABELS[m], m) for m in ordered],
        "engine_ran": "fast_dp" in ordered,
        "size": section["size"], "batch_size": section["batch_size"], "seq_len": spec["seq_len"],
        "hidden": spec["hidden"], "layers": spec["layers"], "vocab_size": spec["vocab_size"],
        "params": tables.params_label(int(any_metrics["param_count"])) if any_metrics else "not measured",
        "warmup_steps": section["warmup_steps"], "timed_steps": section["timed_steps"],
        "memory_source": any_metrics["memory_source"] if any_metrics else "not measured",
        "on_cuda": config["platform"] == "cuda",
        "noise_multiplier": tables.fmt(noise_multiplier),
        "memory_budget_mb": config["run"]["memory_budget_mb"], "timeout_s": tables.fmt(config["run"]["timeout_s"], 0),
        "summary_table": tables.markdown_table(
            ["Method", "Published peak (MB)", "Published time/step (ms)", "Published peak vs vanilla",
             "Published time vs vanilla", "Reproduced peak (MB)", "Reproduced time/step (ms)",
             "Reproduced peak vs vanilla", "Reproduced time vs vanilla"], summary_rows),
        "timeline_table": tables.markdown_table(
            ["Method", "Start (MB)", "Forward: peak / end (MB)", "Backward: peak / end (MB)",
             "Optimiser step: peak / end (MB)", "Peak in"], timeline_rows),
        "time_table": tables.markdown_table(
            ["Method", "Forward (ms)", "Backward (ms)", "Optimiser step (ms)", "Whole step (ms)"], time_rows),
        "component_table": tables.markdown_table(["Method", "When", *COMPONENTS.values()], component_rows),
        "timeline_chart": timeline_chart_name(section["size"]),
        "breakdown_chart": breakdown_chart_name(section["size"]),
        "forward": _forward_facts(results) if vanilla else None,
        "gram": _gram_facts(results["ghost"]) if "ghost" in results else None,
        "kit_norms": _kit_norm_facts(results),
        "engine": _engine_facts(results["fast_dp"]) if "fast_dp" in results else None,
        "engine_label": METHOD_LABELS["fast_dp"],
        "published_only": list(PUBLISHED_ONLY_LABELS.values()),
        "tile": TILE,
        "targets": _target_facts(results, all_runs),
        "pass_times": _pass_times(results),
        "scorecard": scorecard.section(claims(config, all_runs, published), TITLE, all_runs, assets_dir,
                                       scorecard.chart_name(NAME)),
    }
    pages.render("memory_profiling_analysis.md.j2", context, docs_dir / PAGE)
