# privbench CPU image: the kit and its pinned environment.
#
# The environment is exactly the host's: envs/requirements.txt under the full
# lock envs/constraints.txt. The CUDA and confidential-VM images are built on
# top of this one (docker/cuda.Dockerfile, docker/cvm.Dockerfile).
#
#   scripts/build-image.sh cpu            (tags privbench-cpu:<kit version>)
#
# WITHOUT leaves requirements out, by name (space-separated), keeping every
# other pin: e.g. WITHOUT="torch torchvision opacus" gives a JAX-only image of
# about 1 GB instead of 7 (PyTorch brings its CUDA libraries). The tests build
# that one; an image built so says it in its label org.privbench.without.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Runners start containers as the calling user (so result files are theirs),
# who may have no home in the image: caches go to /tmp.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib

RUN useradd --create-home --uid 1000 --user-group privbench \
 && python3 -m venv /opt/venv

ARG WITHOUT=""
COPY envs/requirements.txt envs/constraints.txt /opt/privbench/envs/
RUN cd /opt/privbench/envs \
 && without=$(echo ${WITHOUT} | tr ' ' '|') \
 && grep -v -E "^(${without:-/})==" requirements.txt > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt -c constraints.txt \
 && rm /tmp/requirements.txt

# The kit itself, last: it changes most often (and so do its version and
# commit, which would otherwise invalidate the environment's cached layer).
# Installed in place so that its schemas and templates are found next to it.
COPY . /opt/privbench/
RUN pip install --no-deps -e /opt/privbench

ARG KIT_VERSION=unknown
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="privbench-cpu" \
      org.opencontainers.image.description="privbench: private-training benchmarks, CPU platform" \
      org.opencontainers.image.version="${KIT_VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.privbench.platform="cpu" \
      org.privbench.without="${WITHOUT}"
ENV PRIVBENCH_GIT_COMMIT=${GIT_COMMIT}

USER privbench
WORKDIR /home/privbench
CMD ["python", "-m", "privbench", "--help"]
