"""The kit's DP engine against vanilla training and Opacus' ghost clipping, printed (nothing is asserted).

    .venv/bin/python benchmarks/memory_ratios.py [--configfile config/config.yaml] [--rounds 7] [--threads N]

On the memory page's model and batch (the preset's ``memory_profile`` section:
the Transformer, its size and batch), in this one process:
  - time per step of every method, in alternating rounds (vanilla, kit,
    ghost, vanilla, ...; the machine may be loaded by others, so only ratios
    measured side by side mean something): the median step time, and the
    median over rounds of each round's ratio to that round's vanilla step;
  - peak tensor memory of one step of every method (privbench.profiling.StepMeter:
    the CPU allocator's events, or CUDA's counters), above what the run holds
    before the step (parameters, gradients, optimiser state, batch);
  - the targets of issue 12 for the kit: <= 1.10x vanilla's time per step and
    <= 1.05x its peak tensor memory;
  - where the kit's step goes: its norm time per route (the engine's phase hooks).
Methods: ``vanilla`` (forward, backward, AdamW), ``kit`` (privbench.dp.torch_engine,
one backward pass), ``ghost`` (Opacus' fast gradient clipping, two backward
passes) and ``ghost_kit_norms`` (the same with the kit's norm samplers,
privbench.dp.opacus_norms).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from privbench import models, studies  # noqa: E402
from privbench.dp import opacus_norms, torch_engine  # noqa: E402
from privbench.memory import keep_freed_memory  # noqa: E402
from privbench.profiling import StepMeter, held_bytes  # noqa: E402

MODEL = "transformer"
TIME_TARGET, PEAK_TARGET = 1.10, 1.05
CLIP, NOISE_MULTIPLIER = 1.0, 1.0


class RouteTimer(torch_engine.PhaseObserver):
    """Seconds of norm computation per route label, summed over the layers."""

    def __init__(self):
        self.seconds = collections.Counter()

    @contextlib.contextmanager
    def layer_norms(self, name, module, route_label):
        started = time.perf_counter()
        yield
        self.seconds[route_label] += time.perf_counter() - started


def build(method: str, size: str, batch: int):
    """(step function, module, optimizer, batch tensors, the kit's DPOptimizer or None) of one method,
    on a fresh model."""
    from privbench.training import dp_methods

    family = models.family(MODEL)
    model = models.build("torch", MODEL, size, seed=0)
    inputs, targets = family.synthetic_batch(size, batch, "torch", seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    if method == "vanilla":
        def step():
            optimizer.zero_grad(set_to_none=True)
            family.loss_torch(model(*inputs), targets).backward()
            optimizer.step()
        return step, model, optimizer, (*inputs, targets), None
    if method == "kit":
        dp = torch_engine.make_private(model, optimizer, max_grad_norm=CLIP, noise_multiplier=NOISE_MULTIPLIER,
                                       expected_batch_size=batch, noise_generator=generator)
        return (lambda: dp.step(family.loss_torch, inputs, targets)), model, optimizer, (*inputs, targets), dp
    # Opacus' ghost path: the criterion runs the two backward passes.
    from torch.utils.data import DataLoader, TensorDataset

    module, dp_optimizer, criterion, _ = dp_methods.opacus_private(
        model, optimizer, DataLoader(TensorDataset(*inputs, targets), batch_size=batch),
        noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode="ghost",
        criterion=torch.nn.CrossEntropyLoss(), noise_generator=generator)

    def step():
        dp_optimizer.zero_grad(set_to_none=True)
        logits = module(*inputs)
        criterion(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), shape=logits.shape[:2]).backward()
        dp_optimizer.step()
    return step, module, dp_optimizer, (*inputs, targets), None


def peak_bytes(step, module, optimizer, batch_tensors, _dp=None) -> int:
    """Most bytes tensors hold during one step, above what is held before it."""
    step()  # optimiser state exists from the first step on
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    params = list(module.parameters())
    start = sum(held_bytes({"params": params, "grads": [p.grad for p in params if p.grad is not None],
                            "state": state, "batch": batch_tensors}).values())
    with StepMeter(torch.device("cpu"), start_bytes=start) as meter:
        with meter.section("step"):
            step()
    return meter.sections[0].peak - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", default="config/config.yaml")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--methods", default="vanilla,kit,ghost,ghost_kit_norms")
    args = parser.parse_args()
    keep_freed_memory()  # as every run of the workflow does (privbench.worker)
    if args.threads:
        torch.set_num_threads(args.threads)
    section = studies.load(REPO / args.configfile)["memory_profile"]
    size, batch = section["size"], section["batch_size"]
    methods = args.methods.split(",")
    print(f"{MODEL} {size}, batch {batch}, {torch.get_num_threads()} threads, {args.rounds} rounds")

    built, peaks = {}, {}
    for method in methods:
        with opacus_norms.registered() if method == "ghost_kit_norms" else contextlib.nullcontext():
            built[method] = build(method, size, batch)
            peaks[method] = peak_bytes(*built[method])
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for method in methods:
            with opacus_norms.registered() if method == "ghost_kit_norms" else contextlib.nullcontext():
                started = time.perf_counter()
                built[method][0]()
                times[method].append(time.perf_counter() - started)

    step_ms = {m: 1000 * statistics.median(t) for m, t in times.items()}
    # Each round's ratio to the vanilla step of the same round, median over rounds:
    # steadier than a ratio of medians when the machine's load drifts.
    ratio = {m: statistics.median(t / v for t, v in zip(times[m], times["vanilla"])) for m in methods}
    print(f"\n{'method':16s} {'time/step ms':>13s} {'vs vanilla':>11s} {'peak MB':>9s} {'vs vanilla':>11s}")
    for method in methods:
        print(f"{method:16s} {step_ms[method]:13.1f} {ratio[method]:10.2f}x "
              f"{peaks[method] / 2**20:9.1f} {peaks[method] / peaks['vanilla']:10.2f}x")
    if "kit" in methods:
        time_ratio, peak_ratio = ratio["kit"], peaks["kit"] / peaks["vanilla"]
        for what, ratio, target in (("time", time_ratio, TIME_TARGET), ("peak", peak_ratio, PEAK_TARGET)):
            print(f"target: kit {what} <= {target}x vanilla: {ratio:.2f}x ({'met' if ratio <= target else 'MISSED'})")
        family = models.family(MODEL)
        inputs, targets = family.synthetic_batch(size, batch, "torch", seed=1)
        dp = built["kit"][-1]
        print("kit routes: " + dp.describe(family.loss_torch, inputs, targets)["dp_methods"])
        dp.observer = timer = RouteTimer()
        dp.step(family.loss_torch, inputs, targets)
        print("kit norm time per route (ms, one step): "
              + ", ".join(f"{label} {1000 * s:.1f}" for label, s in sorted(timer.seconds.items())))

if __name__ == "__main__":
    main()
