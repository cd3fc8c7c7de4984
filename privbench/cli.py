"""Command line used by the Snakemake rules (``python -m privbench ...``).

Every subcommand is one stage of the data flow; the rules stay thin.
Errors a user can fix are printed as one message with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from privbench import aggregate, config as config_mod, harness, records, runners, studies
from privbench.errors import MissingDependencyError
from privbench.studies.curves import make_run_spec


def _cmd_validate(args) -> None:
    cfg = studies.load(args.config)
    problems = runners.platform_problems(cfg)
    if problems:
        raise MissingDependencyError(f"{args.config} is valid, but cannot run here: " + "; ".join(problems))
    print(f"{args.config}: valid (preset {cfg['preset']!r})")


def _cmd_plan(args) -> None:
    cfg = studies.load(args.config)
    if args.estimate:
        from privbench import sizing

        print(sizing.format_estimate(sizing.estimate(cfg, args.cores, args.jobs)))
        return
    for name in cfg["experiments"]:
        for curve_id in studies.plan(name).curves(cfg):
            print(f"{name}\t{curve_id}")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(
            f"results folder {folder} is not writable ({exc.strerror}); "
            "fix its permissions or set results_dir in the config to a writable folder"
        ) from None


def _cmd_sweep(args) -> None:
    curve = json.loads(args.curve_json)
    records_dir = Path(args.records_dir)
    _check_writable(records_dir)
    summary = harness.run_sweep(curve, records_dir, make_run_spec, curve.get("runner"))
    records.write_json_atomic(args.output, summary)


def _cmd_aggregate(args) -> None:
    paths = aggregate.record_paths_from_summaries(args.summaries)
    frame = aggregate.build_table(paths)
    aggregate.write_table(frame, args.output)
    print(f"{args.output}: {len(frame)} run(s)")


def _cmd_report(args) -> None:
    cfg = json.loads(args.config_json)
    studies.report(args.experiment).report(cfg, args.table)


def _cmd_fetch(args) -> None:
    from privbench.data import cifar100

    cifar100.fetch(args.url, args.md5, args.data_dir)


def _cmd_index(args) -> None:
    from privbench.report import index

    index.write_index(json.loads(args.config_json))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a preset against the schema")
    p.add_argument("config")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="list the curves a preset will run")
    p.add_argument("config")
    p.add_argument("--estimate", action="store_true",
                   help="instead, size the allocation: jobs, runs, worst-case wall time, core and GPU hours")
    p.add_argument("--cores", type=int, default=8, help="cores per job for --estimate (profiles/slurm: cores)")
    p.add_argument("--jobs", type=int, default=50, help="jobs at once for --estimate (profiles/slurm: jobs)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("sweep", help="run one batch-size curve, one process per run")
    p.add_argument("--curve-json", required=True)
    p.add_argument("--records-dir", required=True)
    p.add_argument("--output", required=True, help="curve summary (JSON)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("aggregate", help="records listed by curve summaries -> tidy CSV table")
    p.add_argument("--output", required=True)
    p.add_argument("summaries", nargs="+")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser("report", help="charts and page of one experiment from its table")
    p.add_argument("experiment")
    p.add_argument("--config-json", required=True)
    p.add_argument("--table", required=True)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("fetch-cifar100", help="download, verify and extract CIFAR-100 into the data cache")
    p.add_argument("--url", required=True)
    p.add_argument("--md5", required=True)
    p.add_argument("--data-dir", required=True)
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("index", help="the docs index page")
    p.add_argument("--config-json", required=True)
    p.set_defaults(func=_cmd_index)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (config_mod.ConfigError, records.MalformedRecordError, MissingDependencyError,
            PermissionError, ValueError) as exc:
        print(f"privbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
