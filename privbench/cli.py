"""Command line used by the Snakemake rules (``python -m privbench ...``).

Every subcommand is one stage of the data flow; the rules stay thin.
Errors a user can fix are printed as one message with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from privbench import __version__, aggregate, config as config_mod, harness, progress, records, runners, studies
from privbench.errors import MissingDependencyError
from privbench.studies.curves import make_run_spec
from privbench.wording import plural


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
    print(f"{args.output}: {plural(len(frame), 'run')}")


def _cmd_report(args) -> None:
    cfg = json.loads(args.config_json)
    studies.report(args.experiment).report(cfg, args.table)


def _cmd_fetch(args) -> None:
    from privbench.data import cifar100

    cifar100.fetch(args.url, args.md5, args.data_dir, progress=progress.emit)


def _cmd_index(args) -> None:
    from privbench.report import index

    index.write_index(json.loads(args.config_json))


def _add_progress_fd(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress-fd", type=int, metavar="FD",
                        help="also write progress lines (privbench: ...) to this open file descriptor; "
                             "the rules pass Snakemake's stderr as 3, so they reach its terminal")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per stage, every option with its help."""
    parser = argparse.ArgumentParser(prog="privbench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the kit's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a preset against the schema")
    p.add_argument("config", help="preset file (YAML), e.g. config/config.yaml")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="list the curves a preset will run")
    p.add_argument("config", help="preset file (YAML), e.g. config/config.yaml")
    p.add_argument("--estimate", action="store_true",
                   help="instead, size the allocation: jobs, runs, worst-case wall time, core and GPU hours")
    p.add_argument("--cores", type=int, default=8, help="cores per job for --estimate (profiles/slurm: cores)")
    p.add_argument("--jobs", type=int, default=50, help="jobs at once for --estimate (profiles/slurm: jobs)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("sweep", help="run one batch-size curve, one process per run")
    p.add_argument("--curve-json", required=True, help="the curve (JSON), as the study's plan describes it")
    p.add_argument("--records-dir", required=True, help="folder of the run records (one JSON file per run)")
    p.add_argument("--output", required=True, help="curve summary (JSON)")
    _add_progress_fd(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("aggregate", help="records listed by curve summaries -> tidy CSV table")
    p.add_argument("--output", required=True, help="the tidy table (CSV)")
    p.add_argument("summaries", nargs="+", help="curve summaries (JSON) listing the records to read")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser("report", help="charts and page of one experiment from its table")
    p.add_argument("experiment", help="the study, e.g. throughput")
    p.add_argument("--config-json", required=True, help="the validated workflow configuration (JSON)")
    p.add_argument("--table", required=True, help="the study's tidy table (CSV)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("fetch-cifar100", help="download, verify and extract CIFAR-100 into the data cache")
    p.add_argument("--url", required=True, help="where to download the archive from (data.cifar100.url)")
    p.add_argument("--md5", required=True, help="the archive's MD5 (data.cifar100.md5); data verified "
                   "against it already is kept without downloading")
    p.add_argument("--data-dir", required=True, help="the data cache folder (data.dir)")
    _add_progress_fd(p)
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("index", help="the docs index page")
    p.add_argument("--config-json", required=True, help="the validated workflow configuration (JSON)")
    p.set_defaults(func=_cmd_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; return its exit code (2: an error the user can fix, printed as one line)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "progress_fd", None) is not None:
        progress.open_terminal(args.progress_fd)
    try:
        args.func(args)
    except (config_mod.ConfigError, records.MalformedRecordError, MissingDependencyError,
            PermissionError, ValueError) as exc:
        print(f"privbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
