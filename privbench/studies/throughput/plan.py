"""Page "Benchmark Results", plan: one curve per (framework, model, size, mode);
along a curve the batch size doubles until a run fails (out of memory, time
limit, crash) or reaches the cap. Every run is a separate process with its own
record.
"""

from __future__ import annotations

from pathlib import Path

from privbench import harness, training
from privbench.studies import curves as curves_mod
from privbench.studies import measuring

NAME = "throughput"
TITLE = "Benchmark Results"
PAGE = "benchmark_results.md"
PUBLISHED = "benchmark_results"


def curves(config: dict) -> dict[str, dict]:
    section = config[NAME]
    out = {}
    for framework in section["frameworks"]:
        for model in section["models"]:
            for size in section["sizes"]:
                for mode in section["modes"]:
                    microbatch = section["microbatch_size"] if (framework, mode) == ("jax", "clipped") else None
                    curve_id = f"{framework}-{model}-{size}-{mode}" + (f"-mb{microbatch}" if microbatch else "")
                    run = {"framework": framework, "model": model, "size": size, "mode": mode,
                           "microbatch_size": microbatch, "settings": section["settings"], **measuring.trainer_run_keys(section)}
                    out[curve_id] = curves_mod.curve(config, NAME, curve_id, run,
                                                     section["batch_start"], section["batch_cap"])
    return {**out, **curves_mod.repeat_rounds(config, NAME, claim_points(section, out))}


# The published claims this page tests (its "Opacus, small models" table): PyTorch's clipped
# (Opacus) against its standard throughput, per model.
CLAIM_FRAMEWORK = "torch"
CLAIM_MODELS = ("cnn", "transformer", "state_space")
CLAIM_MODES = ("standard", "clipped")


def claim_points(section: dict, sweeps: dict[str, dict]) -> list[tuple[dict, int]]:
    """The runs the scorecard judges, repeated in new processes: the standard and clipped curves
    of CLAIM_FRAMEWORK and CLAIM_MODELS at the published table's batch (``opacus_table_batch``),
    where the sweep reaches it and both modes are configured (the claim is their ratio)."""
    batch = section["opacus_table_batch"]
    if not set(CLAIM_MODES) <= set(section["modes"]) or \
            batch not in harness.batch_sizes(section["batch_start"], section["batch_cap"]):
        return []
    return [(c, batch) for c in sweeps.values() if c["run"]["framework"] == CLAIM_FRAMEWORK
            and c["run"]["model"] in CLAIM_MODELS and c["run"]["mode"] in CLAIM_MODES]


def config_problems(section: dict) -> list[str]:
    """The modes a trainer exists for (the DP methods' registry is the vocabulary)."""
    return [f"'{NAME}.modes' has unknown mode {mode!r}: choose from {', '.join(training.MODES)}"
            for mode in section.get("modes", []) if mode not in training.MODES]


def chart_name(model: str, size: str) -> str:
    return f"throughput_{model}_{size}.png"


def page_outputs(config: dict) -> list[str]:
    section = config[NAME]
    charts_ = [str(Path(config["assets_dir"]) / chart_name(m, s)) for m in section["models"] for s in section["sizes"]]
    return [str(Path(config["docs_dir"]) / PAGE), *charts_]
