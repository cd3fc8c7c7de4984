# privbench confidential-VM image: for runs on platform cvm, inside an AMD
# SEV-SNP or Intel TDX guest.
#
# Every run on platform cvm collects a TEE report bound to a fresh nonce
# (privbench.tee) through the guest kernel's configfs-tsm interface
# (/sys/kernel/config/tsm/report) or /dev/sev-guest, which the runners pass
# into the container; the report goes into the run's record. Creating a report
# needs root in the guest (or write access granted to the report folder).
# Runs on platform cvm use the CPU.
#
#   scripts/build-image.sh cpu && scripts/build-image.sh cvm
ARG BASE_IMAGE=privbench-cpu:unknown
FROM ${BASE_IMAGE}

# The kit comes with the base image: refuse one too old to hold the
# attestation code.
RUN python -c "import privbench.tee"

ARG KIT_VERSION=unknown
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="privbench-cvm" \
      org.opencontainers.image.description="privbench: private-training benchmarks, confidential-VM platform (attested runs)" \
      org.opencontainers.image.version="${KIT_VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.privbench.platform="cvm"
