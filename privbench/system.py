"""Description of the system a run executed on, stored in every record."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from privbench.paths import REPO_ROOT

# Distributions whose versions matter for the measurements.
TRACKED_LIBRARIES = (
    "privbench", "jax", "jaxlib", "flax", "optax", "jax-privacy", "torch",
    "torchvision", "opacus", "flwr", "numpy", "dp-accounting", "snakemake",
    # the CUDA stack where installed (None elsewhere): JAX's plugin, the CUDA runtime, cuDNN
    "jax-cuda13-plugin", "jax-cuda13-pjrt", "nvidia-cuda-runtime", "nvidia-cudnn-cu13",
)


def cpu_model(cpuinfo: str | None = None) -> str:
    """The processor's model name; where a virtual machine reports a generic one without a
    model number ("AMD EPYC", "Intel(R) Xeon(R) Processor"), with its family, model and stepping,
    which name the processor generation."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if not any(ch.isdigit() for ch in name) and "cpu family" in fields:
        name += (f" (family {fields['cpu family']}, model {fields.get('model', '?')}, "
                 f"stepping {fields.get('stepping', '?')})")
    return name


def load_average_1m() -> float | None:
    """The kernel's 1-minute load average (runnable and waiting threads), None where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_ticks(stat_text: str | None = None) -> tuple[int, int] | None:
    """(steal, total) CPU ticks since boot, all CPUs together, from /proc/stat's "cpu" line.

    Steal is the time a hypervisor gave this machine's virtual CPUs to someone else; a
    kernel that reports no steal column counts as 0. None where /proc/stat is unreadable.
    """
    try:
        stat_text = Path("/proc/stat").read_text() if stat_text is None else stat_text
    except OSError:
        return None
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal (guest time is already in user)
            ticks = [int(value) for value in fields[1:9]]
            return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)
    return None


class NoiseProbe:
    """The machine's noise over one run: load average at start and end, CPU steal in %.

    Start it just before the run's process, call :meth:`fields` once it has ended.
    """

    def __init__(self):
        self.load_start = load_average_1m()
        self.ticks_start = cpu_ticks()

    def fields(self) -> dict:
        """The record's noise fields (``system``): None where the kernel does not tell."""
        end = cpu_ticks()
        steal_pct = None
        if self.ticks_start is not None and end is not None:
            steal, total = (e - s for e, s in zip(end, self.ticks_start))
            steal_pct = 100.0 * steal / total if total > 0 else 0.0
        return {"load_avg_1m_start": self.load_start, "load_avg_1m_end": load_average_1m(),
                "cpu_steal_pct": steal_pct}


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


GPU_QUERY = "index,uuid,name,memory.total,driver_version"


def _nvidia_smi_gpus() -> str | None:
    """nvidia-smi's CSV lines for GPU_QUERY (every GPU of the node), or None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None


def visible_gpus(smi_output: str | None = None, visible: str | None = None) -> list[dict]:
    """The GPUs this process may use, in CUDA's order: the first is the one a run uses (cuda:0).

    ``smi_output`` is nvidia-smi's CSV for GPU_QUERY (default: asked now); ``visible`` the
    value of CUDA_VISIBLE_DEVICES (default: this process's), a list of indices or UUID
    prefixes; unset means every GPU of the node.
    """
    smi_output = _nvidia_smi_gpus() if smi_output is None else smi_output
    gpus = []
    for line in (smi_output or "").splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 5:
            index, uuid, name, memory_mb, driver = fields
            gpus.append({"index": index, "uuid": uuid, "name": name, "memory_total_mb": float(memory_mb),
                         "driver": driver})
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is None:
        return gpus
    chosen = []
    for entry in filter(None, (item.strip() for item in visible.split(","))):
        match = [gpu for gpu in gpus if entry == gpu["index"] or gpu["uuid"].startswith(entry)]
        if not match:  # CUDA ignores the entries from the first unknown one on
            break
        chosen.append(match[0])
    return chosen


def gpu_fields(gpus: list[dict]) -> dict:
    """The record's GPU fields: the GPU the run used and its driver (None without a GPU)."""
    if not gpus:
        return {"gpu": None, "gpu_driver": None}
    used = gpus[0]
    return {"gpu": f"{used['name']}, {used['memory_total_mb']:.0f} MiB", "gpu_driver": used["driver"]}


# What the workflow itself writes into the checkout (the default preset's pages and
# charts): rewriting them is a run's output, not a change to the kit.
GENERATED_PATHS = ("docs/*.md", "assets/*")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Commit of the kit's checkout (``+dirty`` if it has local changes other than generated pages)."""
    if os.environ.get("PRIVBENCH_GIT_COMMIT"):  # set by container runners
        return os.environ["PRIVBENCH_GIT_COMMIT"]
    return checkout_commit(REPO_ROOT)


def checkout_commit(root: Path) -> str | None:
    """HEAD of the git checkout at ``root``, ``+dirty`` if a tracked file outside GENERATED_PATHS changed."""
    excluded = [f":(exclude){pattern}" for pattern in GENERATED_PATHS]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return commit + ("+dirty" if dirty else "")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe_system() -> dict:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": available_cores(),
        "memory_total_mb": _memory_total_mb(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        **gpu_fields(visible_gpus()),
        "git_commit": git_commit(),
        # Set by the container runners; None when running in the host environment.
        "container_image": os.environ.get("PRIVBENCH_IMAGE"),
        "container_image_digest": os.environ.get("PRIVBENCH_IMAGE_DIGEST"),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        # The SLURM node the job ran on (several nodes may share one host name).
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        # Attestation evidence of a run on platform cvm (privbench.tee); None otherwise.
        "tee": None,
    }


def _memory_total_mb() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None
