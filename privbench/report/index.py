"""The docs index page: one link per reproduced page, plus how to rebuild."""

from __future__ import annotations

from pathlib import Path

from privbench import studies
from privbench.report import pages


def write_index(config: dict) -> None:
    entries = []
    for name in studies.STUDIES:
        module = studies.plan(name)
        entries.append({"title": module.TITLE, "page": module.PAGE, "enabled": name in config["experiments"]})
    entries.sort(key=lambda entry: entry["title"].lower())
    pages.render("index.md.j2", {"entries": entries, "preset": config["preset"]},
                 Path(config["docs_dir"]) / "index.md")
