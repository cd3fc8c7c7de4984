"""The kit's PyTorch DP engine (privbench.dp.torch_engine) against a naive loop
over examples: the clipped gradient sum before noise, with clipping active
(two examples above the clip norm, two below), on every model of the matrix,
on EfficientNet-B0, and on small models built to take every route (gram,
direct, kept, fft, segment, elementwise) and every fallback (vjp,
whole_model, outputs changed in place); plus the phase hooks, the noise and
the one-backward-pass memory behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from naive_dp import BATCH, model_routes
from naive_dp import assert_matches as _assert_matches
from naive_dp import clip_between as _clip_between
from naive_dp import naive_clipped_sum as _naive_clipped_sum
from naive_dp import per_example_torch as _per_example
from privbench import models
from privbench.dp import cost, torch_engine
from privbench.training import make_trainer


def _flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().cpu().numpy().ravel() for t in tensors])


def _check(module, loss_fn, inputs, targets) -> dict:
    """The engine's clipped sum == the naive one, both by clipped_grad_sum (which
    leaves .grad alone) and by a DPOptimizer's clipped_backward (into .grad);
    returns the engine's description."""
    per_example = _per_example(module, loss_fn, inputs, targets)
    clip = _clip_between(per_example)
    expected = _naive_clipped_sum(per_example, clip)
    params = [p for p in module.parameters() if p.requires_grad]
    sums = torch_engine.clipped_grad_sum(module, loss_fn, inputs, targets, clip)
    _assert_matches(_flat(sums), expected)
    assert all(p.grad is None for p in params), "clipped_grad_sum must not touch .grad"
    dp = torch_engine.make_private(module, torch.optim.SGD(params, lr=0.0), max_grad_norm=clip, noise_multiplier=0.0)
    try:
        description = dp.describe(loss_fn, inputs, targets)
        dp.clipped_backward(dp.forward(loss_fn, inputs, targets))
        _assert_matches(_flat(p.grad for p in params), expected)
        assert not any(dp.kept().values()), "the clipped sum frees what was kept"
    finally:
        dp.remove()
    module.zero_grad(set_to_none=True)
    return description


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("model", models.MODELS)
def test_engine_matches_naive(model, size, variant):
    """Every model in both variants: the published ones hold GroupNorm(8) and
    channels-last convolutions."""
    family = models.family(model)
    module = models.build("torch", model, size, seed=0, variant=variant)
    inputs, targets = family.synthetic_batch(size, BATCH, "torch", seed=1)
    description = _check(module, family.loss_torch, inputs, targets)
    assert description["dp_fallback"] == []  # every layer of the matrix has its own rule
    assert description["dp_methods"] == model_routes("torch", model, size, variant)


def test_engine_matches_naive_on_efficientnet_b0():
    from privbench.training.cifar import build_model

    module = build_model("opacus", seed=0)  # GroupNorm, SiLU out of place
    # Dropout and stochastic depth off, so that the naive loop sees the same
    # network; the residual `result += input` then changes a GroupNorm output in place.
    module.eval()
    # In float64: 80 layers deep, two exact float32 programs that round in a
    # different order differ by about TOLERANCE (1.01e-4 in L2 on some CPUs).
    module.double()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 100, (BATCH,), generator=generator)
    description = _check(module, F.cross_entropy, (images,), labels)
    methods = " ".join(description["dp_layers"])
    assert description["dp_fallback"] == []
    assert all(f": {m}" in methods for m in ("gram", "direct", "kept", "elementwise"))
    assert description["dp_copied"]


# The zoo's depthwise layer takes the FFT route with this threshold (PyTorch's own,
# cost.FFT_MIN_KERNEL["torch"], would need a kernel of a thousand taps).
ZOO_FFT_MIN_KERNEL = 32


@pytest.fixture
def short_fft_threshold(monkeypatch):
    from privbench.dp.torch_rules import ConvRule

    monkeypatch.setattr(ConvRule, "fft_min_kernel", ZOO_FFT_MIN_KERNEL)


