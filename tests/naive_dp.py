"""The naive reference of every DP engine test (torch and JAX): each example's
gradient, from a loop over examples, clipped, summed; with a clip norm chosen
so that clipping is active (two examples above it, two below)."""

from __future__ import annotations

import numpy as np

BATCH = 4
TOLERANCE = 1e-4
# For a model that rounds its attention to bfloat16 (8 bits of mantissa: relative
# rounding up to 2^-9, about 2e-3), two exact programs that round in a different
# order agree to about a tenth of that, not to TOLERANCE (measured on the published
# JAX Transformer, small: 1.6e-4; the same model in float32 agrees to 3e-6).
BFLOAT16_TOLERANCE = 1e-3


def clip_between(per_example: list[np.ndarray]) -> float:
    """A clip norm strictly between the 2nd and 3rd smallest per-example norms."""
    norms = np.sort([np.linalg.norm(g) for g in per_example])
    low, high = norms[1:3]
    assert low < high, "per-example gradient norms must differ"
    return float(np.sqrt(low * high))


def naive_clipped_sum(per_example: list[np.ndarray], clip: float) -> np.ndarray:
    return sum(g * min(1.0, clip / np.linalg.norm(g)) for g in per_example)


def assert_matches(actual: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE) -> None:
    """Equal to ``tolerance`` relative to the gradient's scale: every coordinate
    within ``tolerance`` of the largest one, and ``tolerance`` in L2 (coordinate-wise
    relative error is meaningless for float32 coordinates near zero)."""
    assert actual.shape == expected.shape
    error = np.abs(actual - expected)
    assert error.max() <= tolerance * np.abs(expected).max(), error.max()
    assert np.linalg.norm(error) <= tolerance * np.linalg.norm(expected)


def per_example_torch(module, loss_fn, inputs, targets) -> list[np.ndarray]:
    """Each example's gradient of a torch module's trainable parameters, flat,
    by a loop over examples (``inputs`` a tuple of batch-first tensors)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = []
    for i in range(len(targets)):
        module.zero_grad(set_to_none=True)
        loss_fn(module(*(x[i:i + 1] for x in inputs)), targets[i:i + 1]).backward()
        grads.append(np.concatenate([p.grad.detach().cpu().numpy().ravel() for p in params]))
    module.zero_grad(set_to_none=True)
    return grads


# The routes each model of the matrix takes in the JAX engine, and in the torch
# engine but where noted (one shared cost model, privbench.dp.cost), as counted
# by their describe()'s "dp_methods".
MODEL_ROUTES = {
    ("cnn", "tiny"): "direct 1, gram 2, kept 1",
    ("cnn", "small"): "gram 2, kept 2",
    ("transformer", "tiny"): "elementwise 3, gram 5, segment 2",
    ("transformer", "small"): "elementwise 5, kept 9, segment 2",
    ("state_space", "tiny"): "elementwise 2, gram 2, kept 1, segment 1",
    ("state_space", "small"): "elementwise 3, fft 2, kept 3, segment 1",
    ("diffusion", "tiny"): "elementwise 1, kept 4, segment 1",
    ("diffusion", "small"): "elementwise 2, kept 6, segment 1",
}
# PyTorch's own grouped convolution forms the StateSpace model's 256-tap depthwise
# kernel gradients faster than FFT (cost.FFT_MIN_KERNEL): kept, not fft.
TORCH_MODEL_ROUTES = {**MODEL_ROUTES, ("state_space", "small"): "elementwise 3, kept 5, segment 1"}
# The published variant differs only in the Transformer: separate q, k, v
# projections, two more Linear layers per block than the fused one above.
PUBLISHED_ROUTES = {("transformer", "tiny"): "elementwise 3, gram 7, segment 2",
                    ("transformer", "small"): "elementwise 5, kept 13, segment 2"}


def model_routes(framework: str, model: str, size: str, variant: str) -> str:
    """The routes of one model of the matrix in one framework's engine and model variant."""
    routes = TORCH_MODEL_ROUTES if framework == "torch" else MODEL_ROUTES
    if variant == "published":
        routes = {**routes, **PUBLISHED_ROUTES}
    return routes[model, size]
