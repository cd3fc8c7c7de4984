"""Flash Clipping: exact per-sample gradient norms without T x T Gram matrices.

For a linear layer that sees, per example, activations A (T x d) and output
gradients G (T x p), the example's weight gradient is A^T G and

    ||A^T G||_F^2 = <G G^T, A A^T> = sum over row tiles i, j of <G_i G_j^T, A_i A_j^T>.

Opacus' ghost norm forms the two T x T Gram matrices of every example at once.
Flash Clipping accumulates the same sum tile pair by tile pair
(FlashAttention-style; the sum is symmetric, so only pairs j <= i), so a
temporary never holds more than a tile x tile block per example. When T is
large relative to d * p / (d + p), forming A^T G itself is cheaper than the
Grams; then the per-example gradients are formed a few examples and output
columns at a time, again inside a bounded workspace. Each layer takes the
cheaper form by its shapes (:func:`choose_form`). Conv2d is the same sum over
its unfolded input (one "row" per output position).

:func:`register` plugs these norm samplers into Opacus' norm-sampler registry,
so that its fast-gradient-clipping path (``make_private(...,
grad_sample_mode="ghost")``) computes Linear and Conv2d norms this way; that
path still runs two backward passes (norms, then the reweighted loss).
:class:`GradSampleModuleFlashClipping` is Opacus' fast-gradient-clipping
module with the same norm samplers and one backward pass, in place of a
second backward pass (the "book-keeping" trick of Bu et al., 2023). Its hooks
keep, per layer, what the clipped sum sum_n c_n g_n needs once every norm is
known, whichever takes less memory:
- the layer's per-example gradients, formed in the backward pass (their norms
  are taken from them: the direct form, whose products are then not wasted);
  the clipped sum is a weighted sum of them;
- or its input A and output gradient G (norms by the tiled forms above); the
  clipped sum is then A^T (c * G), one matrix product per layer.
The backward pass itself computes no weight gradient: autograd is only asked
for the gradients of the layers that read the data.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, NamedTuple, Optional

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.utils import register_norm_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn

# Rows per Gram tile: a tile pair costs 2 * TILE^2 numbers per example.
TILE = 128
# Largest temporary block, in numbers (16 MiB of float32), per norm computation.
WORKSPACE = 1 << 22


def choose_form(rows: int, d: int, p: int, tile: int = TILE) -> str:
    """"gram" or "direct": the form with fewer multiply-adds for one example.

    Tiled Gram: the pairs j <= i of two Gram products (d and p deep) and
    their inner product, ~ rows * (rows + tile) / 2 * (d + p + 1).
    Direct: A^T G and its squared sum, ~ rows * d * p + d * p.
    """
    tile = min(tile, rows)
    gram = rows * (rows + tile) / 2 * (d + p + 1)
    direct = (rows + 1) * d * p
    return "gram" if gram <= direct else "direct"


def per_sample_sq_norms(activations: torch.Tensor, backprops: torch.Tensor, tile: int = TILE,
                        workspace: int = WORKSPACE, form: Optional[str] = None) -> torch.Tensor:
    """||A_n^T G_n||_F^2 for every example n, A (n, T, d), G (n, T, p) -> (n,).

    ``form`` ("gram" or "direct") overrides :func:`choose_form`, for tests and benchmarks.
    """
    n, rows, d = activations.shape
    p = backprops.shape[-1]
    form = form or choose_form(rows, d, p, tile)
    if form == "gram":
        return _gram_tiled(activations, backprops, min(tile, rows), workspace)
    if form == "direct":
        return _direct(activations, backprops, workspace)
    raise ValueError(f"unknown form {form!r}: choose gram or direct")


def _gram_tiled(a: torch.Tensor, g: torch.Tensor, tile: int, workspace: int) -> torch.Tensor:
    n, rows, _ = a.shape
    out = torch.zeros(n, dtype=a.dtype, device=a.device)
    examples = max(1, workspace // (3 * tile * tile))  # aa, gg and their product
    for s in range(0, n, examples):
        a_s, g_s, out_s = a[s:s + examples], g[s:s + examples], out[s:s + examples]
        for i in range(0, rows, tile):
            a_i, g_i = a_s[:, i:i + tile], g_s[:, i:i + tile]
            for j in range(0, i + 1, tile):
                aa = torch.bmm(a_i, a_s[:, j:j + tile].transpose(1, 2))
                gg = torch.bmm(g_i, g_s[:, j:j + tile].transpose(1, 2))
                pair = aa.mul_(gg).sum(dim=(1, 2))
                out_s.add_(pair, alpha=1.0 if i == j else 2.0)  # (i, j) and (j, i) are equal
    return out.clamp_(min=0)


def _direct(a: torch.Tensor, g: torch.Tensor, workspace: int) -> torch.Tensor:
    n, _, d = a.shape
    p = g.shape[-1]
    columns = max(1, min(p, workspace // d))
    examples = max(1, workspace // (d * columns))
    out = torch.zeros(n, dtype=a.dtype, device=a.device)
    for s in range(0, n, examples):
        a_s = a[s:s + examples].transpose(1, 2)
        for c in range(0, p, columns):
            grads = torch.bmm(a_s, g[s:s + examples, :, c:c + columns])  # examples' gradient columns
            out[s:s + examples] += torch.linalg.vector_norm(grads, dim=(1, 2)).square_()
    return out


def linear_norm_sample(layer: nn.Linear, activations: List[torch.Tensor],
                       backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler for nn.Linear: per-example norms of weight and bias gradients."""
    a = activations[0].to(backprops.dtype)
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])
    g = backprops.reshape(n, -1, backprops.shape[-1])
    norms = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = per_sample_sq_norms(a, g).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(dim=1).norm(dim=1)
    return norms