def _torch_zoo():
    """A model taking every route of the engine and both fallbacks."""

    class Scale(nn.Module):  # a leaf without a rule: per-example vjp
        def __init__(self, n):
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

        def forward(self, x):
            return x * self.gain

    class Zoo(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(11, 6, padding_idx=0)
            self.positions = nn.Embedding(7, 6, padding_idx=2)  # every index once per example
            self.seq = nn.Conv1d(6, 8, 3, padding="same", groups=2)  # grouped, string padding
            self.reflect = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
            self.depthwise = nn.Conv1d(8, 16, 5, padding=2, groups=8)  # channel multiplier 2
            self.long = nn.Conv1d(16, 16, ZOO_FFT_MIN_KERNEL + 1, padding=16, groups=16)  # long depthwise: FFT
            self.wide = nn.Conv2d(4, 32, 3, padding=1, stride=2)  # few positions, many channels: gram
            self.volume = nn.Conv3d(1, 2, 2)
            self.norm = nn.GroupNorm(2, 16)
            self.layer_norm = nn.LayerNorm(16)
            self.scale = Scale(16)
            self.relu = nn.ReLU(inplace=True)  # changes layer_norm's output in place
            self.shared = nn.Linear(16, 16)  # called twice: per-example vjp
            self.head = nn.Linear(16 + 32 + 2, 3)
            self.offset = nn.Parameter(torch.zeros(3))  # owned by a non-leaf: whole-model fallback

        def forward(self, tokens, image):
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            x = (self.tokens(tokens) + self.positions(positions)).transpose(1, 2)  # (B, 6, T)
            x = self.long(self.depthwise(torch.tanh(self.reflect(self.seq(x)))))
            x = self.norm(x).transpose(1, 2)  # (B, T, 16)
            x = self.shared(torch.tanh(self.shared(self.scale(self.relu(self.layer_norm(x))))))
            wide = self.wide(image)
            wide += 1.0  # in place on a layer output, as a residual `out += x`
            wide = wide.mean(dim=(2, 3))
            volume = self.volume(image.unsqueeze(1)).mean(dim=(2, 3, 4))
            return self.head(torch.cat([x.mean(dim=1), wide, volume], dim=1)) + self.offset

    torch.manual_seed(0)
    return Zoo()


def _zoo_batch():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (BATCH, 7), generator=generator)
    tokens[0, :3] = 0  # padding positions get no gradient
    image = torch.randn(BATCH, 4, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (BATCH,), generator=generator)
    return (tokens, image), labels


@pytest.mark.parametrize("tokens", ["distinct", "repeated"])
def test_embedding_norms_equal_per_example_loop(tokens):
    """Both embedding forms: every token once per example (its rows are the output
    gradient itself) and tokens repeated (rows summed per token), padding masked."""
    from privbench.dp.torch_rules import RULES

    generator = torch.Generator().manual_seed(0)
    embedding = nn.Embedding(9, 5, padding_idx=2)
    if tokens == "distinct":
        ids = torch.stack([torch.randperm(9, generator=generator)[:6] for _ in range(BATCH)])
    else:
        ids = torch.randint(0, 4, (BATCH, 6), generator=generator)
    g = torch.randn(BATCH, 6, 5, generator=generator)
    expected = []
    for ids_n, g_n in zip(ids, g):
        grad = torch.zeros(9, 5).index_add_(0, ids_n, g_n)
        grad[embedding.padding_idx] = 0
        expected.append(grad.square().sum())
    rule = RULES[nn.Embedding]
    work = rule.norms(embedding, ids, g, rule.route(embedding, ids, g.shape))
    torch.testing.assert_close(work.sq_norms, torch.stack(expected))


def test_engine_every_route_and_fallback(short_fft_threshold):
    inputs, labels = _zoo_batch()
    description = _check(_torch_zoo(), F.cross_entropy, inputs, labels)
    layers = dict(line.split(": ") for line in description["dp_layers"])
    assert layers["wide (Conv2d)"] == "gram"
    assert layers["tokens (Embedding)"] == layers["positions (Embedding)"] == "segment"
    assert layers["long (Conv1d)"] == "fft"
    assert layers["norm (GroupNorm)"] == layers["layer_norm (LayerNorm)"] == "elementwise"
    assert layers["scale (Scale)"] == "vjp"
    assert layers["shared (Linear)"] == "vjp"
    assert "offset: whole_model" in description["dp_fallback"]
    assert {"direct", "kept"} <= set(layers.values())
    assert sorted(description["dp_copied"]) == ["layer_norm", "wide"]


