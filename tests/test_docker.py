"""A real Docker engine: dockerd started by the test, the CPU image built with
scripts/build-image.sh (RUNTIME=docker), and a tiny benchmark run in it through
``runner.kind: docker``; the record names the image and its digest.

The engine runs with what this machine allows: its own socket, exec root and pid file in a
temporary folder, no iptables, no bridge (containers run with --network none, builds with
--network host), the vfs storage driver (no overlay mounts here), cgroupfs. Builds use
BuildKit: the classic builder commits every metadata step (ARG, LABEL, ...) as a container,
which with vfs is a full copy of the 1.4 GB image each. Its data root is kept in
/var/tmp/privbench-docker across test runs, with the base image and the build's cached
layers (as Podman's store is for tests/test_podman.py); superseded layers are pruned. No registry can be reached:
the base image is made from the Debian archive (scripts/base-image.sh) and given this
machine's CA bundle, which pip in the build needs to reach the package index. The image is
the JAX-only one (WITHOUT="torch torchvision opacus"), as in the Podman test.

A timed-out run's container is removed by the code Docker shares with Podman
(privbench.runners._oci), tested for real in tests/test_podman.py; not here, where vfs
makes a container's start take longer than any time limit that ends a run before JAX
compiles.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from infrastructure import processes_using, sweep_single_run
from privbench import __version__, studies, system
from privbench.studies.throughput import plan as throughput

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_CLIENT = "/usr/bin/docker"  # Debian's (docker.io), not another docker earlier on PATH
DATA_ROOT = Path("/var/tmp/privbench-docker/data")
BASE_IMAGE = "localhost/privbench-base:bookworm"
BUILD_BASE = "localhost/privbench-base:bookworm-hostca"
IMAGE = "localhost/privbench-cpu:test"
WITHOUT = "torch torchvision opacus"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _why_not_here() -> str | None:
    missing = [tool for tool in ("dockerd", "containerd", "runc", "debootstrap") if shutil.which(tool) is None]
    if not Path(DOCKER_CLIENT).exists() or missing:
        return (f"{', '.join(missing or [DOCKER_CLIENT])} not installed (make test-infra installs docker.io "
                "and debootstrap, as root, on Debian)")
    if os.geteuid() != 0:
        return "the Docker test starts its own dockerd, as root"
    return None


@pytest.fixture(scope="module")
def docker():
    """The client command of a dockerd started for this module, stopped (with its containerd) after it."""
    reason = _why_not_here()
    if reason:
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="pbdocker-", dir="/tmp"))  # a socket path must stay short
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    log = open(folder / "dockerd.log", "w")
    daemon = subprocess.Popen(
        ["dockerd", "--host", f"unix://{folder}/docker.sock", "--data-root", str(DATA_ROOT),
         "--exec-root", str(folder / "exec"), "--pidfile", str(folder / "docker.pid"), "--iptables=false",
         "--ip6tables=false", "--bridge=none", "--storage-driver=vfs", "--exec-opt", "native.cgroupdriver=cgroupfs"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = [DOCKER_CLIENT, "-H", f"unix://{folder}/docker.sock"]
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([*client, "version"], capture_output=True).returncode != 0:
            assert daemon.poll() is None and time.monotonic() < deadline, (folder / "dockerd.log").read_text()[-3000:]
            time.sleep(0.5)
        yield client
    finally:
        containers = subprocess.run([*client, "ps", "--all", "--quiet"], capture_output=True, text=True).stdout.split()
        if containers:
            subprocess.run([*client, "rm", "--force", *containers], capture_output=True)
        # superseded kit layers (vfs keeps a full copy of each): only this run's stay cached
        subprocess.run([*client, "image", "prune", "--force"], capture_output=True)
        subprocess.run([*client, "builder", "prune", "--force", "--filter", "until=10m"], capture_output=True)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        log.close()
        assert processes_using(folder) == [], "dockerd or its containerd still runs"
        shutil.rmtree(folder, ignore_errors=True)


def _docker(client, *args: str) -> str:
    return subprocess.run([*client, *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def cpu_image(docker, tmp_path_factory) -> str:
    runtime = " ".join(docker)
    build_env = {**os.environ, "RUNTIME": runtime, "DOCKER_BUILDKIT": "1"}
    subprocess.run(["scripts/base-image.sh", BASE_IMAGE], cwd=REPO_ROOT, env=build_env, check=True,
                   capture_output=True)
    # Docker's builder mounts nothing: the host's CA bundle goes into a thin layer over the base
    context = tmp_path_factory.mktemp("base-ca")
    shutil.copy(CA_BUNDLE, context / "ca-certificates.crt")
    (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY ca-certificates.crt {CA_BUNDLE}\n"
                                        f"ENV PIP_CERT={CA_BUNDLE}\n")
    subprocess.run([*docker, "build", "-t", BUILD_BASE, str(context)], env=build_env, check=True,
                   capture_output=True)
    build = subprocess.run(
        ["scripts/build-image.sh", "cpu", "--build-arg", f"WITHOUT={WITHOUT}", "--network", "host"],
        cwd=REPO_ROOT, env={**build_env, "BASE_IMAGE": BUILD_BASE, "TAG": IMAGE}, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-3000:]
    return IMAGE


def _preset(docker, timeout_s: float = 300) -> dict:
    return studies.validate({
        "preset": "tiny", "experiments": ["throughput"], "platform": "cpu",
        "run": {"memory_budget_mb": 2048, "timeout_s": timeout_s},
        "runner": {"kind": "docker", "images": {"cpu": IMAGE}, "command": docker},
        "throughput": {"frameworks": ["jax"], "models": ["cnn"], "sizes": ["tiny"], "modes": ["standard"],
                       "batch_start": 2, "batch_cap": 2, "warmup_steps": 1, "timed_steps": 3,
                       "opacus_table_batch": 2}})


def test_tiny_benchmark_in_the_docker_image(docker, cpu_image, tmp_path):
    """The sweep rule's command, with the docker runner: the record comes from inside the image."""
    curve = next(iter(throughput.curves(_preset(docker)).values()))
    record = sweep_single_run(curve, tmp_path)  # valid against the record schema
    assert record["status"] == "ok", record["message"]
    assert record["config"]["runner"] == "docker" and record["metrics"]["throughput_sps"] > 0
    described = record["system"]
    assert described["container_image"] == cpu_image
    assert described["container_image_digest"] == _docker(docker, "image", "inspect", "--format", "{{.Id}}",
                                                           cpu_image)
    labels = json.loads(_docker(docker, "image", "inspect", "--format", "{{json .Config.Labels}}", cpu_image))
    assert labels["org.opencontainers.image.version"] == __version__
    assert described["git_commit"] == labels["org.opencontainers.image.revision"] == system.git_commit()
    # the worker described the image's environment: no PyTorch there, Debian's Python
    assert described["libraries"]["torch"] is None and described["libraries"]["jax"]
    # one container (with vfs each start copies the image): its user, not root, and its Python
    user, python = _docker(docker, "run", "--rm", "--network", "none", cpu_image, "sh", "-c",
                           "id -un && python -c 'import platform; print(platform.python_version())'").split()
    assert user == "privbench" and described["python"] == python
