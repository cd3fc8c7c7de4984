# privbench workflow: rebuild published private-training benchmarks.
#
#   snakemake                                  default preset (laptop, about 30 min)
#   snakemake --configfile config/tiny.yaml    minutes, for tests and CI
#   snakemake --configfile config/full.yaml    published settings (GPU cluster)
#
# profiles/default/ (read by Snakemake itself) gives every core and shows a failed
# job's log on the terminal; config/local.yaml, if present, this machine's settings.
#
# The rules are thin: each calls one stage of the privbench package.

import json
import os
import sys

from snakemake.utils import min_version

from privbench import config as privbench_config, runners as privbench_runners, studies as privbench_studies

min_version("9.0")  # rule `name:` and `localrule:` directives (workflow/rules/studies.smk)

if not workflow.overwrite_configfiles:  # a --configfile replaces the default preset whole
    configfile: "config/config.yaml"

# This machine's own settings, kept across invocations and presets and never committed
# (.gitignore): a data mirror, say (README: "Data: CIFAR-100"). Read after the preset;
# --config items still win. PRIVBENCH_LOCAL_CONFIG names another file.
LOCAL_CONFIG = os.environ.get("PRIVBENCH_LOCAL_CONFIG") or "config/local.yaml"
if os.path.exists(LOCAL_CONFIG):
    configfile: LOCAL_CONFIG

# One validator for the workflow and the package: bad keys are named before any job runs.
try:
    privbench_studies.validate(config, source="the workflow configuration")
except privbench_config.ConfigError as exc:
    raise WorkflowError(str(exc))

# The rules declare no container or conda environment: each run is started in its image
# by the kit's own runner (runner.kind), which records the image and its digest. A
# --software-deployment-method would change nothing, so say so instead of ignoring it.
if workflow.deployment_settings.deployment_method:
    methods = ", ".join(sorted(m.name.lower() for m in workflow.deployment_settings.deployment_method))
    raise WorkflowError(
        f"--software-deployment-method/--sdm {methods} is not used by this workflow: its rules run "
        "no job in a container or conda environment. To run the benchmarks in the kit's image, set "
        "runner.kind (apptainer, docker or podman) and runner.images in the preset, e.g. "
        "--config \"runner={'kind': 'apptainer', 'images': {'cpu': '/path/privbench-cpu.sif'}}\" "
        "(README: 'Where runs execute: containers').")

# An environment that cannot serve the platform (say JAX without its CUDA plugin) is named
# now, before any job runs, not by every run failing.
platform_problems = privbench_runners.platform_problems(config)
if platform_problems:
    raise WorkflowError("this environment cannot run the preset:\n"
                        + "\n".join(f"  - {problem}" for problem in platform_problems))

PY = sys.executable  # the interpreter running Snakemake, i.e. the kit's environment
RESULTS = config["results_dir"]
ASSETS = config["assets_dir"]
DOCS = config["docs_dir"]
CONFIG_JSON = json.dumps(config, sort_keys=True)

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/studies.smk"
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