def test_fft_route_equals_the_direct_per_example_gradient(short_fft_threshold):
    """The FFT cross-correlation of a long depthwise 1-D kernel, with padding and
    an odd length, against the per-example gradients of the folded convolution."""
    from privbench.dp.torch_rules import RULES

    torch.manual_seed(0)
    conv = nn.Conv1d(5, 5, 40, padding=7, groups=5)
    x = torch.randn(3, 5, 61)
    g = torch.randn_like(conv(x))
    rule = RULES[nn.Conv1d]
    fft = rule.route(conv, x, g.shape)
    assert fft == cost.Route(cost.FFT, keep=True)
    by_fft = rule.norms(conv, x, g, fft).per_example["weight"]
    by_conv = rule.norms(conv, x, g, cost.Route(cost.DIRECT, keep=True)).per_example["weight"]
    torch.testing.assert_close(by_fft, by_conv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 8, 5, padding=2, groups=4),  # channel multiplier 2 on a 2x2 map
    nn.Conv2d(4, 4, 3, padding=2, stride=2, dilation=2, groups=4),
    nn.Conv1d(3, 3, 5, padding=2, groups=3),
], ids=["multiplier", "strided_dilated", "1d"])
def test_depthwise_clipped_sum_where_the_kernel_exceeds_the_map_equals_per_example_loop(conv):
    """The book-keeping sum of a depthwise layer whose kernel is larger than its input
    (computed as one grouped convolution, not PyTorch's weight gradient) and its
    direct norms, against each example's own weight gradient."""
    from privbench.dp import torch_rules

    torch.manual_seed(0)
    x = torch.randn(BATCH, conv.in_channels, *(2,) * len(conv.kernel_size))
    g = torch.randn_like(conv(x))
    assert torch_rules._depthwise(conv) and torch_rules._kernel_exceeds_input(conv, x)
    weight_grad = torch_rules._CONV_WEIGHT_GRAD[len(conv.kernel_size)]
    per_example = torch.stack([weight_grad(x[n:n + 1], conv.weight.shape, g[n:n + 1], conv.stride, conv.padding,
                                           conv.dilation, conv.groups) for n in range(BATCH)])
    factors = torch.linspace(0.2, 1.0, BATCH)
    rule = torch_rules.RULES[type(conv)]
    work = rule.norms(conv, x, g, cost.Route(cost.DIRECT, keep=False))
    bias = g.flatten(2).sum(dim=2)
    torch.testing.assert_close(work.sq_norms, per_example.flatten(1).square().sum(1) + bias.square().sum(1))
    summed = rule.clipped_sum(conv, work, factors)["weight"]
    torch.testing.assert_close(summed, torch.tensordot(factors, per_example, dims=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    nn.Conv2d(3, 4, (2, 3), padding=(2, 1), dilation=(2, 1)),
    nn.Conv2d(2, 3, 1),
], ids=["same", "strided_dilated_rectangular", "dilated_rectangular_padded", "pointwise"])
@pytest.mark.parametrize("workspace", [None, 1], ids=["one_chunk", "one_example_per_chunk"])
@pytest.mark.parametrize("form", ["patches", "taps"])
def test_per_example_conv_gradients_on_channels_last_tensors_equal_per_example_loop(conv, workspace, form,
                                                                                    monkeypatch):
    """Channels-last input and output gradient (the published CNN): per-example gradients
    formed in that layout, from gathered patches or tap by tap (unit strides), against each
    example's own weight gradient."""
    from privbench.dp import torch_rules

    if workspace:
        monkeypatch.setattr(torch_rules, "PATCH_WORKSPACE", workspace)
        monkeypatch.setattr(torch_rules, "WORKSPACE", workspace)
    monkeypatch.setattr(torch_rules, "TAPS_MIN_CHANNELS", 0 if form == "taps" else 10**9)
    by_taps = []
    monkeypatch.setattr(torch_rules, "_conv2d_per_example_by_taps", _spy(
        torch_rules._conv2d_per_example_by_taps, by_taps))
    torch.manual_seed(0)
    x = torch.randn(BATCH, conv.in_channels, 7, 6).to(memory_format=torch.channels_last)
    g = torch.randn_like(conv(x)).to(memory_format=torch.channels_last)
    assert torch_rules._channels_last(x) and torch_rules._channels_last(g)
    expected = torch.stack([torch.nn.grad.conv2d_weight(x[n:n + 1].contiguous(), conv.weight.shape,
                                                        g[n:n + 1].contiguous(), conv.stride, conv.padding,
                                                        conv.dilation) for n in range(BATCH)])
    rule = torch_rules.RULES[nn.Conv2d]
    work = rule.norms(conv, x, g, cost.Route(cost.DIRECT, keep=True))
    torch.testing.assert_close(work.per_example["weight"], expected, rtol=1e-5, atol=1e-5)
    direct = rule.weight_sq_norms(conv, x, g, cost.DIRECT)
    torch.testing.assert_close(direct, expected.flatten(1).square().sum(1), rtol=1e-5, atol=1e-5)
    assert bool(by_taps) == (form == "taps" and conv.stride == (1, 1) and conv.kernel_size != (1, 1))