def conv2d_norm_sample(layer: nn.Conv2d, activations: List[torch.Tensor],
                       backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler for nn.Conv2d: the linear case over the unfolded input.

    Each output position is one row; with groups, every group is its own
    linear map and the example's squared norm is the sum over groups.
    """
    x = activations[0].to(backprops.dtype)
    n, groups = x.shape[0], layer.groups
    # (n, C_in * kh * kw, L) -> per group (n * groups, L, C_in / groups * kh * kw)
    a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                 dilation=layer.dilation)
    positions = a.shape[-1]
    a = a.reshape(n * groups, -1, positions).transpose(1, 2)
    g = backprops.reshape(n, layer.out_channels, positions)
    norms = {}
    if layer.weight.requires_grad:
        g_groups = g.reshape(n * groups, -1, positions).transpose(1, 2)
        norms[layer.weight] = per_sample_sq_norms(a, g_groups).reshape(n, groups).sum(dim=1).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(dim=2).norm(dim=1)
    return norms


NORM_SAMPLERS = {nn.Linear: linear_norm_sample, nn.Conv2d: conv2d_norm_sample}


def register() -> dict:
    """Make Opacus' fast-gradient-clipping path use the flash norm samplers.

    Returns the samplers it replaced (None where there was none), for :func:`restore`.
    """
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    previous = {layer_type: registry.get(layer_type) for layer_type in NORM_SAMPLERS}
    for layer_type, sampler in NORM_SAMPLERS.items():
        register_norm_sampler(layer_type)(sampler)
    return previous


def restore(previous: dict) -> None:
    """Put back the norm samplers that :func:`register` replaced."""
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    for layer_type, sampler in previous.items():
        if sampler is None:
            registry.pop(layer_type, None)
        else:
            registry[layer_type] = sampler


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """Flash norm samplers in Opacus' registry for the duration of a block."""
    previous = register()
    try:
        yield
    finally:
        restore(previous)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def per_example_fits(layer: nn.Module, activations: list, backprops: torch.Tensor) -> bool:
    """Whether the layer's per-example gradients take no more memory than its input and output gradient.

    For a linear layer on T rows per example: d * p <= T * (d + p).
    """
    n = backprops.shape[0]
    params = sum(p.numel() for p in layer.parameters(recurse=False) if p.requires_grad)
    return n * params * backprops.element_size() <= _nbytes([*activations, backprops])


class _Kept(NamedTuple):
    """What one layer leaves for the clipped sum: its input and output gradient, or,
    where they are smaller, its per-example gradients."""

    layer: nn.Module
    activations: list
    backprops: Optional[torch.Tensor]
    grad_samples: Optional[Dict[nn.Parameter, torch.Tensor]]
    scale: float  # factor between the kept output gradient and the per-example losses' gradient

    def clipped_sums(self, coefficients: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        factors = coefficients * self.scale
        if self.grad_samples is not None:
            return {p: torch.einsum("n,n...->...", factors, gs) for p, gs in self.grad_samples.items()}
        scaled = self.backprops * factors.view(-1, *([1] * (self.backprops.dim() - 1)))
        if type(self.layer) is nn.Linear:
            return _linear_clipped_sum(self.layer, self.activations, scaled)
        return _vjp_clipped_sum(self.layer, self.activations, scaled)


def _linear_clipped_sum(layer: nn.Linear, activations: List[torch.Tensor],
                        scaled_backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """sum_n c_n A_n^T G_n as one product over all examples' rows (G already scaled by c)."""
    g = scaled_backprops.reshape(-1, scaled_backprops.shape[-1])
    sums = {}
    if layer.weight.requires_grad:
        a = activations[0].to(g.dtype)
        sums[layer.weight] = g.T @ a.reshape(-1, a.shape[-1])
    if layer.bias is not None and layer.bias.requires_grad:
        sums[layer.bias] = g.sum(dim=0)
    return sums


def _vjp_clipped_sum(layer: nn.Module, activations: List[torch.Tensor],
                     scaled_backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Any other layer: its parameter gradient at the kept input, for the scaled output gradient."""
    params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
    with torch.enable_grad():  # forward, not __call__: the layer's hooks have done their work
        grads = torch.autograd.grad(layer.forward(*activations), params, scaled_backprops)
    return dict(zip(params, grads))


class GradSampleModuleFlashClipping(GradSampleModuleFastGradientClipping):
    """Opacus' fast-gradient-clipping module with flash norms and one backward pass.

    Call ``module.clipped_backward(loss)`` in place of ``loss.backward()``
    (``loss`` reduced over the examples as ``loss_reduction`` says): it leaves
    the sum of the clipped per-example gradients in ``p.grad``, which Opacus'
    DPOptimizerFastGradientClipping noises and averages, as after its own
    two-pass ghost clipping. Each layer takes the route of :meth:`route`;
    ``keep_per_example=False`` sends every layer that has a norm sampler through
    it (input and output gradient kept), for tests and comparisons.
    """

    NORM_SAMPLERS = {**GradSampleModuleFastGradientClipping.NORM_SAMPLERS, **NORM_SAMPLERS}

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, max_grad_norm: float = 1.0, keep_per_example: bool = True):
        if not batch_first:
            raise ValueError("flash clipping needs batch_first=True (the kept layer inputs are re-used as given)")
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
                         max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        self.keep_per_example = keep_per_example
        self.kept: List[_Kept] = []  # one entry per layer, during a backward pass
        # Parameters of the layers that read non-differentiable input (the data):
        # every other layer lies on a path from the loss to them, so asking
        # autograd for their gradients alone still runs every layer's hook,
        # without computing any other weight gradient.
        self._autograd_leaves: dict = {}

    def capture_activations_hook(self, module: nn.Module, forward_input, forward_output) -> None:
        super().capture_activations_hook(module, forward_input, forward_output)
        if (self.hooks_enabled and module.training and torch.is_grad_enabled()
                and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in forward_input)):
            self._autograd_leaves.update(dict.fromkeys(p for p in module.parameters(recurse=False)
                                                       if p.requires_grad))

    def capture_backprops_hook(self, module: nn.Module, _forward_input, forward_output,
                               loss_reduction: str, batch_first: bool) -> None:
        if not self.hooks_enabled:
            return
        # The output gradient is kept as autograd made it (no scaled copy, and
        # no second copy where the residual stream shares it); a mean loss's
        # factor n (Opacus' per-example scaling) goes into the norms and, later,
        # into the clipping factors instead: both are linear in it.
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=forward_output[0].detach(), loss_reduction="sum", batch_first=batch_first)
        scale = module.max_batch_len if loss_reduction == "mean" else 1
        norms, grad_samples = self.layer_norms(module, activations, backprops)
        kept = (_Kept(module, [], None, grad_samples, scale) if grad_samples is not None
                else _Kept(module, activations, backprops, None, scale))
        for param, norm in norms.items():
            if param._forward_counter > 1:
                raise NotImplementedError("parameter tying is not supported with flash clipping")
            param._norm_sample = norm * scale
            param._forward_counter -= 1
        self.kept.append(kept)
        if not module.activations:
            del module.max_batch_len

    def route(self, module: nn.Module, activations: list, backprops: torch.Tensor) -> str:
        """How one layer's norms are computed and what it keeps for the clipped sum.

        "per_example": its per-example gradients are formed (Opacus' grad
        sampler), their norms taken, and they are kept where they take no more
        memory than the layer's input and output gradient: always for layers
        without a norm sampler (e.g. LayerNorm), and for those with one (the
        flash Linear and Conv2d, Opacus' Embedding) where
        :func:`per_example_fits`. There it is also the cheaper route: forming
        the per-example gradients costs what one weight gradient costs, about
        what the norm samplers' forms cost, and the clipped sum then needs no
        second product per layer.
        "norm_sampler": the layer's norm sampler (for Linear and Conv2d the
        tiled Gram or bounded direct form); its input and output gradient are
        kept, and its clipped sum is a product of the two.
        """
        if type(module) not in self.NORM_SAMPLERS:
            return "per_example"
        if self.keep_per_example and per_example_fits(module, activations, backprops):
            return "per_example"
        return "norm_sampler"

    def layer_norms(self, module: nn.Module, activations: list, backprops: torch.Tensor):
        """One layer's per-example gradient norms, by its :meth:`route`; (norms, per-example gradients to keep or None)."""
        if self.route(module, activations, backprops) == "norm_sampler":
            return self.NORM_SAMPLERS[type(module)](module, activations, backprops), None
        grad_sampler = self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
        grad_samples = grad_sampler(module, activations, backprops)
        norms = {p: gs.reshape(len(gs), -1).norm(2, dim=-1) for p, gs in grad_samples.items()}
        return norms, grad_samples if per_example_fits(module, activations, backprops) else None

    def clipped_backward(self, loss: torch.Tensor) -> None:
        """One backward pass for the per-example norms, then the clipped gradient sum into ``p.grad``."""
        self.norms_backward(loss)
        self.accumulate_clipped_grads()

    def norms_backward(self, loss: torch.Tensor) -> None:
        """The backward pass: per-example gradient norms, and what each layer needs kept for its clipped sum."""
        for param in self.trainable_parameters:
            param._norm_sample = None
        leaves, self._autograd_leaves = list(self._autograd_leaves) or self.trainable_parameters, {}
        try:
            torch.autograd.grad(loss, leaves, allow_unused=True)  # runs the hooks; the gradients are not needed
        except BaseException:
            self.kept.clear()
            raise
        missing = [name for name, p in self._module.named_parameters() if p.requires_grad and p._norm_sample is None]
        if missing:
            self.kept.clear()
            raise RuntimeError(f"no per-example gradient norm for {', '.join(missing)}: the loss does not "
                               "depend on them through a layer whose input is the data")

    def accumulate_clipped_grads(self) -> None:
        """sum_n c_n g_n into ``p.grad``, c_n the examples' clipping factors."""
        coefficients = self.get_clipping_coef()
        try:
            while self.kept:  # popping frees what each layer kept once it is used
                for param, grad in self.kept.pop().clipped_sums(coefficients).items():
                    param.grad = grad if param.grad is None else param.grad + grad
        finally:
            self.kept.clear()
