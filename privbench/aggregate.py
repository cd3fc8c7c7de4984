"""All records of an experiment into one tidy table (one row per run).

Columns: parameter columns (the run's config), metric columns (scalars; the
list of step times is summarised), environment columns (``sys_*``), then
``status``/``message`` and the record's path. Records are validated first; a
malformed one stops the aggregation with its path, it is never dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from privbench import records


def record_paths_from_summaries(summary_paths: Iterable[str | Path]) -> list[Path]:
    """The record files listed by curve summaries (so one preset never mixes with another)."""
    paths = []
    for summary_path in summary_paths:
        summary = json.loads(Path(summary_path).read_text())
        paths.extend(Path(run["record"]) for run in summary["runs"])
    return paths


def to_row(record: dict) -> dict:
    row: dict = {"run_id": record["run_id"], "experiment": record["experiment"], "preset": record["preset"]}
    for key, value in record["config"].items():
        if isinstance(value, dict):
            for sub_key, sub in value.items():
                row[f"{key}_{sub_key}"] = sub
        else:
            row[key] = value
    row["status"] = record["status"]
    row["message"] = record["message"]
    row["estimated"] = record["estimated"]
    row["started_at"], row["finished_at"] = record["started_at"], record["finished_at"]
    for key, value in record["metrics"].items():
        if key == "step_times_s":
            row["timed_steps_done"] = len(value)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            row[key] = value
        elif isinstance(value, dict):
            for sub_key, sub in value.items():
                if isinstance(sub, (int, float, str, bool)) or sub is None:
                    row[f"{key}_{sub_key}"] = sub
    system = record["system"]
    for key, value in system.items():
        if key == "libraries":
            for lib, version in value.items():
                row[f"sys_{lib.replace('-', '_')}"] = version
        elif isinstance(value, dict):  # e.g. tee: its scalar fields (the raw evidence stays in the record)
            for sub_key, sub in value.items():
                if not isinstance(sub, (dict, list)):
                    row[f"sys_{key}_{sub_key}"] = sub
        elif not isinstance(value, list):
            row[f"sys_{key}"] = value
    row["record_path"] = record.get("_path")
    return row


def build_table(record_paths: Iterable[str | Path]) -> pd.DataFrame:
    rows = [to_row(r) for r in records.read_records(record_paths)]
    return pd.DataFrame(rows)


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)

