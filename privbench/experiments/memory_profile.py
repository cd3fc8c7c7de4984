"""Page "Memory Profiling Analysis": where DP-SGD's memory goes, step by step.

One training step of the kit's Transformer under each method, every method a
run of its own (one process, one record):

    vanilla         no DP: mean loss, backward, AdamW
    hooks           Opacus make_private, grad_sample_mode="hooks" (per-example gradients)
    ghost           Opacus make_private, grad_sample_mode="ghost" (ghost norms, two backward passes)
    flash           the kit's Flash Clipping (privbench.dp.flash): tiled exact norms, one backward pass
    flash_two_pass  the flash norm samplers registered in Opacus, inside its unchanged ghost path
    fast_dp         the kit's fast DP-SGD (privbench.dp.fast_torch): one backward pass to the layer
                    outputs, per-layer norms and clipped sums by the cheapest exact route

Each run times its steps, then profiles one more step: the memory held at
the start and after each phase (forward, backward, optimiser step), the peak
inside each phase, what the held memory consists of at each of those points,
and the memory around every per-layer norm computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from privbench import harness, models
from privbench.report import charts, pages, tables

NAME = "memory_profile"
TITLE = "Memory Profiling Analysis"
PAGE = "memory_profiling_analysis.md"
PUBLISHED = "memory_profiling_analysis"

MODEL = "transformer"
METHODS = ("vanilla", "hooks", "ghost", "flash", "flash_two_pass", "fast_dp")
NO_OPACUS = ("vanilla", "fast_dp")  # methods whose runs do not use Opacus
METHOD_LABELS = {
    "vanilla": "Vanilla (no DP)",
    "hooks": "Opacus hooks (per-example gradients)",
    "ghost": "Ghost Clipping (Opacus)",
    "flash": "Flash Clipping (kit, one backward pass)",
    "flash_two_pass": "Flash norms in Opacus' ghost path (two backward passes)",
    "fast_dp": "Fast DP-SGD (kit)",
}
SHORT_LABELS = {"vanilla": "vanilla", "hooks": "hooks", "ghost": "ghost", "flash": "flash\n(one pass)",
                "flash_two_pass": "flash norms\n(two passes)", "fast_dp": "fast DP-SGD\n(kit)"}  # chart ticks
PHASES = ("forward", "backward", "step")
POINTS = ("start", "after_forward", "after_backward", "after_step")
POINT_LABELS = {"start": "start", "after_forward": "after forward", "after_backward": "after backward",
                "after_step": "after optimiser step"}
# What the held memory consists of, in the order a shared storage is attributed.
COMPONENTS = {
    "parameters": "parameters",
    "optimiser_state": "optimiser state",
    "gradients": "gradients",
    "per_example": "per-example norms or gradients",
    "inputs": "input batch",
    "saved_activations": "activations saved by autograd",
    "hook_inputs": "layer inputs (fast DP-SGD: and outputs) kept only by the DP hooks",
    "other": "other (outputs, loss, temporaries)",
}
MB = 2**20


# --------------------------------------------------------------------------- plan

def curves(config: dict) -> dict[str, dict]:
    section = config[NAME]
    out = {}
    for method in section["methods"]:
        curve_id = f"{method}-{section['size']}"
        out[curve_id] = {
            "curve_id": curve_id, "experiment": NAME, "preset": config["preset"], "platform": config["platform"],
            "runner": config["runner"], "limits": config["run"], "method": method, "size": section["size"],
            "batch_start": section["batch_size"], "batch_cap": section["batch_size"],  # a single run
            "warmup_steps": section["warmup_steps"], "timed_steps": section["timed_steps"],
        }
    return out


def make_run_spec(curve: dict, batch: int) -> dict:
    limits = dict(curve["limits"])
    config = {key: curve[key] for key in ("method", "size", "warmup_steps", "timed_steps")}
    config.update(model=MODEL, framework="torch", batch_size=batch, seed=limits.pop("seed"))
    return harness.make_spec(NAME, curve["preset"], f"{curve['curve_id']}-b{batch}", config, limits,
                             curve["platform"])


# --------------------------------------------------------------------------- worker side

def import_frameworks(spec: dict) -> None:
    from privbench.errors import require
    from privbench.experiments import import_framework

    import_framework("torch")
    if spec["config"]["method"] not in NO_OPACUS:
        require("opacus")


@dataclasses.dataclass
class MethodRun:
    """One method's model, optimiser and step, split into the phases that are measured."""

    model: object  # the plain torch module (its parameters)
    module: object  # what the batch goes through (the model or Opacus' wrapper)
    optimizer: object
    loss_fn: Callable  # (outputs, targets) -> what the backward parts take
    backward_parts: list  # [(name, fn(loss))]: the backward phase, in parts where a method has them
    inputs: tuple
    targets: object
    description: dict
    # Where a method's step is not "module, loss_fn, backward parts, optimizer.step()" (fast_dp):
    forward_fn: Callable | None = None  # () -> what the backward parts take
    step_fn: Callable | None = None  # () -> None, the optimiser step phase
    hook_tensors: Callable = list  # () -> tensors the method's own hooks keep (beyond Opacus' and flash's)
    metered_norms: Callable | None = None  # (meter, calls) -> context metering its per-layer norms

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def held(self, saved) -> dict[str, int]:
        """Bytes held now, per component (see COMPONENTS; "other" is left to the caller)."""
        from privbench.profiling import held_bytes

        params = list(self.model.parameters())
        optimizer = getattr(self.optimizer, "original_optimizer", self.optimizer)
        kept = getattr(self.module, "kept", [])  # flash: what each layer keeps for the clipped sum
        return held_bytes({
            "parameters": params,
            "optimiser_state": [t for state in optimizer.state.values() for t in state.values()
                                if hasattr(t, "untyped_storage")],
            "gradients": [g for p in params for g in (p.grad, getattr(p, "summed_grad", None)) if g is not None],
            "per_example": [t for p in params for t in _per_example_tensors(p)]
                           + [t for k in kept for t in [k.backprops, *(k.grad_samples or {}).values()] if t is not None],
            "inputs": [*self.inputs, self.targets],
            "saved_activations": saved.alive(),
            "hook_inputs": [t for m in self.model.modules() for inputs in getattr(m, "activations", [])
                            for t in inputs] + [t for k in kept for t in k.activations] + self.hook_tensors(),
        })


