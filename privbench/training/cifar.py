"""EfficientNet-B0 on CIFAR-100, one party's training (page "Torch benchmarks").

The same trainer serves a centralised run and each client of a federated
one. Methods:

    standard          plain PyTorch: torchvision's model as it is
    opacus            DP-SGD with Opacus, per-sample gradients by hooks;
                      BatchNorm -> GroupNorm (ModuleValidator.fix)
    fast_dp           the same DP-SGD update as opacus (the same model, clip norm,
                      noise multiplier, Poisson-sampled batches and accountant)
                      by the kit's own fast DP-SGD
                      (privbench.training.dp_methods.kit_private)
    expanded_weights  DP-SGD with Opacus grad_sample_mode="ew" (torch's expanded
                      weights), BatchNorm -> Identity: the method of the
                      discontinued BastionLab server, measured as its stand-in

All use Adam and the published learning rate; images stay 32x32 (no resizing).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privbench.timing import time_steps
from privbench.training import dp_methods
from privbench.training.torch_steps import make_opacus_compatible

METHODS = ("standard", "opacus", "fast_dp", "expanded_weights")
# method -> (Opacus grad_sample_mode, None: the kit's fast DP-SGD; what replaces BatchNorm)
DP_METHODS = {"opacus": ("hooks", "group_norm"), "fast_dp": (None, "group_norm"),
              "expanded_weights": ("ew", "identity")}

# CIFAR-100 training-set channel means and standard deviations.
CHANNEL_MEAN = (0.5071, 0.4865, 0.4409)
CHANNEL_STD = (0.2673, 0.2564, 0.2762)


def build_model(method: str, seed: int) -> nn.Module:
    """torchvision's EfficientNet-B0 for 100 classes, adapted to the method's DP library."""
    from torchvision.models import efficientnet_b0

    torch.manual_seed(seed)
    model = efficientnet_b0(weights=None, num_classes=100)
    if method not in DP_METHODS:
        return model
    for module in model.modules():
        if isinstance(module, nn.SiLU):
            module.inplace = False  # per-sample-gradient hooks need the activations kept
    if DP_METHODS[method][1] == "identity":
        _replace_batch_norm(model)
    return make_opacus_compatible(model)  # BatchNorm -> GroupNorm where any is left


def _replace_batch_norm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _replace_batch_norm(child)


def partition(count: int, subset: int | None, parts: int, index: int, seed: int) -> np.ndarray:
    """Indices of one party's share: a seeded shuffle, cut to ``subset``, split in ``parts``."""
    order = np.random.default_rng(seed).permutation(count)[: subset or count]
    return np.array_split(order, parts)[index]


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Privacy budget of ``steps`` Poisson-sampled DP-SGD steps, from Opacus' accountant."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


