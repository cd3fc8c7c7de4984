"""Worker-side helpers shared by the studies: starting a framework before the run's
memory budget applies, timing a trainer's steps, reading the device's peak memory."""

from __future__ import annotations

import time

from privbench.memory import device_peak_memory



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
    """Build the run's trainer (privbench.training), time its steps, read its peak memory."""
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