def _spy(fn, calls: list):
    def spied(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)
    return spied


def test_output_view_changed_in_place_needs_no_copy():
    """A Linear on (B, T, d) returns a view; ReLU(inplace) on it: the gradient is
    taken at the layer's own autograd node, the layer keeps its rule."""

    class ViewInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu_(self.proj(x)).mean(dim=1))

    torch.manual_seed(0)
    x, labels = torch.randn(BATCH, 5, 6), torch.randint(0, 3, (BATCH,))
    description = _check(ViewInPlace(), F.cross_entropy, (x,), labels)
    assert description["dp_copied"] == ["proj"]
    assert description["dp_fallback"] == []


def test_engine_refuses_inputs_changed_in_place():
    class Overwrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            h = x * 2
            y = self.linear(h)
            h.zero_()  # the ordinary backward pass would fail on this too
            return y

    with pytest.raises(RuntimeError, match="inputs of layer 'linear' changed in place"):
        torch_engine.clipped_grad_sum(Overwrite(), nn.functional.mse_loss, (torch.randn(BATCH, 3),),
                                      torch.randn(BATCH, 2), 1.0)


def test_route_keeps_per_example_gradients_only_where_they_fit():
    """Linear(256, 1024): per-example gradients fit from T = 205 rows on (d * p <= T * (d + p)),
    and are kept where the direct form is also the cheaper one (T = 300; at T = 128 the tiled Gram)."""
    dp = torch_engine.make_private(nn.Sequential(nn.Linear(256, 1024), nn.LayerNorm(1024)),
                                   torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0),
                                   max_grad_norm=1.0, noise_multiplier=0.0)
    for rows, expected in [(300, "kept"), (128, "gram")]:
        description = dp.describe(lambda out, _: out.sum(), (torch.zeros(2, rows, 256),), torch.zeros(2))
        assert description["dp_layers"] == [f"0 (Linear): {expected}", "1 (LayerNorm): elementwise"]


class _Recorder(torch_engine.PhaseObserver):
    def __init__(self, dp_ref):
        self.events, self.dp_ref = [], dp_ref

    def forward_done(self, loss):
        self.events.append(("forward_done", float(loss.detach())))

    def layer_norms(self, name, module, route_label):
        import contextlib

        @contextlib.contextmanager
        def section():
            self.events.append(("enter", name, route_label))
            yield
            self.events.append(("exit", name))

        return section()

    def norms_done(self):
        kept = self.dp_ref[0].kept()
        self.events.append(("norms_done", {kind: len(tensors) for kind, tensors in kept.items()}))

    def clipped_sum_done(self):
        self.events.append(("clipped_sum_done",))


