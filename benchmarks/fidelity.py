"""What the harmonisation of the models changes: throughput of the published
variant against the harmonized one (privbench.models.VARIANTS), per model,
framework and mode, on this machine.

For every (model, framework) one fresh process builds the trainers of both
variants and times them alternately, in rounds (published, harmonized,
published, ...), each round one block of steps dispatched back to back and
synchronised once at its end, as the published benchmark timed its steps
(privbench.timing.time_blocks); throughput is batch / the median over rounds
of the time per step. The JAX CNN is the same program in both variants: its
ratio is the measurement's own noise. One line per (model, framework, mode):

    model framework mode published_sps harmonized_sps published/harmonized

    .venv/bin/python benchmarks/fidelity.py                       # every model, small, batch 32
    .venv/bin/python benchmarks/fidelity.py --models cnn --frameworks torch --rounds 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privbench import memory, models  # noqa: E402  (after the path line, for a fresh clone)

MODES = ("standard", "clipped")


def time_variants(model: str, framework: str, mode: str, size: str, batch: int, rounds: int,
                  steps: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, one block of ``steps`` steps per variant and round."""
    from privbench.timing import time_blocks
    from privbench.training import make_trainer

    trainers = {variant: make_trainer(framework, model, size, mode, batch, model_variant=variant)
                for variant in models.VARIANTS}
    for trainer in trainers.values():  # warm-up: compilation, first-touch allocations
        trainer.sync(trainer.step())
    per_step = {variant: [] for variant in models.VARIANTS}
    for _ in range(rounds):
        for variant, trainer in trainers.items():
            metrics = {}
            time_blocks(trainer.step, trainer.sync, 0, steps, 0.0, 1, metrics, lambda _: None)
            per_step[variant].append(metrics["block_times_s"][0] / metrics["block_steps"][0])
    return per_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=models.MODELS, default=list(models.MODELS))
    parser.add_argument("--frameworks", nargs="+", choices=models.FRAMEWORKS, default=list(models.FRAMEWORKS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (the median is kept; >= 3)")
    parser.add_argument("--steps", type=int, default=10, help="back-to-back steps per round")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")

    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; "
          f"size {args.size}, batch {args.batch}, {args.rounds} alternating rounds of {args.steps} steps; "
          "sps = batch / median time per step")
    print("model framework mode published_sps harmonized_sps published/harmonized")
    # One fresh process per configuration: no compilation cache or allocator state shared.
    context = multiprocessing.get_context("spawn")
    for model in args.models:
        for framework in args.frameworks:
            for mode in args.modes:
                with context.Pool(1) as pool:
                    try:
                        per_step = pool.apply(time_variants, (model, framework, mode, args.size, args.batch,
                                                              args.rounds, args.steps))
                    except Exception as exc:  # noqa: BLE001 - a failed configuration is a row, not the end
                        oom = memory.looks_like_oom(f"{type(exc).__name__}: {exc}")
                        print(f"{model} {framework} {mode} - - {'oom' if oom else 'error'}: "
                              f"{str(exc).splitlines()[0][:120]}", flush=True)
                        continue
                sps = {variant: args.batch / statistics.median(times) for variant, times in per_step.items()}
                print(f"{model} {framework} {mode} {sps['published']:.2f} {sps['harmonized']:.2f} "
                      f"{sps['published'] / sps['harmonized']:.2f}", flush=True)
    print(f"# finished {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
