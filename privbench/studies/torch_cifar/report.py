"""Page "Torch benchmarks", report: seconds per epoch and largest batch per configuration
beside the published figures, ratios to the baseline, privacy levels, charts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from privbench.data.cifar100 import OFFICIAL_MD5
from privbench.report import pages, scorecard, tables
from privbench.studies.torch_cifar.plan import (CONFIGURATIONS, NAME, PAGE, PUBLISHED, PUBLISHED_CHART_DEVICES,
                                                TITLE, chart_name)

PUBLISHED_DEVICES = ("cpu", "sev", "v100", "a100")
NOT_REPRODUCIBLE = "not reproducible: the project is discontinued"


def privacy_level(dp: bool, isolated: bool) -> str:
    """None: plain training; Incomplete: DP or data isolation (federation, TEE); OK: both."""
    return ("None", "Incomplete", "OK")[int(dp) + int(isolated)]


@dataclass
class Outcome:
    """What one configuration's curve found: the run at its largest batch, and how it ended."""

    row: object | None  # table row of the largest batch that ran
    end: str  # "OOM at batch 32", "cap reached at batch 64", ...
    attested: bool

    def cell(self) -> str:
        if self.row is None:
            return f"- ({self.end})"
        mark = "≈" if self.row.estimated else ""
        return f"{mark}{self.row.seconds_per_epoch:,.2f} ({int(self.row.batch_size)})"


def _outcomes(frame) -> dict[str, Outcome]:
    out = {}
    for name in (n for n in CONFIGURATIONS if n in set(frame.configuration)):
        group = frame[frame.configuration == name].sort_values("batch_size")
        ok = group[group.status == "ok"]
        failed = group[group.status != "ok"]
        if len(failed):
            first = failed.iloc[0]
            end = f"{tables.STATUS_LABELS[first.status]} at batch {int(first.batch_size)}"
        else:
            end = f"batch cap {int(group.batch_size.max())} reached"
        row = ok.iloc[-1] if len(ok) else None
        attested = "sys_tee_status" in group and bool((group.sys_tee_status == "attested").all())
        out[name] = Outcome(row, end, attested)
    return out


def _published_cell(figures: dict, device: str) -> str:
    if device not in figures:
        return ""
    seconds, batch = figures[device]
    shown = tables.fmt(seconds) if isinstance(seconds, (int, float)) else seconds
    return f"{shown} ({batch})" if batch != "" else shown


def _epsilon_cell(outcome: Outcome | None) -> str:
    row = outcome.row if outcome else None
    if row is None or tables.is_missing(row.get("epsilon")):
        return "-"
    return f"{row.epsilon:.2f} (δ={row.delta:g})"


def _status_cell(outcome: Outcome | None, in_preset: bool) -> str:
    if not in_preset:
        return "not in this preset"
    if outcome.row is None:
        return f"no run fitted: {outcome.end}"
    steps = int(outcome.row.timed_steps)
    how = (f"estimated from {steps} timed step{'s' if steps > 1 else ''}" if outcome.row.estimated
           else "full epoch timed")
    return f"{how}; {outcome.end}"


