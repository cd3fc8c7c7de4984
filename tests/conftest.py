import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Keep the frameworks from grabbing every core while pytest itself runs them.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
# A developer's own config/local.yaml (their data mirror, ...) must not reach the
# tests' workflows: the Snakefile reads this file instead, which does not exist.
os.environ.setdefault("PRIVBENCH_LOCAL_CONFIG", str(REPO_ROOT / "tests" / "no-local-config.yaml"))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def tiny_config():
    from privbench import studies

    return studies.load(REPO_ROOT / "config" / "tiny.yaml")


def run_workflow(out_dir: Path, *extra: str, configfile: str = "config/tiny.yaml", check: bool = True,
                 overrides: tuple[str, ...] = ()):
    """Run the real Snakemake workflow with its outputs redirected under ``out_dir``.

    ``extra`` are further Snakemake arguments (targets, flags), ``overrides``
    further ``--config key=value`` items. Data sets come from a generated
    archive served on 127.0.0.1 (tests/cifar_archive.py), never the internet.
    """
    import subprocess

    from cifar_archive import data_override

    command = [
        # --configfile and --config take every item after them: targets and flags come first
        str(VENV_BIN / "snakemake"), "--cores", "2", *extra, "--configfile", configfile,
        "--config", f"results_dir={out_dir}/results", f"assets_dir={out_dir}/assets",
        f"docs_dir={out_dir}/docs", f"site_dir={out_dir}/site", data_override(out_dir), *overrides,
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory) -> Path:
    """The tiny preset run once, end to end, for every test that inspects its outputs.

    Returns the folder holding results/, assets/, docs/ and site/.
    """
    out = tmp_path_factory.mktemp("tiny_workflow")
    run_workflow(out, "all", "site")
    return out
