"""Page "Benchmark Results", report: throughput tables and charts, DP cost ratios,
how each curve ended."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from privbench import models
from privbench.report import charts, pages, scorecard, tables
from privbench.studies import measuring
from privbench.studies.throughput.plan import NAME, PAGE, PUBLISHED, TITLE, chart_name


def _series_label(framework: str, mode: str) -> str:
    return f"{framework} ({mode})"


# DP-SGD modes, in the order the page lists them: Opacus / jax-privacy
# ("clipped") and the kit's own (privbench.dp).
DP_MODES = ("clipped", "fast_dp")
MODE_LABELS = {"standard": "Standard", "clipped": "Clipped", "fast_dp": "Fast DP (kit's own)"}


def _opacus_table(frame: pd.DataFrame, published: dict, size: str, batch: int) -> list[list[str]]:
    rows = []
    torch_rows = frame[(frame.framework == "torch") & (frame["size"] == size) & (frame.batch_size == batch)]
    for model in ("cnn", "transformer", "state_space", "diffusion"):
        ref = published["opacus_small_batch32"].get(model, {}) if size == "small" and batch == 32 else {}
        measured = {r["mode"]: r for _, r in torch_rows[torch_rows.model == model].iterrows()}
        if not measured and not ref:
            continue
        std = measured.get("standard")
        std_sps = std["throughput_sps"] if std is not None and std["status"] == "ok" else None
        for mode in ("standard", *DP_MODES):
            if mode not in ("standard", "clipped") and mode not in measured:
                continue  # the kit's own mode has no published figure: a row only where measured
            r = measured.get(mode)
            sps = r["throughput_sps"] if r is not None and r["status"] == "ok" else None
            shown = "-" if r is None else (tables.fmt_sps(sps) if sps is not None else tables.STATUS_LABELS[r["status"]])
            ref_sps, ref_std = ref.get(mode), ref.get("standard")
            rows.append([
                models.DISPLAY_NAMES[model], MODE_LABELS[mode],
                tables.fmt_sps(ref_sps), tables.fmt_ratio(ref_sps / ref_std if ref_sps and ref_std else None),
                shown, tables.fmt_ratio(sps / std_sps if sps and std_sps else None),
            ])
    return rows


def _ratio_lines(frame: pd.DataFrame, batch: int) -> list[str]:
    """DP cost per framework, model and DP mode at one batch size: DP / standard throughput."""
    lines = []
    for (framework, model, size), group in frame[frame.batch_size == batch].groupby(["framework", "model", "size"]):
        modes = {r["mode"]: r for _, r in group.iterrows()}
        std = modes.get("standard")
        for mode in DP_MODES:
            dp = modes.get(mode)
            if std is None or dp is None:
                continue
            name = f"{framework}, {models.DISPLAY_NAMES[model]} {size}, {mode}"
            if std["status"] == "ok" and dp["status"] == "ok":
                ratio = dp["throughput_sps"] / std["throughput_sps"]
                lines.append(f"{name}: {ratio:.2f}x of standard ({1 / ratio:.1f}x slower)" if ratio < 1
                             else f"{name}: {ratio:.2f}x of standard (not slower at this batch)")
            else:
                lines.append(f"{name}: no ratio (standard: {std['status']}, {mode}: {dp['status']})")
    return lines


def _dp_faster_facts(frame: pd.DataFrame, batch: int) -> list[dict]:
    """Where a DP mode outran standard training at ``batch``: both throughputs, whether the gap
    is within the two runs' step-time spreads (CV), and the kit engine's route for each
    convolution (``long_conv``: the StateSpace model's long depthwise one explains its case)."""
    from privbench import records

    facts = []
    for (framework, model, size), group in frame[(frame.batch_size == batch) & (frame.status == "ok")].groupby(
            ["framework", "model", "size"]):
        modes = {r["mode"]: r for _, r in group.iterrows()}
        std = modes.get("standard")
        for mode in DP_MODES:
            dp = modes.get(mode)
            if std is None or dp is None or dp["throughput_sps"] <= std["throughput_sps"]:
                continue
            ratio = dp["throughput_sps"] / std["throughput_sps"]
            spread = sum(v for v in (std.get("cv_step"), dp.get("cv_step")) if not tables.is_missing(v))
            layers = records.read_record(dp["record_path"])["metrics"].get("dp_layers") or []
            facts.append({"name": f"{framework}, {models.DISPLAY_NAMES[model]} {size}, {MODE_LABELS[mode]}",
                          "long_conv": model == "state_space" and mode == "fast_dp",
                          "std_sps": tables.fmt_sps(std["throughput_sps"]),
                          "dp_sps": tables.fmt_sps(dp["throughput_sps"]), "ratio": tables.fmt_ratio(ratio),
                          "within_spread": ratio - 1 <= spread, "spread_pct": tables.fmt(100 * spread, 0),
                          "conv_routes": [layer for layer in layers if "Conv" in layer]})
    return facts


def _curve_end_lines(frame: pd.DataFrame) -> list[str]:
    """For every curve: the largest batch that ran and what ended the curve."""
    lines = []
    for (framework, model, size, mode), group in frame.groupby(["framework", "model", "size", "mode"]):
        ok = group[group.status == "ok"]
        failed = group[group.status != "ok"].sort_values("batch_size")
        reached = f"batch {int(ok.batch_size.max())}" if len(ok) else "no batch ran"
        if len(failed):
            first = failed.iloc[0]
            end = f"{tables.STATUS_LABELS[first['status']]} at batch {int(first['batch_size'])}"
        else:
            end = "reached the batch cap"
        lines.append(f"{framework} {models.DISPLAY_NAMES[model]} {size} ({mode}): {reached}; {end}")
    return lines


# The setting of the published Opacus table (published["opacus_small_batch32"]).
PUBLISHED_SIZE, PUBLISHED_BATCH = "small", 32


def claims(config: dict, runs: pd.DataFrame, published: dict) -> list[scorecard.Claim]:
    """The scorecard's claims: Opacus clipped / standard throughput per model, as in the published
    table; reproduced at the published batch if both modes ran it, else the largest both ran."""
    sizes = config[NAME]["sizes"]
    size = PUBLISHED_SIZE if PUBLISHED_SIZE in sizes else sizes[0]
    out = []
    for model, ref in published["opacus_small_batch32"].items():
        key = {"framework": "torch", "model": model, "size": size}
        both = set.intersection(*(scorecard.ok_batches(runs, {**key, "mode": m}) for m in ("standard", "clipped")))
        key["batch_size"] = batch = scorecard.pick_batch(both, PUBLISHED_BATCH)
        reproduced = pages.claim_values(runs, {**key, "mode": "clipped"}, {**key, "mode": "standard"})
        out.append(scorecard.Claim(
            f"{models.DISPLAY_NAMES[model]} {PUBLISHED_SIZE}, batch {PUBLISHED_BATCH}: "
            "PyTorch clipped (Opacus) / standard throughput",
            ref["clipped"] / ref["standard"], reproduced,
            scorecard.differences(("model size", size, PUBLISHED_SIZE), ("batch", batch, PUBLISHED_BATCH)), TITLE))
    return out


def report(config: dict, table_path: str | Path) -> None:
    section, frame, published, assets_dir, docs_dir, all_runs = pages.study_inputs(config, NAME, PUBLISHED,
                                                                                   table_path)

    detailed = []
    for model in section["models"]:
        for size in section["sizes"]:
            sub = frame[(frame.model == model) & (frame["size"] == size)]
            ref = [p for p in published["detailed"] if p["model"] == model and p["size"] == size]
            series = {}
            for (framework, mode), group in sub.groupby(["framework", "mode"]):
                series[_series_label(framework, mode)] = [
                    (int(r.batch_size), r.throughput_sps if r.status == "ok" else None, r.status)
                    for r in group.sort_values("batch_size").itertuples()]
            published_series: dict = {}
            for p in ref:
                published_series.setdefault(_series_label(p["framework"], p["mode"]), []).append(
                    (p["batch_size"], p["throughput_sps"]))
            chart = chart_name(model, size)
            charts.sweep_chart(series, f"{models.DISPLAY_NAMES[model]} {size}: throughput vs batch size",
                               "samples / s", assets_dir / chart, charts.machine_label(sub), published_series)
            columns = sorted(series)
            ref_columns = sorted(published_series)
            batches = sorted(set(int(b) for b in sub.batch_size) | {p["batch_size"] for p in ref})
            rows = []
            for batch in batches:
                row = [str(batch)]
                for col in columns:
                    match = sub[(sub.framework + " (" + sub["mode"] + ")" == col) & (sub.batch_size == batch)]
                    row.append(tables.throughput_cell(match.iloc[0]) + pages.noise_mark(match.iloc[0])
                               if len(match) else "-")
                for col in ref_columns:
                    value = dict(published_series[col]).get(batch)
                    row.append(tables.fmt_sps(value))
                rows.append(row)
            params = sub.param_count.dropna()
            detailed.append({
                "model": models.DISPLAY_NAMES[model], "size": size,
                "params": tables.params_label(int(params.iloc[0])) if len(params) else "not measured",
                "chart": chart,
                "table": tables.markdown_table(["Batch Size", *columns, *[f"{c}, published" for c in ref_columns]],
                                               rows),
            })

    table_size = "small" if "small" in section["sizes"] else section["sizes"][0]
    table_batch = section["opacus_table_batch"]
    ok = frame[frame.status == "ok"]
    cvs = ok.cv_step.dropna() if "cv_step" in ok else pd.Series(dtype=float)
    context = {
        "title": TITLE,
        "preset": config["preset"],
        "published": published,
        "system": pages.system_rows_beside(all_runs, {name: published["system"][key] for name, key in (
            ("Platform", "platform"), ("Processor", "processor"), ("Python", "python"), ("GPU", "gpu"))}),
        **pages.runs_context(all_runs),
        "status_summary": ", ".join(f"{n} {status}" for status, n in frame.status.value_counts().items()),
        "table_size": table_size,
        "table_batch": table_batch,
        "published_comparable": table_size == "small" and table_batch == 32,  # the published table's setting
        "opacus_rows": tables.markdown_table(
            ["Model", "Mode", "Published samples/s", "Published speedup", "Reproduced samples/s", "Reproduced speedup"],
            _opacus_table(frame, published, table_size, table_batch)),
        "ratio_lines": _ratio_lines(frame, table_batch),
        "dp_faster": _dp_faster_facts(frame, table_batch),
        "curve_end_lines": _curve_end_lines(frame),
        "detailed": detailed,
        "scorecard": scorecard.section(claims(config, all_runs, published), TITLE, all_runs, assets_dir,
                                       scorecard.chart_name(NAME)),
        "memory_budget_mb": config["run"]["memory_budget_mb"],
        "timeout_s": tables.fmt(config["run"]["timeout_s"], 0),
        "code": measuring.published_code_facts(section, all_runs),
        "batch_start": section["batch_start"], "batch_cap": section["batch_cap"],
        "median_cv_pct": tables.fmt(100 * statistics.median(cvs), 1) if len(cvs) else None,
        "max_cv_pct": tables.fmt(100 * cvs.max(), 1) if len(cvs) else None,
        "overhead_mean": tables.fmt(ok.harness_overhead_s.mean(), 1) if len(ok) else None,
        "import_mean": tables.fmt(ok.phases_s_import_s.mean() if "phases_s_import_s" in ok and len(ok) else None, 1),
        "warmup_mean": tables.fmt(ok.warmup_s.mean(), 1) if len(ok) else None,
    }
    pages.render("benchmark_results.md.j2", context, docs_dir / PAGE)
