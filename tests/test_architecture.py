"""The package's import graph, read from the code (ast): the layers of the kit only
import downwards, and the worker side of a study loads no reporting libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "privbench"

# Stages from bottom to top; a module may import its own stage, a lower one, or
# infrastructure (INFRA: configuration, records, harness, system, paths...).
STAGES = [
    ("privbench.dp",),
    ("privbench.models", "privbench.data"),
    ("privbench.training", "privbench.jaxpr_evidence", "privbench.profiling"),
    ("privbench.federated",),
    ("privbench.studies.curves", "privbench.studies.measuring"),
    ("privbench.studies.*.plan",),  # what a study runs: read by its measure and report stages
    ("privbench.studies.*.measure",),  # the worker side
    ("privbench.report", "privbench.studies.*.report"),
    # the registry of studies and its users: the index page, the command line (and its
    # plan --estimate, privbench.sizing), the worker
    ("privbench.studies", "privbench.report.index", "privbench.cli", "privbench.sizing", "privbench.worker"),
]
INFRA = ("privbench.config", "privbench.records", "privbench.harness", "privbench.system", "privbench.memory",
         "privbench.paths", "privbench.errors", "privbench.progress", "privbench.wording", "privbench.timing", "privbench.tee",
         "privbench.runners", "privbench.aggregate", "privbench.__main__", "privbench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every privbench module ``path`` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports the module; `from module import name`, the module
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                         else node.module for alias in node.names)
    return {name for name in found if name.split(".")[0] == "privbench"}


def _matches(module: str, pattern: str) -> bool:
    parts, want = module.split("."), pattern.split(".")
    if len(parts) < len(want):
        return False
    return all(w in ("*", p) for p, w in zip(parts, want))


def _stage(module: str) -> int | None:
    """The stage of ``module``: the most specific pattern that matches; None: infrastructure."""
    best = None
    for level, patterns in enumerate(STAGES):
        for pattern in patterns:
            if _matches(module, pattern) and (best is None or len(pattern) > len(best[1])):
                best = (level, pattern)
    for pattern in INFRA:
        if module == pattern or (pattern != "privbench" and _matches(module, pattern)):
            if best is None or len(pattern) >= len(best[1]):
                return None
    return None if best is None else best[0]


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_dp_imports_nothing_of_the_kit_outside_dp():
    bad = {name: sorted(i for i in _imports(path) if not i.startswith("privbench.dp"))
           for name, path in MODULES.items() if name.startswith("privbench.dp")}
    assert {name: found for name, found in bad.items() if found} == {}


def test_no_module_imports_a_higher_stage():
    upward = []
    for name, path in MODULES.items():
        own = _stage(name)
        if own is None:
            continue
        for imported in _imports(path):
            target = _stage(imported)
            if target is not None and target > own:
                upward.append(f"{name} (stage {own}) imports {imported} (stage {target})")
    assert upward == []


def test_infrastructure_imports_no_stage():
    """config, records, harness...: below every stage (config does not import the studies)."""
    bad = [f"{name} imports {imported}" for name, path in MODULES.items() if _stage(name) is None
           and name != "privbench" for imported in _imports(path) if _stage(imported) is not None
           and name not in ("privbench.__main__",)]
    assert bad == []


def test_every_module_has_a_place():
    assert [name for name in MODULES if _stage(name) is None and not any(
        name == p or _matches(name, p) for p in INFRA)] == []


def test_studies_do_not_import_each_other():
    bad = []
    for name, path in MODULES.items():
        parts = name.split(".")
        if len(parts) >= 4 and parts[1] == "studies":
            for imported in _imports(path):
                other = imported.split(".")
                if len(other) >= 3 and other[1] == "studies" and other[2] not in (parts[2], "curves", "measuring") \
                        and len(other) > 3:
                    bad.append(f"{name} imports {imported}")
    assert bad == []


@pytest.mark.parametrize("study", ["throughput", "cnn_microbatch", "memory_profile", "torch_cifar"])
def test_measure_stage_loads_no_reporting_library(study):
    code = (f"import sys; import privbench.studies.{study}.measure; "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
