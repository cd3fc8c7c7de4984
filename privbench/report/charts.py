"""PNG charts (matplotlib, no display needed)."""

from __future__ import annotations

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
                path: str | Path, published: dict[str, list[tuple[int, float]]] | None = None) -> None:
    """One line per series over batch size (log2 axis).

    ``series`` maps a label to (batch, value, status) points; a point whose
    status is not ok is drawn as a marker on the x axis labelled with the
    failure (e.g. OOM), so the cut-off of each curve is visible.
    ``published`` adds dashed reference lines.
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
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, path)
