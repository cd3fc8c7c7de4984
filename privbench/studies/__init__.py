"""Studies: one folder per reproduced page, each split by the stage that runs it.

    <study>/plan.py     NAME, TITLE, PAGE; curves(config), page_outputs(config),
                        optional data_files(config) (rule inputs of the curve jobs) and
                        config_problems(section) (rules on its section a schema cannot state)
    <study>/measure.py  worker side: import_frameworks(spec), measure(spec, metrics, phases,
                        progress); imports no pandas, matplotlib or jinja2
    <study>/report.py   report(config, table_path): the facts (numbers, comparisons,
                        verdicts) from the tidy table, then charts and the page
    <study>/schema.yaml the schema of its section of a preset (the section is named after the folder)
    report/templates/<PAGE>.j2   the page's wording

Shared helpers live in :mod:`privbench.studies.curves` (plan side: curves, run specs,
resources) and :mod:`privbench.studies.measuring` (worker side), never in a sibling study.
Adding a page = one folder here and its template: the folder is found, its schema joins the
presets' validation and the rule set in ``workflow/rules/studies.smk`` serves it.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.resources import files
from pathlib import Path
from types import ModuleType

import yaml

from privbench import config as config_mod

# Every folder of this package with a schema is a study (shared modules are files).
STUDIES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)
                       if module.ispkg and (files(__name__) / module.name / "schema.yaml").is_file()))
STAGES = ("plan", "measure", "report")


def _stage(name: str, stage: str) -> ModuleType:
    if name not in STUDIES:
        raise ValueError(f"unknown experiment {name!r}: choose one of {', '.join(STUDIES)}")
    return importlib.import_module(f"privbench.studies.{name}.{stage}")


def plan(name: str) -> ModuleType:
    """The study's plan module (curves, page outputs): light, imported by the Snakefile."""
    return _stage(name, "plan")


def measure(name: str) -> ModuleType:
    """The study's worker-side module."""
    return _stage(name, "measure")


def report(name: str) -> ModuleType:
    """The study's report module (pandas, charts, the page)."""
    return _stage(name, "report")


def config_problems(config: dict) -> list[str]:
    """The rules each listed study states about its own section (its ``config_problems``)."""
    problems = []
    for name in config.get("experiments", []):
        if name in config and name in STUDIES:
            check = getattr(plan(name), "config_problems", None)
            problems.extend(check(config[name]) if check else [])
    return problems


def section_schemas() -> dict[str, dict]:
    """Study name -> the schema of its section of a preset."""
    return {name: yaml.safe_load((files(__name__) / name / "schema.yaml").read_text()) for name in STUDIES}


def validate(config: dict, source: str = "config") -> dict:
    """:func:`privbench.config.validate` with every study's section schema and own checks."""
    return config_mod.validate(config, source=source, sections=section_schemas(), extra_checks=config_problems)


def load(path: str | Path) -> dict:
    """Read a preset file and validate it with every study's own checks."""
    return validate(config_mod.read(path), source=str(path))
