# Helpers shared by the rule files: each asks the study (privbench.studies) for its
# curves, outputs and resources.

import os

from privbench import studies as privbench_studies
from privbench.report import scorecard as privbench_scorecard
from privbench.studies import curves as privbench_curves

localrules: all


def curves_of(study):
    """Curve id -> curve description, for one study of this preset."""
    return privbench_studies.plan(study).curves(config)


def page_outputs(study):
    # the study's outputs, and the chart of its page's reproduction scorecard
    return [*privbench_studies.plan(study).page_outputs(config),
            f"{ASSETS}/{privbench_scorecard.chart_name(study)}"]


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


def slurm_site_resources():
    """The site's SLURM partition and account, from PRIVBENCH_SLURM_PARTITION and
    PRIVBENCH_SLURM_ACCOUNT: only those set and non-empty, so that an unset one
    leaves the cluster's default instead of reaching sbatch as a literal "$NAME"
    (a profile's default-resources would pass it on as written)."""
    variables = {"slurm_partition": "PRIVBENCH_SLURM_PARTITION", "slurm_account": "PRIVBENCH_SLURM_ACCOUNT"}
    return {resource: value for resource, name in variables.items() if (value := os.environ.get(name, "").strip())}