def test_phase_hooks_fire_in_order_and_kept_lists_what_is_held(short_fft_threshold):
    inputs, labels = _zoo_batch()
    module = _torch_zoo()
    holder = []
    observer = _Recorder(holder)
    dp = torch_engine.make_private(module, torch.optim.SGD(module.parameters(), lr=0.0), max_grad_norm=1.0,
                                   noise_multiplier=0.0, observer=observer)
    holder.append(dp)
    dp.step(F.cross_entropy, inputs, labels)
    kinds = [event[0] for event in observer.events]
    assert kinds[0] == "forward_done" and kinds[-2:] == ["norms_done", "clipped_sum_done"]
    sections = [event for event in observer.events if event[0] == "enter"]
    # one section per layer: the layers with a rule as autograd reaches them
    # (head first, tokens last), then the vjp layers and the whole model
    names = [event[1] for event in sections]
    assert names[0] == "head" and names[-1] == "whole_model"
    assert names.index("tokens") < names.index("scale")
    assert sorted(names) == sorted([*(n for n, m in module.named_modules() if n and n != "relu"), "whole_model"])
    assert kinds.count("enter") == kinds.count("exit")
    assert dict(sections_label[1:] for sections_label in sections)["long"] == "fft"
    held = observer.events[-2][1]
    assert held["per_example"] and held["inputs"] and held["output_grads"]  # kept routes and book-keeping ones
    assert not any(dp.kept().values())


def test_step_adds_noise_of_std_noise_multiplier_times_clip_over_batch():
    module = models.build("torch", "cnn", "tiny", seed=0)
    family = models.family("cnn")
    inputs, targets = family.synthetic_batch("tiny", BATCH, "torch", seed=1)
    params = list(module.parameters())
    expected = _flat(torch_engine.clipped_grad_sum(module, family.loss_torch, inputs, targets, 1e-6))
    before = [p.detach().clone() for p in params]
    dp = torch_engine.make_private(module, torch.optim.SGD(params, lr=1.0), max_grad_norm=1e-6,
                                   noise_multiplier=0.5e6, noise_generator=torch.Generator().manual_seed(0))
    loss = dp.step(family.loss_torch, inputs, targets)
    assert loss.requires_grad is False and torch.isfinite(loss)
    update = _flat(b - p for b, p in zip(before, params))  # lr 1: the step is the gradient
    assert update.std() == pytest.approx(0.5 / BATCH, rel=0.1)
    assert np.abs(expected).max() <= 1e-6 * BATCH


