"""The runners' command lines: each runtime's flags per platform, mounts, image and digest,
and clear messages when a runtime or an image is missing. (Real runs: test_podman.py,
test_docker.py.)"""

import hashlib
import os
import sys

import pytest

from privbench import __version__, config, runners, studies
from privbench.errors import MissingDependencyError
from privbench.runners import _oci, apptainer

WORKER_ARGS = ["/results/runs/.work/r.spec.json", "/results/runs/.work/r.result.json"]
MOUNTS = ["/results/runs"]


@pytest.fixture
def runtimes_installed(monkeypatch):
    """Pretend docker, podman and apptainer exist, and every OCI image has one digest."""
    monkeypatch.setattr(_oci.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(apptainer.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(_oci, "_image_id", lambda command, image, platform: "sha256:" + "ab" * 32)


def flag_values(command, flag):
    return [command[i + 1] for i, item in enumerate(command) if item == flag]


def test_local_runs_this_python():
    command = runners.get(None).wrap(WORKER_ARGS, {}, "cpu", MOUNTS)
    assert command == [sys.executable, "-m", "privbench.worker", *WORKER_ARGS]


@pytest.mark.parametrize("kind, gpu_flags", [("docker", ["--gpus", "all"]),
                                             ("podman", ["--device", "nvidia.com/gpu=all"])])
def test_oci_runtimes(runtimes_installed, kind, gpu_flags):
    runner = runners.get({"kind": kind})
    cpu = runner.wrap(WORKER_ARGS, {"kind": kind}, "cpu", MOUNTS)
    image = f"privbench-cpu:{__version__}"
    assert cpu[:3] == [kind, "run", "--rm"]
    assert cpu[-len(WORKER_ARGS) - 5:] == [image, "python", "-P", "-m", "privbench.worker", *WORKER_ARGS]
    assert f"{MOUNTS[0]}:{MOUNTS[0]}" in flag_values(cpu, "--volume")
    assert f"{os.getcwd()}:{os.getcwd()}:ro" in flag_values(cpu, "--volume")
    assert flag_values(cpu, "--env") == [f"PRIVBENCH_IMAGE={image}", "PRIVBENCH_IMAGE_DIGEST=sha256:" + "ab" * 32]
    assert flag_values(cpu, "--network") == ["none"]
    assert not set(gpu_flags[1:]) & set(cpu)  # no GPU flags for the CPU image

    cuda = runner.wrap(WORKER_ARGS, {"kind": kind, "images": {"cuda": "registry/pb-cuda:1"}}, "cuda", MOUNTS)
    at = cuda.index(gpu_flags[0])
    assert cuda[at:at + 2] == gpu_flags and "registry/pb-cuda:1" in cuda


def test_oci_user_mapping_and_extra_flags(runtimes_installed, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    podman = {"kind": "podman", "command": ["podman", "--cgroup-manager", "cgroupfs"],
              "extra_flags": ["--ulimit", "nofile=1024:1024"]}
    command = runners.get(podman).wrap(WORKER_ARGS, podman, "cpu", MOUNTS)
    assert command[:4] == ["podman", "--cgroup-manager", "cgroupfs", "run"]
    assert flag_values(command, "--userns") == ["keep-id"]  # rootless: the caller inside
    assert command[command.index("--ulimit") + 1] == "nofile=1024:1024"
    assert command.index("--ulimit") < command.index(f"privbench-cpu:{__version__}")
    docker = runners.get({"kind": "docker"}).wrap(WORKER_ARGS, {"kind": "docker"}, "cpu", MOUNTS)
    assert flag_values(docker, "--user") == [f"{os.getuid()}:{os.getgid()}"]


def test_oci_cvm_gets_the_tee_interfaces(runtimes_installed, monkeypatch, tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "sev-guest").write_text("")
    monkeypatch.setattr(_oci, "TEE_CONFIGFS", tmp_path / "config")
    monkeypatch.setattr(_oci, "TEE_DEVICE", tmp_path / "sev-guest")
    command = runners.get({"kind": "docker"}).wrap(WORKER_ARGS, {"kind": "docker"}, "cvm", MOUNTS)
    assert f"{tmp_path}/config:{tmp_path}/config" in flag_values(command, "--volume")
    assert flag_values(command, "--device") == [f"{tmp_path}/sev-guest"]
    assert f"privbench-cvm:{__version__}" in command


def test_apptainer(runtimes_installed, tmp_path):
    sif = tmp_path / "pb-cuda.sif"
    sif.write_bytes(b"SIF image bytes")
    cfg = {"kind": "apptainer", "images": {"cuda": str(sif), "cpu": str(sif)}}
    cuda = runners.get(cfg).wrap(WORKER_ARGS, cfg, "cuda", MOUNTS)
    assert cuda[:3] == ["apptainer", "exec", "--cleanenv"] and "--nv" in cuda
    assert flag_values(cuda, "--bind") == MOUNTS
    assert flag_values(cuda, "--env") == [f"PRIVBENCH_IMAGE={sif}",
                                         "PRIVBENCH_IMAGE_DIGEST=sha256:" + hashlib.sha256(b"SIF image bytes").hexdigest()]
    assert cuda[-len(WORKER_ARGS) - 5:] == [str(sif), "python", "-P", "-m", "privbench.worker", *WORKER_ARGS]
    assert "--nv" not in runners.get(cfg).wrap(WORKER_ARGS, cfg, "cpu", MOUNTS)


def test_missing_runtime_or_image_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(_oci.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="needs the 'podman' command"):
        runners.get({"kind": "podman"}).wrap(WORKER_ARGS, {"kind": "podman"}, "cpu", MOUNTS)
    monkeypatch.setattr(apptainer.shutil, "which", lambda name: "/usr/bin/apptainer")
    cfg = {"kind": "apptainer", "images": {"cpu": str(tmp_path / "missing.sif")}}
    with pytest.raises(MissingDependencyError, match="missing.sif' does not exist: build the cpu image"):
        runners.get(cfg).wrap(WORKER_ARGS, cfg, "cpu", MOUNTS)


def test_missing_oci_image(monkeypatch, tmp_path):
    # a stand-in runtime whose "image inspect" fails like docker's for an unknown image
    fake = tmp_path / "fakedocker"
    fake.write_text("#!/bin/sh\necho 'Error: No such image: privbench-cpu' >&2\nexit 1\n")
    fake.chmod(0o755)
    cfg = {"kind": "docker", "command": [str(fake)]}
    with pytest.raises(MissingDependencyError,
                       match=r"image 'privbench-cpu:.*' was not found .*scripts/build-image.sh cpu"):
        runners.get(cfg).wrap(WORKER_ARGS, cfg, "cpu", MOUNTS)


def test_runner_config_is_validated(tiny_config):
    assert tiny_config["runner"] == {"kind": "local", "extra_flags": [], "attestation": "required"}
    bad = {**tiny_config, "runner": {"kind": "singularity", "image": "x"}}
    with pytest.raises(config.ConfigError) as error:
        studies.validate(bad)
    assert "unknown key 'image' under 'runner'" in str(error.value)
    assert "'runner.kind': 'singularity' is not one of" in str(error.value)


def test_snakemakes_own_apptainer_is_refused_with_the_runner_to_use(tmp_path):
    """The rules declare no container: --sdm apptainer would be ignored, so the workflow stops."""
    from conftest import run_workflow

    result = run_workflow(tmp_path, "--dry-run", "--sdm", "apptainer", check=False)
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert "--sdm apptainer is not used by this workflow" in message and "runner.kind (apptainer" in message
