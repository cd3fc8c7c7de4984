"""Flash Clipping (privbench.dp.flash): exact norms, Opacus registration, clipped sums."""

import pytest
import torch
from torch import nn

from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample

from privbench import models
from privbench.dp import flash

RTOL = 1e-4


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
    ours = flash.linear_norm_sample(layer, [activations], backprops)
    for param in (layer.weight, layer.bias):
        _assert_close(ours[param], hooks[param])
        _assert_close(ours[param], ghost[param])


@pytest.mark.parametrize("form", ["gram", "direct"])
@pytest.mark.parametrize("tile", [7, 128])
def test_both_forms_with_any_tile_and_workspace(form, tile):
    torch.manual_seed(0)
    activations, backprops = torch.randn(3, 53, 12), torch.randn(3, 53, 9)  # 53 rows: 7 full tiles and a rest
    expected = torch.einsum("nti,ntj->nij", activations, backprops).square().sum(dim=(1, 2))
    for workspace in (64, flash.WORKSPACE):  # a tiny workspace forces the split into examples and columns
        _assert_close(flash.per_sample_sq_norms(activations, backprops, tile=tile, workspace=workspace, form=form),
                      expected)


def test_form_follows_the_cost_of_each():
    assert flash.choose_form(rows=8, d=256, p=256) == "gram"  # short sequences: small Grams
    assert flash.choose_form(rows=4096, d=16, p=16) == "direct"  # long sequences, small layer
    with pytest.raises(ValueError, match="unknown form 'tiles'"):
        flash.per_sample_sq_norms(torch.ones(1, 2, 2), torch.ones(1, 2, 2), form="tiles")


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_norms_equal_opacus_hooks(groups):
    torch.manual_seed(groups)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups)
    x = torch.randn(3, 4, 11, 11)
    backprops = torch.randn_like(conv(x))
    expected = _per_example_norms(compute_conv_grad_sample(conv, [x], backprops))
    ours = flash.conv2d_norm_sample(conv, [x], backprops)
    for param in (conv.weight, conv.bias):
        _assert_close(ours[param], expected[param])


def test_registered_in_opacus_fast_gradient_clipping_path():
    """Inside ``registered()`` Opacus' own ghost-clipping module computes its norms with flash."""
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    opacus_linear = registry[nn.Linear]
    torch.manual_seed(0)
    x, y = torch.randn(5, 9, 6), torch.randn(5, 9, 3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    hooks = GradSampleModule(model)
    nn.functional.mse_loss(hooks(x), y).backward()
    expected = torch.stack([p.grad_sample.reshape(5, -1).norm(dim=1) for p in model.parameters()]).norm(dim=0)
    hooks._close()
    with flash.registered():
        assert registry[nn.Linear] is flash.linear_norm_sample and registry[nn.Conv2d] is flash.conv2d_norm_sample
        ghost = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        nn.functional.mse_loss(ghost(x), y).backward()
        _assert_close(ghost.get_norm_sample(), expected)
        ghost._close()
    assert registry[nn.Linear] is opacus_linear and nn.Conv2d not in registry


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.norm = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.norm(x).flatten(1))


def _naive_clipped_sum(model, loss_fn, inputs, targets, clip):
    """The reference: one example at a time, clip its whole gradient, sum."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(targets)):
        model.zero_grad()
        loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        factor = min(1.0, clip / (float(torch.sqrt(sum(g.square().sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    model.zero_grad(set_to_none=True)
    return total


def _transformer_case(seq_len=None):
    family = models.family("transformer")
    if seq_len is None:  # the tiny size: 8 tokens, too few for per-example linear gradients to fit
        (tokens,), targets = family.synthetic_batch("tiny", 5, "torch", 0)
        return models.build("torch", "transformer", "tiny", 0), family.loss_torch, tokens, targets
    torch.manual_seed(0)
    spec = {**family.SIZES["tiny"], "seq_len": seq_len}
    tokens, targets = (torch.randint(0, spec["vocab_size"], (4, seq_len)) for _ in range(2))
    from privbench.models.transformer import _torch_class  # the same model class at another length

    return _torch_class()(**spec), family.loss_torch, tokens, targets


def _cnn_case():
    torch.manual_seed(0)
    return _SmallCNN(), nn.functional.cross_entropy, torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))


CASES = {"transformer": _transformer_case, "transformer-long": lambda: _transformer_case(seq_len=64),
         "cnn": _cnn_case}


@pytest.mark.parametrize("keep_per_example", [True, False], ids=["auto", "norm-samplers-only"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_one_pass_clipped_sum_equals_per_example_loop(case, keep_per_example):
    model, loss_fn, inputs, targets = case()
    clip = 0.05  # below every example's norm: every example is clipped
    expected = _naive_clipped_sum(model, loss_fn, inputs, targets, clip)
    module = flash.GradSampleModuleFlashClipping(model, max_grad_norm=clip, keep_per_example=keep_per_example)
    routes, route = {}, module.route

    def recording_route(layer, activations, backprops):
        taken = route(layer, activations, backprops)
        routes.setdefault(type(layer), set()).add(taken)
        return taken

    module.route = recording_route
    for _ in range(2):  # a second step on the same module gives the same sums
        model.zero_grad(set_to_none=True)
        module.clipped_backward(loss_fn(module(inputs), targets))
        assert not module.kept
        for param, ref in zip(model.parameters(), expected):
            _assert_close(param.grad, ref)
    weights = set().union(*(routes.get(t, set()) for t in (nn.Linear, nn.Conv2d)))
    if not keep_per_example:
        assert weights == {"norm_sampler"}
    elif case is not _transformer_case:  # long enough sequences / small enough layers: the kept route is taken
        assert "per_example" in weights


def test_route_keeps_per_example_gradients_only_where_they_fit():
    module = flash.GradSampleModuleFlashClipping(nn.Sequential(nn.Linear(256, 1024)))
    layer = module._module[0]
    for rows, expected in [(256, "per_example"), (128, "norm_sampler")]:  # d * p <= T * (d + p)?
        a, g = torch.zeros(2, rows, 256), torch.zeros(2, rows, 1024)
        assert module.route(layer, [a], g) == expected
    assert module.route(nn.LayerNorm(4), [torch.zeros(2, 1, 4)], torch.zeros(2, 1, 4)) == "per_example"


def test_two_pass_opacus_path_with_flash_norms_equals_per_example_loop():
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model, _, inputs, targets = _transformer_case()
    expected = _naive_clipped_sum(model, models.family("transformer").loss_torch, inputs, targets, 0.05)
    with flash.registered():
        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=0.05)
        optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.0),
                                                    noise_multiplier=0.0, max_grad_norm=0.05,
                                                    expected_batch_size=len(targets))
        criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss())
        logits = module(inputs)
        criterion(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), shape=logits.shape[:2]).backward()
    for param, ref in zip(model.parameters(), expected):
        _assert_close(param.grad, ref)


def test_rejects_sequence_first_batches():
    with pytest.raises(ValueError, match="batch_first=True"):
        flash.GradSampleModuleFlashClipping(nn.Linear(2, 2), batch_first=False)
