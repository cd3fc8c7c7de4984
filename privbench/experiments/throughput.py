"""Page "Benchmark Results": JAX vs PyTorch, standard vs DP-SGD, batch sweeps.

One curve per (framework, model, size, mode); along a curve the batch size
doubles until a run fails (out of memory, time limit, crash) or reaches the
cap. Every run is a separate process with its own record.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd

from privbench import harness, models
from privbench.report import charts, pages, tables

NAME = "throughput"
TITLE = "Benchmark Results"
PAGE = "benchmark_results.md"
PUBLISHED = "benchmark_results"
# memory_source of a CPU run (device_peak_memory); pages subtract the footprint after imports from it
PROCESS_PEAK = "process peak resident set (VmHWM)"


# --------------------------------------------------------------------------- plan

def curves(config: dict) -> dict[str, dict]:
    section = config[NAME]
    out = {}
    for framework in section["frameworks"]:
        for model in section["models"]:
            for size in section["sizes"]:
                for mode in section["modes"]:
                    microbatch = section["microbatch_size"] if (framework, mode) == ("jax", "clipped") else None
                    curve_id = f"{framework}-{model}-{size}-{mode}" + (f"-mb{microbatch}" if microbatch else "")
                    out[curve_id] = {
                        "curve_id": curve_id, "experiment": NAME, "preset": config["preset"],
                        "platform": config["platform"], "runner": config["runner"], "limits": config["run"],
                        "framework": framework, "model": model, "size": size, "mode": mode,
                        "microbatch_size": microbatch,
                        "batch_start": section["batch_start"], "batch_cap": section["batch_cap"],
                        "warmup_steps": section["warmup_steps"], "timed_steps": section["timed_steps"],
                        "settings": section["settings"],
                    }
    return out


def make_run_spec(curve: dict, batch: int) -> dict:
    limits = dict(curve["limits"])
    config = {key: curve[key] for key in ("framework", "model", "size", "mode", "microbatch_size",
                                          "warmup_steps", "timed_steps", "settings")}
    config["batch_size"] = batch
    config["seed"] = limits.pop("seed")
    return harness.make_spec(NAME, curve["preset"], f"{curve['curve_id']}-b{batch}", config, limits,
                             curve["platform"])


# --------------------------------------------------------------------------- worker side

def import_frameworks(spec: dict) -> None:
    from privbench.experiments import import_framework

    cfg = spec["config"]
    import_framework(cfg["framework"])
    if cfg["mode"] != "standard":  # the DP library's import is not part of the run's memory
        from privbench.errors import require

        require("jax_privacy" if cfg["framework"] == "jax" else "opacus")


def measure(spec: dict, metrics: dict, phases: dict, progress) -> None:
    from privbench import training
    from privbench.timing import summarise, time_steps

    cfg = spec["config"]
    device = "cuda" if spec["platform"] == "cuda" else "cpu"
    t0 = time.perf_counter()
    trainer = training.make_trainer(cfg["framework"], cfg["model"], cfg["size"], cfg["mode"], cfg["batch_size"],
                                    microbatch_size=cfg["microbatch_size"], settings=cfg["settings"],
                                    seed=cfg["seed"], device=device)
    metrics.update(trainer.description)
    phases["setup_s"] = time.perf_counter() - t0
    progress(f"model and step built in {phases['setup_s']:.1f} s; {cfg['warmup_steps']} warm-up, "
             f"{cfg['timed_steps']} timed steps at batch {cfg['batch_size']}")
    time_steps(trainer.step, trainer.sync, cfg["warmup_steps"], cfg["timed_steps"], metrics, progress)
    phases["warmup_s"] = metrics["warmup_s"]
    phases["timed_s"] = sum(metrics["step_times_s"])
    metrics.update(summarise(metrics["step_times_s"], cfg["batch_size"]))
    metrics.update(device_peak_memory(cfg["framework"], device))


def device_peak_memory(framework: str, device: str) -> dict:
    """Peak memory as the device sees it: the allocator's own peak on CUDA, peak RSS on CPU."""
    if device == "cuda":
        if framework == "torch":
            import torch

            return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                    "memory_source": "torch.cuda.max_memory_allocated"}
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return {"peak_memory_mb": stats.get("peak_bytes_in_use", 0) / 2**20,
                "memory_source": "jax device memory_stats peak_bytes_in_use"}
    from privbench.memory import peak_rss_mb

    return {"peak_memory_mb": peak_rss_mb(), "memory_source": PROCESS_PEAK}


