"""MkDocs hooks: publish the charts kept in the top-level ``assets/`` folder.

Pages link charts as ``../assets/NAME.png`` so they also render on a plain
repository browser; for the site the charts are copied to ``assets/`` inside
the site and the links rewritten to match.
"""

import os
from pathlib import Path

from mkdocs.structure.files import File

ASSETS = Path(os.environ.get("PRIVBENCH_ASSETS_DIR", Path(__file__).resolve().parents[1] / "assets"))


def on_files(files, config):
    for chart in sorted(ASSETS.glob("*.png")):
        files.append(File.generated(config, f"assets/{chart.name}", abs_src_path=str(chart)))
    return files


def on_page_markdown(markdown, page, config, files):
    return markdown.replace("](../assets/", "](assets/")
