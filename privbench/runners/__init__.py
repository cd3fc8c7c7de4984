"""Where an isolated run executes.

A runner turns the worker's command line into the command that starts it: in
this Python environment (``local``) or inside the platform's container image
(``docker``, ``podman``, ``apptainer``). One module per runtime, each with

    wrap(worker_args, runner_config, platform, mounts) -> command
        the command that runs ``python -m privbench.worker *worker_args``;
        ``mounts`` are host folders the worker writes (the records folder)
    environment(runner_config) -> dict
        extra environment variables for that command
    platform_problems(platform) -> list[str]   (optional)
        why this runner's environment cannot serve ``platform`` (empty: it can)
    stop(command, runner_config) -> None
        called after the harness killed ``command`` (time limit): ends whatever
        outlives the killed process (a container outlives its client)

Docker and Podman share one code path (``_oci``); each module holds only what
differs between runtimes: GPU flags, user mapping, image references.
"""

from __future__ import annotations

import importlib

from privbench import __version__

RUNNERS = ("local", "docker", "podman", "apptainer")

# In the container, the worker must import the image's kit, never a checkout
# that happens to be the working directory: -P keeps the cwd off sys.path.
CONTAINER_WORKER = ["python", "-P", "-m", "privbench.worker"]


def get(runner_config: dict | None):
    """The runner module for a ``runner:`` config section (default: local)."""
    kind = (runner_config or {}).get("kind", "local")
    if kind not in RUNNERS:
        raise ValueError(f"unknown runner {kind!r}: choose one of {', '.join(RUNNERS)}")
    return importlib.import_module(f"privbench.runners.{kind}")


def platform_problems(config: dict) -> list[str]:
    """Why this machine cannot serve the preset's platform with its runner (empty: it can).

    Checked when the workflow starts and by ``privbench validate``, not when the first run
    fails. Container runners bring the image's environment (the cuda image has JAX's CUDA
    plugin), so only the local runner's environment is checked.
    """
    runner = get(config.get("runner"))
    check = getattr(runner, "platform_problems", None)
    return check(config["platform"]) if check else []


def image_for(runner_config: dict, platform: str, default_pattern: str) -> str:
    """The image a platform runs in: ``runner.images.<platform>``, else the kit's own name.

    ``default_pattern`` is formatted with ``platform`` and the kit ``version``
    (the tag scripts/build-image.sh gives).
    """
    images = runner_config.get("images") or {}
    return images.get(platform) or default_pattern.format(platform=platform, version=__version__)


def image_environment(image: str, digest: str | None) -> dict[str, str]:
    """What the worker in the container reports as its image (read by privbench.system)."""
    env = {"PRIVBENCH_IMAGE": image}
    if digest:
        env["PRIVBENCH_IMAGE_DIGEST"] = digest
    return env
