"""Presets validate; a bad key or value is rejected with its dotted path."""

import copy

import pytest
import yaml

from privbench import config, studies
from privbench.studies.curves import make_run_spec
from privbench.studies.throughput import plan as throughput


@pytest.mark.parametrize("preset", ["config.yaml", "tiny.yaml", "full.yaml"])
def test_presets_are_valid_and_defaults_filled(repo_root, preset):
    cfg = studies.load(repo_root / "config" / preset)
    assert cfg["results_dir"] == "results"
    assert cfg["throughput"]["settings"]["l2_clip_norm"] == 1.0
    assert cfg["run"]["seed"] == 0


def test_full_preset_is_the_published_setting(repo_root):
    cfg = studies.load(repo_root / "config" / "full.yaml")
    section = cfg["throughput"]
    assert section["timed_steps"] == 50 and section["warmup_steps"] == 1
    assert section["sizes"] == ["small", "medium", "large"]
    assert section["settings"] == {"learning_rate": 1e-4, "l2_clip_norm": 1.0, "noise_std": 0.1,
                                   "grad_sample_mode": "hooks", "poisson_sampling": True,
                                   "opacus_batches": 60}


def _raw(repo_root):
    return yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["throughput"].update(batch_capp=4), "unknown key 'batch_capp' under 'throughput'"),
    (lambda c: c.update(colour="red"), "unknown key 'colour' at the top level"),
    (lambda c: c["throughput"].update(models=["cnn", "resnet"]), "'throughput.models.1'"),
    (lambda c: c["throughput"].update(sizes=["huge"]), "'throughput.sizes.0'"),
    (lambda c: c["run"].update(timeout_s=0), "'run.timeout_s'"),
    (lambda c: c["throughput"].update(settings={"grad_sample_mode": "magic"}), "'throughput.settings.grad_sample_mode'"),
    (lambda c: c["throughput"].update(batch_cap=1), "'throughput.batch_cap' (1) is smaller"),
    (lambda c: c["throughput"].update(microbatch_size=3), "'throughput.microbatch_size' (3) does not divide"),
    (lambda c: c.pop("cnn_microbatch"), "has no 'cnn_microbatch' section"),
])
def test_invalid_config_names_the_key(repo_root, mutate, expected):
    raw = _raw(repo_root)
    mutate(raw)
    with pytest.raises(config.ConfigError) as info:
        studies.validate(raw)
    assert expected in str(info.value)


def test_plan_covers_every_combination(tiny_config):
    curves = throughput.curves(tiny_config)
    sweeps = {curve_id: c for curve_id, c in curves.items() if "points" not in c}
    assert len(sweeps) == 2 * 4 * 1 * 3  # frameworks x models x sizes x modes
    assert set(curves) - set(sweeps) == {"repeat-r1"}  # tiny: 2 processes per claim run
    assert "jax-cnn-tiny-clipped" in curves and "torch-state_space-tiny-standard" in curves
    assert "jax-diffusion-tiny-fast_dp" in curves and "torch-transformer-tiny-fast_dp" in curves


def test_changed_setting_changes_the_run_identity(tiny_config):
    curve = throughput.curves(tiny_config)["jax-cnn-tiny-clipped"]
    other = copy.deepcopy(curve)
    other["run"]["settings"]["noise_std"] = 0.5
    a, b = make_run_spec(curve, 2), make_run_spec(other, 2)
    assert a["run_id"] == b["run_id"]
    assert a["config"]["spec_hash"] != b["config"]["spec_hash"]


def test_unknown_mode_is_named_against_the_dp_method_registry(repo_root):
    from privbench import studies

    raw = _raw(repo_root)
    raw["throughput"]["modes"] = ["standard", "fastdp"]
    with pytest.raises(config.ConfigError) as info:
        studies.validate(raw)
    assert "'throughput.modes' has unknown mode 'fastdp': choose from standard, clipped, fast_dp" in str(info.value)


def test_modes_and_trainers_come_from_the_dp_method_registry():
    # Adding a DP method is one entry in dp_methods.REGISTRY: the modes, their
    # trainers and the microbatch rule follow from it.
    from privbench import training
    from privbench.training import dp_methods

    assert training.MODES == ("standard", *dp_methods.NAMES)
    for (framework, method), entry in dp_methods.REGISTRY.items():
        assert training.REGISTRY[(framework, method)] == training.TRAINERS[(framework, entry.trainer)]
        assert ((framework, method) in training.MICROBATCH_MODES) == (entry.trainer == dp_methods.LIBRARY)


def test_studies_are_the_folders_with_a_schema_and_name_the_experiments(repo_root):
    # Adding a page is one folder (plan, measure, report, schema.yaml) and its template:
    # the folder is found and its schema validates its section of a preset.
    from privbench import studies

    assert studies.STUDIES == ("cnn_microbatch", "memory_profile", "throughput", "torch_cifar")
    raw = _raw(repo_root)
    raw["experiments"] = ["throughput", "resnet_page"]
    with pytest.raises(config.ConfigError) as info:
        studies.validate(raw)
    assert "'experiments.1'" in str(info.value)
    raw = _raw(repo_root)
    raw["memory_profile"]["methods"] = ["vanilla", "flash"]  # the study's own schema applies
    with pytest.raises(config.ConfigError) as info:
        studies.validate(raw)
    assert "'memory_profile.methods.1'" in str(info.value)
