"""Page "CNN Benchmark Results", worker side: a trainer run, or a JAXPR capture."""

from __future__ import annotations

import time

from privbench.studies.measuring import import_framework, import_trainer_frameworks, measure_trainer


def import_frameworks(spec: dict) -> None:
    if spec["config"]["task"] == "throughput":
        import_trainer_frameworks(spec)
        return
    from privbench.errors import require

    import_framework("jax")
    require("jax_privacy")


def measure(spec: dict, metrics: dict, phases: dict, progress) -> None:
    cfg = spec["config"]
    if cfg["task"] == "throughput":
        measure_trainer(spec, metrics, phases, progress)
        return
    from privbench import jaxpr_evidence  # imports JAX: worker side only

    t0 = time.perf_counter()
    metrics["jaxpr"] = jaxpr_evidence.capture(cfg["size"], cfg["batch_size"], cfg["microbatch_size"],
                                              cfg["settings"]["l2_clip_norm"], cfg["seed"])
    phases["capture_s"] = time.perf_counter() - t0
    progress(f"traced {len(metrics['jaxpr']['programs'])} programs in {phases['capture_s']:.1f} s")