def _per_example_tensors(param) -> list:
    found = []
    for name in ("grad_sample", "_current_grad_sample", "_norm_sample"):
        value = getattr(param, name, None)
        found.extend(value if isinstance(value, list) else [value] if value is not None else [])
    return found


def build_method(method: str, size: str, batch_size: int, seed: int, device) -> MethodRun:
    """Model, optimiser and step of one method; DP settings are the kit's published defaults."""
    import torch

    from privbench.training import DEFAULT_SETTINGS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    family = models.family(MODEL)
    inputs, targets = family.synthetic_batch(size, batch_size, "torch", seed)
    inputs, targets = tuple(x.to(device) for x in inputs), targets.to(device)
    model = models.build("torch", MODEL, size, seed).to(device)
    lr, clip = DEFAULT_SETTINGS["learning_rate"], DEFAULT_SETTINGS["l2_clip_norm"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    description = {"model": MODEL, "size": size, "method": method, "batch_size": batch_size,
                   "param_count": models.count_params("torch", model), "device": str(device),
                   "learning_rate": lr, "l2_clip_norm": None, "noise_multiplier": None}
    if method == "vanilla":
        return MethodRun(model, model, optimizer, family.loss_torch, [("backward", lambda loss: loss.backward())],
                         inputs, targets, description)

    # DP: the noise of the kit's other pages (std noise_std on the mean clipped
    # gradient); a fixed batch (no Poisson sampling), so that every method's
    # memory is measured on the same batch.
    noise_multiplier = DEFAULT_SETTINGS["noise_std"] * batch_size / clip
    noise_generator = torch.Generator(device).manual_seed(seed)
    description.update(l2_clip_norm=clip, noise_multiplier=noise_multiplier, poisson_sampling=False)
    if method == "fast_dp":  # the model as the fast_dp training mode takes it (no Opacus fix-ups)
        return _fast_dp_run(model, optimizer, family.loss_torch, inputs, targets, description, clip,
                            noise_multiplier, noise_generator)

    from opacus.optimizers import DPOptimizerFastGradientClipping

    from privbench.dp import flash
    from privbench.training.torch_steps import make_opacus_compatible

    model = make_opacus_compatible(model)
    if method == "flash":
        module = flash.GradSampleModuleFlashClipping(model, max_grad_norm=clip)
        optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=noise_multiplier,
                                                    max_grad_norm=clip, expected_batch_size=batch_size,
                                                    generator=noise_generator)
        parts = [("norms", module.norms_backward), ("clipped sum", lambda _loss: module.accumulate_clipped_grads())]
        return MethodRun(model, module, optimizer, family.loss_torch, parts, inputs, targets, description,
                         metered_norms=lambda meter, calls: _metered_flash_layers(module, model, meter, calls))

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if method == "flash_two_pass":
        flash.register()  # this process only: the run is isolated
    grad_sample_mode = "hooks" if method == "hooks" else "ghost"
    loader = DataLoader(TensorDataset(*inputs, targets), batch_size=batch_size)
    private = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=grad_sample_mode,
        criterion=torch.nn.CrossEntropyLoss(), noise_generator=noise_generator)
    description["grad_sample_mode"] = grad_sample_mode
    if grad_sample_mode == "hooks":
        module, optimizer, _ = private
        loss_fn = family.loss_torch
    else:
        module, optimizer, criterion, _ = private

        def loss_fn(outputs, targets):
            # shape: Opacus averages each sequence's token losses into one loss per example.
            return criterion(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), shape=outputs.shape[:2])
    return MethodRun(model, module, optimizer, loss_fn, [("backward", lambda loss: loss.backward())],
                     inputs, targets, description)


