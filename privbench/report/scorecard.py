"""The reproduction scorecard: every published claim the kit can test, its reproduced value
across independent processes, and a verdict.

A claim is a ratio the published page states (clipped vs standard throughput, a time or
memory ratio to a baseline). Ratios, not absolute figures, because both sides of a ratio
are measured on one machine, so it can travel between machines where absolute figures
cannot. Each study's ``report.claims`` lists its claims; the study's page and the docs
index show them through :func:`section` and the template ``_scorecard.md.j2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from matplotlib.ticker import FixedLocator, NullFormatter

from privbench.report import charts, tables
from privbench.report.pages import Spread

# The verdict rule, in one place.
# Issue 14: two runs of the default preset on two machines of one kind differed per cell by a
# median of 14%. A claim is a ratio of two cells; if the two vary independently, the ratio
# varies by about sqrt(2) times as much: 20%. A published value is "consistent" when it lies
# within the reproduced range (min..max across processes) widened by that factor on both sides.
CELL_VARIATION = 0.14
TOLERANCE = round(math.sqrt(2) * CELL_VARIATION, 2)
# Fewer processes give no spread worth the name (issue 14 asks for at least 3): no verdict.
MIN_PROCESSES = 3

CONSISTENT, DIFFERS, NOT_COMPARABLE = "consistent", "differs", "not comparable"
VERDICT_COLORS = {CONSISTENT: "C2", DIFFERS: "C3", NOT_COMPARABLE: "C7"}
INDEX_CHART = "scorecard.png"


@dataclass(frozen=True)
class Claim:
    """One published ratio and what this build measured for it."""

    name: str  # what is compared, e.g. "CNN small, batch 32: Opacus clipped / standard throughput"
    published: float
    reproduced: Spread  # across processes (pages.claim_values); n = 0: not measured, or every run failed
    setting_differs: str = ""  # why the settings are not the published ones ("" when they are)
    page: str = ""  # the page's title, shown on the index

    @property
    def reason(self) -> str:
        """Why the verdict is "not comparable" ("" when it is not)."""
        if self.setting_differs:
            return self.setting_differs
        if self.reproduced.n == 0:
            return "not measured by this preset"
        if self.reproduced.n < MIN_PROCESSES:
            return f"{self.reproduced.n} process{'es' if self.reproduced.n > 1 else ''}, fewer than {MIN_PROCESSES}"
        return ""

    @property
    def verdict(self) -> str:
        if self.reason:
            return NOT_COMPARABLE
        low, high = self.reproduced.low / (1 + TOLERANCE), self.reproduced.high * (1 + TOLERANCE)
        return CONSISTENT if low <= self.published <= high else DIFFERS


def differences(*items: tuple[str, object, object] | str) -> str:
    """``Claim.setting_differs`` from (what, here, published) triples that differ (``here`` None:
    not measured, so nothing to compare) and from plain texts, which always differ ("": none)."""
    parts = [item if isinstance(item, str) else f"{item[0]} {item[1]} (published: {item[2]})"
             for item in items if (item if isinstance(item, str) else item[1] is not None and item[1] != item[2])]
    return "; ".join(parts)


def ok_batches(runs: pd.DataFrame, where: dict) -> set[int]:
    """The batch sizes of the successful runs matching every ``where`` item."""
    mask = runs.status == "ok" if "status" in runs else pd.Series(False, index=runs.index)
    for key, value in where.items():
        if key not in runs:  # a table without the column (e.g. no run of that kind): none matches
            return set()
        mask &= runs[key] == value
    return {int(b) for b in runs[mask].batch_size}


def pick_batch(batches: Iterable[int], published_batch: int | None) -> int | None:
    """The batch a claim is reproduced at, among the ``batches`` that ran: the published one if
    it ran, else the largest."""
    batches = set(batches)
    return published_batch if published_batch in batches else max(batches, default=None)


def _reproduced_cell(spread: Spread) -> str:
    if spread.n == 0:
        return "-"
    if spread.n == 1:
        return f"{tables.fmt_ratio(spread.median)} (n=1, spread unknown)"
    return f"{tables.fmt_ratio(spread.median)} ({spread.low:.2f}-{spread.high:.2f}, n={spread.n})"


def _verdict_cell(claim: Claim) -> str:
    return f"{claim.verdict}: {claim.reason}" if claim.reason else claim.verdict


def table(claims: list[Claim], with_page: bool = False) -> str:
    """The scorecard as a markdown table; numbered as the chart's points."""
    headers = ["#", *(["Page"] if with_page else []), "Claim", "Published", "Reproduced: median (min-max, processes)",
               "Verdict"]
    rows = [[str(i), *([c.page] if with_page else []), c.name, tables.fmt_ratio(c.published),
             _reproduced_cell(c.reproduced), _verdict_cell(c)] for i, c in enumerate(claims, start=1)]
    return tables.markdown_table(headers, rows, ["r", *(["l"] if with_page else []), "l", "r", "r", "l"])


