"""pytest plugin: run a test session with the kit's norm samplers in Opacus' registry.

Used by tests/test_opacus_norms.py to run Opacus' own fast-gradient-clipping
tests against privbench.dp.opacus_norms; it counts the samplers' calls into
the file named by $PRIVBENCH_NORM_SAMPLER_CALLS, as proof that they ran.
"""

import os

import pytest

_calls = {"count": 0}


def pytest_configure(config):
    from privbench.dp import opacus_norms

    sampler = opacus_norms.norm_sample

    def counted(layer, activations, backprops):
        _calls["count"] += 1
        return sampler(layer, activations, backprops)

    opacus_norms.NORM_SAMPLERS = {layer_type: counted for layer_type in opacus_norms.NORM_SAMPLERS}
    opacus_norms.register()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    path = os.environ.get("PRIVBENCH_NORM_SAMPLER_CALLS")
    if path:
        with open(path, "w") as out:
            out.write(str(_calls["count"]))