@contextlib.contextmanager
def _instead(obj, name: str, replacement):
    """``obj.name`` is ``replacement`` inside the block (an attribute of this one object)."""
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        delattr(obj, name)


def _fast_dp_run(model, optimizer, loss_fn, inputs, targets, description, clip, noise_multiplier,
                 noise_generator) -> MethodRun:
    """The fast_dp training mode's step (``privbench.dp.fast_torch``), unchanged, in the page's three phases.

    ``FastDPOptimizer.step`` is one call: ``FastClipper.clipped_grad_sum`` (the forward pass with every
    layer's input and output recorded by forward hooks; one backward pass, to the layer outputs only;
    per layer, the per-example squared norms and then the clipped sum, without a second pass), then
    the noise, the averaging and the AdamW step. Here the clipper's forward pass runs as the forward
    phase; ``clipped_grad_sum`` runs as the backward phase, handed that forward pass's loss instead of
    running its own; its clipped sums are left in ``.grad`` (where Opacus' ghost path leaves them) and
    ``FastDPOptimizer.step`` runs as the optimiser step phase, handed those sums: noise, averaging,
    AdamW. Nothing of the step is re-implemented: the phases are cut at the boundaries of its own calls.
    """
    import torch

    from privbench.dp.fast_torch import make_private_fast

    dp = make_private_fast(model, optimizer, max_grad_norm=clip, noise_multiplier=noise_multiplier,
                           expected_batch_size=len(targets), noise_generator=noise_generator)
    clipper = dp.clipper
    routes = dp.describe(loss_fn, inputs, targets)
    description.update(dp_methods=routes["dp_methods"], dp_fallback=routes["dp_fallback"],
                       grad_sample_mode=None)

    def forward():
        return clipper._forward(loss_fn, tuple(inputs), targets)

    def backward(loss):
        with _instead(clipper, "_forward", lambda *_: loss):
            sums, _ = clipper.clipped_grad_sum(loss_fn, inputs, targets)
        for param, total in zip(clipper.params, sums):
            param.grad = total

    def step():
        sums = [p.grad if p.grad is not None else torch.zeros_like(p) for p in clipper.params]
        with _instead(clipper, "clipped_grad_sum", lambda *_: (sums, None)):
            dp.step(loss_fn, inputs, targets)

    def recorded():  # each layer's input and output, kept by the clipper's hooks until its sums are made
        return [t for layer in clipper._layers for call in layer.calls
                for t in (*call.args, call.output) if isinstance(t, torch.Tensor)]

    return MethodRun(model, model, optimizer, loss_fn, [("backward", backward)], inputs, targets, description,
                     forward_fn=forward, step_fn=step, hook_tensors=recorded,
                     metered_norms=lambda meter, calls: _metered_fast_dp_rules(clipper, meter, calls))


@contextlib.contextmanager
def _metered_fast_dp_rules(clipper, meter, calls: list):
    """Each layer's norm computation in the fast DP-SGD step as a meter section of its own (its route noted)."""
    layers = clipper._layers
    original = [layer.rule for layer in layers]

    class Metered:
        def __init__(self, rule, layer):
            self.rule, self.layer = rule, layer

        def __getattr__(self, name):
            return getattr(self.rule, name)

        def norms(self, module, x, g, method):
            section = f"norm: {self.layer.name}"
            calls.append({"layer": self.layer.name, "type": type(module).__name__, "section": section,
                          "route": method, "input_shape": list(x.shape), "output_grad_shape": list(g.shape)})
            with meter.section(section):
                return self.rule.norms(module, x, g, method)

    for layer in layers:
        if layer.rule is not None:
            layer.rule = Metered(layer.rule, layer)
    try:
        yield
    finally:
        for layer, rule in zip(layers, original):
            layer.rule = rule


