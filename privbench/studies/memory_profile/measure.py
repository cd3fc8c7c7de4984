"""Page "Memory Profiling Analysis", worker side: one metered training step per method."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, ContextManager

from privbench import models
from privbench.training import dp_methods
from privbench.studies.measuring import import_framework
from privbench.studies.memory_profile.plan import MB, METHODS, MODEL, NO_OPACUS, PHASES, POINTS


def import_frameworks(spec: dict) -> None:
    from privbench.errors import require

    import_framework("torch")
    if spec["config"]["method"] not in NO_OPACUS:
        require("opacus")


class _Parts:
    """Runs the parts of a step, each inside ``bracket(key)`` (key "phase" or "phase: part").

    A part may be cut from inside while it runs (:meth:`cut`): the kit engine's
    backward phase is one call, cut by its phase observer where the norms are done.
    """

    def __init__(self, bracket: Callable[[str], ContextManager]):
        self._bracket = bracket
        self._phase: str | None = None
        self._open: ContextManager | None = None

    def run(self, phase: str, part: str, fn: Callable[[], object]) -> None:
        self._phase = phase
        self._enter(phase if part == phase else f"{phase}: {part}")
        try:
            fn()
        finally:
            self._exit()

    def cut(self, part: str) -> None:
        """End the running part here and go on as ``part`` of the same phase (no-op outside a part)."""
        if self._open is not None:
            self._exit()
            self._enter(f"{self._phase}: {part}")

    def _enter(self, key: str) -> None:
        self._open = self._bracket(key)
        self._open.__enter__()

    def _exit(self) -> None:
        opened, self._open = self._open, None
        opened.__exit__(None, None, None)


def _engine_observer():
    """The kit engine's phase observer as the page uses it (a subclass of its public ``PhaseObserver``)."""
    from privbench.dp.torch_engine import PhaseObserver

    class EngineMeter(PhaseObserver):
        """Cuts the engine's one backward call into the parts "norms" and "clipped sum" (at
        ``norms_done``) and, while a meter is set, makes each layer's norm computation a meter
        section of its own, noted in ``calls`` with the layer's route."""

        def __init__(self) -> None:
            self.parts: _Parts | None = None
            self.meter = None
            self.calls: list[dict] = []

        def norms_done(self) -> None:
            if self.parts is not None:
                self.parts.cut("clipped sum")

        @contextlib.contextmanager
        def layer_norms(self, name, module, route_label):
            if self.meter is None:
                yield
                return
            section = f"norm: {name}"
            self.calls.append({"layer": name, "type": type(module).__name__, "section": section,
                               "route": route_label})
            with self.meter.section(section):
                yield

    return EngineMeter()


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
    # The kit engine (fast_dp): its own three phases, what it holds, its phase observer.
    forward_fn: Callable | None = None  # () -> what the backward parts take
    step_fn: Callable | None = None  # () -> None, the optimiser step phase
    engine_kept: Callable = dict  # () -> {kind: tensors} the engine holds for the clipped sum
    observer: object = None  # the engine's EngineMeter (see _engine_observer)
    norm_form: Callable | None = None  # (layer, activations, backprops) -> the form a kit norm sampler takes

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def held(self, saved) -> dict[str, int]:
        """Bytes held now, per component (see COMPONENTS; "other" is left to the caller)."""
        from privbench.profiling import held_bytes

        params = list(self.model.parameters())
        optimizer = getattr(self.optimizer, "original_optimizer", self.optimizer)
        kept = self.engine_kept()
        return held_bytes({
            "parameters": params,
            "optimiser_state": [t for state in optimizer.state.values() for t in state.values()
                                if hasattr(t, "untyped_storage")],
            "gradients": [g for p in params for g in (p.grad, getattr(p, "summed_grad", None)) if g is not None],
            "per_example": [t for p in params for t in _per_example_tensors(p)] + kept.get("per_example", []),
            "inputs": [*self.inputs, self.targets],
            "saved_activations": saved.alive(),
            "hook_inputs": [t for m in self.model.modules() for inputs in getattr(m, "activations", [])
                            for t in inputs] + kept.get("inputs", []) + kept.get("output_grads", []),
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
    noise_multiplier = dp_methods.noise_multiplier(DEFAULT_SETTINGS["noise_std"], batch_size, clip)
    noise_generator = torch.Generator(device).manual_seed(seed)
    description.update(l2_clip_norm=clip, noise_multiplier=noise_multiplier, poisson_sampling=False)
    if method == "fast_dp":  # the model as the fast_dp training mode takes it (no Opacus fix-ups)
        return _engine_run(model, optimizer, family.loss_torch, inputs, targets, description, clip,
                           noise_multiplier, noise_generator)

    from torch.utils.data import DataLoader, TensorDataset

    from privbench.training.torch_steps import make_opacus_compatible

    model = make_opacus_compatible(model)
    norm_form = None
    if method == "flash_two_pass":
        from privbench.dp import opacus_norms, torch_rules

        opacus_norms.register()  # this process only: the run is isolated

        def norm_form(layer, activations, backprops):
            if type(layer) not in opacus_norms.NORM_SAMPLERS:
                return None  # one of Opacus' own samplers
            return torch_rules.RULES[type(layer)].route(layer, activations[0], backprops.shape).norm

    grad_sample_mode = "hooks" if method == "hooks" else "ghost"
    loader = DataLoader(TensorDataset(*inputs, targets), batch_size=batch_size)
    private = dp_methods.opacus_private(
        model, optimizer, loader, noise_multiplier=noise_multiplier, max_grad_norm=clip, poisson_sampling=False,
        grad_sample_mode=grad_sample_mode, criterion=torch.nn.CrossEntropyLoss(), noise_generator=noise_generator)
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
                     inputs, targets, description, norm_form=norm_form)


def _engine_run(model, optimizer, loss_fn, inputs, targets, description, clip, noise_multiplier,
                noise_generator) -> MethodRun:
    """The kit engine's step (``privbench.dp.torch_engine``, the fast_dp training mode) in its own phases.

    ``DPOptimizer.step`` is ``forward``, ``clipped_backward`` and ``noise_and_step``: the page runs
    these three as its forward, backward and optimiser step phases. The backward phase is cut, by
    the engine's phase observer, into "norms" (the one backward pass, every layer's per-example
    norms computed as autograd reaches it) and "clipped sum" (the book-keeping sums into ``.grad``).
    """
    observer = _engine_observer()
    dp = dp_methods.kit_private(model, optimizer, max_grad_norm=clip, noise_multiplier=noise_multiplier,
                                expected_batch_size=len(targets), noise_generator=noise_generator,
                                observer=observer)
    routes = dp.describe(loss_fn, inputs, targets)
    description.update(dp_layers=routes["dp_layers"], dp_methods=routes["dp_methods"],
                       dp_fallback=routes["dp_fallback"], grad_sample_mode=None)
    # "norms": the one call runs on past the norms; the observer cuts the part there.
    return MethodRun(model, model, optimizer, loss_fn, [("norms", dp.clipped_backward)], inputs, targets,
                     description, forward_fn=lambda: dp.forward(loss_fn, inputs, targets),
                     step_fn=dp.noise_and_step, engine_kept=dp.kept, observer=observer)


def _run_step(run: MethodRun, parts: _Parts, phase: Callable[[str], ContextManager] = contextlib.nullcontext) -> None:
    """One step, phase by phase inside ``phase(name)``, part by part through ``parts``."""
    state: dict = {}

    def forward():
        state["loss"] = (run.forward_fn() if run.forward_fn is not None
                         else run.loss_fn(run.module(*run.inputs), run.targets))

    def step():
        state.clear()
        (run.step_fn or run.optimizer.step)()

    if run.observer is not None:
        run.observer.parts = parts
    with phase("forward"):
        parts.run("forward", "forward", forward)
    with phase("backward"):
        for name, fn in run.backward_parts:
            parts.run("backward", name, lambda: fn(state["loss"]))
    with phase("step"):
        parts.run("step", "step", step)


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

    @contextlib.contextmanager
    def timed(key):
        started = time.perf_counter()
        yield
        sync()
        part_times.setdefault(key, []).append(time.perf_counter() - started)

    def step():
        run.zero_grad()
        _run_step(run, _Parts(timed))

    time_steps(step, sync, cfg["warmup_steps"], cfg["timed_steps"], metrics, progress)
    phases["warmup_s"] = metrics["warmup_s"]
    phases["timed_s"] = sum(metrics["step_times_s"])
    metrics.update(summarise(metrics["step_times_s"], cfg["batch_size"]))
    metrics["part_times_s"] = {key: statistics.fmean(times[cfg["warmup_steps"]:]) for key, times in part_times.items()}

    started = time.perf_counter()
    metrics.update(profile_step(run, device))
    phases["profile_s"] = time.perf_counter() - started
    progress(f"profiled one step in {phases['profile_s']:.1f} s: peak {metrics['peak_memory_mb']:.1f} MB "
             f"({metrics['memory_source']})")


def profile_step(run: MethodRun, device) -> dict:
    """Memory through one more step: levels, phase peaks, components, per-layer norm computations."""
    from privbench.profiling import SavedTensors, StepMeter

    run.zero_grad()
    saved = SavedTensors()
    held = {"start": run.held(saved)}
    meter = StepMeter(device, start_bytes=sum(held["start"].values()))
    norm_calls: list[dict] = []

    @contextlib.contextmanager
    def phase(name):
        with meter.section(name), (saved.tracking() if name == "forward" else contextlib.nullcontext()):
            yield
        held[f"after_{name}"] = run.held(saved)

    def part(key):  # a phase's single part is the phase's own section
        return meter.section(key) if ": " in key else contextlib.nullcontext()

    with meter, _metered_norms(run, meter, norm_calls):
        _run_step(run, _Parts(part), phase)
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
    return out


@contextlib.contextmanager
def _metered_norms(run: MethodRun, meter, calls: list):
    """Each per-layer norm computation of the step a meter section of its own, noted in ``calls``:
    through the kit engine's phase observer, or by wrapping the norm samplers in Opacus' registry."""
    if run.observer is not None:
        run.observer.meter, run.observer.calls = meter, calls
        try:
            yield
        finally:
            run.observer.meter = None
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
            noted = {"layer": names[layer], "type": type(layer).__name__, "section": section,
                     "input_shape": list(activations[0].shape), "output_grad_shape": list(backprops.shape)}
            form = run.norm_form(layer, activations, backprops) if run.norm_form else None
            calls.append({**noted, "form": form} if form else noted)
            with meter.section(section):
                return sampler(layer, activations, backprops)
        return call

    registry.update({layer_type: metered(sampler) for layer_type, sampler in original.items()})
    try:
        yield
    finally:
        registry.clear()
        registry.update(original)
