"""The docs index page: one link per reproduced page, the reproduction scorecard of every
page's claims together, and how to rebuild."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from privbench import studies
from privbench.report import pages, scorecard


def table_path(config: dict, name: str) -> Path:
    """An experiment's tidy table, as the workflow's table rule writes it."""
    return Path(config["results_dir"]) / "tables" / f"{name}.csv"


def write_index(config: dict) -> None:
    """``docs/index.md`` and its scorecard chart, from the tables of the preset's experiments."""
    entries, claims, frames = [], [], []
    for name in studies.STUDIES:
        module = studies.plan(name)
        entries.append({"title": module.TITLE, "page": module.PAGE, "enabled": name in config["experiments"]})
        if name in config["experiments"]:
            inputs = pages.study_inputs(config, name, module.PUBLISHED, table_path(config, name))
            claims += studies.report(name).claims(config, inputs.all_runs, inputs.published)
            frames.append(inputs.all_runs)
    entries.sort(key=lambda entry: entry["title"].lower())
    card = scorecard.section(claims, "All pages", pd.concat(frames) if frames else pd.DataFrame(),
                             Path(config["assets_dir"]), scorecard.INDEX_CHART, with_page=True)
    pages.render("index.md.j2", {"entries": entries, "preset": config["preset"], "scorecard": card},
                 Path(config["docs_dir"]) / "index.md")
