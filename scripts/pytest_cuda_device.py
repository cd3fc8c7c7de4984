"""pytest plugin of scripts/device-check.sh: the tests' PyTorch tensors on the GPU at full float32.

Loaded with ``-p pytest_cuda_device`` (scripts/ on PYTHONPATH): new tensors and modules
default to ``cuda``, TF32 is off for matmuls and convolutions. JAX needs no plugin: with
its CUDA plugin installed it runs on the GPU already (JAX_DEFAULT_MATMUL_PRECISION=highest
is set by the caller).
"""

import torch

torch.set_default_device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")