def _table_rows(published: dict, outcomes: dict[str, Outcome], configured: set[str]) -> list[list[str]]:
    def row(label, privacy, figures, outcome, status):
        reproduced = outcome.cell() if outcome else "-"
        return [label, privacy, *(_published_cell(figures, d) for d in PUBLISHED_DEVICES), reproduced,
                _epsilon_cell(outcome), status]

    rows = []
    refs = {ref["configuration"]: ref for ref in published["rows"]}
    for name, conf in CONFIGURATIONS.items():
        outcome = outcomes.get(name)
        if name in refs:
            figures = refs[name]["figures"]
        elif conf.counterpart and (name in configured or outcome):
            figures = {device: ("-", "") for device in PUBLISHED_DEVICES}  # no published figures
        else:
            continue  # a stand-in (shown under BastionLab), or a kit's own method this preset did not run
        attested = bool(outcome and outcome.attested)
        label = conf.label + (" in a TEE (attested)" if attested else "")
        rows.append(row(label, privacy_level(conf.method != "standard", conf.federated or attested),
                        figures, outcome, _status_cell(outcome, name in configured)))
    for ref in published["bastionlab"]:
        rows.append(row(ref["label"], ref["privacy"], ref["figures"], None, NOT_REPRODUCIBLE))
        name = ref["stand_in"]
        conf, outcome = CONFIGURATIONS[name], outcomes.get(name)
        label = f"↳ stand-in: {conf.label}" + (" in a TEE" if ref["tee"] else "")
        if name not in configured:
            status = "not in this preset"
        elif outcome.attested != ref["tee"]:
            outcome, status = None, ("not measured (no confidential VM)" if ref["tee"]
                                     else "not measured (this preset's runs were in a confidential VM)")
        else:
            status = _status_cell(outcome, True)
        rows.append(row(label, privacy_level(ref["dp"], ref["tee"]), {}, outcome, status))
    return rows


def _ratio_lines(published: dict, outcomes: dict[str, Outcome]) -> list[str]:
    """Time per epoch of each configuration over the baseline's, here and as published."""
    base = outcomes.get("baseline")
    if base is None or base.row is None:
        return []
    refs = {ref["configuration"]: ref["figures"] for ref in published["rows"]}
    refs["expanded_weights"] = published["bastionlab"][1]["figures"]  # BastionLab DP, the method it stands in for
    lines = []
    for name, outcome in outcomes.items():
        if name == "baseline" or outcome.row is None:
            continue
        ratio = outcome.row.seconds_per_epoch / base.row.seconds_per_epoch
        counterpart = CONFIGURATIONS[name].counterpart
        if counterpart:
            other = outcomes.get(counterpart)
            against = ("" if other is None or other.row is None else
                       f"; {outcome.row.seconds_per_epoch / other.row.seconds_per_epoch:.2f}x the time per epoch "
                       f"of {CONFIGURATIONS[counterpart].label} (batch {int(other.row.batch_size)})")
            lines.append(f"{CONFIGURATIONS[name].label}: {ratio:.1f}x the baseline's time per epoch "
                         f"(batch {int(outcome.row.batch_size)} against {int(base.row.batch_size)}){against}; "
                         "the kit's own method, no published figure.")
            continue
        ref_ratios = []
        for device in PUBLISHED_CHART_DEVICES:
            seconds, base_seconds = refs[name].get(device, [None])[0], refs["baseline"][device][0]
            if isinstance(seconds, (int, float)):
                ref_ratios.append(f"{seconds / base_seconds:.1f}x on {published['devices'][device]['name']}")
        ref_text = ("BastionLab's DP, as published: " if name == "expanded_weights" else "published: ")
        lines.append(f"{CONFIGURATIONS[name].label}: {ratio:.1f}x the baseline's time per epoch "
                     f"(batch {int(outcome.row.batch_size)} against {int(base.row.batch_size)}); "
                     f"{ref_text}{', '.join(ref_ratios)}.")
    return lines


def _batch_lines(outcomes: dict[str, Outcome]) -> list[str]:
    def fitted(outcome: Outcome) -> str:
        return f"batch {int(outcome.row.batch_size)}" if outcome.row is not None else "no batch"

    lines = []
    for name, outcome in outcomes.items():
        counterpart = CONFIGURATIONS[name].counterpart
        against = (f" ({CONFIGURATIONS[counterpart].label}: {fitted(outcomes[counterpart])})"
                   if counterpart in outcomes else "")
        lines.append(f"{CONFIGURATIONS[name].label}: {fitted(outcome)} fitted; {outcome.end}{against}.")
    return lines


