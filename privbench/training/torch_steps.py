"""PyTorch training steps; the DP mode is Opacus with its published defaults."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from privbench import models
from privbench.training import dp_methods

# torch.optim.AdamW's own default, recorded in the description because it
# differs from optax.adamw's (1e-4); the published code used each default.
WEIGHT_DECAY = 1e-2



class RepeatedBatch(Dataset):
    """One fixed batch repeated ``copies`` times, as the published Opacus runs fed
    Opacus (sample rate 1 / copies, expected batch B), without copying it:
    example i is the batch's example i mod B."""

    def __init__(self, tensors: tuple, copies: int):
        self._tensors = tensors
        self._batch = len(tensors[0])
        self._copies = copies

    def __len__(self) -> int:
        return self._batch * self._copies

    def __getitem__(self, index: int) -> tuple:
        return tuple(t[index % self._batch] for t in self._tensors)


def make_opacus_compatible(module: torch.nn.Module) -> torch.nn.Module:
    """Opacus' own fix-ups (e.g. BatchNorm -> GroupNorm), then its check.

    ModuleValidator.fix first clones the module by pickling it, which fails for
    classes defined inside functions (as the kit's lazily-imported models are);
    for a module that is already valid, fix would return an unchanged clone,
    so it is only called when there is something to fix.
    """
    from opacus.validators import ModuleValidator

    if not ModuleValidator.is_valid(module):
        module = ModuleValidator.fix(module)
    ModuleValidator.validate(module, strict=True)
    return module


def clipped_grad_sum_torch(
    module, loss_fn, inputs, targets, max_grad_norm, grad_sample_mode="hooks"
) -> list[torch.Tensor]:
    """Sum over the batch of per-example gradients clipped to ``max_grad_norm``,
    before noise, one tensor per trainable parameter of ``module`` (which must
    already be Opacus-compatible, see :func:`make_opacus_compatible`).

    Uses the same Opacus pieces make_private assembles: a grad-sample wrapper
    for per-example gradients and DPOptimizer.clip_and_accumulate, which leaves
    the clipped sum in ``p.summed_grad``.
    """
    from opacus.grad_sample import prepare_module
    from opacus.optimizers import DPOptimizer

    dp_methods.check_grad_sample_mode(grad_sample_mode)
    dp_methods.fix_opacus_channels_last_conv()
    params = [p for p in module.parameters() if p.requires_grad]
    wrapped = prepare_module(
        module, grad_sample_mode, batch_first=True, loss_reduction="mean"
    )
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(targets),
        loss_reduction="mean",
    )
    try:
        loss_fn(wrapped(*inputs), targets).backward()
        optimizer.clip_and_accumulate()
        return [p.summed_grad.detach().clone() for p in params]
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped.cleanup()  # leaves ``module`` as it was, without hooks


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainer:
    mode: str  # "standard" or a DP method of privbench.training.dp_methods

    def sync(self, handle) -> None:
        _synchronize(self._device)

    def _build(self, model, size, batch_size, seed, device, variant) -> None:
        """The model and one fixed synthetic batch, on ``device``."""
        family = models.family(model)
        self._device = torch.device(device)
        self._loss = family.loss_torch
        self._variant = variant
        self._module = models.build("torch", model, size, seed, variant).to(self._device)
        inputs, targets = family.synthetic_batch(size, batch_size, "torch", seed)
        self._inputs = tuple(x.to(self._device) for x in inputs)
        self._targets = targets.to(self._device)

    def param_arrays(self) -> list[np.ndarray]:
        """Host copies of the current parameters (for checks, not timing)."""
        return [p.detach().cpu().numpy().copy() for p in self._module.parameters()]

    def _describe(self, model, size, batch_size, module, settings, microbatch_size=None, **dp):
        return {
            "framework": "torch",
            "model": model,
            "size": size,
            "model_variant": self._variant,
            "mode": self.mode,
            "batch_size": batch_size,
            "param_count": models.count_params("torch", module),
            "device": str(self._device),
            "learning_rate": settings["learning_rate"],
            "weight_decay": WEIGHT_DECAY,
            "microbatch_size": microbatch_size,
            **dp,
        }


class StandardTrainer(_Trainer):
    """Gradient of the mean loss on one in-memory batch, AdamW."""

    def __init__(self, *, mode, model, size, batch_size, microbatch_size, settings, seed, device, variant):
        self.mode = mode
        self._build(model, size, batch_size, seed, device, variant)
        self._optimizer = torch.optim.AdamW(
            self._module.parameters(), lr=settings["learning_rate"]
        )
        self.description = self._describe(
            model, size, batch_size, self._module, settings,
            grad_sample_mode=None, l2_clip_norm=None, noise_std_effective=0.0,
        )

    def step(self):
        self._optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self._module(*self._inputs), self._targets)
        loss.backward()
        self._optimizer.step()
        return loss.detach()


