"""Pages rendered from Jinja2 templates in ``privbench/report/templates``."""

from __future__ import annotations

import statistics
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import jinja2
import pandas as pd
import yaml

from privbench import tee
from privbench.paths import PUBLISHED_DIR, TEMPLATE_DIR
from privbench.wording import plural  # also the template filter below; reports call pages.plural

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,  # a missing value is a bug, never an empty cell
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


_env.filters["plural"] = plural


def published(name: str) -> dict:
    """Reference figures of a published page, kept with their source in ``report/published``."""
    return yaml.safe_load((PUBLISHED_DIR / f"{name}.yaml").read_text())


class StudyInputs(NamedTuple):
    """What every study's report starts from."""

    section: dict  # the study's section of the preset
    frame: pd.DataFrame  # its tidy table's sweep runs (repeat 0): every figure but the claims'
    published: dict  # its published figures
    assets_dir: Path
    docs_dir: Path
    all_runs: pd.DataFrame  # every row, the claims' repeats included (column "repeat")


def study_inputs(config: dict, name: str, published_name: str, table_path: str | Path) -> StudyInputs:
    runs = pd.read_csv(table_path)
    return StudyInputs(config[name], sweep_runs(runs), published(published_name),
                       Path(config["assets_dir"]), Path(config["docs_dir"]), runs)


def repeat_index(runs: pd.DataFrame) -> pd.Series:
    """Each row's repeat index: 0 for a sweep's own run (and for records older than repeats)."""
    if "repeat" not in runs:
        return pd.Series(0, index=runs.index)
    return runs["repeat"].fillna(0).astype(int)


def sweep_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The sweeps' own runs (repeat 0). The pages' tables, charts and figures show these, so no
    run counts twice; only the scorecard's claims use the repeats (:func:`claim_values`)."""
    return runs[repeat_index(runs) == 0].reset_index(drop=True)


class Spread(NamedTuple):
    """A figure measured in ``n`` independent processes: their median and range."""

    median: float | None  # None: no process gave a value
    low: float | None  # smallest across the processes
    high: float | None  # largest
    n: int


def repeat_values(runs: pd.DataFrame, where: dict, column: str) -> dict[int, float]:
    """Repeat index -> ``column`` of the successful run matching every ``where`` item
    (e.g. ``{"framework": "jax", "mode": "clipped", "batch_size": 32}``), which must single
    out one run per repeat: two matches of one repeat raise ValueError (name the batch too)."""
    mask = runs.status == "ok"
    for key, value in where.items():
        if key not in runs:
            return {}
        mask &= runs[key].isna() if value is None else runs[key] == value
    chosen = runs[mask & runs[column].notna()] if column in runs else runs.iloc[0:0]
    repeats = repeat_index(chosen)
    if repeats.duplicated().any():
        raise ValueError(f"{where} matches {len(chosen)} runs, several of one repeat: "
                         f"{', '.join(map(str, chosen.run_id))}")
    return dict(zip(repeats, chosen[column].astype(float)))


def claim_values(runs: pd.DataFrame, numerator: dict, denominator: dict | None = None,
                 column: str = "throughput_sps") -> Spread:
    """A published claim's figure per independent process, and its spread across them.

    ``runs``: a study's tidy table with its repeats (:attr:`StudyInputs.all_runs`). The figure
    is ``column`` of the run matching ``numerator`` over that of the run matching
    ``denominator`` (see :func:`repeat_values`), paired by repeat index: repeat k of both ran in
    the same repeat round, close in time. Without a denominator, the numerator's values.
    Processes where either run failed give no value.
    """
    top = repeat_values(runs, numerator, column)
    bottom = repeat_values(runs, denominator, column) if denominator is not None else None
    values = [value / bottom[k] if bottom is not None else value for k, value in sorted(top.items())
              if bottom is None or bottom.get(k)]
    if not values:
        return Spread(None, None, None, 0)
    return Spread(statistics.median(values), min(values), max(values), len(values))


# A run counts as taken under load when the 1-minute load average at its start or its end
# exceeds the threads the run itself keeps busy (its cores, times its parties: each Flower
# client uses every core) by more than LOAD_MARGIN: then more threads wanted a core than
# the run had, so something else competed with it. The average lags by about a minute, so
# at a run's start it still shows the job's previous run, which used the same cores: hence
# a margin over the run's own threads rather than over zero. And under steal when the
# hypervisor gave more than STEAL_LIMIT_PCT of the CPU time to other guests: every step
# slows by about that share, more than the step-time spread (CV) of a quiet machine.
LOAD_MARGIN = 0.5
STEAL_LIMIT_PCT = 5.0
NOISE_MARK = "†"  # after a table cell of such a run
NOISE_COLUMNS = ("sys_load_avg_1m_start", "sys_load_avg_1m_end", "sys_cpu_steal_pct")


def _field(row, column: str):
    """A column of a table row, a Series (iterrows, iloc) or a named tuple (itertuples)."""
    return row.get(column) if hasattr(row, "get") else getattr(row, column, None)


