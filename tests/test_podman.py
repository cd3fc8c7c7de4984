"""A real container run: Podman builds the CPU image from docker/ and the kit runs a tiny
benchmark in it through the real runner and harness.

No registry can be reached here, so the base image is made from the Debian archive
(scripts/base-image.sh) and kept in Podman's store across test runs, as are the
build's cached layers. To stay within CI time the test builds the CPU image without
PyTorch (build argument WITHOUT: about 1 GB instead of 7, the same pins otherwise) and
runs a JAX benchmark. Podman runs rootful here, with runc, cgroupfs and ulimits below
the host's; builds reach the package index through the host network, with this
machine's pip configuration and local package folders mounted.
"""

import configparser
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from infrastructure import sweep_single_run
from privbench import __version__, harness, studies, system
from privbench.studies.curves import make_run_spec
from privbench.studies.throughput import plan as throughput

REPO_ROOT = Path(__file__).resolve().parents[1]
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
BASE_IMAGE = "localhost/privbench-base:bookworm"
IMAGE = "localhost/privbench-cpu:test"
WITHOUT = "torch torchvision opacus"


def _why_not_here() -> str | None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (make test-infra installs them, as root, on Debian)"
    if os.geteuid() != 0:
        return "the container test runs rootful Podman and debootstrap: it needs root"
    return None


def _host_pip_volumes() -> list[str]:
    """This machine's pip configuration files and the local package folders they name."""
    files = [Path("/etc/pip.conf"), Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"]
    volumes, folders = [], set()
    for path in filter(Path.exists, files):
        volumes += ["--volume", f"{path}:{path}:ro"]  # the build runs pip as root, like this test
        parser = configparser.ConfigParser()
        parser.read(path)
        for section in parser.sections():
            for key in ("index-url", "extra-index-url", "find-links"):
                for location in parser[section].get(key, "").split():
                    location = location.removeprefix("file://")
                    if location.startswith("/"):
                        # the folder below the top level holds the index and the files it links to
                        folders.add(Path(*Path(location).parts[:3]))
    for folder in sorted(folders):
        volumes += ["--volume", f"{folder}:{folder}:ro"]
    return volumes


def _podman(*args: str) -> str:
    return subprocess.run([*PODMAN, *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def cpu_image() -> str:
    reason = _why_not_here()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "RUNTIME": " ".join(PODMAN),
           "BASE_IMAGE": BASE_IMAGE, "TAG": IMAGE}
    subprocess.run(["scripts/base-image.sh", BASE_IMAGE], cwd=REPO_ROOT, env=env, check=True,
                   capture_output=True)
    ca_bundle = "/etc/ssl/certs/ca-certificates.crt"
    build = subprocess.run(
        ["scripts/build-image.sh", "cpu", "--build-arg", f"WITHOUT={WITHOUT}", "--network", "host",
         "--volume", f"{ca_bundle}:{ca_bundle}:ro", *_host_pip_volumes(), *ULIMITS],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-3000:]
    return IMAGE


def _runner_config() -> dict:
    return {"kind": "podman", "images": {"cpu": IMAGE}, "command": PODMAN, "extra_flags": ULIMITS}


def _preset(timeout_s: float = 300) -> dict:
    return studies.validate({
        "preset": "tiny", "experiments": ["throughput"], "platform": "cpu",
        "run": {"memory_budget_mb": 2048, "timeout_s": timeout_s}, "runner": _runner_config(),
        "throughput": {"frameworks": ["jax"], "models": ["cnn"], "sizes": ["tiny"], "modes": ["standard"],
                       "batch_start": 2, "batch_cap": 2, "warmup_steps": 1, "timed_steps": 3,
                       "opacus_table_batch": 2}})


def test_image_labels_and_user(cpu_image):
    labels = json.loads(_podman("image", "inspect", "--format", "{{json .Labels}}", cpu_image))
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.revision"] == system.git_commit()
    assert labels["org.privbench.without"] == WITHOUT
    assert _podman("run", "--rm", *ULIMITS, cpu_image, "id", "-un") == "privbench"  # not root


def test_tiny_benchmark_in_the_image(cpu_image, tmp_path):
    """The sweep rule's command, with the podman runner: the record comes from inside the image."""
    curve = next(iter(throughput.curves(_preset()).values()))
    record = sweep_single_run(curve, tmp_path)  # valid against the record schema
    assert record["status"] == "ok", record["message"]
    assert record["config"]["runner"] == "podman" and record["metrics"]["throughput_sps"] > 0
    described = record["system"]
    assert described["container_image"] == cpu_image
    assert described["container_image_digest"] == "sha256:" + _podman("image", "inspect", "--format",
                                                                       "{{.Id}}", cpu_image)
    labels = json.loads(_podman("image", "inspect", "--format", "{{json .Labels}}", cpu_image))
    assert described["git_commit"] == labels["org.opencontainers.image.revision"]
    # the worker described the image's environment, not this one: no PyTorch there, Debian's Python
    assert described["libraries"]["torch"] is None and described["libraries"]["jax"]
    assert described["python"] == _podman("run", "--rm", *ULIMITS, cpu_image, "python", "-c",
                                          "import platform; print(platform.python_version())")


def test_a_timed_out_run_leaves_no_container(cpu_image, tmp_path):
    cfg = _preset(timeout_s=4)  # past the container's start, before JAX has compiled
    spec = make_run_spec(next(iter(throughput.curves(cfg).values())), 2)
    record = harness.run_isolated(spec, tmp_path / "run.json", cfg["runner"])
    assert record["status"] == "timeout"
    assert _podman("ps", "--all", "--filter", "name=^privbench-", "--format", "{{.Names}}") == ""
