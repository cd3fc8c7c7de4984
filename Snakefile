# privbench workflow: rebuild published private-training benchmarks.
#
#   snakemake --cores all                              default preset (laptop, < 1 h)
#   snakemake --cores all --configfile config/tiny.yaml  minutes, for tests and CI
#   snakemake --cores all --configfile config/full.yaml  published settings (GPU cluster)
#
# The rules are thin: each calls one stage of the privbench package.

import json
import sys

from privbench import config as privbench_config

if not workflow.overwrite_configfiles:  # a --configfile replaces the default preset whole
    configfile: "config/config.yaml"

# One validator for the workflow and the package: bad keys are named before any job runs.
try:
    privbench_config.validate(config, source="the workflow configuration")
except privbench_config.ConfigError as exc:
    raise WorkflowError(str(exc))

PY = sys.executable  # the interpreter running Snakemake, i.e. the kit's environment
RESULTS = config["results_dir"]
ASSETS = config["assets_dir"]
DOCS = config["docs_dir"]
CONFIG_JSON = json.dumps(config, sort_keys=True)

include: "workflow/rules/common.smk"
include: "workflow/rules/throughput.smk"
include: "workflow/rules/cnn_microbatch.smk"
include: "workflow/rules/memory_profile.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/torch_cifar.smk"
include: "workflow/rules/docs.smk"


rule all:
    input:
        f"{DOCS}/index.md",
        [page_outputs(name) for name in config["experiments"]],
        # The tables too: in a fresh clone the committed pages of the reference run
        # exist while this checkout has no results, and Snakemake does not rebuild
        # a missing input of an existing output. As targets, the tables (and the
        # runs behind them) are made, and the pages, now older, follow.
        [f"{RESULTS}/tables/{name}.csv" for name in config["experiments"]],
