"""PNG charts (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FAILURE_MARKERS = {"oom": ("x", "OOM"), "timeout": ("s", "timeout"), "error": ("D", "error")}


def save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def sweep_chart(series: dict[str, list[tuple[int, float | None, str]]], title: str, ylabel: str,
                path: str | Path, published: dict[str, list[tuple[int, float]]] | None = None,
                xlabel: str = "batch size",
                references: dict[str, tuple[float | None, str]] | None = None) -> None:
    """One line per series over batch size, or another power-of-two axis named by ``xlabel`` (log2).

    ``series`` maps a label to (batch, value, status) points; a point whose
    status is not ok is drawn as a marker on the x axis labelled with the
    failure (e.g. OOM), so the cut-off of each curve is visible.
    ``published`` adds dashed reference lines. ``references`` maps a label to
    (value, status) of a run that has no x value (e.g. a mode without a
    microbatch size): a dotted horizontal line, labelled with its value, or,
    for a failed run, a legend entry naming the failure.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, points) in enumerate(sorted(series.items())):
        color = f"C{i % 10}"
        ok = [(b, v) for b, v, s in points if s == "ok" and v is not None]
        if ok:
            ax.plot([b for b, _ in ok], [v for _, v in ok], marker="o", color=color, label=label)
        for batch, _value, status in points:
            if status in FAILURE_MARKERS:
                marker, text = FAILURE_MARKERS[status]
                ax.scatter([batch], [0], marker=marker, s=70, color=color, zorder=5, clip_on=False)
                ax.annotate(text, (batch, 0), textcoords="offset points", xytext=(0, 8 + 10 * (i % 3)),
                            ha="center", fontsize=7, color=color)
    for i, (label, points) in enumerate(sorted((published or {}).items())):
        ax.plot([b for b, _ in points], [v for _, v in points], linestyle="--", marker=".",
                color="gray", label=f"{label} (published)")
    for i, (label, (value, status)) in enumerate(sorted((references or {}).items()), start=len(series)):
        color = f"C{i % 10}"
        if status == "ok" and value is not None:
            ax.axhline(value, linestyle=":", linewidth=1.8, color=color, label=f"{label}: {value:.2f}")
        else:
            ax.plot([], [], linestyle=":", color=color,
                    label=f"{label}: {FAILURE_MARKERS.get(status, (None, status))[1]}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, path)


# The published style of the "Torch benchmarks" charts: dark background, yellow bars.
BAR_BACKGROUND, BAR_COLOR, BAR_TEXT = "#020c1b", "#f0bb2f", "#d9d9d9"


def bar_chart(bars: list[tuple[str, float | None, str]], title: str, path: str | Path) -> None:
    """Vertical bars with their value on top, in the published style.

    ``bars`` are (tick label, value, note): a bar without a value (a failed
    run) is left empty with its note (e.g. "OOM at batch 32") on the axis.
    """
    fig, ax = plt.subplots(figsize=(14.5, 8.2), facecolor=BAR_BACKGROUND)
    ax.set_facecolor(BAR_BACKGROUND)
    positions = range(len(bars))
    values = [value or 0.0 for _, value, _ in bars]
    ax.bar(positions, values, color=BAR_COLOR, width=0.8, zorder=3)
    top = max(values, default=0.0) or 1.0
    for x, (_, value, note) in zip(positions, bars):
        text = f"{value:.2f}" if value is not None else note
        ax.text(x, (value or 0.0) + top * 0.01, text, ha="center", va="bottom", color=BAR_TEXT,
                fontweight="bold", fontsize=10)
    ticks = ["\n".join(textwrap.fill(line, 22) for line in label.split("\n")) for label, _, _ in bars]
    ax.set_xticks(list(positions), ticks, color=BAR_TEXT, fontsize=10)
    ax.tick_params(axis="y", colors=BAR_TEXT)
    ax.tick_params(axis="x", length=0)
    ax.grid(color="#2a3445", linestyle="--", linewidth=0.7, zorder=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_ylim(0, top * 1.08)
    ax.set_title(title, loc="left", color=BAR_COLOR, fontsize=12)
    save(fig, path)
