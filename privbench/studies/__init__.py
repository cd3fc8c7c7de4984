"""Studies: one folder per reproduced page, each split by the stage that runs it.

    <study>/plan.py     NAME, TITLE, PAGE; curves(config), page_outputs(config),
                        optional data_files(config) (rule inputs of the curve jobs) and
                        config_problems(section) (rules on its section a schema cannot state)
    <study>/measure.py  worker side: import_frameworks(spec), measure(spec, metrics, phases,
                        progress); imports no pandas, matplotlib or jinja2
    <study>/report.py   report(config, table_path): the facts (numbers, comparisons,
                        verdicts) from the tidy table, then charts and the page
    report/templates/<PAGE>.j2   the page's wording

Shared helpers live in :mod:`privbench.studies.curves` (plan side: curves, run specs,
resources) and :mod:`privbench.studies.devices` (worker side), never in a sibling study.
Adding a page = one folder here, its schema section and its template; the rule set in
``workflow/rules/studies.smk`` serves every study.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from privbench import config as config_mod

STUDIES = ("throughput", "cnn_microbatch", "memory_profile", "torch_cifar")
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


def validate(config: dict, source: str = "config") -> dict:
    """:func:`privbench.config.validate` plus every study's own checks."""
    return config_mod.validate(config, source=source, extra_checks=config_problems)


def load(path: str | Path) -> dict:
    """Read a preset file and validate it with every study's own checks."""
    return validate(config_mod.read(path), source=str(path))
