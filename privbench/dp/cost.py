"""One cost model for both engines: which exact route a layer takes.

Pure functions of a layer's shapes (no framework import), shared by the
PyTorch and the JAX engine, so that the same layer takes the same route in
both and a change of the model is made once.

Every layer whose parameter gradient is a product of its input and its output
gradient (Linear; a convolution over its unfolded input, one row per output
position and each feature group its own product) is described per example by

    rows   T: positions (tokens, output pixels) of one example
    d      input features per group (Linear: in_features; Conv: C_in/G * kernel)
    p      output features per group
    groups G

and the squared norm of an example's weight gradient A^T G (A: T x d,
G: T x p, per group) has two exact forms:

    "gram"    <A A^T, G G^T>, from T x T Gram matrices (ghost norm; the torch
              engine tiles them, Flash Clipping)       ~ G T^2 (d + p) multiply-adds
    "direct"  the per-example gradient itself, then its squared sum
                                                         ~ G T d p multiply-adds

After the norms, the clipped sum sum_n c_n grad_n either re-weights per-example
gradients that were kept ("kept": only where they take no more memory than
the layer's input and output gradient, which the other route holds anyway), or
is one weight-gradient product with each example's output gradient scaled by
c_n ("book-keeping").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Norm forms.
GRAM, DIRECT, FFT, SEGMENT, ELEMENTWISE = "gram", "direct", "fft", "segment", "elementwise"

# Rows per Gram tile (torch engine): a tile pair costs 2 * TILE^2 numbers per example.
TILE = 128
# A depthwise 1-D kernel at least this long takes the FFT route (O(T log T), not O(T K)).
# Where that pays depends on the framework's own grouped convolution, measured on CPU:
# XLA's per-example depthwise kernel gradient is slow, so JAX takes FFT from 32 taps;
# PyTorch's is 3.7x faster than FFT at 256 taps (batch 32, 256 channels: 19 vs 72 ms)
# and only falls behind past 1024 taps (at 2048: 55 vs 25 ms).
FFT_MIN_KERNEL = {"jax": 32, "torch": 1024}


@dataclass(frozen=True)
class Route:
    """How one layer's per-example norms and clipped sum are computed.

    ``norm``: the form of the norm (GRAM, DIRECT, FFT, SEGMENT, ELEMENTWISE);
    ``keep``: whether its per-example gradients are kept for the clipped sum
    (else the sum is one book-keeping product).
    """

    norm: str
    keep: bool

    @property
    def label(self) -> str:
        """One word per route, as run records and pages list them."""
        if self.norm == DIRECT:
            return "kept" if self.keep else "direct"
        return self.norm


def gram_cost(rows: int, d: int, p: int, groups: int = 1, tile: int | None = None) -> float:
    """Multiply-adds of the Gram form for one example (the pairs j <= i of
    tiles when ``tile`` is given, the whole T x T products otherwise)."""
    if tile:
        tile = min(tile, rows)
        return groups * rows * (rows + tile) / 2 * (d + p + 1)
    return groups * rows * rows * (d + p)


def direct_cost(rows: int, d: int, p: int, groups: int = 1) -> float:
    """Multiply-adds of forming an example's gradient and its squared sum."""
    return groups * (rows + 1) * d * p


def per_example_fits(per_example_numel: int, kept_numel: int) -> bool:
    """Whether a layer's per-example gradients (numbers per example) take no more
    memory than what the book-keeping route keeps of the layer per example
    (its input and output gradient)."""
    return per_example_numel <= kept_numel


def matmul_route(rows: int, d: int, p: int, groups: int = 1, *, kept_numel: int | None = None,
                 tile: int | None = None) -> Route:
    """The route of a Linear or convolution layer (see the module docstring).

    ``kept_numel``: numbers per example that the book-keeping route keeps of
    the layer (default: its input and output gradient, G T (d + p)).
    """
    if kept_numel is None:
        kept_numel = groups * rows * (d + p)
    if gram_cost(rows, d, p, groups, tile) < direct_cost(rows, d, p, groups):
        return Route(GRAM, keep=False)
    return Route(DIRECT, keep=per_example_fits(groups * d * p, kept_numel))


def depthwise_fft_applies(kernel: int, spatial_dims: int, depthwise: bool, unit_strides: bool,
                          min_kernel: int) -> bool:
    """A depthwise 1-D convolution with a kernel of at least ``min_kernel`` taps (the
    framework's :data:`FFT_MIN_KERNEL`): its per-example gradient by FFT
    cross-correlation (kept: it is no larger than the input)."""
    return depthwise and spatial_dims == 1 and unit_strides and kernel >= min_kernel


def conv_route(positions: int, kernel: int, c_in: int, c_out: int, groups: int, *, spatial_dims: int,
               unit_strides: bool, kept_numel: int, fft_min_kernel: int, tile: int | None = None) -> Route:
    """The route of a convolution: FFT for long depthwise 1-D kernels (from
    ``fft_min_kernel`` taps), else the Linear choice over its unfolded input
    (Gram only for 1-D and 2-D)."""
    depthwise = groups == c_in == c_out
    if depthwise_fft_applies(kernel, spatial_dims, depthwise, unit_strides, fft_min_kernel):
        return Route(FFT, keep=True)
    d, p = c_in // groups * kernel, c_out // groups
    route = matmul_route(positions, d, p, groups, kept_numel=kept_numel, tile=tile)
    if route.norm == GRAM and spatial_dims > 2:
        return Route(DIRECT, keep=per_example_fits(groups * d * p, kept_numel))
    return route


def numel(shape) -> int:
    return math.prod(shape)
