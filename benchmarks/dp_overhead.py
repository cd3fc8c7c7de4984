"""Cost of the kit's fast DP-SGD (mode ``fast_dp``) against non-private
training, per workload and framework, on this machine (issue 13's targets).

For every (workload, framework) one process builds both trainers at the same
batch size and times them in alternation, step for step, so that both see
the same background load; throughput is batch / median step time. Memory is
measured apart, one fresh process per mode:

- ``tensor_memory``: the step's peak tensor memory, what the step itself needs.
  PyTorch: the bytes of every live tensor before a step (parameters, gradients,
  optimiser state, batch; each storage once) plus the peak of the CPU
  allocator's events during the step (privbench.profiling.StepMeter, as the
  memory page meters). JAX: the compiled update's memory analysis, argument +
  output + temporary bytes less what donation aliases.
- ``peak_rss``: the process's peak resident set (VmHWM) over a few steps after
  the warm-up, which the framework's own footprint dilutes (shown for reference).

A third trainer, timed in the same alternation, is fast_dp without noise
(noise std 0: nothing is drawn): ``clipping_ratio`` is its throughput over the
non-private one, the cost of the exact per-example clipping alone; the gap
between it and ``ratio`` is the Gaussian noise (one normal per parameter per
step, which on a CPU's generator costs a small model a fifth of its step).

One line per workload; the first six columns are the targets' figures:

    workload framework nonprivate_sps dp_sps ratio tensor_memory_ratio clipping_ratio nonprivate_tensor_mb dp_tensor_mb nonprivate_peak_rss_mb dp_peak_rss_mb

Targets: ratio >= 0.8 and tensor_memory_ratio <= 1.10 on every workload.
``--scaling`` prints a second table instead: the same two ratios for CNN and
Transformer in both frameworks at batch 8, 32 and 128 (small) and at sizes
small and medium (batch 32), to see whether the cost of DP grows with either.

    .venv/bin/python benchmarks/dp_overhead.py                       # everything, small, batch 32
    .venv/bin/python benchmarks/dp_overhead.py --workloads cnn --frameworks torch --rounds 3
    .venv/bin/python benchmarks/dp_overhead.py --scaling
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privbench.memory import keep_freed_memory  # noqa: E402 (imports no framework)

MODEL_WORKLOADS = ("cnn", "transformer", "state_space", "diffusion")
EFFICIENTNET = "efficientnet_b0"  # torch only: torchvision's, GroupNorm, 100 classes, 32x32 inputs
WORKLOADS = (*MODEL_WORKLOADS, EFFICIENTNET)
MODES = ("standard", "fast_dp")
CLIPPING_ONLY = "fast_dp_without_noise"  # timed beside the two modes
TIMED = (*MODES, CLIPPING_ONLY)
EFFICIENTNET_LEARNING_RATE = 1e-3  # Adam, as on the torch benchmarks page


def build_trainer(workload: str, framework: str, mode: str, size: str, batch: int, seed: int = 0):
    """An object with step() and sync(handle), for either mode or CLIPPING_ONLY."""
    if workload == EFFICIENTNET:
        return EfficientNetTrainer(mode, batch, seed)
    from privbench.training import make_trainer

    if mode == CLIPPING_ONLY:
        return make_trainer(framework, workload, size, "fast_dp", batch, settings={"noise_std": 0.0}, seed=seed)
    return make_trainer(framework, workload, size, mode, batch, seed=seed)


class EfficientNetTrainer:
    """EfficientNet-B0 as the torch benchmarks page trains it under DP (BatchNorm
    -> GroupNorm, SiLU out of place), on random 32x32 images, Adam; the same
    model in both modes so that the ratio is the cost of DP alone."""

    def __init__(self, mode: str, batch: int, seed: int):
        import numpy as np
        import torch
        import torch.nn.functional as F

        from privbench.training.cifar import build_model
        from privbench.training.dp_methods import builder

        self.model = build_model("opacus", seed)
        rng = np.random.default_rng(seed)
        self.images = torch.from_numpy(rng.standard_normal((batch, 3, 32, 32), dtype=np.float32))
        self.labels = torch.from_numpy(rng.integers(0, 100, batch))
        self.loss = F.cross_entropy
        optimizer = torch.optim.Adam(self.model.parameters(), lr=EFFICIENTNET_LEARNING_RATE)
        if mode in ("fast_dp", CLIPPING_ONLY):
            self.dp = builder("torch", "fast_dp")(self.model, optimizer, max_grad_norm=1.0,
                                                   noise_multiplier=0.0 if mode == CLIPPING_ONLY else 1.0,
                                                   noise_generator=torch.Generator().manual_seed(seed))
        else:
            self.dp, self.optimizer = None, optimizer

    def step(self):
        if self.dp is not None:
            return self.dp.step(self.loss, (self.images,), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def sync(self, handle) -> None:
        pass  # CPU: every step has finished when it returns


def _limit_threads(threads: int | None) -> None:
    """Before any framework import: torch's thread count; XLA has no flag for a count,
    only for one thread (its Eigen operations single-threaded), set when threads == 1."""
    if threads is None:
        return
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    import torch

    torch.set_num_threads(threads)


def time_both(workload, framework, size, batch, rounds, threads) -> dict:
    """Step times of both modes and of CLIPPING_ONLY, alternating one step of each per round."""
    _limit_threads(threads)
    keep_freed_memory()  # as every run of the workflow does (privbench.worker)
    trainers = {mode: build_trainer(workload, framework, mode, size, batch) for mode in TIMED}
    for trainer in trainers.values():  # warm-up: compilation, first-touch allocations
        trainer.sync(trainer.step())
    times = {mode: [] for mode in TIMED}
    for _ in range(rounds):
        for mode, trainer in trainers.items():
            start = time.perf_counter()
            trainer.sync(trainer.step())
            times[mode].append(time.perf_counter() - start)
    return times


def peak_memory(workload, framework, mode, size, batch, steps, threads) -> float:
    """Peak resident set (MB) of a fresh process over training steps of one mode.

    Both modes import the same libraries first (the DP mode's noise comes from
    jax-privacy); after the warm-up step the heap that compilation freed is
    handed back to the system and the peak reset, so that what is compared is
    the training step, not imports or the one-off compilation.
    """
    _limit_threads(threads)
    from privbench.memory import peak_rss_mb, reset_peak_rss

    __import__(f"privbench.dp.{framework}_engine")
    if framework == "jax":
        __import__("jax_privacy")
    trainer = build_trainer(workload, framework, mode, size, batch)
    trainer.sync(trainer.step())
    _release_freed_heap()
    reset_peak_rss()
    for _ in range(steps):
        trainer.sync(trainer.step())
    return peak_rss_mb()


def tensor_memory(workload, framework, mode, size, batch, threads) -> float:
    """Peak tensor memory (MB) of one training step of one mode, in a fresh process (see the module docstring)."""
    _limit_threads(threads)
    trainer = build_trainer(workload, framework, mode, size, batch)
    trainer.sync(trainer.step())  # compiled; optimiser state exists
    if framework == "jax":
        return trainer.compiled_memory_bytes() / 2**20
    import gc

    import torch

    from privbench.profiling import StepMeter, held_bytes

    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        live = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    start = sum(held_bytes({"live": live}).values())
    del live
    with StepMeter(torch.device("cpu"), start_bytes=start) as meter:
        with meter.section("step"):
            trainer.sync(trainer.step())
    return meter.sections[0].peak / 2**20


def _release_freed_heap() -> None:
    """glibc keeps freed heap mapped (counted in the resident set); give it back."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak then includes what the allocator kept


