"""The engine's norms as Opacus norm samplers (privbench.dp.opacus_norms) and the
shared Gram / direct norm algebra (privbench.dp.torch_rules): exact norms,
registration, Opacus' two-pass path, and Opacus' own fast-gradient-clipping
tests run with the kit's samplers registered."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from torch import nn

from naive_dp import assert_matches, naive_clipped_sum, per_example_torch
from privbench import models
from privbench.dp import cost, opacus_norms, torch_rules

RTOL = 1e-4
TESTS = Path(__file__).resolve().parent

# Opacus' own tests of its fast-gradient-clipping (ghost) path, shipped in its wheel.
OPACUS_GHOST_TESTS = ["opacus.tests.grad_sample_module_fast_gradient_clipping_test",
                      "opacus.tests.grad_sample_hooks_fast_gradient_clipping_test"]


def _per_example_norms(grad_samples: dict) -> dict:
    return {p: gs.reshape(len(gs), -1).norm(dim=1) for p, gs in grad_samples.items()}


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-6 * float(expected.abs().max()))


# (examples, T, d, p); T = 300 and 130 are not multiples of the 128-row tile
LINEAR_SHAPES = [(3, 1, 5, 7), (4, 37, 8, 3), (2, 300, 16, 40), (3, 130, 300, 200), (2, 256, 64, 96)]


@pytest.mark.parametrize("n, rows, d, p", LINEAR_SHAPES)
def test_linear_norms_equal_opacus_hooks_and_ghost(n, rows, d, p):
    torch.manual_seed(rows)
    layer = nn.Linear(d, p)
    activations, backprops = torch.randn(n, rows, d), torch.randn(n, rows, p)
    hooks = _per_example_norms(compute_linear_grad_sample(layer, [activations], backprops))
    ghost = compute_linear_norm_sample(layer, [activations], backprops)
    ours = opacus_norms.norm_sample(layer, [activations], backprops)
    for param in (layer.weight, layer.bias):
        _assert_close(ours[param], hooks[param])
        _assert_close(ours[param], ghost[param])


@pytest.mark.parametrize("form", [cost.GRAM, cost.DIRECT])
@pytest.mark.parametrize("tile", [7, 128])
def test_both_forms_with_any_tile_and_workspace(form, tile):
    torch.manual_seed(0)
    activations, backprops = torch.randn(3, 53, 12), torch.randn(3, 53, 9)  # 53 rows: 7 full tiles and a rest
    expected = torch.einsum("nti,ntj->nij", activations, backprops).square().sum(dim=(1, 2))
    for workspace in (64, torch_rules.WORKSPACE):  # a tiny workspace forces the split into examples and columns
        _assert_close(torch_rules.matmul_sq_norms(activations, backprops, form, tile=tile, workspace=workspace),
                      expected)


def test_form_follows_the_cost_of_each():
    assert cost.matmul_route(rows=8, d=256, p=256, tile=cost.TILE).norm == cost.GRAM  # short sequences
    assert cost.matmul_route(rows=4096, d=16, p=16, tile=cost.TILE).norm == cost.DIRECT  # long sequences
    with pytest.raises(ValueError, match="unknown form 'tiles'"):
        torch_rules.matmul_sq_norms(torch.ones(1, 2, 2), torch.ones(1, 2, 2), "tiles")


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_norms_equal_opacus_hooks(groups):
    torch.manual_seed(groups)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups)
    x = torch.randn(3, 4, 11, 11)
    backprops = torch.randn_like(conv(x))
    expected = _per_example_norms(compute_conv_grad_sample(conv, [x], backprops))
    for form in (cost.GRAM, cost.DIRECT):
        _assert_close(torch_rules.RULES[nn.Conv2d].weight_sq_norms(conv, x, backprops, form).sqrt(),
                      expected[conv.weight])
    ours = opacus_norms.norm_sample(conv, [x], backprops)
    for param in (conv.weight, conv.bias):
        _assert_close(ours[param], expected[param])


def test_registered_in_opacus_fast_gradient_clipping_path():
    """Inside ``registered()`` Opacus' own ghost-clipping module computes its norms with the kit's samplers."""
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    opacus_linear = registry[nn.Linear]
    torch.manual_seed(0)
    x, y = torch.randn(5, 9, 6), torch.randn(5, 9, 3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    hooks = GradSampleModule(model)
    nn.functional.mse_loss(hooks(x), y).backward()
    expected = torch.stack([p.grad_sample.reshape(5, -1).norm(dim=1) for p in model.parameters()]).norm(dim=0)
    hooks._close()
    with opacus_norms.registered():
        assert registry[nn.Linear] is opacus_norms.norm_sample and registry[nn.Conv2d] is opacus_norms.norm_sample
        ghost = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        nn.functional.mse_loss(ghost(x), y).backward()
        _assert_close(ghost.get_norm_sample(), expected)
        ghost._close()
    assert registry[nn.Linear] is opacus_linear and nn.Conv2d not in registry


def test_two_pass_opacus_path_with_kit_norms_equals_per_example_loop():
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    family = models.family("transformer")
    (inputs,), targets = family.synthetic_batch("tiny", 5, "torch", 0)
    model = models.build("torch", "transformer", "tiny", 0)
    expected = naive_clipped_sum(per_example_torch(model, family.loss_torch, (inputs,), targets), 0.05)
    with opacus_norms.registered():
        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=0.05)
        optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.0),
                                                    noise_multiplier=0.0, max_grad_norm=0.05,
                                                    expected_batch_size=len(targets))
        criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss())
        logits = module(inputs)
        criterion(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), shape=logits.shape[:2]).backward()
    assert_matches(np.concatenate([p.grad.numpy().ravel() for p in model.parameters()]), expected)


def test_opacus_own_ghost_clipping_tests_pass_with_kit_norm_samplers(tmp_path):
    """Opacus' fast-gradient-clipping test modules (from its wheel), run by pytest
    with tests/opacus_norms_plugin.py registering the kit's samplers: all pass,
    and the samplers did compute norms."""
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "PRIVBENCH_NORM_SAMPLER_CALLS": str(calls)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "opacus_norms_plugin", "-p", "no:cacheprovider",
         "--pyargs", *OPACUS_GHOST_TESTS],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
    assert int(calls.read_text()) > 0
