"""Page "Memory Profiling Analysis": where DP-SGD's memory goes, step by step.

One training step of the kit's Transformer under each method, every method a
run of its own (one process, one record):

    vanilla         no DP: mean loss, backward, AdamW
    hooks           Opacus make_private, grad_sample_mode="hooks" (per-example gradients)
    ghost           Opacus make_private, grad_sample_mode="ghost" (ghost norms, two backward passes)
    flash_two_pass  the kit engine's norms as Opacus norm samplers (privbench.dp.opacus_norms),
                    inside Opacus' unchanged ghost path
    fast_dp         the kit's DP-SGD engine (privbench.dp.torch_engine): one backward pass, per
                    layer the cheapest exact route for its norms, clipped sums by book-keeping
                    (it supersedes the kit's former one-pass Flash Clipping)

Each run times its steps, then profiles one more step: the memory held at
the start and after each phase (forward, backward, optimiser step), the peak
inside each phase, what the held memory consists of at each of those points,
and the memory around every per-layer norm computation (the kit engine's
through its public phase observer, Opacus' by wrapping its norm-sampler registry).
"""

from __future__ import annotations

from pathlib import Path

from privbench.studies import curves as curves_mod

NAME = "memory_profile"
TITLE = "Memory Profiling Analysis"
PAGE = "memory_profiling_analysis.md"
PUBLISHED = "memory_profiling_analysis"

MODEL = "transformer"
METHODS = ("vanilla", "hooks", "ghost", "flash_two_pass", "fast_dp")
NO_OPACUS = ("vanilla", "fast_dp")  # methods whose runs do not use Opacus
METHOD_LABELS = {
    "vanilla": "Vanilla (no DP)",
    "hooks": "Opacus hooks (per-example gradients)",
    "ghost": "Ghost Clipping (Opacus)",
    "flash_two_pass": "Kit norms in Opacus' ghost path (two backward passes)",
    "fast_dp": "Fast DP-SGD (kit engine)",
}
# Methods of the published page that the kit does not run: their published row is shown with this label.
PUBLISHED_ONLY_LABELS = {"flash": "Flash Clipping (published only; the kit engine is the kit's one-pass method)"}
SHORT_LABELS = {"vanilla": "vanilla", "hooks": "hooks", "ghost": "ghost",
                "flash_two_pass": "kit norms\n(two passes)", "fast_dp": "fast DP-SGD\n(kit engine)"}  # chart ticks
PHASES = ("forward", "backward", "step")
POINTS = ("start", "after_forward", "after_backward", "after_step")
POINT_LABELS = {"start": "start", "after_forward": "after forward", "after_backward": "after backward",
                "after_step": "after optimiser step"}
# What the held memory consists of, in the order a shared storage is attributed.
COMPONENTS = {
    "parameters": "parameters",
    "optimiser_state": "optimiser state",
    "gradients": "gradients",
    "per_example": "per-example norms or gradients",
    "inputs": "input batch",
    "saved_activations": "activations saved by autograd",
    "hook_inputs": "layer inputs (kit engine: and output gradients) kept only by the DP hooks",
    "other": "other (outputs, loss, temporaries)",
}
MB = 2**20


def curves(config: dict) -> dict[str, dict]:
    section = config[NAME]
    out = {}
    for method in section["methods"]:
        curve_id = f"{method}-{section['size']}"
        run = {"method": method, "size": section["size"], "model": MODEL, "framework": "torch",
               "warmup_steps": section["warmup_steps"], "timed_steps": section["timed_steps"]}
        out[curve_id] = curves_mod.curve(config, NAME, curve_id, run,
                                         section["batch_size"], section["batch_size"])  # a single run
    return {**out, **curves_mod.repeat_rounds(config, NAME, claim_points(section, out))}


# The methods of the scorecard's claims (time and peak memory against vanilla, as published):
# Opacus' ghost clipping and the kit's engine (in place of the published Flash Clipping).
CLAIM_METHODS = ("vanilla", "ghost", "fast_dp")


def claim_points(section: dict, runs: dict[str, dict]) -> list[tuple[dict, int]]:
    """The runs the scorecard judges, repeated in new processes: vanilla and each configured
    DP method of CLAIM_METHODS (none without vanilla, the claims' denominator)."""
    chosen = [m for m in CLAIM_METHODS if m in section["methods"]]
    if "vanilla" not in chosen or len(chosen) < 2:
        return []
    return [(runs[f"{m}-{section['size']}"], section["batch_size"]) for m in chosen]


def breakdown_chart_name(size: str) -> str:
    return f"memory_breakdown_{size}.png"


def timeline_chart_name(size: str) -> str:
    return f"memory_timeline_{size}.png"


def page_outputs(config: dict) -> list[str]:
    size, assets = config[NAME]["size"], Path(config["assets_dir"])
    return [str(Path(config["docs_dir"]) / PAGE), str(assets / breakdown_chart_name(size)),
            str(assets / timeline_chart_name(size))]