def test_noise_drawn_on_several_cores_is_gaussian_independent_and_reproducible(monkeypatch):
    """The multi-core noise path: N(0, std^2) per number, its parts drawn from
    different streams, the same noise again from the same seed."""
    monkeypatch.setattr(torch_engine, "PARALLEL_NOISE_MIN_NUMBERS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def noise_of_one_step(seed):
            module = nn.Linear(200, 100)
            params = list(module.parameters())
            dp = torch_engine.make_private(module, torch.optim.SGD(params, lr=0.0), max_grad_norm=1e-9,
                                           noise_multiplier=1e9, noise_generator=torch.Generator().manual_seed(seed))
            try:
                data = torch.Generator().manual_seed(7)
                dp.step(lambda out, y: F.mse_loss(out, y), (torch.randn(4, 200, generator=data),),
                        torch.randn(4, 100, generator=data))
                return _flat(p.grad for p in params) * 4 / (1e9 * 1e-9)  # undo the divisor and std
            finally:
                dp.remove()

        noise = noise_of_one_step(0)
        assert noise.std() == pytest.approx(1.0, rel=0.05) and abs(noise.mean()) < 0.02
        half = len(noise) // 2
        assert abs(np.corrcoef(noise[:half - 50], noise[half:2 * half - 50])[0, 1]) < 0.05
        # (up to the clipped sum, below 1e-8 here: the layer's initial weights differ)
        np.testing.assert_allclose(noise, noise_of_one_step(0), atol=1e-6)
        assert np.abs(noise - noise_of_one_step(1)).max() > 1.0
    finally:
        torch.set_num_threads(threads)


class _ChannelsLastConvNet(nn.Module):
    """A convolution on channels-last activations, then a Linear layer."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 8, 3, padding=1), nn.Linear(200, 20)

    def forward(self, x):
        x = x.reshape(-1, 2, 5, 5).contiguous(memory_format=torch.channels_last)
        return self.head(self.conv(x).flatten(1))


def test_noise_drawn_ahead_during_the_step_is_the_noise_drawn_after_it(monkeypatch):
    """From the second step on, the noise is drawn in the background while the
    forward and backward passes run (into the previous step's gradients, here
    a channels-last one among them): the same numbers as drawn after the
    clipped sum, step for step."""
    from privbench.dp import cost, torch_rules

    monkeypatch.setattr(torch_engine, "PARALLEL_NOISE_MIN_NUMBERS", 0)
    # The direct route's book-keeping sum of a channels-last convolution is channels-last too.
    monkeypatch.setattr(torch_rules.ConvRule, "route", lambda *args: cost.Route(cost.DIRECT, keep=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def gradients_of_two_steps(ahead: bool):
            torch.manual_seed(0)
            module = _ChannelsLastConvNet().to(memory_format=torch.channels_last)
            params = list(module.parameters())
            dp = torch_engine.make_private(module, torch.optim.SGD(params, lr=0.1), max_grad_norm=1.0,
                                           noise_multiplier=1.0, noise_generator=torch.Generator().manual_seed(3))
            if not ahead:
                dp._draw_noise_ahead = lambda: None
            data = torch.Generator().manual_seed(7)
            inputs, targets = (torch.randn(4, 50, generator=data),), torch.randn(4, 20, generator=data)
            grads = []
            for _ in range(2):
                loss = dp.forward(lambda out, y: F.mse_loss(out, y), inputs, targets)
                grads.append(dp._noise_ahead is not None)
                dp.clipped_backward(loss)
                dp.noise_and_step()
                grads.append(_flat(p.grad for p in params))
            dp.remove()
            return grads

        drawn_ahead, drawn_after = gradients_of_two_steps(True), gradients_of_two_steps(False)
        assert drawn_ahead[0::2] == [False, True] and drawn_after[0::2] == [False, False]
        for ahead, after in zip(drawn_ahead[1::2], drawn_after[1::2]):
            np.testing.assert_array_equal(ahead, after)
    finally:
        torch.set_num_threads(threads)


def test_trainer_noise_std_on_mean_gradient():
    """With a negligible clip norm the gradient handed to AdamW is pure noise
    of std noise_std, as in the clipped mode."""
    trainer = make_trainer("torch", "cnn", "tiny", "fast_dp", batch_size=8,
                           settings={"l2_clip_norm": 1e-6})
    trainer.step()
    noisy = _flat(p.grad for p in trainer._module.parameters())
    assert noisy.std() == pytest.approx(0.1, rel=0.1)


def test_empty_batch_is_a_noise_only_update():
    """Poisson sampling can draw an empty batch: the update is the noise alone
    over the expected batch size, as in Opacus."""
    module = models.build("torch", "cnn", "tiny", seed=0)
    params = list(module.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    dp = torch_engine.make_private(module, optimizer, max_grad_norm=2.0, noise_multiplier=0.5,
                                   expected_batch_size=4, noise_generator=torch.Generator().manual_seed(0))
    inputs, targets = models.family("cnn").synthetic_batch("tiny", BATCH, "torch", seed=1)
    loss = dp.step(models.family("cnn").loss_torch, tuple(x[:0] for x in inputs), targets[:0])
    assert torch.isnan(loss)
    noise = _flat(b - p for b, p in zip(before, params))  # lr 1: the step is the gradient
    assert noise.std() == pytest.approx(0.5 * 2.0 / 4, rel=0.1)
    assert abs(noise.mean()) < 0.05


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


def _transformer_case(seq_len=None):
    family = models.family("transformer")
    if seq_len is None:  # the tiny size: 8 tokens, too few for per-example linear gradients to fit
        (tokens,), targets = family.synthetic_batch("tiny", 5, "torch", 0)
        return models.build("torch", "transformer", "tiny", 0), family.loss_torch, tokens, targets
    torch.manual_seed(0)
    spec = {**family.SIZES["tiny"], "seq_len": seq_len}
    tokens, targets = (torch.randint(0, spec["vocab_size"], (4, seq_len)) for _ in range(2))
    from privbench.models.transformer import torch_class  # the same model class at another length

    return torch_class()(**spec, variant=models.PUBLISHED), family.loss_torch, tokens, targets


def _cnn_case():
    torch.manual_seed(0)
    return _SmallCNN(), nn.functional.cross_entropy, torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))


CASES = {"transformer": _transformer_case, "transformer-long": lambda: _transformer_case(seq_len=64),
         "cnn": _cnn_case}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_steps_with_every_example_clipped_equal_per_example_loop(case):
    """clip 0.05 below every example's norm; two steps on one engine give the same sums."""
    model, loss_fn, inputs, targets = case()
    clip = 0.05
    expected = _naive_clipped_sum(_per_example(model, loss_fn, (inputs,), targets), clip)
    dp = torch_engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), max_grad_norm=clip,
                                   noise_multiplier=0.0)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        dp.clipped_backward(dp.forward(loss_fn, (inputs,), targets))
        assert not any(dp.kept().values())
        _assert_matches(_flat(p.grad for p in model.parameters()), expected)
    routes = {line.rsplit(": ", 1)[1] for line in dp.describe(loss_fn, (inputs,), targets)["dp_layers"]
              if "(Linear)" in line or "(Conv2d)" in line}
    if case is not _transformer_case:  # long enough sequences / small enough layers: the kept route is taken
        assert "kept" in routes