def _device_label(frame, config: dict) -> str:
    if config["platform"] == "cuda":
        gpus = sorted({str(g).split(",")[0] for g in frame.sys_gpu.dropna()}) if "sys_gpu" in frame else []
        limit_gb = config[NAME]["gpu_memory_limit_mb"] / 1024
        return f"{', '.join(gpus) or 'GPU'}, {limit_gb:g}GB limit"
    cpus = sorted({str(p) for p in frame.sys_processor.dropna()})
    return f"{', '.join(cpus)} ({config[NAME]['memory_budget_mb'] / 1024:g}GB RAM budget)"


def _batch_note(batch) -> str:
    return f"({batch})" if isinstance(batch, int) else ""


def _published_bars(figures: dict, devices: dict[str, str]) -> dict[str, tuple[float, str]]:
    """The published figures of one row as bars of the chart's published series (numbers only)."""
    return {devices[d]: (seconds, _batch_note(batch)) for d, (seconds, batch) in figures.items()
            if d in devices and isinstance(seconds, (int, float))}


def _charts(frame, config: dict, published: dict, outcomes: dict[str, Outcome], assets: Path) -> str:
    """One chart: each configuration's seconds per epoch here beside the published ones, on one scale."""
    from privbench.report import charts  # matplotlib: not for the worker and client processes

    device = _device_label(frame, config)
    reproduced = f"reproduced: {device}"
    devices = {d: f"published: {published['devices'][d]['chart_device']}" for d in PUBLISHED_CHART_DEVICES}
    refs = {r["configuration"]: r["figures"] for r in published["rows"]}
    groups = []
    for name in (n for n in CONFIGURATIONS if n in outcomes or n in refs):
        bars = _published_bars(refs.get(name, {}), devices)
        outcome = outcomes.get(name)
        if outcome is not None:
            row = outcome.row
            bars[reproduced] = ((None, outcome.end) if row is None else
                                (row.seconds_per_epoch, _batch_note(int(row.batch_size))))
        groups.append((CONFIGURATIONS[name].short, bars))
    for ref in published["bastionlab"]:  # not reproducible: their stand-ins have their own bars
        groups.append((ref["label"], {reproduced: (None, "discontinued"), **_published_bars(ref["figures"], devices)}))
    estimated = any(o.row is not None and o.row.estimated for o in outcomes.values())
    charts.grouped_bar_chart(
        groups, [reproduced, *devices.values()],
        "EfficientNet-B0 on CIFAR-100: seconds per epoch (batch size), reproduced beside published"
        + (" (reproduced: estimated from timed steps)" if estimated else ""),
        "seconds per epoch", assets / chart_name(config["platform"]), charts.machine_label(frame))
    return device


def _run_rows(frame) -> list[list[str]]:
    rows = []
    order = {name: i for i, name in enumerate(CONFIGURATIONS)}
    for r in frame.sort_values(["configuration", "batch_size"], key=lambda c: c.map(order) if c.name == "configuration"
                               else c).itertuples():
        if r.status == "ok":
            seconds = ("≈" if r.estimated else "") + f"{r.seconds_per_epoch:,.2f}"
        else:
            seconds = f"{tables.STATUS_LABELS[r.status]}: {r.message}"
        rounds = json.loads(Path(r.record_path).read_text())["metrics"].get("round_times_s")
        rows.append([CONFIGURATIONS[r.configuration].label + pages.noise_mark(r), str(int(r.batch_size)), seconds,
                     tables.fmt(getattr(r, "steps_per_epoch", None), 0),
                     tables.fmt(getattr(r, "peak_memory_mb", None), 0),
                     ", ".join(f"{t:.1f}" for t in rounds) if rounds else "-"])
    return rows


