# privbench CUDA image: the CPU image plus JAX's CUDA plugin.
#
# PyTorch's CUDA libraries are in the CPU image already (the pinned torch
# wheel brings them); JAX needs its CUDA plugin, pinned in
# envs/requirements-cuda.txt to the jaxlib of the lock, with the shared NVIDIA
# libraries held at the lock's versions. The GPU driver comes from the host:
# docker run --gpus all, podman run --device nvidia.com/gpu=all, apptainer --nv
# (the runners add these flags for platform cuda).
#
#   scripts/build-image.sh cpu && scripts/build-image.sh cuda
ARG BASE_IMAGE=privbench-cpu:unknown
FROM ${BASE_IMAGE}

USER root
COPY envs/requirements-cuda.txt /opt/privbench/envs/
RUN pip install -r /opt/privbench/envs/requirements-cuda.txt -c /opt/privbench/envs/constraints.txt
USER privbench

# What the NVIDIA container toolkit exposes to the container.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

ARG KIT_VERSION=unknown
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="privbench-cuda" \
      org.opencontainers.image.description="privbench: private-training benchmarks, CUDA platform" \
      org.opencontainers.image.version="${KIT_VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.privbench.platform="cuda"
