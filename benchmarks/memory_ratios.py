"""Flash Clipping against its speed and memory targets, printed (nothing is asserted).

    .venv/bin/python benchmarks/memory_ratios.py [--configfile config/config.yaml] [--rounds 1] [--out DIR]

Runs the methods of the preset's memory_profile section, each in its own
process through the harness as the workflow does (--rounds repeats them,
interleaved, and keeps each method's median time), then prints:
  - time per step and peak memory of every method, and their ratios to vanilla;
  - the targets: flash within 1.3x of vanilla's time per step and 1.15x of its
    peak memory, and its peak not above ghost clipping's;
  - where flash's time goes: its phases beside vanilla's, and for every linear
    layer of the model the route the one-pass module takes and the cost of each
    route (kept per-example gradients and their weighted sum; the norm
    sampler's chosen and other form and the product clipped sum), of Opacus'
    ghost norm, and of the weight gradient vanilla computes for it (timed in
    this process, best of --repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from privbench import config, harness, models  # noqa: E402
from privbench.experiments import memory_profile  # noqa: E402

TIME_TARGET, PEAK_TARGET = memory_profile.TARGETS["time_vs_vanilla"], memory_profile.TARGETS["peak_vs_vanilla"]


def run_methods(cfg: dict, out: Path, rounds: int) -> dict[str, list[dict]]:
    """Every method's metrics, one entry per round; a failed run is reported and left out."""
    runs: dict[str, list[dict]] = {}
    for round_ in range(rounds):
        for curve in memory_profile.curves(cfg).values():
            spec = memory_profile.make_run_spec(curve, curve["batch_start"])
            spec["run_id"] += f"-round{round_}"
            record = harness.run_isolated(spec, out / f"{spec['run_id']}.json")
            if record["status"] == "ok":
                runs.setdefault(curve["method"], []).append(record["metrics"])
            else:
                print(f"{curve['method']}: {record['status']} ({record['message']})")
    return runs


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def layer_costs(size: str, batch: int, repeats: int) -> list[tuple]:
    """Per linear layer (one of each shape): the one-pass route and milliseconds of each computation on random data."""
    import torch
    from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample

    from privbench.dp import flash

    rows = models.family(memory_profile.MODEL).SIZES[size]["seq_len"]
    model = models.build("torch", memory_profile.MODEL, size, 0)
    shapes = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            shapes.setdefault((layer.in_features, layer.out_features), (name, layer))
    out = []
    for (d, p), (name, layer) in shapes.items():
        a, g = torch.randn(batch, rows, d), torch.randn(batch, rows, p)
        coefficients = torch.rand(batch)
        chosen = flash.choose_form(rows, d, p)
        other = "direct" if chosen == "gram" else "gram"

        def per_example():  # the kept route: per-example gradients and their norms
            grads = compute_linear_grad_sample(layer, [a], g)
            return grads, {q: gs.reshape(batch, -1).norm(dim=1) for q, gs in grads.items()}

        grads, _ = per_example()
        out.append((
            name, d, p, "kept" if flash.per_example_fits(layer, [a], g) else chosen,
            best_ms(lambda: g.reshape(-1, p).T @ a.reshape(-1, d), repeats),
            best_ms(per_example, repeats),
            best_ms(lambda: flash._Kept(layer, [], None, grads, 1.0).clipped_sums(coefficients), repeats),
            best_ms(lambda: flash.per_sample_sq_norms(a, g, form=chosen), repeats),
            best_ms(lambda: flash.per_sample_sq_norms(a, g, form=other), repeats),
            best_ms(lambda: flash._Kept(layer, [a], g, None, 1.0).clipped_sums(coefficients), repeats),
            best_ms(lambda: compute_linear_norm_sample(layer, [a], g), repeats),
        ))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", default="config/config.yaml")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every method (median time kept)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per layer computation (best kept)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the records (default: a temporary one)")
    args = parser.parse_args()
    cfg = config.load(REPO / args.configfile)
    section = cfg[memory_profile.NAME]
    out = args.out or Path(tempfile.mkdtemp(prefix="privbench-memory-"))
    print(f"preset {cfg['preset']}: Transformer {section['size']}, batch {section['batch_size']}, "
          f"{section['timed_steps']} timed steps, {args.rounds} round(s); records in {out}")

    runs = run_methods(cfg, out, args.rounds)
    step_ms = {m: 1000 * statistics.median(r["mean_step_s"] for r in rs) for m, rs in runs.items()}
    peak_mb = {m: rs[0]["peak_memory_mb"] for m, rs in runs.items()}  # the same in every round
    vanilla_ms, vanilla_mb = step_ms.get("vanilla"), peak_mb.get("vanilla")
    print(f"\n{'method':16s} {'time/step ms':>13s} {'vs vanilla':>11s} {'peak MB':>9s} {'vs vanilla':>11s}")
    for method in runs:
        time_ratio = f"{step_ms[method] / vanilla_ms:.2f}x" if vanilla_ms else "-"
        peak_ratio = f"{peak_mb[method] / vanilla_mb:.2f}x" if vanilla_mb else "-"
        print(f"{method:16s} {step_ms[method]:13.1f} {time_ratio:>11s} {peak_mb[method]:9.1f} {peak_ratio:>11s}")

    if "flash" in runs and vanilla_ms:
        time_ratio, peak_ratio = step_ms["flash"] / vanilla_ms, peak_mb["flash"] / vanilla_mb
        print(f"\ntarget: flash time <= {TIME_TARGET}x vanilla: {time_ratio:.2f}x "
              f"({'met' if time_ratio <= TIME_TARGET else 'MISSED'})")
        print(f"target: flash peak <= {PEAK_TARGET}x vanilla: {peak_ratio:.2f}x "
              f"({'met' if peak_ratio <= PEAK_TARGET else 'MISSED'})")
        if "ghost" in runs:
            print(f"target: flash peak <= ghost peak: {peak_mb['flash']:.1f} MB vs {peak_mb['ghost']:.1f} MB "
                  f"({'met' if peak_mb['flash'] <= peak_mb['ghost'] else 'MISSED'})")
        for method in ("vanilla", "flash"):
            parts = {k: 1000 * statistics.median(r["part_times_s"][k] for r in runs[method])
                     for k in runs[method][0]["part_times_s"]}
            print(f"{method} phases (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))

    print(f"\nper linear layer, batch {section['batch_size']} x T (ms, best of {args.repeats}); vanilla computes "
          "the weight gradient; one-pass flash either keeps the per-example gradients (route 'kept': form them "
          "and their norms, later a weighted sum) or takes the norm sampler's form (gram/direct) and later a "
          "product of the kept input and output gradient:")
    print(f"{'layer':18s} {'d':>5s} {'p':>6s} {'route':>7s} {'weight grad':>12s} {'per-ex+norm':>12s} "
          f"{'weighted sum':>12s} {'flash norm':>12s} {'other form':>12s} {'product sum':>12s} {'ghost norm':>12s}")
    for name, d, p, route, *costs in layer_costs(section["size"], section["batch_size"], args.repeats):
        print(f"{name:18s} {d:5d} {p:6d} {route:>7s} " + " ".join(f"{c:12.1f}" for c in costs))


if __name__ == "__main__":
    main()