def _value(row, column: str) -> float | None:
    value = _field(row, column)
    return None if value is None or pd.isna(value) else float(value)


def run_noise(row) -> dict | None:
    """The noise facts of one run (a table row): ``threads`` (its own), and ``load_start``,
    ``load_end``, ``steal_pct`` where past the limits above (else None); ``noisy`` whether any
    is. None for a record written before noise was recorded."""
    start, end, steal = (_value(row, column) for column in NOISE_COLUMNS)
    if start is None and end is None and steal is None:
        return None
    threads = (_value(row, "sys_cpu_count") or 1) * (_value(row, "num_clients") or 1)
    over = {"load_start": start if start is not None and start > threads + LOAD_MARGIN else None,
            "load_end": end if end is not None and end > threads + LOAD_MARGIN else None,
            "steal_pct": steal if steal is not None and steal > STEAL_LIMIT_PCT else None}
    return {"run_id": _field(row, "run_id"), "threads": int(threads), **over,
            "noisy": any(value is not None for value in over.values())}


def noise_mark(row) -> str:
    """NOISE_MARK for a run taken under load or steal, else nothing."""
    facts = run_noise(row)
    return NOISE_MARK if facts and facts["noisy"] else ""


def noise_summary(runs: pd.DataFrame) -> dict:
    """For the page's sentence on noise, over every process (repeats included): the runs, the
    flagged ones' facts, how many have no noise record, the limits, the ranges seen."""
    facts = [run_noise(row) for _, row in runs.iterrows()]
    recorded = [f for f in facts if f is not None]

    def seen(column: str) -> list[float]:
        return [float(v) for v in runs[column].dropna()] if column in runs else []

    loads = seen("sys_load_avg_1m_start") + seen("sys_load_avg_1m_end")
    steals = seen("sys_cpu_steal_pct")
    return {"runs": len(runs), "flagged": [f for f in recorded if f["noisy"]],
            "not_recorded": len(facts) - len(recorded), "load_margin": LOAD_MARGIN,
            "steal_limit_pct": STEAL_LIMIT_PCT, "mark": NOISE_MARK,
            "load_min": min(loads, default=None), "load_max": max(loads, default=None),
            "steal_max_pct": max(steals, default=None)}


def runs_context(all_runs: pd.DataFrame) -> dict:
    """What every page says about its runs: how many processes (``runs``), how many of them
    are repeats of the scorecard's runs (``repeat_runs``), and the machine's noise (``noise``)."""
    return {"runs": len(all_runs), "repeat_runs": int((repeat_index(all_runs) > 0).sum()),
            "noise": noise_summary(all_runs)}


def render(template: str, context: dict, out_path: str | Path) -> None:
    text = _env.get_template(template).render(**context)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out_path)


def system_rows(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """What the runs of a table ran on (distinct values joined, so mixed systems show)."""

    def distinct(column: str) -> str:
        if column not in frame:
            return "-"
        values = sorted({str(v) for v in frame[column].dropna()})
        return ", ".join(values) if values else "none"

    libraries = []
    for col in sorted(c for c in frame.columns if c.startswith("sys_") and c[4:] in _LIBS):
        versions = distinct(col)
        if versions not in ("-", "none"):
            libraries.append(f"{col[4:].replace('_', '-')} {versions}")
    return [
        ("Run dates", run_dates(frame)),
        ("Platform", distinct("sys_platform")),
        ("Processor", distinct("sys_processor")),
        ("Cores available to a run", distinct("sys_cpu_count")),
        ("Memory", distinct("sys_memory_total_mb") + " MB"),
        ("Python", distinct("sys_python")),
        ("GPU", distinct("sys_gpu")),
        ("Container image", distinct("sys_container_image")),
        ("Confidential computing (TEE)", tee.page_label(frame)),
        ("Libraries", "; ".join(libraries) or "-"),
        ("Kit commit", distinct("sys_git_commit")),
    ]


def run_dates(frame: pd.DataFrame) -> str:
    """When the runs were taken: the first start and the last end, in UTC."""
    if "started_at" not in frame or frame["started_at"].isna().all():
        return "not recorded"
    first = pd.to_datetime(frame["started_at"], utc=True).min()
    last = pd.to_datetime(frame["finished_at"], utc=True).max()
    return f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"


def data_source(url: str) -> str:
    """Where data came from, without the paths of the machine that built the page: an
    http(s) or ftp URL by its host, a file URL or a path as "a local copy"."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https", "ftp") and parsed.hostname:
        return parsed.hostname
    return "a local copy"


def system_rows_beside(frame: pd.DataFrame, published: dict[str, str],
                       unstated: str = "not stated") -> list[tuple[str, str, str]]:
    """:func:`system_rows` with the published page's value of each row beside it (``unstated`` where it names none)."""
    return [(name, value, published.get(name, unstated)) for name, value in system_rows(frame)]


_LIBS = {"jax", "jaxlib", "flax", "optax", "jax_privacy", "torch", "torchvision", "opacus", "flwr", "numpy"}
