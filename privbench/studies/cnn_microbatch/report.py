"""Page "CNN Benchmark Results", report: throughput, speed-up and peak memory per
microbatch size, the recommendation computed from them, the JAXPR evidence."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from privbench import models, records
from privbench.report import charts, pages, scorecard, tables
from privbench.studies import measuring
from privbench.studies.cnn_microbatch.plan import FAST_DP, MODEL, NAME, PAGE, PUBLISHED, TITLE, chart_name, fast_dp_on
from privbench.memory import PROCESS_PEAK

FRAMEWORK_LABELS = {"jax": "JAX (jax-privacy)", "torch": "PyTorch (Opacus)"}
FRAMEWORK_NAMES = {"jax": "JAX", "torch": "PyTorch"}
DP_LIBRARIES = {"jax": "jax-privacy", "torch": "Opacus"}
FAST_DP_LABEL = "Fast DP (kit)"
PROGRAM_LABELS = {"standard": "standard gradient", "clipped": "clipped gradient",
                  "clipped_microbatch": "clipped gradient, microbatched"}
# Two throughputs are called different only if they differ by more than this
# or by more than the two runs' step-time spreads (coefficients of variation)
# together, whichever is larger: a few timed steps on a CPU move by a few percent.
CLOSE = 0.05


def _sps(row) -> float | None:
    return row["throughput_sps"] if row is not None and row["status"] == "ok" else None


def _outcome(row) -> str:
    """Throughput ±spread as on the "Benchmark Results" page, or what stopped the run
    (a timeout saying how long the run was given)."""
    if row is None:
        return "not run"
    return (row["message"] if row["status"] == "timeout" else tables.throughput_cell(row)) + pages.noise_mark(row)


def _percent(value) -> str:
    return "-" if tables.is_missing(value) else f"{100 * value:.1f}%"


def _peak(row) -> str:
    """Peak memory; for a process peak (CPU), also what the run added beyond its imports."""
    if row is None or row["status"] != "ok" or tables.is_missing(row.get("peak_memory_mb")):
        return "-"
    if row["memory_source"] != PROCESS_PEAK:  # a device allocator's peak: no host footprint to subtract
        return f"{row['peak_memory_mb']:,.0f}"
    return f"{row['peak_memory_mb']:,.0f} (+{row['peak_memory_mb'] - row['rss_after_import_mb']:,.0f})"


def _published_case(published: dict, case: dict) -> dict | None:
    return next((p for p in published["cases"]
                 if p["size"] == case["size"] and p["batch_size"] == case["batch_size"]), None)


class _Case:
    """The runs of one case and one framework: the standard run and the clipped run per microbatch size."""

    def __init__(self, runs: pd.DataFrame, framework: str, case: dict):
        mine = runs[(runs.framework == framework) & (runs["size"] == case["size"])
                    & (runs.batch_size == case["batch_size"])]
        by_mode = {(r["mode"], None if tables.is_missing(r["microbatch_size"]) else int(r["microbatch_size"])): r
                   for _, r in mine.iterrows()}
        self.framework, self.case = framework, case
        self.standard = by_mode.get(("standard", None))
        self.clipped = {m: by_mode.get(("clipped", m)) for m in case["microbatch_sizes"]}
        self.fast_dp = by_mode.get((FAST_DP, None))  # None: not configured (or not run)

    @property
    def label(self) -> str:
        return f"{FRAMEWORK_LABELS[self.framework]}, CNN {self.case['size']} at batch {self.case['batch_size']}"

    def ratio(self, row) -> float | None:
        sps, std = _sps(row), _sps(self.standard)
        return sps / std if sps and std else None

    def ok_clipped(self) -> dict[int, pd.Series]:
        return {m: r for m, r in self.clipped.items() if _sps(r)}

    def table(self, published: dict | None) -> str:
        headers = ["Mode", "Microbatch Size", "Throughput (samples/s)", "Speedup vs Standard", "% of Standard",
                   "Peak memory, MB (added by the run)"]
        if published is not None:
            headers += ["Published throughput", "Published % of Standard"]
        rows = []
        shown = [("Standard", "-", self.standard), *(("Clipped", str(m), r) for m, r in self.clipped.items())]
        if self.fast_dp is not None:
            shown.append((FAST_DP_LABEL, "-", self.fast_dp))
        for mode, microbatch, row in shown:
            ratio = self.ratio(row)
            cells = [mode, microbatch, _outcome(row), tables.fmt_ratio(ratio), _percent(ratio), _peak(row)]
            if published is not None:
                cells += _published_cells(published, mode, microbatch)
            rows.append(cells)
        return tables.markdown_table(headers, rows)


def _published_cells(published: dict, mode: str, microbatch: str) -> list[str]:
    if mode == "Standard":
        return [tables.fmt_sps(published["standard"]), "100.0%"]
    if mode == FAST_DP_LABEL:  # the kit's own mode: not on the published page
        return ["-", "-"]
    value = published["clipped"].get(int(microbatch))
    if value is None:
        return [published.get("clipped_status", "-"), "-"]
    return [tables.fmt_sps(value), _percent(value / published["standard"])]


def _cost_lines(views: list[_Case], published: dict) -> list[str]:
    """Clipped throughput as a share of standard, per framework, with the published range."""
    lines = []
    for framework in dict.fromkeys(v.framework for v in views):
        shares = [v.ratio(r) for v in views if v.framework == framework for r in v.clipped.values()]
        shares = [s for s in shares if s]
        if not shares:
            lines.append(f"{FRAMEWORK_LABELS[framework]}: no clipped run finished beside a standard one, "
                         "so no share is computed.")
            continue
        low, high = min(shares), max(shares)
        line = (f"{FRAMEWORK_LABELS[framework]}: clipped training ran at {100 * low:.1f}-{100 * high:.1f}% "
                f"of standard throughput across {pages.plural(len(shares), 'clipped run')}")
        outpaced = sum(s >= 1 for s in shares)
        if outpaced:  # per-example work makes a step slower, never faster: the timings were disturbed
            line += (f"; {pages.plural(outpaced, 'clipped run')} outpaced the standard run, which per-example clipping "
                     "should not allow: treat those timings as disturbed and compare the spreads.")
        else:
            line += f", i.e. clipping cost {100 * (1 - high):.0f}-{100 * (1 - low):.0f}% of it."
        lines.append(line)
    published_shares = [value / p["standard"] for p in published["cases"] for value in p["clipped"].values()]
    lines.append(f"Published (JAX): {100 * min(published_shares):.1f}-{100 * max(published_shares):.1f}% of "
                 f"standard, a cost of {100 * (1 - max(published_shares)):.0f}-"
                 f"{100 * (1 - min(published_shares)):.0f}%.")
    return lines


def _fast_dp_lines(views: list[_Case]) -> list[str]:
    """The kit's fast DP-SGD per framework: its throughput as a share of standard, and against the
    fastest clipped run (jax-privacy / Opacus) of the same case."""
    lines = []
    for framework in dict.fromkeys(v.framework for v in views):
        parts = []
        for view in (v for v in views if v.framework == framework and v.fast_dp is not None):
            case = f"CNN {view.case['size']} at batch {view.case['batch_size']}"
            share = view.ratio(view.fast_dp)
            if share is None:
                parts.append(f"{case}: no share computed (fast DP: {_outcome(view.fast_dp)}; standard: "
                             f"{_outcome(view.standard)})")
                continue
            text = f"{case}: {100 * share:.1f}% of standard"
            if share >= 1:  # clipping adds per-example work: faster than standard means disturbed timings
                text += " (faster than standard, which per-example clipping should not allow: treat as disturbed)"
            ok = view.ok_clipped()
            if ok:
                best = max(ok, key=lambda m: ok[m]["throughput_sps"])
                text += (f", {_sps(view.fast_dp) / ok[best]['throughput_sps']:.2f}x the throughput of the fastest "
                         f"{DP_LIBRARIES[framework]} clipped run (microbatch {best})")
            parts.append(text)
        if parts:
            lines.append(f"{FRAMEWORK_NAMES[framework]}: " + "; ".join(parts) + ".")
    return lines


def _microbatch_findings(view: _Case) -> dict | None:
    """Fastest microbatch against the whole batch, and peak memory from largest to smallest microbatch."""
    ok = view.ok_clipped()
    if len(ok) < 2:
        return None
    largest, smallest = max(ok), min(ok)
    fastest = max(ok, key=lambda m: ok[m]["throughput_sps"])
    gain = ok[fastest]["throughput_sps"] / ok[largest]["throughput_sps"]
    spreads = [ok[m]["cv_step"] for m in {fastest, largest}]
    margin = max(CLOSE, sum(s for s in spreads if not tables.is_missing(s)))
    added = {m: r["peak_memory_mb"] - (r["rss_after_import_mb"] if r["memory_source"] == PROCESS_PEAK else 0)
             for m, r in ok.items()}
    by_size = [added[m] for m in sorted(ok, reverse=True)]
    return {
        "label": view.label, "largest": largest, "smallest": smallest, "fastest": fastest,
        "largest_sps": ok[largest]["throughput_sps"], "fastest_sps": ok[fastest]["throughput_sps"],
        "gain": gain, "margin": margin, "largest_is_fastest": gain <= 1 + margin,
        "memory_largest": added[largest], "memory_smallest": added[smallest],
        "memory_falls": all(a >= b for a, b in zip(by_size, by_size[1:])) and by_size[0] > by_size[-1],
    }


def _finding_line(f: dict) -> str:
    margin = (f"{100 * f['margin']:.0f}% (the larger of {100 * CLOSE:.0f}% and the two runs' "
              "step-time spreads together)")
    speed = (f"microbatch {f['fastest']} was fastest ({tables.fmt_sps(f['fastest_sps'])} samples/s), "
             f"{f['gain']:.2f}x the throughput of microbatch {f['largest']} ({tables.fmt_sps(f['largest_sps'])}), "
             f"more than the margin of {margin}"
             if not f["largest_is_fastest"] else
             f"no smaller microbatch beat microbatch {f['largest']} ({tables.fmt_sps(f['largest_sps'])} samples/s) "
             f"by more than {margin}")
    memory = (f"peak memory (added by the run) went from {f['memory_largest']:,.0f} MB at microbatch "
              f"{f['largest']} to {f['memory_smallest']:,.0f} MB at {f['smallest']}")
    return f"{f['label']}: {speed}; {memory}."


def _recommendation(findings: list[dict], published: dict) -> str:
    if not findings:
        return ("Too few clipped runs finished to compare microbatch sizes, so this build makes no "
                "recommendation about them.")
    faster_small = [f for f in findings if not f["largest_is_fastest"]]
    memory_falls = all(f["memory_falls"] for f in findings)
    memory = ("Smaller microbatches lowered peak memory in every case measured."
              if memory_falls else
              "Smaller microbatches did not lower peak memory in every case measured (see the tables).")
    agrees = published["recommended_microbatch"] == "largest"
    if not faster_small:
        speed = ("In every case the largest microbatch was the fastest, or no smaller one was faster beyond "
                 "the spread of the measurements: on this system, use the largest microbatch that fits in memory"
                 + (", as the published page advised." if agrees else "."))
    else:
        cases = "; ".join(f"{f['label']}: microbatch {f['fastest']}" for f in faster_small)
        speed = (f"In {len(faster_small)} of {len(findings)} cases a smaller microbatch was faster than the whole "
                 f"batch beyond the spread of the measurements ({cases}). On this system a larger microbatch is "
                 "therefore not the faster choice"
                 + (", contrary to the published advice to use the largest one that fits" if agrees else "")
                 + ": pick the microbatch size by measuring it on the target hardware, among those that fit "
                 "in memory.")
    return f"{speed} {memory}"


def _chart(views: list[_Case], case: dict, published: dict | None, machine: str, assets_dir: Path) -> None:
    series = {f"{v.framework} clipped": [(m, _sps(r), r["status"]) for m, r in v.clipped.items() if r is not None]
              for v in views}
    published_series = ({"jax clipped": sorted(published["clipped"].items())}
                        if published and published["clipped"] else None)
    standard = ", ".join(f"{v.framework} {tables.fmt_sps(_sps(v.standard))}" for v in views)
    # the kit's fast DP-SGD takes no microbatch size: a horizontal line across the axis
    references = {f"{v.framework} fast DP (kit, no microbatches)": (_sps(v.fast_dp), v.fast_dp["status"])
                  for v in views if v.fast_dp is not None}
    charts.sweep_chart(series, f"CNN {case['size']}, batch {case['batch_size']}: clipped throughput "
                       f"(standard: {standard} samples/s)", "samples / s", assets_dir / chart_name(case),
                       machine, published_series, xlabel="microbatch size", references=references)


def claims(config: dict, runs: pd.DataFrame, published: dict) -> list[scorecard.Claim]:
    """The scorecard's claims, JAX as published, per published case: clipped / standard throughput
    at each microbatch size, and each smaller microbatch's clipped throughput / the whole batch's."""
    out = []
    for ref in (p for p in published["cases"] if p["clipped"]):
        whole = ref["batch_size"]
        case = {"task": "throughput", "framework": "jax", "size": ref["size"], "batch_size": whole}
        clipped = {m: {**case, "mode": "clipped", "microbatch_size": m} for m in ref["clipped"]}
        label = f"CNN {ref['size']}, batch {whole}"
        for m, sps in ref["clipped"].items():
            out.append(scorecard.Claim(
                f"{label}, microbatch {m}: JAX clipped (jax-privacy) / standard throughput", sps / ref["standard"],
                pages.claim_values(runs, clipped[m], {**case, "mode": "standard"}), page=TITLE))
        for m, sps in ref["clipped"].items():
            if m != whole and whole in ref["clipped"]:
                out.append(scorecard.Claim(
                    f"{label}: JAX clipped throughput, microbatch {m} / whole batch (microbatch {whole})",
                    sps / ref["clipped"][whole], pages.claim_values(runs, clipped[m], clipped[whole]), page=TITLE))
    return out


# ---- JAXPR section

def _jaxpr_captures(frame: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """(captures that ran, failed capture runs), by batch size."""
    rows = frame[frame.task == "jaxpr"].sort_values("batch_size")
    captures = [records.read_record(r.record_path)["metrics"]["jaxpr"] for r in rows.itertuples() if r.status == "ok"]
    failed = [{"batch_size": int(r.batch_size), "status": r.status, "message": r.message}
              for r in rows.itertuples() if r.status != "ok"]
    return captures, failed


def _relation(capture: dict) -> list[dict]:
    """Per layer, standard vs clipped weight gradient, and whether the batch went into the feature groups."""
    batch = capture["batch_size"]
    standard = {c["layer"]: c for c in capture["programs"]["standard"]["weight_gradient_convs"]}
    rows = []
    for clipped in capture["programs"]["clipped"]["weight_gradient_convs"]:
        std = standard.get(clipped["layer"])
        c_out = clipped["kernel_shape"][3]
        rows.append({
            "batch_size": batch, "layer": clipped["layer"], "standard": std, "clipped": clipped,
            "holds": (std is not None and std["feature_group_count"] == 1 and std["shape"][3] == c_out
                      and clipped["feature_group_count"] == batch and clipped["shape"][3] == batch * c_out),
        })
    return rows


def _jaxpr_context(captures: list[dict], published: dict, frame: pd.DataFrame, section: dict) -> dict | None:
    if not captures:
        return None
    first = captures[0]
    batch, microbatch = first["batch_size"], first["microbatch_size"]
    layers = first["kernels"]
    shown_layer = layers[1]["layer"] if len(layers) > 1 else layers[0]["layer"]  # the second conv, as published
    programs = {name: {"label": label, "equation_count": p["equation_count"],
                       "conv": next(c for c in p["weight_gradient_convs"] if c["layer"] == shown_layer),
                       "convs": p["weight_gradient_convs"]}
                for name, label in PROGRAM_LABELS.items() if (p := first["programs"].get(name))}
    standard, clipped = programs["standard"]["conv"], programs["clipped"]["conv"]
    micro = programs.get("clipped_microbatch", {}).get("conv")
    ref = published["jaxpr"]
    comparable = (ref["size"], ref["batch_size"], ref["layer"]) == (first["size"], batch, shown_layer)
    relations = [row for capture in captures for row in _relation(capture)]
    per_example_mb = 4 * first["param_count"] / 2**20  # float32 gradient of every parameter
    microbatches = sorted({m for case in section["cases"] if case["size"] == first["size"]
                           for m in case["microbatch_sizes"]}, reverse=True)
    run_ids = list(frame[(frame.task == "jaxpr") & (frame.status == "ok")].sort_values("batch_size").run_id)
    return {
        "size": first["size"], "batch_size": batch, "microbatch_size": microbatch,
        "microbatches_per_step": batch // microbatch if microbatch else None,
        "kernels": layers, "shown_layer": shown_layer, "programs": programs,
        "standard": standard, "clipped": clipped, "micro": micro,
        # what the explanation states, checked on the captured values
        "standard_sums": (standard["feature_group_count"] == 1 and standard["weight_gradients"] == 1
                          and all(shape[0] == batch for shape in standard["operand_shapes"])),
        "clipped_folds_batch": clipped["feature_group_count"] == batch and clipped["weight_gradients"] == batch,
        "micro_loops": micro is not None and bool(micro["inside_loops"])
        and micro["feature_group_count"] == microbatch and micro["weight_gradients"] == microbatch,
        "published": ref if comparable else None,
        "published_matches": comparable and all(
            programs[mode]["conv"]["shape"] == ref[mode]["shape"]
            and programs[mode]["conv"]["feature_group_count"] == ref[mode]["feature_group_count"]
            for mode in ("standard", "clipped")),
        "relation_table": tables.markdown_table(
            ["Batch", "Layer (kernel)", "Standard: output, feature_group_count",
             "Clipped: output, feature_group_count", "Batch folded into the feature groups"],
            [[str(r["batch_size"]), f"{r['layer']} ({'x'.join(map(str, r['clipped']['kernel_shape']))})",
              f"`{r['standard']['shape_text']}`, {r['standard']['feature_group_count']}" if r["standard"] else "-",
              f"`{r['clipped']['shape_text']}`, {r['clipped']['feature_group_count']}",
              "yes" if r["holds"] else "no"] for r in relations]),
        "relation_holds": all(r["holds"] for r in relations),
        "batches": [c["batch_size"] for c in captures],
        "param_count": f"{first['param_count']:,}", "per_example_mb": tables.fmt(per_example_mb, 1),
        "conv_share_pct": tables.fmt(100 * sum(math.prod(k["shape"]) for k in layers) / first["param_count"], 1),
        "gradient_memory": [(m, tables.fmt(m * per_example_mb, 1)) for m in microbatches],
        "run_ids": run_ids,
    }


def report(config: dict, table_path: str | Path) -> None:
    section, frame, published, assets_dir, docs_dir, all_runs = pages.study_inputs(config, NAME, PUBLISHED,
                                                                                   table_path)
    runs = frame[frame.task == "throughput"]

    cases, all_views = [], []
    for case in section["cases"]:
        views = [_Case(runs, framework, case) for framework in section["frameworks"]]
        ref = _published_case(published, case)
        _chart(views, case, ref, charts.machine_label(runs), assets_dir)
        params = runs[(runs["size"] == case["size"])].param_count.dropna()
        cases.append({
            "size": case["size"], "batch_size": case["batch_size"],
            "input_shape": tuple(models.family(MODEL).SIZES[case["size"]]["input_shape"]),
            "params": tables.params_label(int(params.iloc[0])) if len(params) else "not measured",
            "chart": chart_name(case),
            "tables": [{"label": FRAMEWORK_LABELS[v.framework], "opacus": v.framework == "torch",
                        "table": v.table(ref if v.framework == "jax" else None)} for v in views],
            "published_status": ref.get("clipped_status") if ref else None,
        })
        all_views += views

    findings = [f for f in map(_microbatch_findings, all_views) if f]
    captures, failed_captures = _jaxpr_captures(frame)
    memory_sources = sorted(set(runs.memory_source.dropna())) if "memory_source" in runs else []
    context = {
        "title": TITLE, "preset": config["preset"], "published": published, **pages.runs_context(all_runs),
        "status_summary": ", ".join(f"{n} {status}" for status, n in frame.status.value_counts().items()),
        "system": pages.system_rows_beside(all_runs, {"Platform": published["system"]}, unstated="-"),
        "frameworks": [FRAMEWORK_LABELS[f] for f in section["frameworks"]],
        "torch": "torch" in section["frameworks"],
        "settings": section["settings"], "memory_budget_mb": config["run"]["memory_budget_mb"],
        "timeout_s": tables.fmt(config["run"]["timeout_s"], 0),
        "code": measuring.published_code_facts(section, all_runs),
        "process_peak_used": PROCESS_PEAK in memory_sources,
        "memory_sources": "; ".join(memory_sources) or "not measured",
        "cost_lines": _cost_lines(all_views, published),
        "fast_dp": fast_dp_on(section),
        "fast_dp_label": FAST_DP_LABEL,
        "fast_dp_lines": _fast_dp_lines(all_views),
        "finding_lines": [_finding_line(f) for f in findings],
        "recommendation": _recommendation(findings, published),
        "cases": cases,
        "jaxpr": _jaxpr_context(captures, published, frame, section),
        "jaxpr_failed": failed_captures,
        "scorecard": scorecard.section(claims(config, all_runs, published), TITLE, all_runs, assets_dir,
                                       scorecard.chart_name(NAME)),
    }
    pages.render("cnn_benchmark_results.md.j2", context, docs_dir / PAGE)
