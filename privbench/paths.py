"""Where things live in the repository, resolved once."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
PUBLISHED_DIR = Path(__file__).resolve().parent / "report" / "published"
TEMPLATE_DIR = Path(__file__).resolve().parent / "report" / "templates"
