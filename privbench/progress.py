"""Progress lines for the user: one per finished run, and the data download's.

A Snakemake job sends its output to its log file, so nothing it prints reaches
the terminal where ``snakemake`` runs. The rules therefore hand the job a second
stream (``3>&2``: Snakemake's own stderr) and the command line names it
(``--progress-fd 3``); every line written here goes to the log (stdout) and to
that stream. Lines start with ``privbench:`` so that they stand out among
Snakemake's own.
"""

from __future__ import annotations

import os
from typing import TextIO

PREFIX = "privbench:"
_MESSAGE_CHARS = 160  # a failure's message is cut here on the terminal; the record keeps all of it

_terminal: TextIO | None = None


def open_terminal(fd: int) -> None:
    """Also write every progress line to file descriptor ``fd`` (left open at exit)."""
    global _terminal
    _terminal = os.fdopen(fd, "w", buffering=1, closefd=False)


def emit(message: str) -> None:
    """Write ``privbench: <message>`` to the log and, if opened, to the terminal."""
    line = f"{PREFIX} {message}"
    print(line, flush=True)
    if _terminal is not None:
        _terminal.write(line + "\n")


def headline(record: dict) -> str:
    """The figure a run is judged by: s/epoch or samples/s, and its peak memory if measured."""
    metrics = record.get("metrics") or {}
    figures = []
    if metrics.get("seconds_per_epoch") is not None:
        estimated = " (estimated)" if record.get("estimated") else ""
        figures.append(f"{metrics['seconds_per_epoch']:.1f} s/epoch{estimated}")
    elif metrics.get("throughput_sps") is not None:
        figures.append(f"{metrics['throughput_sps']:.2f} samples/s")
    if metrics.get("peak_memory_mb") is not None:
        figures.append(f"peak {metrics['peak_memory_mb']:.0f} MB")
    return ", ".join(figures)


def run_finished(record: dict) -> None:
    """One line for a finished run: its id, status and headline figure (or why it failed)."""
    detail = headline(record) if record["status"] == "ok" else (record.get("message") or "")
    if len(detail) > _MESSAGE_CHARS:
        detail = detail[:_MESSAGE_CHARS - 3] + "..."
    emit(f"{record['run_id']} {record['status']}" + (f": {detail}" if detail else ""))
