"""Page "CNN Benchmark Results": what per-example clipping costs a CNN, what
the microbatch size changes (throughput and peak memory), and, from the
traced program, why.

Per case (CNN size, batch size) and framework: one standard run and one
clipped run per microbatch size, each a single run through the shared harness
(measured exactly as on the "Benchmark Results" page), and (section key
``fast_dp``, on by default) one run of the kit's own DP-SGD, mode ``fast_dp``,
which takes no microbatch size (one forward and one backward pass). The
microbatch size is jax-privacy's ``microbatch_size`` in JAX and the physical
batch of Opacus' BatchMemoryManager in PyTorch. The JAXPR capture is a curve of its own
(task "jaxpr"): one run per batch size, whose record holds the traced
programs and the weight-gradient convolutions found in them.
"""

from __future__ import annotations

from pathlib import Path

from privbench.studies import curves as curves_mod
from privbench.studies import measuring

NAME = "cnn_microbatch"
TITLE = "CNN Benchmark Results"
PAGE = "cnn_benchmark_results.md"
PUBLISHED = "cnn_benchmark_results"
MODEL = "cnn"
FAST_DP = "fast_dp"  # the kit's own DP-SGD: one pass, no microbatch size


def config_problems(section: dict) -> list[str]:
    """What the schema cannot check: divisibility and distinct cases."""
    problems, seen = [], set()
    for i, case in enumerate(section["cases"]):
        key = (case["size"], case["batch_size"])
        if key in seen:
            problems.append(f"'{NAME}.cases.{i}' repeats size {key[0]} at batch {key[1]}: list each case once")
        seen.add(key)
        bad = [m for m in case["microbatch_sizes"] if case["batch_size"] % m]
        if bad:
            problems.append(f"'{NAME}.cases.{i}.microbatch_sizes' {bad} do not divide batch_size "
                            f"{case['batch_size']}: choose divisors of the batch size")
    jaxpr = section["jaxpr"]
    if jaxpr["batch_cap"] < jaxpr["batch_start"]:
        problems.append(f"'{NAME}.jaxpr.batch_cap' ({jaxpr['batch_cap']}) is smaller than "
                        f"'{NAME}.jaxpr.batch_start' ({jaxpr['batch_start']})")
    microbatch = jaxpr["microbatch_size"]
    if microbatch is not None and jaxpr["batch_start"] % microbatch:
        problems.append(f"'{NAME}.jaxpr.microbatch_size' ({microbatch}) does not divide "
                        f"'{NAME}.jaxpr.batch_start' ({jaxpr['batch_start']}): choose a divisor or null")
    return problems


def fast_dp_on(section: dict) -> bool:
    """Whether the section asks for the fast_dp runs. The schema's default is true; a configuration
    serialised before the key existed (a workflow started on older code) had none, hence False."""
    return bool(section.get("fast_dp", False))


def run_curve_id(framework: str, size: str, batch: int, mode: str, microbatch: int | None) -> str:
    return f"{framework}-{MODEL}-{size}-b{batch}-{mode}" + (f"-mb{microbatch}" if microbatch else "")


def curves(config: dict) -> dict[str, dict]:
    section = config[NAME]
    out = {}
    for case in section["cases"]:
        batch = case["batch_size"]
        for framework in section["frameworks"]:
            runs = [("standard", None), *(("clipped", m) for m in case["microbatch_sizes"])]
            if fast_dp_on(section):  # after the others: their curve ids and specs are unchanged
                runs.append((FAST_DP, None))
            for mode, microbatch in runs:
                limits = dict(config["run"])
                if mode == "clipped" and "clipped_timeout_s" in case:
                    limits["timeout_s"] = case["clipped_timeout_s"]
                curve_id = run_curve_id(framework, case["size"], batch, mode, microbatch)
                run = {"task": "throughput", "framework": framework, "model": MODEL, "size": case["size"],
                       "mode": mode, "microbatch_size": microbatch, "settings": section["settings"],
                       **measuring.trainer_run_keys(section)}
                # a single run: its record is named by the curve
                out[curve_id] = curves_mod.curve(config, NAME, curve_id, run, batch, batch, limits, run_id=curve_id)
    jaxpr = section["jaxpr"]
    curve_id = f"jaxpr-{MODEL}-{jaxpr['size']}"
    run = {"task": "jaxpr", "framework": "jax", "model": MODEL, "size": jaxpr["size"],
           "microbatch_size": jaxpr["microbatch_size"], "settings": section["settings"]}
    out[curve_id] = curves_mod.curve(config, NAME, curve_id, run, jaxpr["batch_start"], jaxpr["batch_cap"])
    return {**out, **curves_mod.repeat_rounds(config, NAME, claim_points(section, out))}


PUBLISHED_FRAMEWORK = "jax"  # the published page measured jax-privacy only


def claim_points(section: dict, runs: dict[str, dict]) -> list[tuple[dict, int]]:
    """The runs the scorecard judges (the microbatch speed-up), repeated in new processes:
    in the published framework, every case with two or more microbatch sizes, its standard
    run and its clipped run at each microbatch size."""
    if PUBLISHED_FRAMEWORK not in section["frameworks"]:
        return []
    points = []
    for case in section["cases"]:
        if len(case["microbatch_sizes"]) < 2:
            continue
        batch = case["batch_size"]
        for mode, microbatch in [("standard", None), *(("clipped", m) for m in case["microbatch_sizes"])]:
            points.append((runs[run_curve_id(PUBLISHED_FRAMEWORK, case["size"], batch, mode, microbatch)], batch))
    return points


def chart_name(case: dict) -> str:
    return f"cnn_microbatch_{case['size']}_b{case['batch_size']}.png"


def page_outputs(config: dict) -> list[str]:
    cases = config[NAME]["cases"]
    return [str(Path(config["docs_dir"]) / PAGE), *(str(Path(config["assets_dir"]) / chart_name(c)) for c in cases)]