@contextlib.contextmanager
def _metered_flash_layers(module, model, meter, calls: list):
    """Each layer's norm computation in the one-pass flash step as a meter section of its own (its route noted)."""
    from privbench.dp.flash import NORM_SAMPLERS

    names = {layer: name for name, layer in model.named_modules()}
    layer_norms = module.layer_norms

    def metered(layer, activations, backprops):
        section = f"norm: {names[layer]}"
        route = module.route(layer, activations, backprops)
        call = {"layer": names[layer], "type": type(layer).__name__, "section": section, "route": route,
                "input_shape": list(activations[0].shape), "output_grad_shape": list(backprops.shape)}
        if route == "per_example":  # a flash layer (Linear, Conv2d) or one of Opacus' grad samplers (LayerNorm)
            call["flash_form"] = "direct, kept" if type(layer) in NORM_SAMPLERS else "per-example gradients"
        elif not (call["type"] == "Linear" and activations[0].dim() == 3):  # profile_step names a linear form
            call["flash_form"] = "norm sampler"
        calls.append(call)
        with meter.section(section):
            return layer_norms(layer, activations, backprops)

    with _instead(module, "layer_norms", metered):
        yield


def _phase_functions(run: MethodRun) -> list[tuple[str, list[tuple[str, Callable]]]]:
    """(phase, [(part, fn)]) in order; the parts of one step share the loss through ``state``."""
    state: dict = {}

    def forward():
        state["loss"] = (run.forward_fn() if run.forward_fn is not None
                         else run.loss_fn(run.module(*run.inputs), run.targets))

    def backward_part(fn):
        return lambda: fn(state["loss"])

    def step():
        state.clear()
        if run.step_fn is not None:
            run.step_fn()
        else:
            run.optimizer.step()

    return [("forward", [("forward", forward)]),
            ("backward", [(name, backward_part(fn)) for name, fn in run.backward_parts]),
            ("step", [("step", step)])]


def measure(spec: dict, metrics: dict, phases: dict, progress) -> None:
    import torch

    from privbench.timing import summarise, time_steps

    cfg = spec["config"]
    device = torch.device("cuda" if spec["platform"] == "cuda" else "cpu")

    def sync(_handle=None) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    run = build_method(cfg["method"], cfg["size"], cfg["batch_size"], cfg["seed"], device)
    metrics.update(run.description)
    phases["setup_s"] = time.perf_counter() - t0
    progress(f"{cfg['method']}: model and optimiser built in {phases['setup_s']:.1f} s; "
             f"{cfg['warmup_steps']} warm-up, {cfg['timed_steps']} timed steps at batch {cfg['batch_size']}")

    part_times: dict[str, list[float]] = {}

    def step():
        run.zero_grad()
        for phase, parts in _phase_functions(run):
            for part, fn in parts:
                started = time.perf_counter()
                fn()
                sync()
                key = phase if part == phase else f"{phase}: {part}"
                part_times.setdefault(key, []).append(time.perf_counter() - started)

    time_steps(step, sync, cfg["warmup_steps"], cfg["timed_steps"], metrics, progress)
    phases["warmup_s"] = metrics["warmup_s"]
    phases["timed_s"] = sum(metrics["step_times_s"])
    metrics.update(summarise(metrics["step_times_s"], cfg["batch_size"]))
    metrics["part_times_s"] = {key: statistics.fmean(times[cfg["warmup_steps"]:]) for key, times in part_times.items()}

    started = time.perf_counter()
    metrics.update(profile_step(run, cfg["method"], device))
    phases["profile_s"] = time.perf_counter() - started
    progress(f"profiled one step in {phases['profile_s']:.1f} s: peak {metrics['peak_memory_mb']:.1f} MB "
             f"({metrics['memory_source']})")


