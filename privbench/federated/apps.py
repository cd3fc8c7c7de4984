"""The Flower app of the "Torch benchmarks" page: FedAvg over the clients.

Both sides read the run's spec (a JSON file named in the run config) and the
measurement code of ``privbench.experiments.torch_cifar``; each writes what it
measured as JSON into the run's result folder, from which the orchestrating
worker builds the run's record.
"""

from __future__ import annotations

import json
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
    from privbench.experiments import torch_cifar

    spec = _spec(context)
    cfg = spec["config"]
    strategy = StrictFedAvg(cfg["num_clients"])
    outcome = {"status": "error", "message": None}
    try:
        model = torch_cifar.initial_model(spec)
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
    from privbench.experiments import torch_cifar

    spec = _spec(context)
    partition = int(context.node_config["partition-id"])
    server_round = int(message.content["config"]["server-round"])
    state, measured = torch_cifar.client_round(spec, partition, int(context.node_config["num-partitions"]),
                                               message.content["arrays"].to_torch_state_dict(), server_round)
    write_json_atomic(_result_dir(context) / f"client-{partition}-round-{server_round}.json", measured)
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": measured["train_examples"]})})
    return Message(content=content, reply_to=message)
