"""The child side of one isolated run: ``python -m privbench.worker SPEC RESULT``.

It imports the framework, applies the memory budget, lets the experiment
measure, classifies any failure (out of memory or another error) and writes
a small result file. The parent (``privbench.harness``) turns that into the
run's record; if this process dies or hangs, the parent records why.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _configure_threads(threads: int) -> None:
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)


def _gpu_budget_before_imports(budget_mb: int) -> float | None:
    """Platform cuda: the memory of the run's GPU, with JAX's allocator capped at the budget
    before JAX starts (PyTorch's is capped after its import, by memory.apply_budget)."""
    from privbench import memory, system  # neither loads a framework

    gpus = system.visible_gpus()
    if not gpus:
        return None  # apply_budget fails the run, saying so
    os.environ.update(memory.gpu_budget_environment(budget_mb, gpus[0]["memory_total_mb"]))
    return gpus[0]["memory_total_mb"]


def main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as handle:
        spec = json.load(handle)
    limits = spec["limits"]
    _configure_threads(limits.get("threads", 0))
    platform = spec.get("platform", "cpu")
    gpu_total_mb = _gpu_budget_before_imports(limits["memory_budget_mb"]) if platform == "cuda" else None

    # Imported here, after the thread settings, because they load the frameworks.
    from privbench import memory, precision, studies, system, tee
    from privbench.records import write_json_atomic

    phases: dict = {}
    metrics: dict = {}
    # The system as the run sees it (in a container: the image's), with a cvm run's TEE evidence.
    system_extra = system.describe_system()
    result = {"status": "error", "message": None, "metrics": metrics, "phases": phases,
              "system_extra": system_extra}
    try:
        system_extra["tee"] = tee.attest_run(spec)
        t0 = time.perf_counter()
        experiment = studies.measure(spec["experiment"])
        experiment.import_frameworks(spec)
        phases["import_s"] = time.perf_counter() - t0
        metrics["rss_after_import_mb"] = memory.rss_mb()
        metrics.update(precision.apply(limits.get("precision", "highest"), platform))
        metrics.update(memory.keep_freed_memory())
        metrics.update(memory.apply_budget(limits["memory_budget_mb"], platform, gpu_total_mb))
        metrics["peak_rss_reset"] = memory.reset_peak_rss()
        _progress(f"{spec['run_id']}: imports done in {phases['import_s']:.1f} s, "
                  f"memory budget {limits['memory_budget_mb']} MB")
        experiment.measure(spec, metrics, phases, _progress)
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure must become a record
        text = "".join(traceback.format_exception(exc))
        _progress(text)
        from privbench.memory import looks_like_oom
        oom = isinstance(exc, MemoryError) or looks_like_oom(f"{type(exc).__name__}: {exc}")
        result["status"] = "oom" if oom else "error"
        first_line = (str(exc).strip().splitlines() or [""])[0][:500]
        result["message"] = f"{type(exc).__name__}: {first_line}"
    finally:
        try:
            from privbench import memory as _memory
            metrics["peak_rss_mb"] = _memory.peak_rss_mb()
        except Exception:  # noqa: BLE001
            pass
    write_json_atomic(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