# --------------------------------------------------------------------------- report

def chart_name(model: str, size: str) -> str:
    return f"throughput_{model}_{size}.png"


def page_outputs(config: dict) -> list[str]:
    section = config[NAME]
    charts_ = [str(Path(config["assets_dir"]) / chart_name(m, s)) for m in section["models"] for s in section["sizes"]]
    return [str(Path(config["docs_dir"]) / PAGE), *charts_]


def _series_label(framework: str, mode: str) -> str:
    return f"{framework} ({mode})"


def _cell(row) -> str:
    if row["status"] != "ok":
        return tables.STATUS_LABELS[row["status"]]
    spread = f" ±{100 * row['cv_step']:.0f}%" if not tables.is_missing(row.get("cv_step")) else ""
    return f"{row['throughput_sps']:.2f}{spread}"


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
            shown = "-" if r is None else (tables.fmt(sps) if sps is not None else tables.STATUS_LABELS[r["status"]])
            ref_sps, ref_std = ref.get(mode), ref.get("standard")
            rows.append([
                models.DISPLAY_NAMES[model], MODE_LABELS[mode],
                tables.fmt(ref_sps), tables.fmt_ratio(ref_sps / ref_std if ref_sps and ref_std else None),
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


def report(config: dict, table_path: str | Path) -> None:
    section = config[NAME]
    frame = pd.read_csv(table_path)
    published = pages.published(PUBLISHED)
    assets_dir, docs_dir = Path(config["assets_dir"]), Path(config["docs_dir"])

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
                               "samples / s", assets_dir / chart, published_series)
            columns = sorted(series)
            ref_columns = sorted(published_series)
            batches = sorted(set(int(b) for b in sub.batch_size) | {p["batch_size"] for p in ref})
            rows = []
            for batch in batches:
                row = [str(batch)]
                for col in columns:
                    match = sub[(sub.framework + " (" + sub["mode"] + ")" == col) & (sub.batch_size == batch)]
                    row.append(_cell(match.iloc[0]) if len(match) else "-")
                for col in ref_columns:
                    value = dict(published_series[col]).get(batch)
                    row.append(tables.fmt(value))
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
        "system": pages.system_rows(frame),
        "runs": len(frame),
        "status_summary": ", ".join(f"{n} {status}" for status, n in frame.status.value_counts().items()),
        "table_size": table_size,
        "table_batch": table_batch,
        "opacus_rows": tables.markdown_table(
            ["Model", "Mode", "Published samples/s", "Published speedup", "Reproduced samples/s", "Reproduced speedup"],
            _opacus_table(frame, published, table_size, table_batch)),
        "ratio_lines": _ratio_lines(frame, table_batch),
        "curve_end_lines": _curve_end_lines(frame),
        "detailed": detailed,
        "timed_steps": section["timed_steps"],
        "warmup_steps": section["warmup_steps"],
        "memory_budget_mb": config["run"]["memory_budget_mb"],
        "timeout_s": config["run"]["timeout_s"],
        "median_cv": statistics.median(cvs) if len(cvs) else None,
        "max_cv": cvs.max() if len(cvs) else None,
        "overhead_mean": ok.harness_overhead_s.mean() if len(ok) else None,
        "import_mean": ok.phases_s_import_s.mean() if "phases_s_import_s" in ok and len(ok) else None,
        "warmup_mean": ok.warmup_s.mean() if len(ok) else None,
    }
    pages.render("benchmark_results.md.j2", context, docs_dir / PAGE)
