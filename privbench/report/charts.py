"""PNG charts (matplotlib, no display needed).

Every chart names the machine its runs took place on under its title, keeps its legend
outside the axes (right of them) so that no data is hidden, labels batch-size axes
with plain numbers and switches its value axis to a log scale where the values span
more than ``LOG_SPAN`` (a linear axis would flatten the smaller series onto the floor).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator  # noqa: E402

FAILURE_MARKERS = {"oom": ("x", "OOM"), "timeout": ("s", "timeout"), "error": ("D", "error")}
LOG_SPAN = 10  # largest / smallest value beyond which a value axis is logarithmic
PLAIN_NUMBER = FuncFormatter(lambda value, _: f"{value:g}")


def save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def machine_label(frame) -> str:
    """The machine of a table's runs for a chart's subtitle: CPU model, cores and GPU, if any.

    Distinct values are joined with " / ", so runs on mixed machines show as such.
    """
    def distinct(column: str) -> str:
        values = sorted({str(v) for v in frame[column].dropna()}) if column in frame else []
        return " / ".join(values)

    cores = distinct("sys_cpu_count")
    parts = [distinct("sys_processor") or "unknown CPU", f"{cores} cores" if cores else "", distinct("sys_gpu")]
    return ", ".join(part for part in parts if part)


def titles(ax, title: str, machine: str) -> None:
    """The chart's title, and under it the machine (see machine_label) in smaller grey type."""
    ax.set_title(title, fontsize=10, pad=18)
    ax.text(0.5, 1.015, machine, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="dimgray")


