"""Page "Torch benchmarks", worker side: one party's training (privbench.training.cifar),
centralised in the worker or federated over a real Flower deployment."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from privbench.memory import device_peak_memory

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


def _measure_centralised(spec: dict, metrics: dict, phases: dict, progress) -> None:
    from privbench.training import cifar

    cfg = spec["config"]
    t0 = time.perf_counter()
    trainer = cifar.party_trainer(spec["config"], _device(spec), 0, 1, metrics)
    phases["setup_s"] = time.perf_counter() - t0
    progress(f"{cfg['method']} trainer built in {phases['setup_s']:.1f} s: {metrics['train_examples']} examples, "
             f"{trainer.steps_per_epoch} steps per epoch at batch {cfg['batch_size']}")
    t0 = time.perf_counter()
    cifar.train_party(trainer, cfg, cfg["warmup_steps"], metrics, progress)
    phases["train_s"] = time.perf_counter() - t0
    metrics.update(device_peak_memory("torch", _device(spec)))


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
