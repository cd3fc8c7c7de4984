"""Measure the foundation's own speed targets and print them (nothing is asserted).

    .venv/bin/python benchmarks/workflow_speed.py [--configfile config/tiny.yaml] [--out DIR]
        [--config KEY=VALUE ...] [--in-place]

--config items go to every snakemake call (e.g. the data section, to pull
CIFAR-100 from a mirror). --in-place measures the outputs of an earlier run
of the preset in the project's own results/, assets/ and docs/ (no first run:
the paths must be those that run used, or every job would rerun).

Prints, for the preset given (tiny by default):
  - a full first run of the workflow (wall time),
  - a second `snakemake --cores all` with nothing changed (target < 10 s),
  - rebuilding pages and charts from existing records (target < 30 s),
  - the harness's own time per run vs the measured work (from the tidy table),
  - two repeated runs of the same configuration and their throughput ratio (target within 10%).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def snakemake(out: Path | None, configfile: str, overrides: list[str], *extra: str) -> float:
    paths = [] if out is None else [f"results_dir={out}/results", f"assets_dir={out}/assets",
                                    f"docs_dir={out}/docs", f"site_dir={out}/site"]
    # targets and flags first: --configfile and --config take every item after them
    command = [SNAKEMAKE, "--cores", "all", *extra, "--configfile", configfile]
    if paths or overrides:
        command += ["--config", *paths, *overrides]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - started


def repeated_runs(out: Path, repeats: int = 2) -> list[float]:
    """The same configuration (JAX CNN small, standard, batch 32, 30 steps), run twice."""
    sys.path.insert(0, str(REPO))
    from privbench import harness, studies
    from privbench.studies.curves import make_run_spec
    from privbench.studies.throughput import plan as throughput

    cfg = studies.load(REPO / "config" / "config.yaml")
    curve = throughput.curves(cfg)["jax-cnn-small-standard"]
    curve["run"]["timed_steps"] = 30
    values = []
    for i in range(repeats):
        spec = make_run_spec(curve, 32)
        spec["run_id"] += f"-repeat{i}"
        record = harness.run_isolated(spec, out / "repeats" / f"{spec['run_id']}.json")
        values.append(record["metrics"]["throughput_sps"])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", default="config/tiny.yaml")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--config", nargs="*", default=[], help="snakemake --config items for every call")
    parser.add_argument("--in-place", action="store_true",
                        help="measure an earlier run's outputs in results/, assets/, docs/ (no first run)")
    args = parser.parse_args()
    if args.in_place:
        out, results = None, REPO / "results"
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="privbench-speed-"))
        results = out / "results"
        first = snakemake(out, args.configfile, args.config, "all")
        print(f"first run of {args.configfile}: {first:.1f} s")
    second = snakemake(out, args.configfile, args.config, "all")
    print(f"second run, nothing changed: {second:.1f} s (target < 10 s) ratio {second / 10:.2f} of target")
    sys.path.insert(0, str(REPO))
    from privbench import studies

    pages = [f"{name}_page" for name in studies.load(REPO / args.configfile)["experiments"]]
    rebuild = snakemake(out, args.configfile, args.config, "all", "--forcerun", *pages, "docs_index")
    print(f"rebuild pages and charts from records: {rebuild:.1f} s (target < 30 s) ratio {rebuild / 30:.2f} of target")

    table = pd.read_csv(results / "tables" / "throughput.csv")
    ok = table[table.status == "ok"]
    work = ok.phases_s_setup_s + ok.phases_s_warmup_s + ok.phases_s_timed_s
    print(f"harness overhead per run: mean {ok.harness_overhead_s.mean():.2f} s "
          f"(imports {ok.phases_s_import_s.mean():.2f} s) vs measured work {work.mean():.2f} s "
          f"over {len(ok)} runs; overhead/work ratio {ok.harness_overhead_s.sum() / work.sum():.2f}")

    a, b = repeated_runs(Path(tempfile.mkdtemp(prefix="privbench-repeats-")))
    print(f"repeatability, jax cnn small standard b32: {a:.1f} vs {b:.1f} samples/s, "
          f"ratio {max(a, b) / min(a, b):.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
