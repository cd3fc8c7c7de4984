"""The package works installed (not editable): schemas, templates and published
figures are package data. Its dependencies are declared, its pins used, and its
command line says its version and explains every option."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from privbench import cli

REPO = Path(__file__).resolve().parents[1]


def test_installed_package_validates_a_preset_from_another_folder(tmp_path):
    target, elsewhere, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    elsewhere.mkdir()
    # a copy of what the build reads, so that the build leaves nothing in the checkout
    shutil.copytree(REPO / "privbench", source / "privbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True, cwd=elsewhere)
    installed = target / "privbench"
    assert (installed / "schemas" / "config.schema.yaml").is_file()
    assert (installed / "report" / "templates" / "benchmark_results.md.j2").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-m", "privbench", "validate", str(REPO / "config" / "config.yaml")],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "valid (preset 'default')" in result.stdout
    where = subprocess.run([sys.executable, "-c", "import privbench; print(privbench.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))  # the installed copy ran, not the checkout


def test_version_is_the_package_version():
    import privbench

    result = subprocess.run([sys.executable, "-m", "privbench", "--version"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == f"privbench {privbench.__version__}"


def _parsers(parser: argparse.ArgumentParser):
    """``parser`` and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_line_option_has_help():
    parsers = list(_parsers(cli.build_parser()))
    assert len(parsers) > 5  # the subcommands were found
    missing = [f"{parser.prog} {action.dest}" for parser in parsers for action in parser._actions
               if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert missing == []


def _top_level_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "privbench"}


def _names(requirements: list[str]) -> set[str]:
    """Normalised distribution names of requirement strings (``Jinja2==3.1.6`` -> ``jinja2``)."""
    return {re.split(r"[=<>!~\[; ]", line.strip())[0].lower().replace("_", "-") for line in requirements}


def test_every_imported_package_is_declared_and_every_pin_is_used():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"])
    distributions = importlib.metadata.packages_distributions()
    imported = {_names(distributions[name]).pop() for name in _top_level_imports(REPO / "privbench")}
    assert imported - declared == set(), "imported by privbench but not in pyproject.toml dependencies"
    assert declared - imported == set(), "declared in pyproject.toml but never imported"

    pins = _names(line for line in (REPO / "envs" / "requirements.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    tools = set().union(*(_names(extra) for extra in project["optional-dependencies"].values()))
    # pinned beside the package it is the backend of, never imported by its name
    companions = {"jaxlib"}
    assert declared - pins == set(), "a dependency without its pin in envs/requirements.txt"
    assert pins - declared - tools - companions == set(), "a pin that nothing imports or runs"
