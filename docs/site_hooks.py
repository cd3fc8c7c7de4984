"""MkDocs hooks: publish the charts kept in the top-level ``assets/`` folder, and give
headings ids that the theme's scripts accept.

Pages link charts as ``../assets/NAME.png`` so they also render on a plain
repository browser; for the site the charts are copied to ``assets/`` inside
the site and the links rewritten to match.
"""

import os
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.structure.files import File

ASSETS = Path(os.environ.get("PRIVBENCH_ASSETS_DIR", Path(__file__).resolve().parents[1] / "assets"))


def _heading_id(value: str, separator: str) -> str:
    """Python-Markdown's heading id, never starting with a digit ("## 1. Summary" gives
    "section-1-summary"): the theme's scroll spy takes the ids as CSS selectors, where
    "#1-summary" is invalid and stops its script."""
    slug = slugify(value, separator)
    return f"section{separator}{slug}" if slug[:1].isdigit() else slug


def on_config(config):
    config.mdx_configs.setdefault("toc", {})["slugify"] = _heading_id
    return config


def on_files(files, config):
    for chart in sorted(ASSETS.glob("*.png")):
        files.append(File.generated(config, f"assets/{chart.name}", abs_src_path=str(chart)))
    return files


def on_page_markdown(markdown, page, config, files):
    return markdown.replace("](../assets/", "](assets/")
