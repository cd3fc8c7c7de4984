"""The CUDA path, checked on CPU where a check can exist (issue 15; scripts/device-check.sh
checks the rest on a GPU): the GPU memory budget, the out-of-memory classifier on CUDA's
messages, the record's GPU fields, the precision setting, the environment check, and the
CUDA image's pins against the lock."""

import re
import resource
from pathlib import Path

import pytest

from privbench import harness, memory, precision, runners, system
from privbench.runners import local

REPO_ROOT = Path(__file__).resolve().parents[1]
# nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader,nounits
SMI = ("0, GPU-1111aaaa-0000-0000-0000-000000000000, NVIDIA H100 80GB HBM3, 81559, 550.54.15\n"
       "1, GPU-2222bbbb-0000-0000-0000-000000000000, NVIDIA H100 80GB HBM3, 81559, 550.54.15\n"
       "2, GPU-3333cccc-0000-0000-0000-000000000000, NVIDIA A100-SXM4-40GB, 40960, 550.54.15\n")


# --- the budget: GPU memory on cuda, the same for both frameworks, no RLIMIT_AS -----------------

def test_jax_gets_a_capped_allocator_without_preallocation():
    env = memory.gpu_budget_environment(8192, 81920)
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.100000"}
    assert memory.gpu_budget_environment(10**6, 81920)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "1.000000"


def test_cuda_budget_caps_torch_and_leaves_the_address_space_alone(monkeypatch):
    import torch

    fractions = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fractions.append)
    monkeypatch.setattr(resource, "setrlimit", lambda *a: pytest.fail("RLIMIT_AS set on a cuda run"))
    applied = memory.apply_budget(8192, "cuda", gpu_total_mb=81920)
    assert fractions == [0.1]  # the same fraction JAX gets from gpu_budget_environment
    assert applied == {"gpu_memory_total_mb": 81920, "gpu_memory_budget_mb": 8192, "gpu_memory_fraction": 0.1}


def test_cuda_budget_without_a_visible_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        memory.apply_budget(8192, "cuda", gpu_total_mb=None)


def test_cpu_budget_is_still_the_address_space(monkeypatch):
    limits = []
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limit: limits.append((kind, limit)))
    applied = memory.apply_budget(1024, "cpu")
    assert limits and limits[0][0] == resource.RLIMIT_AS and "address_space_limit_mb" in applied


def test_flower_parties_share_the_runs_gpu_budget(monkeypatch):
    from privbench.training import cifar

    limits = []

    class Stop(Exception):
        pass

    monkeypatch.setattr(cifar, "set_device_memory_limit", lambda mb: limits.append(mb) or {})
    monkeypatch.setattr(cifar, "party_data", lambda *a: (_ for _ in ()).throw(Stop()))
    for parts in (1, 2):
        with pytest.raises(Stop):
            cifar.party_trainer({"gpu_memory_limit_mb": 16384}, "cuda", 0, parts, {})
    assert limits == [16384, 8192]  # two clients on one GPU hold what one run may


# --- out of memory or not: CUDA's messages ------------------------------------------------------

@pytest.mark.parametrize("text", [
    "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "RuntimeError: cuFFT error: CUFFT_ALLOC_FAILED",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.2GiB.",
])
def test_cuda_allocation_failures_are_oom(text):
    assert memory.looks_like_oom(text)


@pytest.mark.parametrize("text", [
    # a driver or context that did not start is the machine's error, not the batch size's
    "INTERNAL: failed initializing StreamExecutor for CUDA device ordinal 0: INTERNAL: failed call to "
    "cuDevicePrimaryCtxRetain: CUDA_ERROR_OUT_OF_MEMORY: out of memory; total memory reported: 85031714816",
    "RuntimeError: CUDA driver initialization failed, you might not have a CUDA gpu.",
    "RuntimeError: The NVIDIA driver on your system is too old (found version 11040); driver version is insufficient",
])
def test_cuda_start_failures_are_errors(text):
    assert not memory.looks_like_oom(text)


def test_xla_allocator_warning_does_not_make_a_run_oom():
    warning = ("W external/xla/xla/tsl/framework/bfc_allocator.cc:310] Allocator (GPU_0_bfc) ran out of memory "
               "trying to allocate 2.13GiB with freed_by_count=0. The caller indicates that this is not a failure, "
               "but this may mean that there could be performance gains if more memory were available.")
    result = {"status": "error", "message": "ValueError: shapes do not match"}
    assert harness._classify(result, False, 1, 60, [warning, "ValueError: shapes do not match"]) == (
        "error", "ValueError: shapes do not match")
    # nor a run that finished: the warning is no failure at all
    assert harness._classify({"status": "ok", "message": None}, False, 0, 60, [warning]) == ("ok", None)


