# Helpers shared by the rule files.

from privbench import experiments as privbench_experiments

localrules: all


def curves_of(experiment):
    """Curve id -> curve description, for one experiment of this preset."""
    return privbench_experiments.get(experiment).curves(config)


def page_outputs(experiment):
    return privbench_experiments.get(experiment).page_outputs(config)


def curve_summaries(experiment):
    return [f"{RESULTS}/curves/{experiment}/{curve}.json" for curve in curves_of(experiment)]


def run_threads():
    # Benchmark jobs take every core they are given, so that locally two
    # timed runs never share the machine and disturb each other's timings.
    # On a cluster, --cores (profiles/slurm: cores) is what one job asks for.
    return max(1, workflow.cores)


def run_gpus():
    # A benchmark job on platform cuda asks the scheduler for one GPU
    # (SLURM: --gpus=1); the container runners add their GPU flags.
    return 1 if config["platform"] == "cuda" else 0


def curve_json(experiment):
    return lambda wildcards: json.dumps(curves_of(experiment)[wildcards.curve], sort_keys=True)
