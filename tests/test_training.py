"""Training steps: clipped gradients against a naive per-example reference,
trainers that actually train, and the input checks of make_trainer."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from privbench import models
from privbench.training import MissingDependencyError, make_trainer

# Four examples: two end up above the clip norm and two below (see _clip_norm).
BATCH = 4


def _clip_norm(norms: np.ndarray) -> float:
    """A clip norm strictly between the 2nd and 3rd smallest per-example
    gradient norms, so that clipping is active for some examples only."""
    low, high = np.sort(norms)[1:3]
    assert low < high, "per-example gradient norms must differ"
    clip = float(np.sqrt(low * high))
    assert (norms > clip).any() and (norms < clip).any()
    return clip


def _naive_clipped_sum(per_example: list[np.ndarray], clip: float) -> np.ndarray:
    return sum(g * min(1.0, clip / np.linalg.norm(g)) for g in per_example)


def _flat_jax(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _flat_torch(tensors) -> np.ndarray:
    return np.concatenate([t.detach().cpu().numpy().ravel() for t in tensors])


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(
        actual, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max()
    )


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("microbatch_size", [None, 2])
@pytest.mark.parametrize("model", models.MODELS)
def test_clipped_grad_sum_jax_matches_naive(model, microbatch_size, variant):
    from flax import nnx

    from privbench.training.jax_steps import clipped_grad_sum_jax

    family = models.family(model)
    module = models.build("jax", model, "tiny", seed=0, variant=variant)
    inputs, targets = family.synthetic_batch("tiny", BATCH, "jax", seed=1)

    example_grad = nnx.jit(nnx.grad(lambda m, x, y: family.loss_jax(m(*x), y)))
    per_example = [
        _flat_jax(example_grad(module, tuple(x[i : i + 1] for x in inputs), targets[i : i + 1]))
        for i in range(BATCH)
    ]
    clip = _clip_norm(np.array([np.linalg.norm(g) for g in per_example]))

    actual = _flat_jax(
        clipped_grad_sum_jax(module, family.loss_jax, inputs, targets, clip, microbatch_size)
    )
    _assert_close(actual, _naive_clipped_sum(per_example, clip))

    if microbatch_size is not None:
        # jax-privacy 2.0 still clips each example on its own when
        # microbatching (keep_batch_dim=True makes every example a group); had
        # it clipped each microbatch's mean gradient instead, this would match.
        per_microbatch = [
            np.mean(per_example[i : i + microbatch_size], axis=0)
            for i in range(0, BATCH, microbatch_size)
        ]
        assert not np.allclose(actual, _naive_clipped_sum(per_microbatch, clip), rtol=1e-2)


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize(
    "model,grad_sample_mode",
    [(model, "hooks") for model in models.MODELS] + [("cnn", "functorch")],
)
def test_clipped_grad_sum_torch_matches_naive(model, grad_sample_mode, variant):
    """Every model and variant; the published CNN's channels-last convolutions
    need privbench.training.dp_methods.fix_opacus_channels_last_conv."""
    from privbench.training.torch_steps import clipped_grad_sum_torch, make_opacus_compatible

    family = models.family(model)
    module = make_opacus_compatible(models.build("torch", model, "tiny", seed=0, variant=variant))
    inputs, targets = family.synthetic_batch("tiny", BATCH, "torch", seed=1)

    per_example = []
    for i in range(BATCH):
        module.zero_grad(set_to_none=True)
        x = tuple(t[i : i + 1] for t in inputs)
        family.loss_torch(module(*x), targets[i : i + 1]).backward()
        per_example.append(_flat_torch(p.grad for p in module.parameters()))
    module.zero_grad(set_to_none=True)
    clip = _clip_norm(np.array([np.linalg.norm(g) for g in per_example]))

    actual = _flat_torch(
        clipped_grad_sum_torch(
            module, family.loss_torch, inputs, targets, clip, grad_sample_mode
        )
    )
    _assert_close(actual, _naive_clipped_sum(per_example, clip))


@pytest.mark.parametrize(
    "framework,mode,microbatch_size,settings",
    [
        ("jax", "standard", None, None),
        ("jax", "clipped", None, None),
        ("jax", "clipped", 2, None),
        ("torch", "standard", None, None),
        ("torch", "clipped", None, None),
        ("torch", "clipped", 2, None),
        ("torch", "clipped", None, {"poisson_sampling": False}),
    ],
)
def test_trainer_steps_change_parameters(framework, mode, microbatch_size, settings):
    trainer = make_trainer(
        framework, "cnn", "tiny", mode, batch_size=8,
        microbatch_size=microbatch_size, settings=settings,
    )
    before = trainer.param_arrays()
    for _ in range(2):
        trainer.sync(trainer.step())
    after = trainer.param_arrays()

    assert len(before) == len(after)
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    description = trainer.description
    assert description["param_count"] == sum(a.size for a in after)
    assert description["microbatch_size"] == microbatch_size
    # The same noise on the averaged gradient in both frameworks.
    assert description["noise_std_effective"] == pytest.approx(
        0.1 if mode == "clipped" else 0.0
    )


def test_torch_noise_std_on_mean_gradient():
    """With a negligible clip norm the gradient Opacus hands AdamW is pure
    noise, whose std must be the configured noise_std (as in JAX, where it is
    added to the already-averaged gradient)."""
    trainer = make_trainer(
        "torch", "cnn", "tiny", "clipped", batch_size=8,
        settings={"l2_clip_norm": 1e-6, "poisson_sampling": False},
    )
    trainer.step()
    # After the step Opacus leaves the noisy mean gradient in p.grad.
    noisy = _flat_torch(p.grad for p in trainer._module.parameters())
    assert noisy.std() == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"framework": "mxnet"}, "unknown framework 'mxnet'"),
        ({"mode": "dp"}, "unknown mode 'dp'"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
        ({"size": "huge"}, "unknown size 'huge'"),
        ({"batch_size": 0}, "batch size 0 must be a positive integer"),
        (
            {"batch_size": 32, "microbatch_size": 5},
            "batch size 32 is not divisible by microbatch size 5: "
            "choose a microbatch size that divides the batch",
        ),
        ({"microbatch_size": 0}, "microbatch size 0 must be a positive integer"),
        ({"mode": "standard", "microbatch_size": 2}, "not supported for jax standard"),
        ({"framework": "torch", "mode": "standard", "microbatch_size": 2}, "not supported for torch standard"),
        ({"settings": {"lr": 1e-3}}, "unknown setting\\(s\\) lr"),
        ({"settings": {"noise_std": -1.0}}, "noise_std=-1.0 must be >= 0"),
        ({"settings": {"opacus_batches": 0}}, "opacus_batches=0 must be > 0"),
        ({"model_variant": "faithful"}, "unknown model variant 'faithful'"),
        (
            {"framework": "torch", "settings": {"grad_sample_mode": "ghost"}},
            "grad_sample_mode 'ghost' is not supported",
        ),
    ],
)
def test_make_trainer_rejects_bad_input(kwargs, message):
    args = {"framework": "jax", "model": "cnn", "size": "tiny", "mode": "clipped",
            "batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_trainer(**args)


@pytest.mark.parametrize(
    "framework,package,pip_name",
    [("jax", "jax_privacy", "jax-privacy"), ("torch", "opacus", "opacus")],
)
def test_missing_dp_package_names_it(monkeypatch, framework, package, pip_name):
    # A None entry in sys.modules makes `import package` fail as if absent.
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingDependencyError) as raised:
        make_trainer(framework, "cnn", "tiny", "clipped", batch_size=8)
    assert isinstance(raised.value, ImportError)
    assert repr(pip_name) in str(raised.value)
    assert "pip install -r envs/requirements.txt" in str(raised.value)


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("variant", models.VARIANTS)
def test_trainer_records_its_model_variant(framework, variant):
    trainer = make_trainer(framework, "diffusion", "tiny", "standard", batch_size=2, model_variant=variant)
    assert trainer.description["model_variant"] == variant


@pytest.mark.parametrize(("opacus_batches", "poisson"), [(None, True), (3, True), (3, False)])
def test_opacus_gets_the_fixed_batch_repeated(opacus_batches, poisson):
    """As published: the one batch repeated to 60 batches' worth (sample rate 1/60)."""
    settings = {"poisson_sampling": poisson, **({} if opacus_batches is None else {"opacus_batches": opacus_batches})}
    trainer = make_trainer("torch", "cnn", "tiny", "clipped", batch_size=4, settings=settings)
    copies = opacus_batches or 60
    assert trainer.description["sample_rate"] == pytest.approx(1 / copies)
    dataset = trainer._loader.dataset
    assert len(dataset) == 4 * copies
    batch = [dataset[i] for i in range(4)]
    for i in range(4, 4 * copies, 5):
        for a, b in zip(dataset[i], batch[i % 4]):
            assert a.equal(b)
    assert trainer.description["noise_std_effective"] == pytest.approx(0.1)
    trainer.sync(trainer.step())


