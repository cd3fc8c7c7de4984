"""Process memory: budgets and peaks (CPU, Linux)."""

from __future__ import annotations

import re
import resource

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


def apply_budget(budget_mb: int) -> dict:
    """Cap this process's address space at what it holds now plus ``budget_mb``.

    Called after the framework is imported, so the budget covers the model,
    the data and the training step, and means the same on every machine.
    RLIMIT_AS counts virtual memory: an allocation past it fails cleanly
    (MemoryError, XLA RESOURCE_EXHAUSTED, torch DefaultCPUAllocator) instead
    of waking the kernel's OOM killer.
    """
    base = virtual_mb() or 0.0
    limit = int((base + budget_mb) * MB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return {"virtual_at_budget_mb": round(base, 1), "address_space_limit_mb": round(limit / MB, 1)}


OOM_MARKERS = (
    "RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "DefaultCPUAllocator: can't allocate",
    "can't allocate memory", "std::bad_alloc", "Cannot allocate memory", "CUDA out of memory",
    "OutOfMemoryError", "failed to allocate",
)
# XNNPACK/YNNPACK (JAX on CPU) print a failed allocation only on stderr, then raise a bare
# INTERNAL error: under a memory budget that is running out of memory.
OOM_PATTERN = re.compile("|".join([*map(re.escape, OOM_MARKERS), r"allocate of <\d+> failed"]))


def oom_evidence(text: str) -> str | None:
    """The first sign in ``text`` (an error message, a worker's output) of running out of memory."""
    match = OOM_PATTERN.search(text)
    return match.group(0) if match else None


def looks_like_oom(text: str) -> bool:
    return oom_evidence(text) is not None
