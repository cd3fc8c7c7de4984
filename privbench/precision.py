"""Float32 precision of matrix products and convolutions on GPUs, the same in both frameworks.

On Ampere and later GPUs JAX computes float32 matmuls and convolutions in TensorFloat-32
by default, while PyTorch's matmuls use full float32 (and its cuDNN convolutions TF32):
left alone, the two frameworks would be timed at different precisions. A preset's
``run.precision`` chooses one for both, applied by the worker after the imports and
recorded with the run (``config.precision``):

    highest   true float32 everywhere (the default: results comparable across GPUs)
    tf32      TensorFloat-32 for matmuls and convolutions in both frameworks

CPUs compute float32 in float32 either way: on other platforms nothing is changed.
"""

from __future__ import annotations

import sys

PRECISIONS = ("highest", "tf32")


def apply(precision: str, platform: str) -> dict:
    """Set ``precision`` in every framework this process has imported (platform cuda only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if platform != "cuda":
        return {}
    tf32 = precision == "tf32"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return {"float32_precision": precision}