def test_backward_pass_forms_no_weight_gradient():
    """Autograd is asked only for the output gradients of the layers that read the data
    (at their autograd edges), not for any parameter: no weight gradient is formed twice."""
    module = models.build("torch", "transformer", "tiny", seed=0)
    family = models.family("transformer")
    inputs, targets = family.synthetic_batch("tiny", BATCH, "torch", seed=1)
    asked = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, **kwargs):
        asked.extend(inputs)
        return grad(outputs, inputs, **kwargs)

    torch.autograd.grad = spy
    try:
        sums = torch_engine.clipped_grad_sum(module, family.loss_torch, inputs, targets, 1.0)
    finally:
        torch.autograd.grad = grad
    assert not any(isinstance(x, torch.Tensor) for x in asked)
    assert [edge.node.name() for edge in asked] == ["EmbeddingBackward0"] * 2  # tokens, positions
    names = [name for name, _ in module.named_parameters()]
    assert all(s.abs().sum() > 0 for name, s in zip(names, sums) if name.endswith("weight"))


def test_layer_returning_a_tuple_is_refused():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight, x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)[0]

    with pytest.raises(NotImplementedError, match="layer 'pair' returns no single tensor"):
        torch_engine.clipped_grad_sum(Model(), nn.functional.mse_loss, (torch.randn(BATCH, 3),),
                                      torch.randn(BATCH, 3), 1.0)


def test_clipped_backward_drops_what_it_kept_while_the_caller_holds_the_loss():
    # The hooks on the autograd graph refer to the engine's per-call records for as
    # long as the loss (and so the graph) lives: the kept per-example gradients must
    # be dropped by the clipped sum itself, not when the caller lets go of the loss.
    import gc

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    inputs, targets = (torch.randn(BATCH, 5, 8),), torch.randint(0, 3, (BATCH, 5))
    dp = torch_engine.make_private(module, torch.optim.SGD(module.parameters(), lr=0.0), max_grad_norm=1.0,
                                   noise_multiplier=0.0)

    def loss_fn(outputs, labels):
        return F.cross_entropy(outputs.reshape(-1, 3), labels.reshape(-1))

    assert dp.describe(loss_fn, inputs, targets)["dp_methods"] == "kept 2"
    loss = dp.forward(loss_fn, inputs, targets)
    dp.clipped_backward(loss)
    gc.collect()
    per_example_shapes = {(BATCH, 6, 8), (BATCH, 3, 6)}
    alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) in per_example_shapes]
    assert loss.grad_fn is not None and alive == []