def profile_step(run: MethodRun, method: str, device) -> dict:
    """Memory through one more step: levels, phase peaks, components, per-layer norm computations."""
    from privbench.profiling import SavedTensors, StepMeter

    run.zero_grad()
    saved = SavedTensors()
    held = {"start": run.held(saved)}
    meter = StepMeter(device, start_bytes=sum(held["start"].values()))
    norm_calls: list[dict] = []
    with meter, _metered_norm_samplers(run, meter, norm_calls):
        for phase, parts in _phase_functions(run):
            with meter.section(phase), (saved.tracking() if phase == "forward" else contextlib.nullcontext()):
                for part, fn in parts:
                    with meter.section(f"{phase}: {part}") if part != phase else contextlib.nullcontext():
                        fn()
            held[f"after_{phase}"] = run.held(saved)
    sections = {s.name: s for s in meter.sections}
    levels = {"start": meter.start, **{f"after_{p}": sections[p].after for p in PHASES}}
    peak_phase = max(PHASES, key=lambda p: sections[p].peak)
    out = {
        "memory_source": meter.source,
        "peak_memory_mb": sections[peak_phase].peak / MB,
        "peak_phase": peak_phase,
        "timeline_mb": {point: levels[point] / MB for point in POINTS},
        "phase_peak_mb": {p: sections[p].peak / MB for p in PHASES},
        "part_levels_mb": {name: {"before": s.before / MB, "after": s.after / MB, "peak": s.peak / MB}
                           for name, s in sections.items() if ": " in name},
        "norm_calls": [{**call, "before_mb": sections[call["section"]].before / MB,
                        "peak_mb": sections[call["section"]].peak / MB} for call in norm_calls],
    }
    for point in POINTS:
        components = {key: value / MB for key, value in held[point].items()}
        components["other"] = levels[point] / MB - sum(components.values())
        out[f"components_{point}_mb"] = components
    if method in ("flash", "flash_two_pass"):
        from privbench.dp.flash import choose_form

        for call in out["norm_calls"]:
            if call["type"] == "Linear" and len(call["input_shape"]) == 3 and "flash_form" not in call:
                _, rows, d = call["input_shape"]
                call["flash_form"] = choose_form(rows, d, call["output_grad_shape"][-1])
    return out


@contextlib.contextmanager
def _metered_norm_samplers(run: MethodRun, meter, calls: list):
    """Wrap the norm samplers the run's module uses so that each call is a meter section of its own."""
    if run.metered_norms is not None:
        with run.metered_norms(meter, calls):
            yield
        return
    registry = getattr(run.module, "NORM_SAMPLERS", None)
    if registry is None:  # no norm samplers: vanilla, hooks
        yield
        return
    names = {module: name for name, module in run.model.named_modules()}
    original = dict(registry)

    def metered(sampler):
        def call(layer, activations, backprops):
            section = f"norm: {names[layer]}"
            calls.append({"layer": names[layer], "type": type(layer).__name__, "section": section,
                          "input_shape": list(activations[0].shape), "output_grad_shape": list(backprops.shape)})
            with meter.section(section):
                return sampler(layer, activations, backprops)
        return call

    registry.update({layer_type: metered(sampler) for layer_type, sampler in original.items()})
    try:
        yield
    finally:
        registry.clear()
        registry.update(original)


# --------------------------------------------------------------------------- report

TARGETS = {"time_vs_vanilla": 1.3, "peak_vs_vanilla": 1.15}  # the kit's own goals for flash clipping on CPU
GRAM_ITEMSIZE = 4  # float32: the kit's models train in float32


def breakdown_chart_name(size: str) -> str:
    return f"memory_breakdown_{size}.png"


def timeline_chart_name(size: str) -> str:
    return f"memory_timeline_{size}.png"


def page_outputs(config: dict) -> list[str]:
    size, assets = config[NAME]["size"], Path(config["assets_dir"])
    return [str(Path(config["docs_dir"]) / PAGE), str(assets / breakdown_chart_name(size)),
            str(assets / timeline_chart_name(size))]


