"""Small wording helpers shared by every stage that writes text for people (pages, CLI, TEE labels)."""

from __future__ import annotations


def plural(count, noun: str, plural_form: str | None = None) -> str:
    """``1 step``, ``5 steps`` (``plural_form`` where adding an s is wrong)."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"