def test_time_blocks_calibrates_to_the_least_steps_and_seconds():
    import time

    from privbench.timing import summarise_blocks, time_blocks

    synced = []

    def run(step_s, min_steps, min_seconds, blocks):
        metrics, calls = {}, []

        def step():
            time.sleep(step_s)
            calls.append(1)
            return len(calls)

        time_blocks(step, synced.append, 1, min_steps, min_seconds, blocks, metrics, lambda _: None)
        return metrics, len(calls)

    # slow steps: the least number of steps decides (ceil(5 / 3) = 2 in the first block)
    metrics, calls = run(0.01, 5, 0.0, 3)
    assert metrics["block_steps"] == [2, 2, 2] and calls == 1 + 6
    # fast steps: the least seconds decide, in equal blocks after the first
    synced.clear()
    metrics, calls = run(0.002, 3, 0.2, 4)
    first, *rest = metrics["block_steps"]
    assert first == 1 and len(set(rest)) == 1 and sum(metrics["block_steps"]) >= 0.2 / 0.004
    assert sum(metrics["block_times_s"]) >= 0.15
    # one synchronisation per block (plus the warm-up step's), on the block's last step
    assert synced == [1, *np.cumsum(metrics["block_steps"]) + 1]
    summary = summarise_blocks(metrics["block_steps"], metrics["block_times_s"], batch_size=8)
    assert summary["throughput_sps"] == pytest.approx(8 * sum(metrics["block_steps"]) / sum(metrics["block_times_s"]))
    assert summary["timed_steps_done"] == sum(metrics["block_steps"]) and summary["timing_blocks"] == 4
    assert summary["min_step_s"] <= summary["mean_step_s"] <= summary["max_step_s"]