class LocalTrainer:
    """Model, optimiser and data loader of one party; ``model`` is the plain module."""

    def __init__(self, method: str, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 settings: dict, device: str, seed: int):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        self.method, self.settings = method, settings
        self.device = torch.device(device)
        self.model = build_model(method, seed).to(self.device)
        self._mean = torch.tensor(CHANNEL_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CHANNEL_STD, device=self.device).view(1, 3, 1, 1)
        self._fast_dp = None
        data = TensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))
        loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.Adam(self.model.parameters(), lr=settings["learning_rate"])
        self.description = {"method": method, "train_examples": len(labels),
                            "param_count": sum(p.numel() for p in self.model.parameters()),
                            "learning_rate": settings["learning_rate"]}
        if method == "fast_dp":
            self._make_private_kit(loader, optimizer, images, labels, batch_size, seed)
        elif method in DP_METHODS:
            grad_sample_mode = DP_METHODS[method][0]
            self._module, self._optimizer, self._loader = dp_methods.opacus_private(
                self.model, optimizer, loader, poisson_sampling=True, accountant=settings["accountant"],
                noise_multiplier=settings["noise_multiplier"], max_grad_norm=settings["l2_clip_norm"],
                grad_sample_mode=grad_sample_mode)
            self.description.update(grad_sample_mode=grad_sample_mode, norm_layers=DP_METHODS[method][1],
                                    noise_multiplier=settings["noise_multiplier"],
                                    l2_clip_norm=settings["l2_clip_norm"])
        else:
            self._module, self._optimizer, self._loader = self.model, optimizer, loader
        self.steps_per_epoch = len(self._loader)
        self._batches = iter(self._loader)

    def _make_private_kit(self, loader, optimizer, images, labels, batch_size: int, seed: int) -> None:
        """DP-SGD by the kit's fast clipping, sampled and scaled as Opacus'
        make_private does: Poisson-sampled batches (sample rate 1 / batches per
        epoch), the noisy sum divided by the expected batch size."""
        from opacus.data_loader import DPDataLoader

        s = self.settings
        self._module, self._optimizer = self.model, optimizer
        self._loader = DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(seed))
        self._fast_dp = dp_methods.kit_private(
            self.model, optimizer, max_grad_norm=s["l2_clip_norm"], noise_multiplier=s["noise_multiplier"],
            expected_batch_size=int(len(labels) * self._loader.sample_rate),
            noise_generator=torch.Generator(self.device).manual_seed(seed))
        # the layers' routes at this batch shape, for the record (one forward pass, no gradient)
        first = torch.from_numpy(images[:batch_size]).permute(0, 3, 1, 2)
        routes = self._fast_dp.describe(F.cross_entropy, (self._normalise(first),),
                                        torch.from_numpy(labels[:batch_size]).to(self.device))
        self.description.update(dp_engine="privbench.dp.torch_engine", norm_layers=DP_METHODS["fast_dp"][1],
                                noise_multiplier=s["noise_multiplier"], l2_clip_norm=s["l2_clip_norm"],
                                **routes)

    def privacy(self) -> dict:
        """Epsilon after one epoch (one pass over this party's data) at the configured delta."""
        if self.method not in DP_METHODS:
            return {}
        s = self.settings
        return {"epsilon": epsilon(s["noise_multiplier"], self._loader.sample_rate, self.steps_per_epoch,
                                   s["delta"], s["accountant"]),
                "delta": s["delta"], "accountant": s["accountant"], "sample_rate": self._loader.sample_rate}

    def _normalise(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs.to(self.device).float().div_(255) - self._mean) / self._std

    def _train_on(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self._normalise(inputs)
        if self._fast_dp is not None:  # clipped sum, noise and the optimiser's step in one call
            return self._fast_dp.step(F.cross_entropy, (x,), targets.to(self.device))
        self._optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self._module(x), targets.to(self.device))
        loss.backward()
        self._optimizer.step()
        return loss.detach()

    def step(self) -> torch.Tensor:
        """One update on the next batch (data fetch included), cycling over epochs."""
        try:
            batch = next(self._batches)
        except StopIteration:
            self._batches = iter(self._loader)
            batch = next(self._batches)
        return self._train_on(*batch)

    def sync(self, handle=None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def epoch(self, progress: Callable[[str], None]) -> dict:
        """One full pass over the data, timed as a whole; step times kept too."""
        step_times, loss = [], None
        report_every = max(1, self.steps_per_epoch // 10)
        start = time.perf_counter()
        for i, batch in enumerate(self._loader):
            t0 = time.perf_counter()
            loss = self._train_on(*batch)
            self.sync()
            step_times.append(time.perf_counter() - t0)
            if (i + 1) % report_every == 0:
                progress(f"epoch step {i + 1}/{self.steps_per_epoch}: {step_times[-1]:.3f} s")
        return {"epoch_s": time.perf_counter() - start, "step_times_s": step_times,
                "loss_last": None if loss is None else float(loss)}


def set_device_memory_limit(limit_mb: int) -> dict:
    """Cap this process's CUDA allocations at ``limit_mb`` (the published GPU budgets)."""
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    fraction = min(1.0, limit_mb / total_mb)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"gpu_memory_limit_mb": min(limit_mb, total_mb), "gpu_memory_total_mb": total_mb}


# --------------------------------------------------------------------------- one party's run

def party_data(cfg: dict, index: int, parts: int):
    """Images and labels of party ``index`` of ``parts`` (the run config says the data and subset)."""
    from privbench.data import cifar100

    images, labels = cifar100.load(cfg["data_dir"])
    share = partition(len(labels), cfg["train_subset"], parts, index, cfg["seed"])
    return images[share], labels[share]


def party_trainer(cfg: dict, device: str, index: int, parts: int, metrics: dict) -> "LocalTrainer":
    """The trainer of party ``index`` of ``parts`` for a run config; its description goes into ``metrics``."""
    if device == "cuda":  # the parties share the job's one GPU: together they hold the run's budget
        metrics.update(set_device_memory_limit(cfg["gpu_memory_limit_mb"] / parts))
    images, labels = party_data(cfg, index, parts)
    trainer = LocalTrainer(cfg["method"], images, labels, cfg["batch_size"], cfg["settings"], device,
                                 cfg["seed"] + index)
    metrics.update(trainer.description, steps_per_epoch=trainer.steps_per_epoch, **trainer.privacy())
    return trainer


def train_party(trainer, cfg: dict, warmup_steps: int, metrics: dict, progress) -> None:
    """A full epoch, or ``timed_steps`` steps and the epoch estimated from them."""
    time_steps(trainer.step, trainer.sync, warmup_steps, 0 if cfg["full_epoch"] else cfg["timed_steps"],
               metrics, progress)
    if cfg["full_epoch"]:
        epoch = trainer.epoch(progress)
        metrics.update(step_times_s=epoch["step_times_s"], seconds_per_epoch=epoch["epoch_s"],
                       loss_last=epoch["loss_last"])
    else:
        metrics["seconds_per_epoch"] = statistics.fmean(metrics["step_times_s"]) * trainer.steps_per_epoch
        metrics["estimated"] = True