# --- the record: the GPU the run used, its driver, the CUDA stack's versions --------------------

@pytest.mark.parametrize("visible, used", [(None, "0"), ("2", "2"), ("1,0", "1"), ("GPU-3333", "2"), ("", None)])
def test_visible_gpus_follow_cuda_visible_devices(visible, used):
    gpus = system.visible_gpus(SMI, visible)
    assert (gpus[0]["index"] if gpus else None) == used


def test_record_names_the_gpu_used_and_its_driver(monkeypatch):
    monkeypatch.setattr(system, "_nvidia_smi_gpus", lambda: SMI)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    described = system.describe_system()
    assert described["gpu"] == "NVIDIA A100-SXM4-40GB, 40960 MiB" and described["gpu_driver"] == "550.54.15"
    for library in ("jax-cuda13-plugin", "nvidia-cuda-runtime", "nvidia-cudnn-cu13"):
        assert library in described["libraries"]  # None where not installed
    monkeypatch.setattr(system, "_nvidia_smi_gpus", lambda: None)
    assert system.gpu_fields(system.visible_gpus()) == {"gpu": None, "gpu_driver": None}


# --- precision: one setting for both frameworks, on cuda only ------------------------------------

def test_precision_sets_both_frameworks_on_cuda():
    import jax
    import torch

    before = (jax.config.jax_default_matmul_precision, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    try:
        assert precision.apply("highest", "cpu") == {} and jax.config.jax_default_matmul_precision == before[0]
        assert precision.apply("highest", "cuda") == {"float32_precision": "highest"}
        assert jax.config.jax_default_matmul_precision == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
        precision.apply("tf32", "cuda")
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
        assert torch.backends.cudnn.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"
    finally:
        jax.config.update("jax_default_matmul_precision", before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
        torch.set_float32_matmul_precision(before[2])
        torch.backends.cuda.matmul.allow_tf32 = before[3]
    with pytest.raises(ValueError, match="unknown precision"):
        precision.apply("bf16", "cuda")


def test_precision_is_a_preset_setting_in_the_spec(tiny_config):
    assert tiny_config["run"]["precision"] == "highest"
    spec = harness.make_spec("throughput", "tiny", "r", {"model": "cnn"}, tiny_config["run"])
    tf32 = harness.make_spec("throughput", "tiny", "r", {"model": "cnn"}, {**tiny_config["run"], "precision": "tf32"})
    assert spec["config"]["spec_hash"] != tf32["config"]["spec_hash"]  # a changed precision is a new run


# --- the environment: said when the workflow starts, not by every run ---------------------------

def test_local_environment_without_jax_cuda_plugin_is_named(monkeypatch):
    installed = {"jax": "0.10.2", "torch": "2.14.1"}
    monkeypatch.setattr(local, "_version", installed.get)
    [problem] = runners.platform_problems({"platform": "cuda", "runner": {"kind": "local"}})
    assert "no CUDA plugin" in problem and "envs/requirements-cuda.txt" in problem
    assert runners.platform_problems({"platform": "cpu", "runner": {"kind": "local"}}) == []
    # a container runner brings the image's environment
    assert runners.platform_problems({"platform": "cuda", "runner": {"kind": "docker"}}) == []
    installed.update({"jax-cuda13-plugin": "0.10.2", "torch": "2.14.1+cpu"})
    [problem] = runners.platform_problems({"platform": "cuda", "runner": {"kind": "local"}})
    assert "CPU-only build" in problem


# --- the CUDA image: compiler packages at the lock's CUDA toolkit --------------------------------

def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_cuda_image_compiler_pins_match_the_locks_toolkit():
    lock = _pins(REPO_ROOT / "envs" / "constraints.txt")
    cuda = _pins(REPO_ROOT / "envs" / "requirements-cuda.txt")
    toolkit = lock["nvidia-cuda-runtime"].split(".")[:2]
    for package in ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm"):
        assert cuda[package].split(".")[:2] == toolkit, f"{package}=={cuda[package]} vs CUDA {'.'.join(toolkit)}"
    assert cuda["nvidia-cuda-nvcc"] == lock["nvidia-cuda-nvrtc"]  # one toolkit release
    assert cuda["jax-cuda13-plugin"] == cuda["jax-cuda13-pjrt"] == lock["jaxlib"]
