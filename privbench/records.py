"""Result records: one JSON file per run, written atomically, validated on read.

A record is final as soon as it exists: the harness writes it to a temporary
file in the same folder and renames it into place, so a run killed halfway
leaves no record and is redone on the next invocation, while finished runs
(whatever their status) are kept.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from jsonschema import Draft202012Validator

from privbench.config import load_schema

SCHEMA_VERSION = 1

_validator = Draft202012Validator(load_schema("record.schema.yaml"))


class MalformedRecordError(ValueError):
    """One or more record files failed validation; the message lists them by path."""


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True, default=_jsonable)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    # numpy scalars and similar: store as plain numbers
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


def problems(record: object) -> list[str]:
    """Schema violations of a record, as readable strings (empty if valid)."""
    errors = sorted(_validator.iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<record>'}: {e.message}" for e in errors]


def write_record(path: str | Path, record: dict) -> None:
    found = problems(record)
    if found:  # a bug in the kit, never in the user's input: fail loudly
        raise MalformedRecordError(f"refusing to write invalid record {path}: {found}")
    write_json_atomic(path, record)


def read_record(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MalformedRecordError(f"{path}: not valid JSON ({exc})") from None
    found = problems(record)
    if found:
        raise MalformedRecordError(f"{path}: " + "; ".join(found))
    return record


def read_records(paths: Iterable[str | Path]) -> list[dict]:
    """Read many records; every malformed one is reported by path, none dropped."""
    records, failures = [], []
    for path in paths:
        try:
            record = read_record(path)
        except (MalformedRecordError, OSError) as exc:
            failures.append(str(exc))
            continue
        record["_path"] = str(path)
        records.append(record)
    if failures:
        raise MalformedRecordError(
            f"{len(failures)} malformed record(s); fix or delete them and rerun:\n"
            + "\n".join(f"  - {f}" for f in failures)
        )
    return records


def existing_record(path: str | Path) -> dict | None:
    """A valid record at ``path``, or None if there is none (or it is unreadable)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read_record(path)
    except MalformedRecordError:
        return None
