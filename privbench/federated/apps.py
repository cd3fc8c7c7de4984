"""The Flower app of the "Torch benchmarks" page: FedAvg over the clients.

Both sides read the run's spec (a JSON file named in the run config) and train
with ``privbench.training.cifar``; each writes what it
measured as JSON into the run's result folder, from which the orchestrating
worker builds the run's record.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch  # noqa: F401 - flwr converts torch state dicts only once torch is loaded
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from privbench.records import write_json_atomic

serverapp = ServerApp()
clientapp = ClientApp()


def _spec(context: Context) -> dict:
    return json.loads(Path(str(context.run_config["spec-path"])).read_text())


def _result_dir(context: Context) -> Path:
    return Path(str(context.run_config["result-dir"]))


class FederationRoundError(RuntimeError):
    """A training round in which not every client returned its update."""


class StrictFedAvg(FedAvg):
    """FedAvg over all clients, every round timed. A round without every
    client's update fails the run: with a party missing, it is no longer the
    benchmarked configuration."""

    def __init__(self, num_clients: int):
        super().__init__(fraction_evaluate=0.0, min_train_nodes=num_clients, min_available_nodes=num_clients)
        self.round_times_s: list[float] = []
        self._round_start = 0.0

    def configure_train(self, server_round, arrays, config, grid):
        self._round_start = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        failed = [reply for reply in replies if reply.has_error()]
        if failed or len(replies) < self.min_train_nodes:
            reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed)
            raise FederationRoundError(
                f"round {server_round}: {len(replies) - len(failed)} of {self.min_train_nodes} clients "
                f"returned an update" + (f" ({reasons})" if reasons else ""))
        aggregated = super().aggregate_train(server_round, replies)
        self.round_times_s.append(time.perf_counter() - self._round_start)
        return aggregated


@serverapp.main()
def server_main(grid: Grid, context: Context) -> None:
    from privbench.training.cifar import build_model

    spec = _spec(context)
    cfg = spec["config"]
    strategy = StrictFedAvg(cfg["num_clients"])
    outcome = {"status": "error", "message": None}
    try:
        model = build_model(cfg["method"], cfg["seed"])  # the clients' architecture
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg["rounds"],
                       timeout=spec["limits"]["timeout_s"])
        outcome["status"] = "ok"
    except Exception as exc:
        outcome["message"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        outcome["round_times_s"] = strategy.round_times_s
        write_json_atomic(_result_dir(context) / "server.json", outcome)


@clientapp.train()
def client_train(message: Message, context: Context) -> Message:
    spec = _spec(context)
    partition = int(context.node_config["partition-id"])
    server_round = int(message.content["config"]["server-round"])
    state, measured = _client_round(spec, partition, int(context.node_config["num-partitions"]),
                                               message.content["arrays"].to_torch_state_dict(), server_round)
    write_json_atomic(_result_dir(context) / f"client-{partition}-round-{server_round}.json", measured)
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": measured["train_examples"]})})
    return Message(content=content, reply_to=message)


def _device(spec: dict) -> str:
    return "cuda" if spec["platform"] == "cuda" else "cpu"


def _client_round(spec: dict, partition: int, parts: int, state: dict, server_round: int) -> tuple[dict, dict]:
    """One client's local training in one round (runs in the ClientApp process)."""
    import psutil

    from privbench.memory import device_peak_memory, reset_peak_rss
    from privbench.system import available_cores
    from privbench.training import cifar

    def progress(message: str) -> None:
        print(f"[client {partition}, round {server_round}] {message}", file=sys.stderr, flush=True)

    cfg = spec["config"]
    process_age_s = time.time() - psutil.Process().create_time()
    # the clients share the machine: each gets its share of the cores
    torch.set_num_threads(spec["limits"]["threads"] or max(1, available_cores() // parts))
    reset_peak_rss()
    measured: dict = {"partition": partition, "round": server_round, "threads": torch.get_num_threads(),
                      "process_age_s": process_age_s}
    t0 = time.perf_counter()
    trainer = cifar.party_trainer(cfg, _device(spec), partition, parts, measured)
    trainer.model.load_state_dict(state)
    measured["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a full-epoch round is exactly one local epoch; an estimating round warms up first
    cifar.train_party(trainer, cfg, 0 if cfg["full_epoch"] else cfg["warmup_steps"], measured, progress)
    measured["train_s"] = time.perf_counter() - t0
    measured.update(device_peak_memory("torch", _device(spec)))
    progress(f"done: {measured['train_s']:.1f} s of training")
    return trainer.model.state_dict(), measured
