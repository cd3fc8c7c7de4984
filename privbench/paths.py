"""Where things live, resolved once.

Schemas, templates and published figures are package data, read through
``importlib.resources``, so an installed (non-editable) package finds them.
"""

from importlib.resources import files
from pathlib import Path

PACKAGE_DATA = files("privbench")
SCHEMA_DIR = PACKAGE_DATA / "schemas"
PUBLISHED_DIR = PACKAGE_DATA / "report" / "published"
TEMPLATE_DIR = PACKAGE_DATA / "report" / "templates"
# The checkout the package runs from (its git commit goes into the records).
REPO_ROOT = Path(__file__).resolve().parents[1]
