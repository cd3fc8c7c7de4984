"""Process memory: budgets and peaks (CPU, Linux; the GPU budget on platform cuda)."""

from __future__ import annotations

import re
import resource
import sys

MB = 1024 * 1024


def _status_field_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    kb = _status_field_kb("VmRSS")
    return None if kb is None else kb / 1024


def virtual_mb() -> float | None:
    kb = _status_field_kb("VmSize")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _status_field_kb("VmHWM")
    if kb is None:  # not Linux: fall back to the lifetime peak
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


# glibc's mallopt parameters (malloc.h) and the settings keep_freed_memory applies.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_TRIM_BYTES, _KEEP_MMAP_BYTES = 1 << 30, 256 * MB


def keep_freed_memory() -> dict:
    """Let glibc keep freed memory for reuse, as CUDA's caching allocator does.

    By default glibc gives large freed blocks back to the kernel at once, so a
    step that allocates the same tens of megabytes every time (per-example
    gradients, activations) page-faults all of them afresh each step: measured
    on the memory page's Transformer, 4-5% of a DP step and nothing of a plain
    one. Blocks under 256 MB now come from the heap, and up to 1 GiB of freed
    heap stays mapped. Applied to every run alike (a process setting); the
    peak resident set is unchanged. Returns what to record with the run."""
    if not sys.platform.startswith("linux"):
        return {"malloc_keeps_freed": False}
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_BYTES)
                       and libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP_BYTES))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        applied = False
    return {"malloc_keeps_freed": applied}


def gpu_budget_environment(budget_mb: int, gpu_total_mb: float) -> dict[str, str]:
    """JAX's settings for a GPU budget, to set before JAX starts: no preallocation (by default
    JAX takes 75% of the card at once), its allocator capped at ``budget_mb`` of the card."""
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{_gpu_fraction(budget_mb, gpu_total_mb):.6f}"}


def _gpu_fraction(budget_mb: int, gpu_total_mb: float) -> float:
    return min(1.0, budget_mb / gpu_total_mb)


def apply_budget(budget_mb: int, platform: str = "cpu", gpu_total_mb: float | None = None) -> dict:
    """Apply a run's memory budget, the same for both frameworks; returns what was set, for the record.

    CPU (and cvm): cap this process's address space at what it holds now plus ``budget_mb``.
    Called after the framework is imported, so the budget covers the model, the data and the
    training step, and means the same on every machine. RLIMIT_AS counts virtual memory: an
    allocation past it fails cleanly (MemoryError, XLA RESOURCE_EXHAUSTED, torch
    DefaultCPUAllocator) instead of waking the kernel's OOM killer.

    cuda: a GPU-memory budget of ``budget_mb`` on the card of ``gpu_total_mb`` (nothing is on
    the GPU after the imports), and no RLIMIT_AS: CUDA reserves tens of GB of address space
    when it starts, which would fail every run. JAX's allocator is capped by
    ``gpu_budget_environment`` (set before JAX starts), PyTorch's caching allocator here by
    ``torch.cuda.set_per_process_memory_fraction`` if PyTorch is imported; both then fail an
    allocation past the budget with their out-of-memory error.
    """
    if platform == "cuda":
        if not gpu_total_mb:
            raise RuntimeError("platform cuda, but no GPU is visible to this run (nvidia-smi lists none "
                               "in CUDA_VISIBLE_DEVICES)")
        fraction = _gpu_fraction(budget_mb, gpu_total_mb)
        if "torch" in sys.modules:
            sys.modules["torch"].cuda.set_per_process_memory_fraction(fraction)
        return {"gpu_memory_total_mb": gpu_total_mb, "gpu_memory_budget_mb": min(budget_mb, gpu_total_mb),
                "gpu_memory_fraction": round(fraction, 6)}
    base = virtual_mb() or 0.0
    limit = int((base + budget_mb) * MB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return {"virtual_at_budget_mb": round(base, 1), "address_space_limit_mb": round(limit / MB, 1)}


OOM_MARKERS = (
    "RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "DefaultCPUAllocator: can't allocate",
    "can't allocate memory", "std::bad_alloc", "Cannot allocate memory", "CUDA out of memory",
    "OutOfMemoryError", "failed to allocate",
    # CUDA libraries failing to get their workspace: the device ran out of memory
    "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUFFT_ALLOC_FAILED",
)
# XNNPACK/YNNPACK (JAX on CPU) print a failed allocation only on stderr, then raise a bare
# INTERNAL error: under a memory budget that is running out of memory.
OOM_PATTERN = re.compile("|".join([*map(re.escape, OOM_MARKERS), r"allocate of <\d+> failed"]))
# Lines that mention memory without the run having run out of it: XLA's allocator warning
# ("ran out of memory trying to allocate ... this is not a failure, but ...") and a CUDA
# driver or context that failed to start (CUDA_ERROR_OUT_OF_MEMORY from cuInit or context
# creation is a broken device or driver, an error of the machine, not of the batch size).
NOT_OOM_LINE = re.compile(
    r"not a failure|failed initializing StreamExecutor|cuInit|cuDevicePrimaryCtxRetain|cuCtxCreate"
    r"|CUDA driver initialization failed|cudaErrorInitializationError|CUDA_ERROR_NOT_INITIALIZED"
    r"|CUDA_ERROR_NO_DEVICE|driver version is insufficient|Unable to initialize backend")


def oom_evidence(text: str) -> str | None:
    """The first sign in ``text`` (an error message, a worker's output) of running out of memory."""
    for line in text.splitlines():
        match = None if NOT_OOM_LINE.search(line) else OOM_PATTERN.search(line)
        if match:
            return match.group(0)
    return None


def looks_like_oom(text: str) -> bool:
    return oom_evidence(text) is not None


# memory_source of a CPU run (device_peak_memory); pages subtract the footprint after imports from it
PROCESS_PEAK = "process peak resident set (VmHWM)"


def device_peak_memory(framework: str, device: str) -> dict:
    """Peak memory as the device sees it: the allocator's own peak on CUDA, peak RSS on CPU."""
    if device == "cuda":
        if framework == "torch":
            import torch

            return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                    "memory_source": "torch.cuda.max_memory_allocated"}
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return {"peak_memory_mb": stats.get("peak_bytes_in_use", 0) / 2**20,
                "memory_source": "jax device memory_stats peak_bytes_in_use"}
    return {"peak_memory_mb": peak_rss_mb(), "memory_source": PROCESS_PEAK}
