"""Page "Torch benchmarks": EfficientNet-B0 on CIFAR-100, seconds per epoch and
the largest batch that fits, for plain PyTorch, Opacus, the kit's own fast
DP-SGD, 2-party Flower, Flower with either DP, and expanded-weights DP (the
stand-in for the discontinued BastionLab).

One curve per configuration: the batch size doubles (one process per run)
until a run fails (out of memory, time limit, crash) or reaches the cap. Each
run either trains one full epoch (``full_epoch``) or times a few steps and
estimates the epoch from them (recorded ``estimated: true``). Federated runs
start a real Flower federation (``privbench.federated``), one round per epoch.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from privbench import harness
from privbench.data.cifar100 import OFFICIAL_MD5
from privbench.report import tables

NAME = "torch_cifar"
TITLE = "Torch benchmarks"
PAGE = "torch_benchmarks.md"
PUBLISHED = "torch_benchmarks"


@dataclass(frozen=True)
class Configuration:
    label: str  # as in the published table
    short: str  # chart tick
    method: str  # privbench.training.cifar.METHODS
    federated: bool
    # The kit's own method: no published figures; set to the published
    # configuration it does the same work as (compared with it on the page).
    counterpart: str | None = None


# In the order of the page's rows and bars (a kit's own row follows its counterpart).
CONFIGURATIONS = {
    "baseline": Configuration("PyTorch (baseline)", "PyTorch Baseline", "standard", False),
    "opacus": Configuration("PyTorch + Opacus", "PyTorch + Opacus", "opacus", False),
    "fast_dp": Configuration("PyTorch + fast DP (kit)", "PyTorch + fast DP (kit)", "fast_dp", False, "opacus"),
    "flower": Configuration("PyTorch + 2-party Flower", "PyTorch + 2-party Flower", "standard", True),
    "flower_opacus": Configuration("PyTorch + 2-party Flower + Opacus", "PyTorch + 2-party Flower + Opacus",
                                   "opacus", True),
    "flower_fast_dp": Configuration("PyTorch + 2-party Flower + fast DP (kit)",
                                    "PyTorch + 2-party Flower + fast DP (kit)", "fast_dp", True, "flower_opacus"),
    "expanded_weights": Configuration("PyTorch + expanded-weights DP", "Expanded-weights DP",
                                      "expanded_weights", False),
}
NUM_CLIENTS = 2


# --------------------------------------------------------------------------- plan

def curves(config: dict) -> dict[str, dict]:
    section, data = config[NAME], config["data"]
    out = {}
    for name, batches in section["configurations"].items():
        conf = CONFIGURATIONS[name]
        out[name] = {
            "curve_id": name, "experiment": NAME, "preset": config["preset"], "platform": config["platform"],
            "runner": config["runner"],
            "limits": {**config["run"], "memory_budget_mb": section["memory_budget_mb"],
                       "timeout_s": section["timeout_s"] or config["run"]["timeout_s"]},
            "configuration": name, "method": conf.method, "federated": conf.federated,
            "num_clients": NUM_CLIENTS if conf.federated else 1, "rounds": section["flower_rounds"],
            "batch_start": batches["batch_start"], "batch_cap": batches["batch_cap"],
            "warmup_steps": section["warmup_steps"], "timed_steps": section["timed_steps"],
            "full_epoch": section["full_epoch"], "train_subset": section["train_subset"],
            "gpu_memory_limit_mb": section["gpu_memory_limit_mb"],
            "data_dir": data["dir"], "data_md5": data["cifar100"]["md5"],
            "settings": {"learning_rate": section["learning_rate"], **section["dp"]},
        }
    return out


def make_run_spec(curve: dict, batch: int) -> dict:
    limits = dict(curve["limits"])
    keys = ("configuration", "method", "federated", "num_clients", "rounds", "warmup_steps", "timed_steps",
            "full_epoch", "train_subset", "gpu_memory_limit_mb", "data_dir", "data_md5", "settings")
    config = {key: curve[key] for key in keys}
    config["batch_size"] = batch
    config["seed"] = limits.pop("seed")
    return harness.make_spec(NAME, curve["preset"], f"{curve['curve_id']}-b{batch}", config, limits,
                             curve["platform"])


def data_files(config: dict) -> list[str]:
    from privbench.data import cifar100

    return [str(cifar100.folder(config["data"]["dir"]) / name) for name in cifar100.FILES]


# --------------------------------------------------------------------------- worker side

def _device(spec: dict) -> str:
    return "cuda" if spec["platform"] == "cuda" else "cpu"


def import_frameworks(spec: dict) -> None:
    from privbench.errors import require

    cfg = spec["config"]
    require("torch", "torchvision", *(["opacus"] if cfg["method"] != "standard" else []),
            *(["flwr", "psutil"] if cfg["federated"] else []))
    import torch

    # The CUDA context reserves much address space: it belongs to the base, not the budget.
    torch.zeros(1, device=_device(spec))


def measure(spec: dict, metrics: dict, phases: dict, progress) -> None:
    if spec["config"]["federated"]:
        _measure_federated(spec, metrics, phases, progress)
    else:
        _measure_centralised(spec, metrics, phases, progress)


def _party_data(cfg: dict, index: int, parts: int):
    from privbench.data import cifar100
    from privbench.training.cifar import partition

    images, labels = cifar100.load(cfg["data_dir"])
    share = partition(len(labels), cfg["train_subset"], parts, index, cfg["seed"])
    return images[share], labels[share]


def _trainer(spec: dict, index: int, parts: int, metrics: dict):
    from privbench.training import cifar

    cfg = spec["config"]
    device = _device(spec)
    if device == "cuda":
        metrics.update(cifar.set_device_memory_limit(cfg["gpu_memory_limit_mb"]))
    images, labels = _party_data(cfg, index, parts)
    trainer = cifar.LocalTrainer(cfg["method"], images, labels, cfg["batch_size"], cfg["settings"], device,
                                 cfg["seed"] + index)
    metrics.update(trainer.description, steps_per_epoch=trainer.steps_per_epoch, **trainer.privacy())
    return trainer


def _train(trainer, cfg: dict, warmup_steps: int, metrics: dict, progress) -> None:
    """A full epoch, or ``timed_steps`` steps and the epoch estimated from them."""
    from privbench.timing import time_steps

    time_steps(trainer.step, trainer.sync, warmup_steps, 0 if cfg["full_epoch"] else cfg["timed_steps"],
               metrics, progress)
    if cfg["full_epoch"]:
        epoch = trainer.epoch(progress)
        metrics.update(step_times_s=epoch["step_times_s"], seconds_per_epoch=epoch["epoch_s"],
                       loss_last=epoch["loss_last"])
    else:
        metrics["seconds_per_epoch"] = statistics.fmean(metrics["step_times_s"]) * trainer.steps_per_epoch
        metrics["estimated"] = True


def _measure_centralised(spec: dict, metrics: dict, phases: dict, progress) -> None:
    from privbench.experiments.throughput import device_peak_memory

    cfg = spec["config"]
    t0 = time.perf_counter()
    trainer = _trainer(spec, 0, 1, metrics)
    phases["setup_s"] = time.perf_counter() - t0
    progress(f"{cfg['method']} trainer built in {phases['setup_s']:.1f} s: {metrics['train_examples']} examples, "
             f"{trainer.steps_per_epoch} steps per epoch at batch {cfg['batch_size']}")
    t0 = time.perf_counter()
    _train(trainer, cfg, cfg["warmup_steps"], metrics, progress)
    phases["train_s"] = time.perf_counter() - t0
    metrics.update(device_peak_memory("torch", _device(spec)))


# Federated: the worker orchestrates; the training happens in the ClientApp processes.

def initial_model(spec: dict):
    """The global model the ServerApp starts from (same architecture as the clients')."""
    from privbench.training.cifar import build_model

    return build_model(spec["config"]["method"], spec["config"]["seed"])


def client_round(spec: dict, partition: int, parts: int, state: dict, server_round: int) -> tuple[dict, dict]:
    """One client's local training in one round (runs in the ClientApp process)."""
    import torch

    from privbench.experiments.throughput import device_peak_memory
    from privbench.memory import reset_peak_rss
    from privbench.system import available_cores

    def progress(message: str) -> None:
        print(f"[client {partition}, round {server_round}] {message}", file=sys.stderr, flush=True)

    import psutil

    cfg = spec["config"]
    process_age_s = time.time() - psutil.Process().create_time()
    # the clients share the machine: each gets its share of the cores
    torch.set_num_threads(spec["limits"]["threads"] or max(1, available_cores() // parts))
    reset_peak_rss()
    measured: dict = {"partition": partition, "round": server_round, "threads": torch.get_num_threads(),
                      "process_age_s": process_age_s}
    t0 = time.perf_counter()
    trainer = _trainer(spec, partition, parts, measured)
    trainer.model.load_state_dict(state)
    measured["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a full-epoch round is exactly one local epoch; an estimating round warms up first
    _train(trainer, cfg, 0 if cfg["full_epoch"] else cfg["warmup_steps"], measured, progress)
    measured["train_s"] = time.perf_counter() - t0
    measured.update(device_peak_memory("torch", _device(spec)))
    progress(f"done: {measured['train_s']:.1f} s of training")
    return trainer.model.state_dict(), measured


def _measure_federated(spec: dict, metrics: dict, phases: dict, progress) -> None:
    from privbench.federated import deployment

    cfg = spec["config"]
    work = Path(tempfile.mkdtemp(prefix=f"privbench-{spec['run_id']}-"))
    try:
        # The Flower processes run in their own working folders: give them the data folder
        # as an absolute path (the run spec, and so its hash, keeps the configured one).
        app_spec = {**spec, "config": {**cfg, "data_dir": str(Path(cfg["data_dir"]).resolve())}}
        (work / "spec.json").write_text(json.dumps(app_spec))
        results = work / "results"
        results.mkdir()
        t0 = time.perf_counter()
        with deployment.Federation(work, cfg["num_clients"], progress) as federation:
            phases["federation_start_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                federation.run_app({"spec-path": work / "spec.json", "result-dir": results},
                                   spec["limits"]["timeout_s"])
            finally:  # the rounds done before a failure are recorded too
                phases["rounds_s"] = time.perf_counter() - t0
                server = _read_json(results / "server.json")
                metrics["round_times_s"] = server.get("round_times_s", [])
        _collect_federated(cfg, server, results, metrics)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"{cfg['rounds']} round(s): " + ", ".join(f"{t:.1f} s" for t in metrics["round_times_s"]))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _collect_federated(cfg: dict, server: dict, results: Path, metrics: dict) -> None:
    """Server and client measurements -> the run's metrics; raises if the run did not complete."""
    if not server:
        raise RuntimeError("the ServerApp wrote no result: the federated run did not complete")
    if server["status"] != "ok":
        raise RuntimeError(f"the ServerApp failed: {server['message']}")
    clients = [json.loads((results / f"client-{i}-round-{cfg['rounds']}.json").read_text())
               for i in range(cfg["num_clients"])]
    metrics["clients"] = [{key: c.get(key) for key in (
        "partition", "train_examples", "steps_per_epoch", "setup_s", "train_s", "epsilon", "peak_memory_mb",
        "threads", "process_age_s", "step_times_s")} for c in clients]
    metrics["train_examples"] = sum(c["train_examples"] for c in clients)
    metrics["steps_per_epoch"] = max(c["steps_per_epoch"] for c in clients)  # the slowest client sets the pace
    metrics["peak_memory_mb"] = max(c["peak_memory_mb"] for c in clients)
    metrics["memory_source"] = f"largest client: {clients[0]['memory_source']}"
    if "epsilon" in clients[0]:
        metrics.update({key: clients[0][key] for key in ("delta", "accountant")},
                       epsilon=max(c["epsilon"] for c in clients))
    last_round = metrics["round_times_s"][-1]
    if cfg["full_epoch"]:
        metrics["seconds_per_epoch"] = last_round  # each round is one local epoch on every client
    else:
        # the round's own cost (start-up, transfers, aggregation) as measured, the clients' training extrapolated
        overhead = last_round - max(c["train_s"] for c in clients)
        metrics["seconds_per_epoch"] = overhead + max(
            statistics.fmean(c["step_times_s"]) * c["steps_per_epoch"] for c in clients)
        metrics["estimated"] = True


def config_problems(section: dict) -> list[str]:
    return [f"'{NAME}.configurations.{name}.batch_cap' ({b['batch_cap']}) is smaller than its "
            f"batch_start ({b['batch_start']})"
            for name, b in section["configurations"].items() if b["batch_cap"] < b["batch_start"]]


# --------------------------------------------------------------------------- report

PUBLISHED_DEVICES = ("cpu", "sev", "v100", "a100")
PUBLISHED_CHART_DEVICES = ("cpu", "v100", "a100")
NOT_REPRODUCIBLE = "not reproducible: the project is discontinued"


def chart_name(platform: str) -> str:
    return f"torch_cifar_{platform}.png"


def published_chart_name(device: str) -> str:
    return f"torch_cifar_published_{device}.png"


def page_outputs(config: dict) -> list[str]:
    assets = Path(config["assets_dir"])
    return [str(Path(config["docs_dir"]) / PAGE), str(assets / chart_name(config["platform"])),
            *(str(assets / published_chart_name(d)) for d in PUBLISHED_CHART_DEVICES)]


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


def _charts(frame, config: dict, published: dict, outcomes: dict[str, Outcome], assets: Path) -> str:
    from privbench.report import charts  # matplotlib: not for the worker and client processes

    estimated = False
    bars = []
    for name, outcome in outcomes.items():
        short = CONFIGURATIONS[name].short
        if outcome.row is None:
            bars.append((f"{short}\n(no batch fitted)", None, outcome.end))
        else:
            estimated |= bool(outcome.row.estimated)
            bars.append((f"{short}\n(batch_size={int(outcome.row.batch_size)})", outcome.row.seconds_per_epoch, ""))
    device = _device_label(frame, config)
    title = f"Wall clock time of each configuration on {device} (s/epoch)"
    charts.bar_chart(bars, title + (", estimated from timed steps" if estimated else ""),
                     assets / chart_name(config["platform"]))
    for device_key in PUBLISHED_CHART_DEVICES:
        refs = [(CONFIGURATIONS[r["configuration"]].short, r["figures"]) for r in published["rows"]]
        refs += [(r["chart_label"], r["figures"]) for r in published["bastionlab"]]
        bars = [(f"{label}\n(batch_size={fig[device_key][1]})", fig[device_key][0], "")
                for label, fig in refs if isinstance(fig.get(device_key, [None])[0], (int, float))]
        chart_device = published["devices"][device_key]["chart_device"]
        charts.bar_chart(bars, f"Wall clock time of each configuration on {chart_device} (s/epoch), as published",
                         assets / published_chart_name(device_key))
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
        rows.append([CONFIGURATIONS[r.configuration].label, str(int(r.batch_size)), seconds,
                     tables.fmt(getattr(r, "steps_per_epoch", None), 0),
                     tables.fmt(getattr(r, "peak_memory_mb", None), 0),
                     ", ".join(f"{t:.1f}" for t in rounds) if rounds else "-"])
    return rows


def report(config: dict, table_path: str | Path) -> None:
    import pandas as pd

    from privbench.report import pages

    section = config[NAME]
    frame = pd.read_csv(table_path)
    published = pages.published(PUBLISHED)
    assets, docs = Path(config["assets_dir"]), Path(config["docs_dir"])
    outcomes = _outcomes(frame)
    device = _charts(frame, config, published, outcomes, assets)
    headers = ["Configuration", "Privacy",
               *(f"Published {published['devices'][d]['name']}, {published['devices'][d]['budget']}"
                 for d in PUBLISHED_DEVICES),
               f"Reproduced: {device}", "ε after one epoch", "Status"]
    any_estimated = bool(frame[frame.status == "ok"].estimated.any())
    context = {
        "title": TITLE, "preset": config["preset"], "published": published, "runs": len(frame),
        "status_summary": ", ".join(f"{n} {status}" for status, n in frame.status.value_counts().items()),
        "system": pages.system_rows(frame), "device": device, "platform": config["platform"],
        "section": section, "data": config["data"]["cifar100"], "any_estimated": any_estimated,
        "official_data": config["data"]["cifar100"]["md5"] == OFFICIAL_MD5,
        "train_examples": int(frame.train_examples.max()) if "train_examples" in frame else None,
        "table": tables.markdown_table(headers, _table_rows(published, outcomes, set(section["configurations"])),
                                       ["l", "c", *"rrrrrr", "l"]),
        "ratio_lines": _ratio_lines(published, outcomes), "batch_lines": _batch_lines(outcomes),
        "chart": chart_name(config["platform"]),
        "published_charts": [(published["devices"][d]["chart_device"], published_chart_name(d))
                             for d in PUBLISHED_CHART_DEVICES],
        "run_table": tables.markdown_table(
            ["Configuration", "Batch", "s/epoch or outcome", "Steps per epoch", "Peak memory (MB)",
             "Flower round times (s)"], _run_rows(frame)),
    }
    pages.render("torch_benchmarks.md.j2", context, docs / PAGE)