def chart(claims: list[Claim], title: str, machine: str, path: str | Path) -> None:
    """Published (x) against reproduced (y) ratio per claim, numbered as in the table: the
    reproduced range as an error bar, the y = x line and the tolerance band around it, log
    axes when the values span more than ``charts.LOG_SPAN``."""
    measured = [(i, c) for i, c in enumerate(claims, start=1) if c.reproduced.n]
    fig, ax = charts.plt.subplots(figsize=(6.5, 5))
    if not measured:
        ax.text(0.5, 0.5, "no claim measured by this preset", ha="center", va="center")
        ax.axis("off")
        charts.save(fig, path)
        return
    values = [v for _, c in measured for v in (c.published, c.reproduced.low, c.reproduced.high)]
    lo, hi = min(values) / 1.3, max(values) * 1.3
    log = max(values) > charts.LOG_SPAN * min(values)
    line = [lo * (hi / lo) ** (k / 50) for k in range(51)]  # evenly spaced on a log axis, straight on a linear one
    ax.plot(line, line, color="black", linewidth=1, label="reproduced = published")
    ax.fill_between(line, [x / (1 + TOLERANCE) for x in line], [x * (1 + TOLERANCE) for x in line],
                    color="gray", alpha=0.15, label=f"tolerance ±{100 * TOLERANCE:.0f}%")
    for verdict, color in VERDICT_COLORS.items():
        points = [(i, c) for i, c in measured if c.verdict == verdict]
        if not points:
            continue
        ax.errorbar([c.published for _, c in points], [c.reproduced.median for _, c in points],
                    yerr=[[c.reproduced.median - c.reproduced.low for _, c in points],
                          [c.reproduced.high - c.reproduced.median for _, c in points]],
                    fmt="o", color=color, capsize=3, label=verdict)
        for i, c in points:
            ax.annotate(str(i), (c.published, c.reproduced.median), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color=color)
    if log:  # ticks at 1, 2, 5 x 10^k as plain numbers: decades alone leave a short axis one label
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(charts.PLAIN_NUMBER)
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("published ratio")
    ax.set_ylabel("reproduced ratio (median; bar: min-max across processes)")
    charts.titles(ax, title, machine)
    ax.grid(alpha=0.3, which="both")
    charts.legend_outside(ax)
    charts.save(fig, path)


def chart_name(study: str) -> str:
    return f"scorecard_{study}.png"


def section(claims: list[Claim], title: str, frame: pd.DataFrame, assets_dir: Path, chart_file: str,
            with_page: bool = False) -> dict:
    """What ``_scorecard.md.j2`` shows: the table, the chart (drawn here, with the machine of
    ``frame``'s runs under its title), the rule's numbers."""
    chart(claims, f"{title}: published vs reproduced ratios", charts.machine_label(frame), assets_dir / chart_file)
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICT_COLORS}
    return {
        "claims": len(claims), "with_page": with_page, "table": table(claims, with_page), "chart": chart_file,
        "counts": ", ".join(f"{n} {v}" for v, n in counts.items() if n),
        "tolerance_pct": f"{100 * TOLERANCE:.0f}", "cell_variation_pct": f"{100 * CELL_VARIATION:.0f}",
        "min_processes": MIN_PROCESSES,
    }