def legend_outside(ax, below: bool = False) -> None:
    """The legend right of the axes (or below them: for wide charts), off the data (only if something is labelled)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if below:  # under the two-line tick labels
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, borderaxespad=0)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def value_axis(ax, values: list[float]) -> bool:
    """A log y axis with plain-number ticks if ``values`` span more than LOG_SPAN, else linear from 0.

    Returns whether the axis is logarithmic.
    """
    positive = [v for v in values if v is not None and v > 0]
    log = bool(positive) and max(positive) / min(positive) > LOG_SPAN
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(positive) / 2)  # the lowest series clear of the failure markers on the x axis
        # ticks at 1, 2, 5 per decade over up to three decades, so that every series has a number near it
        few_decades = max(positive) / min(positive) < 1000
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if few_decades else (1.0,)))
        ax.yaxis.set_major_formatter(PLAIN_NUMBER)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    else:
        ax.set_ylim(bottom=0)
    return log


def sweep_chart(series: dict[str, list[tuple[int, float | None, str]]], title: str, ylabel: str,
                path: str | Path, machine: str, published: dict[str, list[tuple[int, float]]] | None = None,
                xlabel: str = "batch size",
                references: dict[str, tuple[float | None, str]] | None = None) -> None:
    """One line per series over batch size, or another power-of-two axis named by ``xlabel`` (log2).

    ``series`` maps a label to (batch, value, status) points; a point whose
    status is not ok is drawn as a marker on the x axis labelled with the
    failure (e.g. OOM), so the cut-off of each curve is visible; a series with
    no ok point still has its legend entry, naming where it failed.
    ``published`` maps a label to (batch, value) points, drawn dashed in the
    colour of the series of the same label. ``references`` maps a label to
    (value, status) of a run that has no x value (e.g. a mode without a
    microbatch size): a dotted horizontal line, labelled with its value, or,
    for a failed run, a legend entry naming the failure. ``machine`` is the
    subtitle (machine_label).
    """
    published = published or {}
    references = references or {}
    colors = {label: f"C{i % 10}" for i, label in enumerate(
        [*sorted(set(series) | set(published)), *sorted(references)])}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # failure markers sit on the x axis whatever the y scale: x in data, y in axes fractions
    on_x_axis = ax.get_xaxis_transform()
    for i, (label, points) in enumerate(sorted(series.items())):
        color = colors[label]
        ok = [(b, v) for b, v, s in points if s == "ok" and v is not None]
        failed = [(b, s) for b, _v, s in points if s in FAILURE_MARKERS]
        if ok:
            ax.plot([b for b, _ in ok], [v for _, v in ok], marker="o", color=color, label=label)
        elif failed:  # nothing ran: the legend shows the series by its failure marker
            batch, status = failed[0]
            marker, text = FAILURE_MARKERS[status]
            ax.scatter([], [], marker=marker, color=color, label=f"{label}: {text} at {batch}")
        for batch, status in failed:
            marker, text = FAILURE_MARKERS[status]
            ax.scatter([batch], [0], marker=marker, s=70, color=color, zorder=5, clip_on=False,
                       transform=on_x_axis)
            ax.annotate(text, (batch, 0), xycoords=on_x_axis, textcoords="offset points",
                        xytext=(0, 8 + 10 * (i % 3)), ha="center", fontsize=7, color=color)
    for label, points in sorted(published.items()):
        ax.plot([b for b, _ in points], [v for _, v in points], linestyle="--", marker="^", fillstyle="none",
                color=colors[label], alpha=0.8, label=f"{label} (published)")
    for label, (value, status) in sorted(references.items()):
        if status == "ok" and value is not None:
            ax.axhline(value, linestyle=":", linewidth=1.8, color=colors[label], label=f"{label}: {value:.2f}")
        else:
            ax.plot([], [], linestyle=":", color=colors[label],
                    label=f"{label}: {FAILURE_MARKERS.get(status, (None, status))[1]}")

    ax.set_xscale("log", base=2)
    batches = sorted({b for points in [*series.values(), *published.values()] for b, *_ in points})
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_major_formatter(PLAIN_NUMBER)
    ax.xaxis.set_minor_locator(NullLocator())
    if len(batches) == 1:  # one point: widen the axis around it
        ax.set_xlim(batches[0] / 2, batches[0] * 2)
    values = [v for points in series.values() for _b, v, s in points if s == "ok"]
    values += [v for points in published.values() for _b, v in points]
    values += [v for v, s in references.values() if s == "ok"]
    value_axis(ax, values)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    titles(ax, title, machine)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save(fig, path)


def _short(value: float) -> str:
    """A bar's value: whole numbers from 100 on, else two decimals."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def grouped_bar_chart(groups: list[tuple[str, dict[str, tuple[float | None, str]]]], series: list[str],
                      title: str, ylabel: str, path: str | Path, machine: str) -> None:
    """Side by side bars per group on one value axis, each bar labelled with its value.

    ``groups`` are (tick label, {series name: (value, note)}) in order;
    ``series`` the series names in legend order (the first drawn solid, the
    others hatched: the first is the reproduced one, the others published).
    A bar's note follows its value above it (e.g. "(64)" for a batch size); a bar
    without a value shows its note (e.g. "OOM at batch 32") at the foot of its
    slot; a series missing from a group leaves a gap.
    """
    fig, ax = plt.subplots(figsize=(max(8.0, 1.25 * len(groups) + 2), 6))
    width = 0.8 / len(series)
    values = [value for _, bars in groups for value, _ in bars.values()]
    log = value_axis(ax, values)
    shown_values = [v for v in values if v is not None]
    top = max(shown_values, default=1.0)
    for k, name in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        drawn = [(x + offset, *bars[name]) for x, (_, bars) in enumerate(groups) if name in bars]
        shown = [(x, value, note) for x, value, note in drawn if value is not None]
        ax.bar([x for x, _, _ in shown], [value for _, value, _ in shown], width * 0.92, color=f"C{k}",
               hatch=None if k == 0 else "//", edgecolor="white", zorder=3, label=name)
        for x, value, note in drawn:
            if value is None:  # at the foot of the empty slot
                ax.text(x, 0.01, note, transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="bottom", fontsize=7, color=f"C{k}")
            else:
                ax.text(x, value * 1.08 if log else value + top * 0.01, f"{_short(value)} {note}".strip(),
                        rotation=90, ha="center", va="bottom", fontsize=7)
    if log:
        ax.set_ylim(min(shown_values) / 3, top * 40)  # room for the rotated labels above the tallest bar
    else:
        ax.set_ylim(0, top * 1.4)
    ax.set_xticks(range(len(groups)), ["\n".join(textwrap.wrap(label, 16)) for label, _ in groups], fontsize=8)
    ax.tick_params(axis="x", length=0)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    titles(ax, title, machine)
    legend_outside(ax, below=True)
    save(fig, path)