def claims(config: dict, runs, published: dict) -> list[scorecard.Claim]:
    """The scorecard's claims: each published configuration's CPU time per epoch over the
    baseline's (BastionLab's DP training through its stand-in), each at the largest batch that
    fitted in the published run; reproduced at that batch if it ran, else the largest that ran."""
    refs = [(CONFIGURATIONS[r["configuration"]].label, r["configuration"], r["figures"]["cpu"], "")
            for r in published["rows"] if r["configuration"] != "baseline"]
    refs += [(r["label"], r["stand_in"], r["figures"]["cpu"],
              f"measured by its stand-in, {CONFIGURATIONS[r['stand_in']].label}") for r in published["bastionlab"]
             if r["stand_in"] != "baseline" and isinstance(r["figures"]["cpu"][0], (int, float))]
    base_seconds, base_batch = next(r["figures"]["cpu"] for r in published["rows"] if r["configuration"] == "baseline")
    other_device = ("published on a CPU, this run on a GPU",) if config["platform"] == "cuda" else ()

    def at_batch(name: str, published_batch: int) -> dict:
        where = {"configuration": name}
        return {**where, "batch_size": scorecard.pick_batch(scorecard.ok_batches(runs, where), published_batch)}

    baseline = at_batch("baseline", base_batch)
    out = []
    for label, name, (seconds, batch), stand_in in refs:
        run = at_batch(name, batch)
        batches = (None if None in (run["batch_size"], baseline["batch_size"])
                   else f"{run['batch_size']} against {baseline['batch_size']}")
        out.append(scorecard.Claim(
            f"{label}: time per epoch / the baseline's (CPU)", seconds / base_seconds,
            pages.claim_values(runs, run, baseline, "seconds_per_epoch"),
            scorecard.differences(*other_device, ("batch", batches, f"{batch} against {base_batch}"), stand_in), TITLE))
    return out


def report(config: dict, table_path: str | Path) -> None:
    section, frame, published, assets, docs, all_runs = pages.study_inputs(config, NAME, PUBLISHED, table_path)
    outcomes = _outcomes(frame)
    device = _charts(frame, config, published, outcomes, assets)
    headers = ["Configuration", "Privacy",
               *(f"Published {published['devices'][d]['name']}, {published['devices'][d]['budget']}"
                 for d in PUBLISHED_DEVICES),
               f"Reproduced: {device}", "ε after one epoch", "Status"]
    any_estimated = bool(frame[frame.status == "ok"].estimated.any())
    context = {
        "title": TITLE, "preset": config["preset"], "published": published, **pages.runs_context(all_runs),
        "status_summary": ", ".join(f"{n} {status}" for status, n in frame.status.value_counts().items()),
        "system": pages.system_rows_beside(all_runs, {
            "Processor": published["devices"]["cpu"]["name"],
            "GPU": f"{published['devices']['v100']['name']}, {published['devices']['a100']['name']}",
            "Confidential computing (TEE)": published["devices"]["sev"]["name"]}),
        "device": device, "section": section, "accountant": section["dp"]["accountant"].upper(),
        "memory_budget_gb": tables.fmt(section["memory_budget_mb"] / 1024, 1),
        "gpu_memory_gb": (tables.fmt(section["gpu_memory_limit_mb"] / 1024, 1)
                          if config["platform"] == "cuda" else None), "data": config["data"]["cifar100"],
        "data_source": pages.data_source(config["data"]["cifar100"]["url"]), "any_estimated": any_estimated,
        "official_data": config["data"]["cifar100"]["md5"] == OFFICIAL_MD5,
        "train_examples": int(frame.train_examples.max()) if "train_examples" in frame else None,
        "table": tables.markdown_table(headers, _table_rows(published, outcomes, set(section["configurations"])),
                                       ["l", "c", *"rrrrrr", "l"]),
        "ratio_lines": _ratio_lines(published, outcomes), "batch_lines": _batch_lines(outcomes),
        "chart": chart_name(config["platform"]),
        "run_table": tables.markdown_table(
            ["Configuration", "Batch", "s/epoch or outcome", "Steps per epoch", "Peak memory (MB)",
             "Flower round times (s)"], _run_rows(frame)),
    }
    context["scorecard"] = scorecard.section(claims(config, all_runs, published), TITLE, all_runs, assets,
                                             scorecard.chart_name(NAME))
    pages.render("torch_benchmarks.md.j2", context, docs / PAGE)
