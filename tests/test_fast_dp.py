"""The training mode fast_dp (the kit's DP engines, privbench.dp) in both
frameworks' trainers. The engines themselves are tested against a naive loop
over examples in tests/test_dp_torch_engine.py and tests/test_dp_jax_engine.py."""

from __future__ import annotations

import numpy as np
import pytest

from privbench.training import make_trainer


# --------------------------------------------------------------------------- both trainers

@pytest.mark.parametrize("variant", ["published", "harmonized"])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fast_dp_trainer_trains_and_describes_its_layers(framework, variant):
    trainer = make_trainer(framework, "transformer", "tiny", "fast_dp", batch_size=8, model_variant=variant)
    before = trainer.param_arrays()
    for _ in range(2):
        trainer.sync(trainer.step())
    after = trainer.param_arrays()
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    description = trainer.description
    assert description["mode"] == "fast_dp"
    assert description["noise_std_effective"] == pytest.approx(0.1)
    assert description["l2_clip_norm"] == 1.0
    assert description["dp_fallback"] == []
    assert any(line.startswith("tokens (Embed") for line in description["dp_layers"])


def test_fast_dp_takes_no_microbatch_size():
    with pytest.raises(ValueError, match="not supported for jax fast_dp"):
        make_trainer("jax", "cnn", "tiny", "fast_dp", batch_size=8, microbatch_size=2)