def in_fresh_process(function, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def measure(workload, framework, size, batch, rounds, threads, memory_steps) -> dict:
    """Both modes' throughput (alternated in one process), tensor memory and peak resident set."""
    times = in_fresh_process(time_both, workload, framework, size, batch, rounds, threads)
    sps = {mode: batch / statistics.median(times[mode]) for mode in TIMED}
    tensor_mb = {mode: in_fresh_process(tensor_memory, workload, framework, mode, size, batch, threads)
                 for mode in MODES}
    rss_mb = {mode: in_fresh_process(peak_memory, workload, framework, mode, size, batch, memory_steps, threads)
              for mode in MODES} if memory_steps else None
    return {"sps": sps, "ratio": sps["fast_dp"] / sps["standard"],
            "clipping_ratio": sps[CLIPPING_ONLY] / sps["standard"], "tensor_mb": tensor_mb,
            "tensor_memory_ratio": tensor_mb["fast_dp"] / tensor_mb["standard"], "rss_mb": rss_mb}


SCALING_WORKLOADS = ("cnn", "transformer")
SCALING_POINTS = (("small", 8), ("small", 32), ("small", 128), ("medium", 32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=None,
                        help="workloads to measure (default: all; with --scaling: cnn transformer)")
    parser.add_argument("--frameworks", nargs="+", choices=("jax", "torch"), default=["jax", "torch"],
                        help="frameworks to measure (EfficientNet-B0 is torch only)")
    parser.add_argument("--size", default="small", help="model size of the four model workloads")
    parser.add_argument("--batch", type=int, default=32, help="batch of the four model workloads")
    parser.add_argument("--efficientnet-batch", type=int, default=64, help="batch of EfficientNet-B0")
    parser.add_argument("--rounds", type=int, default=5, help="alternated timed steps per mode (median kept)")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps after warm-up when measuring the peak resident set (0: skip it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads; 1 also makes XLA single-threaded (default: the libraries' own)")
    parser.add_argument("--scaling", action="store_true",
                        help="the growth table: ratios at batch 8, 32, 128 (small) and sizes small, medium (batch 32)")
    args = parser.parse_args(argv)

    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} load average {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'default'}; sps = batch / median step time")
    if args.scaling:
        print("workload framework size batch ratio tensor_memory_ratio nonprivate_sps dp_sps clipping_ratio")
        for workload in args.workloads or SCALING_WORKLOADS:
            for framework in args.frameworks:
                for size, batch in SCALING_POINTS:
                    m = measure(workload, framework, size, batch, args.rounds, args.threads, memory_steps=0)
                    print(f"{workload} {framework} {size} {batch} {m['ratio']:.2f} {m['tensor_memory_ratio']:.2f} "
                          f"{m['sps']['standard']:.2f} {m['sps']['fast_dp']:.2f} {m['clipping_ratio']:.2f}", flush=True)
    else:
        print("workload framework nonprivate_sps dp_sps ratio tensor_memory_ratio clipping_ratio nonprivate_tensor_mb"
              " dp_tensor_mb nonprivate_peak_rss_mb dp_peak_rss_mb")
        for workload in args.workloads or WORKLOADS:
            for framework in args.frameworks:
                if workload == EFFICIENTNET and framework != "torch":
                    continue
                batch = args.efficientnet_batch if workload == EFFICIENTNET else args.batch
                m = measure(workload, framework, args.size, batch, args.rounds, args.threads, args.memory_steps)
                rss = (f"{m['rss_mb']['standard']:.0f} {m['rss_mb']['fast_dp']:.0f}" if m["rss_mb"] else "- -")
                print(f"{workload} {framework} {m['sps']['standard']:.2f} {m['sps']['fast_dp']:.2f} {m['ratio']:.2f} "
                      f"{m['tensor_memory_ratio']:.2f} {m['clipping_ratio']:.2f} "
                      f"{m['tensor_mb']['standard']:.1f} {m['tensor_mb']['fast_dp']:.1f} "
                      f"{rss}", flush=True)
    print(f"# finished {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
