"""Markdown tables and number formatting for the generated pages."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

STATUS_LABELS = {"oom": "OOM", "timeout": "timeout", "error": "error"}


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, digits: int = 2, missing: str = "-") -> str:
    if is_missing(value):
        return missing
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


# Throughput (samples/s) everywhere on the pages: one decimal, thousands separated.
SPS_DIGITS = 1


def fmt_sps(value, missing: str = "-") -> str:
    """A throughput as every page writes it (reproduced and published alike)."""
    return fmt(value, SPS_DIGITS, missing)


def fmt_ratio(value, missing: str = "-") -> str:
    return missing if is_missing(value) else f"{value:.2f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence], align: Sequence[str] | None = None) -> str:
    """A GitHub/MkDocs markdown table; ``align`` items are 'l', 'r' or 'c'."""
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def params_label(count: int) -> str:
    """'2.16M (2,158,568)' as in the published headings."""
    if count >= 1_000_000:
        short = f"{count / 1e6:.2f}M"
    elif count >= 1_000:
        short = f"{count / 1e3:.2f}K"
    else:
        short = str(count)
    return f"{short} ({count:,})"


def throughput_cell(row) -> str:
    """A run's throughput with its step-time spread, or what stopped the run."""
    if row["status"] != "ok":
        return STATUS_LABELS[row["status"]]
    spread = f" ±{100 * row['cv_step']:.0f}%" if not is_missing(row.get("cv_step")) else ""
    return f"{fmt_sps(row['throughput_sps'])}{spread}"
