"""Pages rendered from Jinja2 templates in ``privbench/report/templates``."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jinja2
import pandas as pd
import yaml

from privbench import tee
from privbench.paths import PUBLISHED_DIR, TEMPLATE_DIR

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,  # a missing value is a bug, never an empty cell
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def published(name: str) -> dict:
    """Reference figures of a published page, kept with their source in ``report/published``."""
    return yaml.safe_load((PUBLISHED_DIR / f"{name}.yaml").read_text())


class StudyInputs(NamedTuple):
    """What every study's report starts from."""

    section: dict  # the study's section of the preset
    frame: pd.DataFrame  # its tidy table
    published: dict  # its published figures
    assets_dir: Path
    docs_dir: Path


def study_inputs(config: dict, name: str, published_name: str, table_path: str | Path) -> StudyInputs:
    return StudyInputs(config[name], pd.read_csv(table_path), published(published_name),
                       Path(config["assets_dir"]), Path(config["docs_dir"]))


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


def system_rows_beside(frame: pd.DataFrame, published: dict[str, str],
                       unstated: str = "not stated") -> list[tuple[str, str, str]]:
    """:func:`system_rows` with the published page's value of each row beside it (``unstated`` where it names none)."""
    return [(name, value, published.get(name, unstated)) for name, value in system_rows(frame)]


_LIBS = {"jax", "jaxlib", "flax", "optax", "jax_privacy", "torch", "torchvision", "opacus", "flwr", "numpy"}