class ClippedTrainer(_Trainer):
    """Opacus make_private (per-example clipping, Gaussian noise, Poisson
    sampling by default) around AdamW, fed from an in-memory data set.

    With a microbatch size, Opacus' BatchMemoryManager splits every logical
    batch into physical batches of at most that many examples, whose clipped
    gradients are summed before the one noisy update of the logical batch.
    """

    def __init__(self, *, mode, model, size, batch_size, microbatch_size, settings, seed, device, variant):
        self.mode = mode
        from opacus.utils.batch_memory_manager import wrap_data_loader

        grad_sample_mode = settings["grad_sample_mode"]
        family = models.family(model)
        self._device = torch.device(device)
        self._loss = family.loss_torch
        self._variant = variant
        module = make_opacus_compatible(models.build("torch", model, size, seed, variant))
        module = module.to(self._device)
        inputs, targets = family.synthetic_batch(size, batch_size, "torch", seed)
        copies = settings["opacus_batches"]
        dataset = RepeatedBatch((*(x.to(self._device) for x in inputs), targets.to(self._device)), copies)
        # The DPDataLoader that make_private builds inherits this generator, so
        # the Poisson sampling is seeded without touching torch's global RNG.
        loader = DataLoader(
            dataset, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
        )
        clip = settings["l2_clip_norm"]
        # std noise_std on the mean clipped gradient, as on the JAX side
        noise_multiplier = dp_methods.noise_multiplier(settings["noise_std"], batch_size, clip)
        self._module, self._optimizer, self._loader = dp_methods.builder("torch", self.mode)(
            module,
            torch.optim.AdamW(module.parameters(), lr=settings["learning_rate"]),
            loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip,
            poisson_sampling=settings["poisson_sampling"],
            grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator(self._device).manual_seed(seed),
        )
        if microbatch_size is not None:
            # The loader BatchMemoryManager hands out in its `with` block; the
            # trainer outlives any block, so it keeps the loader itself.
            self._loader = wrap_data_loader(
                data_loader=self._loader, max_batch_size=microbatch_size, optimizer=self._optimizer
            )
        self._batches = iter(self._loader)
        self.description = self._describe(
            model, size, batch_size, module, settings,
            microbatch_size=microbatch_size,
            grad_sample_mode=grad_sample_mode,
            l2_clip_norm=clip,
            noise_std_effective=noise_multiplier * clip / self._optimizer.expected_batch_size,
            noise_multiplier=noise_multiplier,
            poisson_sampling=settings["poisson_sampling"],
            sample_rate=1 / copies,
        )

    def _next_batch(self):
        # Cycle through the in-memory data set; each pass is one Opacus epoch.
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self._loader)
            return next(self._batches)

    def step(self):
        # One update: physical batches until the optimiser has stepped. Before
        # the last physical batch of a logical one, Opacus only clips and
        # accumulates (and flags the step as skipped); without a microbatch
        # size every batch is the last.
        while True:
            *inputs, targets = self._next_batch()
            self._optimizer.zero_grad(set_to_none=True)
            loss = self._loss(self._module(*inputs), targets)
            loss.backward()
            self._optimizer.step()
            if not self._optimizer._is_last_step_skipped:
                return loss.detach()


class FastDPTrainer(_Trainer):
    """Training mode ``fast_dp`` (torch): AdamW on one fixed in-memory batch,
    per-example clipping by the kit's engine, noise of std noise_std on the
    averaged gradient (as in the clipped mode), its routes in the description."""

    def __init__(self, *, mode, model, size, batch_size, microbatch_size, settings, seed, device, variant):
        self.mode = mode
        self._build(model, size, batch_size, seed, device, variant)
        clip = settings["l2_clip_norm"]
        noise_multiplier = dp_methods.noise_multiplier(settings["noise_std"], batch_size, clip)
        self._dp = dp_methods.builder("torch", self.mode)(
            self._module,
            torch.optim.AdamW(self._module.parameters(), lr=settings["learning_rate"]),
            max_grad_norm=clip, noise_multiplier=noise_multiplier, expected_batch_size=batch_size,
            noise_generator=torch.Generator(self._device).manual_seed(seed))
        self.description = self._describe(
            model, size, batch_size, self._module, settings,
            grad_sample_mode=None, l2_clip_norm=clip,
            noise_std_effective=noise_multiplier * clip / batch_size,
            noise_multiplier=noise_multiplier, poisson_sampling=False,
            **self._dp.describe(self._loss, self._inputs, self._targets))

    def step(self):
        return self._dp.step(self._loss, self._inputs, self._targets)
