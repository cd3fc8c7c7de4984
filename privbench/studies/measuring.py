"""Helpers shared by the studies that measure the kit's trainers: the keys of a run's
config (model variant, timing), starting a framework before the run's memory budget
applies, timing a trainer's steps as the published code did, reading the device's peak
memory, and the facts a page states about how those runs follow the published code."""

from __future__ import annotations

import time

from privbench.memory import device_peak_memory
from privbench.wording import plural


# The keys of a trainer run's config, copied from its study's section, that set its
# model variant and how it is timed (the studies' schema.yaml documents them).
TRAINER_RUN_KEYS = ("model_variant", "warmup_steps", "timed_steps", "timed_seconds_min", "timing_blocks")


def trainer_run_keys(section: dict) -> dict:
    """A study section's :data:`TRAINER_RUN_KEYS`, for the config of a run measured by
    :func:`measure_trainer` (part of the run's identity, so records never mix)."""
    return {key: section[key] for key in TRAINER_RUN_KEYS}


def published_code_facts(section: dict, runs) -> dict:
    """The facts a page of trainer runs states about how closely they follow the
    published benchmark code (template ``_published_code.md.j2``): the section's
    model variant and timing keys, Opacus' sample rate, and the DP libraries'
    versions the runs recorded (``runs``: the aggregated table, may lack them)."""

    def versions(column: str) -> str | None:
        if column not in runs:
            return None
        return ", ".join(sorted({str(v) for v in runs[column].dropna()})) or None

    return {**trainer_run_keys(section),
            "opacus_batches": section["settings"]["opacus_batches"],
            "jax_privacy": versions("sys_jax_privacy"), "opacus": versions("sys_opacus")}


def import_framework(framework: str) -> None:
    """Import a framework and start its runtime, so that cost is not timed as work."""
    from privbench.errors import require

    if framework == "jax":
        require("jax", "flax", "optax")
        import jax

        jax.devices()
    elif framework == "torch":
        require("torch")
        import torch

        torch.zeros(1)
    else:
        raise ValueError(f"unknown framework {framework!r}: choose jax or torch")


def import_trainer_frameworks(spec: dict) -> None:
    """The framework of a trainer run, and its DP library where the mode uses one."""
    cfg = spec["config"]
    import_framework(cfg["framework"])
    if cfg["mode"] != "standard":  # the DP library's import is not part of the run's memory
        from privbench.errors import require

        require("jax_privacy" if cfg["framework"] == "jax" else "opacus")


def measure_trainer(spec: dict, metrics: dict, phases: dict, progress) -> None:
    """Build the run's trainer (privbench.training) on its model variant, time its steps
    as the published code did (privbench.timing.time_blocks), read its peak memory."""
    from privbench import training
    from privbench.timing import summarise_blocks, time_blocks

    cfg = spec["config"]
    device = "cuda" if spec["platform"] == "cuda" else "cpu"
    t0 = time.perf_counter()
    trainer = training.make_trainer(cfg["framework"], cfg["model"], cfg["size"], cfg["mode"], cfg["batch_size"],
                                    microbatch_size=cfg["microbatch_size"], settings=cfg["settings"],
                                    seed=cfg["seed"], device=device, model_variant=cfg["model_variant"])
    metrics.update(trainer.description)
    phases["setup_s"] = time.perf_counter() - t0
    progress(f"model and step built in {phases['setup_s']:.1f} s; {cfg['warmup_steps']} warm-up, then at least "
             f"{cfg['timed_steps']} timed steps and {cfg['timed_seconds_min']} s in "
             f"{plural(cfg['timing_blocks'], 'block')} at batch {cfg['batch_size']}")
    time_blocks(trainer.step, trainer.sync, cfg["warmup_steps"], cfg["timed_steps"], cfg["timed_seconds_min"],
                cfg["timing_blocks"], metrics, progress)
    phases["warmup_s"] = metrics["warmup_s"]
    phases["timed_s"] = sum(metrics["block_times_s"])
    metrics.update(summarise_blocks(metrics["block_steps"], metrics["block_times_s"], cfg["batch_size"]))
    metrics.update(device_peak_memory(cfg["framework"], device))