def _timeline_chart(results: dict[str, dict], title: str, path: Path) -> None:
    fig, ax = charts.plt.subplots(figsize=(7.5, 4.2))
    for i, (method, metrics) in enumerate(results.items()):
        color = f"C{i % 10}"
        ax.plot(range(len(POINTS)), [metrics["timeline_mb"][p] for p in POINTS], marker="o", color=color,
                label=METHOD_LABELS[method])
        ax.scatter([k + 0.5 for k in range(len(PHASES))], [metrics["phase_peak_mb"][p] for p in PHASES],
                   marker="^", facecolors="none", edgecolors=color, s=60, zorder=5)
    ax.set_xticks([0, 0.5, 1, 1.5, 2, 2.5, 3],
                  ["start", "forward\n(peak)", "after\nforward", "backward\n(peak)", "after\nbackward",
                   "step\n(peak)", "after\nstep"], fontsize=8)
    ax.set_ylabel("memory held by tensors (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    charts.save(fig, path)


def _breakdown_chart(results: dict[str, dict], title: str, path: Path) -> None:
    points = ("after_forward", "after_backward")
    fig, ax = charts.plt.subplots(figsize=(max(8, 1.5 * len(results) + 1), 4.5))
    width = 0.38
    for i, (method, metrics) in enumerate(results.items()):
        for j, point in enumerate(points):
            x, bottom = i + (j - 0.5) * width, 0.0
            for k, (component, label) in enumerate(COMPONENTS.items()):
                value = max(0.0, metrics[f"components_{point}_mb"][component])
                ax.bar(x, value, width * 0.95, bottom=bottom, color=f"C{k}", label=label if i == j == 0 else None)
                bottom += value
            ax.text(x, bottom, "F" if point == "after_forward" else "B", ha="center", va="bottom", fontsize=7)
        ax.hlines(metrics["peak_memory_mb"], i - width, i + width, colors="black", linestyles="--",
                  label="peak of the step" if i == 0 else None)
    ax.set_xticks(range(len(results)), [SHORT_LABELS[m] for m in results], fontsize=8)
    ax.set_ylabel("MB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    charts.save(fig, path)


def _mb(value) -> str:
    """Megabytes, with enough decimals for the tiny preset's small figures to differ."""
    return tables.fmt(value, 1 if tables.is_missing(value) or abs(value) >= 10 else 3)


def _mb_change(value: float) -> str:
    return ("+" if value >= 0 else "-") + _mb(abs(value))


def _forward_lines(results: dict[str, dict]) -> tuple[list[str], dict]:
    """Question 1, per DP method: extra memory after forward and at the peak, against vanilla."""
    vanilla = results["vanilla"]
    lines, facts = [], {"forward_equal": True, "peaks_in_backward": True, "max_hook_inputs": 0.0,
                        "more": [], "fast_dp": "fast_dp" in results}
    for method, metrics in results.items():
        if method == "vanilla":
            continue
        extra_forward = metrics["timeline_mb"]["after_forward"] - vanilla["timeline_mb"]["after_forward"]
        hook_inputs = metrics["components_after_forward_mb"]["hook_inputs"]
        same = abs(extra_forward) <= 0.01 * vanilla["timeline_mb"]["after_forward"]
        facts["forward_equal"] &= same
        if not same and extra_forward > 0:
            facts["more"].append(METHOD_LABELS[method])
        facts["peaks_in_backward"] &= metrics["peak_phase"] == "backward"
        facts["max_hook_inputs"] = max(facts["max_hook_inputs"], hook_inputs)
        held = []
        if metrics["components_after_backward_mb"]["per_example"] > 0.01 * metrics["peak_memory_mb"]:
            held.append(f"per-example gradients after the backward pass: "
                        f"{_mb(metrics['components_after_backward_mb']['per_example'])} MB")
        norm_pass = metrics["part_levels_mb"].get("backward: norms")
        if norm_pass:
            held.append(f"held when its norm pass ends (what each layer keeps for the clipped sum: its per-example "
                        f"gradients, or its input and output gradient): {_mb(norm_pass['after'])} MB")
        kept = "layer inputs and outputs" if method == "fast_dp" else "layer inputs"
        lines.append(f"{METHOD_LABELS[method]}: after the forward pass {_mb_change(extra_forward)} MB against vanilla "
                     f"({kept} kept only by the hooks: {_mb(hook_inputs)} MB); peak "
                     f"{_mb_change(metrics['peak_memory_mb'] - vanilla['peak_memory_mb'])} MB against vanilla, reached "
                     f"in the {metrics['peak_phase']} phase" + "".join(f"; {h}" for h in held) + ".")
    return lines, facts


def _gram_facts(metrics: dict) -> dict | None:
    """Question 2, from the ghost run: the memory around each call of Opacus' linear norm sampler."""
    calls = [c for c in metrics["norm_calls"] if c["type"] == "Linear" and len(c["input_shape"]) == 3]
    if not calls:
        return None
    highest = max(calls, key=lambda c: c["peak_mb"])
    n, rows, _ = highest["input_shape"]
    return {
        "calls": len(calls),
        "max_rise_mb": max(c["peak_mb"] - c["before_mb"] for c in calls),
        "gram_mb": n * rows * rows * GRAM_ITEMSIZE / MB,
        "rows": rows, "batch": n,
        "highest_layer": highest["layer"], "highest_mb": highest["peak_mb"],
        "step_peak_mb": metrics["peak_memory_mb"],
        "sets_peak": highest["peak_mb"] >= metrics["peak_memory_mb"] - 1e-6,
        "lowest_start_mb": min(c["before_mb"] for c in calls),
        "after_forward_mb": metrics["timeline_mb"]["after_forward"],
    }


def _flash_norm_facts(results: dict[str, dict]) -> dict | None:
    """The flash norm samplers' calls on linear layers (the two-pass run first: there every linear layer uses one)."""
    for method in ("flash_two_pass", "flash"):
        if method in results:
            calls = [c for c in results[method]["norm_calls"]
                     if c["type"] == "Linear" and c.get("route", "norm_sampler") == "norm_sampler"]
            if calls:
                forms = sorted({c.get("flash_form") for c in calls if c.get("flash_form")})
                return {"method": METHOD_LABELS[method], "max_rise_mb": max(c["peak_mb"] - c["before_mb"] for c in calls),
                        "forms": ", ".join(forms)}
    return None


def _flash_routes(metrics: dict) -> str:
    """The one-pass flash run's route per layer type, e.g. "9 Linear: direct, kept; 5 LayerNorm: per-example"."""
    counts: dict[tuple[str, str], int] = {}
    for call in metrics["norm_calls"]:
        form = call.get("flash_form", call.get("route"))
        counts[call["type"], form] = counts.get((call["type"], form), 0) + 1
    return "; ".join(f"{n} {layer_type}: {form}" for (layer_type, form), n in counts.items())


def _fast_dp_facts(metrics: dict) -> dict:
    """The fast DP-SGD run: the route of each layer's norm and the memory around those computations."""
    calls = metrics["norm_calls"]
    routes: dict[str, int] = {}
    for call in calls:
        routes[call["route"]] = routes.get(call["route"], 0) + 1
    return {
        "routes": ", ".join(f"{route} {n}" for route, n in sorted(routes.items())) or metrics.get("dp_methods", ""),
        "calls": len(calls),
        "max_rise_mb": max((c["peak_mb"] - c["before_mb"] for c in calls), default=None),
        "fallback": metrics.get("dp_fallback") or [],
    }


def report(config: dict, table_path: str | Path) -> None:
    from privbench import records
    from privbench.dp.flash import TILE

    section = config[NAME]
    frame = pd.read_csv(table_path)
    published = pages.published(PUBLISHED)
    assets_dir, docs_dir = Path(config["assets_dir"]), Path(config["docs_dir"])
    by_method = {row["method"]: row for _, row in frame.iterrows()}
    ordered = [m for m in METHODS if m in by_method]
    results = {m: records.read_record(by_method[m]["record_path"])["metrics"]
               for m in ordered if by_method[m]["status"] == "ok"}
    vanilla = results.get("vanilla")

    def status_or(method: str, text: str) -> str:
        status = by_method[method]["status"]
        return text if status == "ok" else tables.STATUS_LABELS[status]

    summary_rows = []
    for method in ordered:
        ref = published["methods"].get(method, {})
        ref_vanilla = published["methods"]["vanilla"]
        metrics = results.get(method)
        row = [METHOD_LABELS[method], tables.fmt(ref.get("peak_memory_mb")), tables.fmt(ref.get("step_ms")),
               tables.fmt_ratio(ref["peak_memory_mb"] / ref_vanilla["peak_memory_mb"] if ref else None),
               tables.fmt_ratio(ref["step_ms"] / ref_vanilla["step_ms"] if ref else None)]
        if metrics is None:
            row += [status_or(method, "")] + ["-"] * 3
        else:
            row += [_mb(metrics["peak_memory_mb"]), tables.fmt(1000 * metrics["mean_step_s"], 1),
                    tables.fmt_ratio(metrics["peak_memory_mb"] / vanilla["peak_memory_mb"] if vanilla else None),
                    tables.fmt_ratio(metrics["mean_step_s"] / vanilla["mean_step_s"] if vanilla else None)]
        summary_rows.append(row)

    timeline_rows, time_rows, component_rows = [], [], []
    for method, metrics in results.items():
        timeline_rows.append([METHOD_LABELS[method], _mb(metrics["timeline_mb"]["start"]),
                              *[f"{_mb(metrics['phase_peak_mb'][p])} / {_mb(metrics['timeline_mb'][f'after_{p}'])}"
                                for p in PHASES], metrics["peak_phase"]])
        parts = metrics["part_times_s"]
        backward = sum(v for k, v in parts.items() if k.startswith("backward"))
        split = [f"{k.split(': ')[1]} {1000 * v:.1f}" for k, v in parts.items() if k.startswith("backward: ")]
        time_rows.append([METHOD_LABELS[method], tables.fmt(1000 * parts["forward"], 1),
                          tables.fmt(1000 * backward, 1) + (f" ({', '.join(split)})" if split else ""),
                          tables.fmt(1000 * parts["step"], 1), tables.fmt(1000 * metrics["mean_step_s"], 1)])
        for point in ("after_forward", "after_backward"):
            component_rows.append([METHOD_LABELS[method], POINT_LABELS[point],
                                   *[_mb(metrics[f"components_{point}_mb"][c]) for c in COMPONENTS]])

    targets = None
    if {"vanilla", "flash"} <= set(results):
        flash = results["flash"]
        targets = {
            "time_ratio": flash["mean_step_s"] / vanilla["mean_step_s"],
            "peak_ratio": flash["peak_memory_mb"] / vanilla["peak_memory_mb"],
            "ghost_peak_mb": results["ghost"]["peak_memory_mb"] if "ghost" in results else None,
            "flash_peak_mb": flash["peak_memory_mb"],
        }

    title = f"{models.DISPLAY_NAMES[MODEL]} {section['size']}, batch {section['batch_size']}"
    if results:
        _timeline_chart(results, f"{title}: memory through one step", assets_dir / timeline_chart_name(section["size"]))
        _breakdown_chart(results, f"{title}: what the memory holds after forward (F) and after backward (B)",
                         assets_dir / breakdown_chart_name(section["size"]))
    else:  # every run failed: the page says so, the charts say so
        for name in (timeline_chart_name(section["size"]), breakdown_chart_name(section["size"])):
            fig, ax = charts.plt.subplots(figsize=(6, 2))
            ax.text(0.5, 0.5, "no successful run", ha="center", va="center")
            ax.axis("off")
            charts.save(fig, assets_dir / name)

    forward_lines, forward_facts = _forward_lines(results) if vanilla else ([], None)
    any_metrics = next(iter(results.values()), None)
    spec = models.family(MODEL).SIZES[section["size"]]
    context = {
        "title": TITLE,
        "mb": _mb,
        "preset": config["preset"],
        "published": published,
        "system": pages.system_rows(frame),
        "runs": len(frame),
        "status_summary": ", ".join(f"{n} {status}" for status, n in frame.status.value_counts().items()),
        "failures": [f"{METHOD_LABELS[m]}: {tables.STATUS_LABELS[by_method[m]['status']]} "
                     f"({by_method[m]['message']})" for m in ordered if by_method[m]["status"] != "ok"],
        "methods": [(METHOD_LABELS[m], m) for m in ordered],
        "size": section["size"], "batch_size": section["batch_size"], "seq_len": spec["seq_len"],
        "hidden": spec["hidden"], "layers": spec["layers"], "vocab_size": spec["vocab_size"],
        "params": tables.params_label(int(any_metrics["param_count"])) if any_metrics else "not measured",
        "warmup_steps": section["warmup_steps"], "timed_steps": section["timed_steps"],
        "memory_source": any_metrics["memory_source"] if any_metrics else "not measured",
        "on_cuda": config["platform"] == "cuda",
        "noise_multiplier": next((m["noise_multiplier"] for m in results.values() if m.get("noise_multiplier")), None),
        "memory_budget_mb": config["run"]["memory_budget_mb"], "timeout_s": config["run"]["timeout_s"],
        "summary_table": tables.markdown_table(
            ["Method", "Published peak (MB)", "Published time/step (ms)", "Published peak vs vanilla",
             "Published time vs vanilla", "Reproduced peak (MB)", "Reproduced time/step (ms)",
             "Reproduced peak vs vanilla", "Reproduced time vs vanilla"], summary_rows),
        "timeline_table": tables.markdown_table(
            ["Method", "Start (MB)", "Forward: peak / end (MB)", "Backward: peak / end (MB)",
             "Optimiser step: peak / end (MB)", "Peak in"], timeline_rows),
        "time_table": tables.markdown_table(
            ["Method", "Forward (ms)", "Backward (ms)", "Optimiser step (ms)", "Whole step (ms)"], time_rows),
        "component_table": tables.markdown_table(["Method", "When", *COMPONENTS.values()], component_rows),
        "timeline_chart": timeline_chart_name(section["size"]),
        "breakdown_chart": breakdown_chart_name(section["size"]),
        "forward_lines": forward_lines,
        "forward_facts": forward_facts,
        "vanilla": vanilla,
        "gram": _gram_facts(results["ghost"]) if "ghost" in results else None,
        "flash_norms": _flash_norm_facts(results),
        "flash_routes": _flash_routes(results["flash"]) if "flash" in results else None,
        "fast_dp": _fast_dp_facts(results["fast_dp"]) if "fast_dp" in results else None,
        "fast_dp_label": METHOD_LABELS["fast_dp"],
        "tile": TILE,
        "targets": targets,
        "target_limits": TARGETS,
        "pass_times": ({m: f"{1000 * results[m]['mean_step_s']:.1f} ms" if m in results else None
                        for m in ("ghost", "flash", "flash_two_pass", "fast_dp")}
                       if {"ghost", "flash", "flash_two_pass"} <= set(results) else None),
    }
    pages.render("memory_profiling_analysis.md.j2", context, docs_dir / PAGE)
