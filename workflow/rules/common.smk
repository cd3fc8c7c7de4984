# Helpers shared by the rule files: each asks the study (privbench.studies) for its
# curves, outputs and resources.

from privbench import studies as privbench_studies
from privbench.studies import curves as privbench_curves

localrules: all


def curves_of(study):
    """Curve id -> curve description, for one study of this preset."""
    return privbench_studies.plan(study).curves(config)


def page_outputs(study):
    return privbench_studies.plan(study).page_outputs(config)


def curve_summaries(study):
    return [f"{RESULTS}/curves/{study}/{curve}.json" for curve in curves_of(study)]


def data_files(study):
    """Data the study's runs read (its plan's ``data_files``), made by the data rules."""
    files = getattr(privbench_studies.plan(study), "data_files", None)
    return files(config) if files else []


def run_threads():
    # Benchmark jobs take every core they are given, so that locally two
    # timed runs never share the machine and disturb each other's timings.
    # On a cluster, --cores (profiles/slurm: cores) is what one job asks for.
    return max(1, workflow.cores)


def run_gpus():
    # A benchmark job on platform cuda asks the scheduler for one GPU
    # (SLURM: --gpus=1); the container runners add their GPU flags.
    return 1 if config["platform"] == "cuda" else 0
