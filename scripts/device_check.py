"""The checks of scripts/device-check.sh: the kit's CUDA path on one GPU, one line per check.

    PASS|FAIL <check>: <what was seen>

Checks, in order (the first needs a GPU; without one the script says so and stops):
  environment   the GPU (nvidia-smi), its driver, JAX and PyTorch both see it
  budget-<fw>   through the real harness, per framework: a run that fits its GPU budget is
                ok, one far past it is recorded as oom (not error, not killed)
  sweep-<fw>    a throughput sweep of the CNN in standard, clipped and fast_dp modes
  memory-page   the memory page's CUDA allocator path (vanilla and fast_dp)
  dp-correct    the DP correctness tests (naive per-example reference) on CUDA at full float32

Run it through scripts/device-check.sh (which finds or makes a Python environment).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("jax", "torch")
DP_TESTS = ("tests/test_fast_dp.py", "tests/test_opacus_norms.py", "tests/test_dp_jax_engine.py",
            "tests/test_dp_torch_engine.py")
failures = 0


def report(ok: bool, check: str, detail: str) -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {check}: {detail}", file=sys.__stdout__, flush=True)


def environment() -> bool:
    """The GPU, its driver, and both frameworks seeing it (each in its own process)."""
    from privbench import system

    gpus = system.visible_gpus()
    if not gpus:
        why = "nvidia-smi not found" if not shutil.which("nvidia-smi") else "nvidia-smi lists no GPU"
        report(False, "environment", f"no GPU ({why}; CUDA_VISIBLE_DEVICES="
                                     f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): the checks need one")
        return False
    probes = {"jax": "import jax; print(jax.devices('gpu')[0].device_kind)",
              "torch": "import torch; print(torch.cuda.get_device_name(0), torch.version.cuda, "
                       "torch.backends.cudnn.version())"}
    seen = {}
    for framework, code in probes.items():
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
        seen[framework] = probe.stdout.strip() if probe.returncode == 0 else f"FAILED ({_last_line(probe.stderr)})"
    fields = system.gpu_fields(gpus)
    versions = {k: v for k, v in system.library_versions().items() if k in (
        "jax", "jaxlib", "jax-cuda13-plugin", "torch", "nvidia-cuda-runtime", "nvidia-cudnn-cu13")}
    ok = all(not value.startswith("FAILED") for value in seen.values())
    report(ok, "environment", f"{fields['gpu']}, driver {fields['gpu_driver']}; jax sees {seen['jax']}; "
                              f"torch sees {seen['torch']}; {versions}")
    return ok


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _config(**sections) -> dict:
    from privbench import studies

    return studies.validate({"preset": "device-check", "platform": "cuda", "runner": {"kind": "local"},
                             "run": {"memory_budget_mb": 4096, "timeout_s": 300, "precision": "highest"},
                             "experiments": list(sections), **sections})


def _throughput(frameworks, modes, size, batch_start, batch_cap, timed_steps=5) -> dict:
    return {"frameworks": list(frameworks), "models": ["cnn"], "sizes": [size], "modes": list(modes),
            "batch_start": batch_start, "batch_cap": batch_cap, "warmup_steps": 1, "timed_steps": timed_steps}


def budget(workdir: Path) -> None:
    """Per framework: batch 16 fits 4 GB; batch 4096 of the small CNN cannot fit 256 MB."""
    from privbench import harness
    from privbench.studies.curves import make_run_spec
    from privbench.studies.throughput import plan

    for framework in FRAMEWORKS:
        seen = []
        for budget_mb, batch, expected in ((4096, 16, "ok"), (256, 4096, "oom")):
            cfg = _config(throughput=_throughput([framework], ["standard"], "small", batch, batch))
            cfg["run"]["memory_budget_mb"] = budget_mb
            curve = next(iter(plan.curves(cfg).values()))
            curve["limits"]["memory_budget_mb"] = budget_mb
            record = harness.run_isolated(make_run_spec(curve, batch), workdir / f"budget-{framework}-{batch}.json")
            seen.append((expected, record["status"], f"batch {batch} in {budget_mb} MB: {record['status']}"
                         + (f" ({record['message'][:160]})" if record["message"] else "")))
        report(all(expected == status for expected, status, _ in seen), f"budget-{framework}",
               "; ".join(text for _, _, text in seen))


def sweep(workdir: Path) -> None:
    """The CNN in all three modes, batch 16 to 64, per framework, through run_sweep."""
    from privbench import harness, records
    from privbench.studies.curves import make_run_spec
    from privbench.studies.throughput import plan

    for framework in FRAMEWORKS:
        cfg = _config(throughput=_throughput([framework], ["standard", "clipped", "fast_dp"], "small", 16, 64))
        parts, ok = [], True
        for curve in plan.curves(cfg).values():
            summary = harness.run_sweep(curve, workdir / "sweep", make_run_spec)
            rates = []
            for run in summary["runs"]:
                record = records.read_record(run["record"])
                ok &= record["status"] == "ok"
                rates.append(f"b{run['batch_size']} {record['metrics'].get('throughput_sps') or 0:.0f}/s"
                             if record["status"] == "ok" else f"b{run['batch_size']} {record['status']}")
            parts.append(f"{curve['run']['mode']}: {', '.join(rates)}")
        report(ok, f"sweep-{framework}", "; ".join(parts))


def memory_page(workdir: Path) -> None:
    from privbench import harness
    from privbench.studies.curves import make_run_spec
    from privbench.studies.memory_profile import plan

    cfg = _config(memory_profile={"size": "small", "batch_size": 16, "warmup_steps": 1, "timed_steps": 2,
                                  "methods": ["vanilla", "fast_dp"]})
    parts, ok = [], True
    for curve_id, curve in plan.curves(cfg).items():
        record = harness.run_isolated(make_run_spec(curve, curve["batch_start"]), workdir / f"{curve_id}.json")
        metrics = record["metrics"]
        ok &= record["status"] == "ok" and "CUDA" in str(metrics.get("memory_source"))
        parts.append(f"{curve['run']['method']}: {record['status']}, peak {metrics.get('peak_memory_mb') or 0:.0f} MB"
                     f" from {metrics.get('memory_source')}")
    report(ok, "memory-page", "; ".join(parts))


def dp_correctness() -> None:
    """The DP tests against the naive reference with tensors on CUDA (scripts/pytest_cuda_device.py)."""
    tests = [test for test in DP_TESTS if (REPO_ROOT / test).exists()]
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not e2e", "-p", "pytest_cuda_device", *tests],
                         cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=360)
    report(run.returncode == 0, "dp-correct", f"{_last_line(run.stdout)} ({', '.join(tests)}; float32 highest, "
                                              "torch default device cuda, JAX on its GPU)")


def main(log_path: Path) -> int:
    start = time.monotonic()
    if not environment():
        print("device-check: no usable GPU here; nothing else was checked", flush=True)
        return 1
    summary = sys.stdout
    # the runs' own output (the harness streams every worker's) goes to the log, the verdicts here
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="privbench-device-check-") as tmp:
        for check in (budget, sweep, memory_page):
            try:
                with contextlib.redirect_stdout(log):
                    check(Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
                report(False, check.__name__.replace("_", "-"), f"{type(exc).__name__}: {exc}")
            summary.flush()
    dp_correctness()
    print(f"device-check: {failures} failed, in {time.monotonic() - start:.0f} s (runs' output: {log_path})",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "device-check.log"))
