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

from dataclasses import dataclass
from pathlib import Path

from privbench.studies import curves as curves_mod

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
PUBLISHED_CHART_DEVICES = ("cpu", "v100", "a100")


def curves(config: dict) -> dict[str, dict]:
    section, data = config[NAME], config["data"]
    out = {}
    for name, batches in section["configurations"].items():
        conf = CONFIGURATIONS[name]
        run = {"configuration": name, "method": conf.method, "federated": conf.federated,
               "num_clients": NUM_CLIENTS if conf.federated else 1, "rounds": section["flower_rounds"],
               "warmup_steps": section["warmup_steps"], "timed_steps": section["timed_steps"],
               "full_epoch": section["full_epoch"], "train_subset": section["train_subset"],
               "gpu_memory_limit_mb": section["gpu_memory_limit_mb"],
               "data_dir": data["dir"], "data_md5": data["cifar100"]["md5"],
               "settings": {"learning_rate": section["learning_rate"], **section["dp"]}}
        limits = {**config["run"], "memory_budget_mb": section["memory_budget_mb"],
                  "timeout_s": section["timeout_s"] or config["run"]["timeout_s"]}
        out[name] = curves_mod.curve(config, NAME, name, run, batches["batch_start"], batches["batch_cap"], limits)
    return {**out, **curves_mod.repeat_rounds(config, NAME, claim_points(section, out))}


# The configurations of the scorecard's claims (time per epoch against the baseline): those with
# published CPU figures (expanded_weights: BastionLab's DP, through its stand-in), not the kit's own.
CLAIM_CONFIGURATIONS = ("baseline", "opacus", "flower", "flower_opacus", "expanded_weights")


def claim_points(section: dict, runs: dict[str, dict]) -> list[tuple[dict, int]]:
    """The runs the scorecard judges, repeated in new processes: the baseline and each configured
    one of CLAIM_CONFIGURATIONS at its batch cap (the largest batch its curve may reach)."""
    chosen = [name for name in CLAIM_CONFIGURATIONS if name in section["configurations"]]
    if "baseline" not in chosen or len(chosen) < 2:
        return []
    return [(runs[name], section["configurations"][name]["batch_cap"]) for name in chosen]


def data_files(config: dict) -> list[str]:
    from privbench.data import cifar100

    return [str(cifar100.verified_marker(config["data"]["dir"], config["data"]["cifar100"]["md5"]))]


def config_problems(section: dict) -> list[str]:
    return [f"'{NAME}.configurations.{name}.batch_cap' ({b['batch_cap']}) is smaller than its "
            f"batch_start ({b['batch_start']})"
            for name, b in section["configurations"].items() if b["batch_cap"] < b["batch_start"]]


def chart_name(platform: str) -> str:
    return f"torch_cifar_{platform}.png"


def page_outputs(config: dict) -> list[str]:
    assets = Path(config["assets_dir"])
    return [str(Path(config["docs_dir"]) / PAGE), str(assets / chart_name(config["platform"]))]
