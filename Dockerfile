# syntax=docker/dockerfile:1.7
# Two images from one tree:
#   docker build --target operator -t ghcr.io/dpo-operator/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/dpo-operator/trainer:0.1.0 .
# Dependencies are pinned by constraints.txt, the set the test suite ran with.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# The CUDA of the trainer image: at least the CUDA runtime the pinned torch wheel was built for
# (constraints.txt: nvidia-cuda-runtime), so that the container runtime refuses a node whose
# driver is too old instead of torch failing later (tests/unit/test_image.py checks it).
ARG CUDA_VERSION=13.2.0
ARG TRAINER_BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04
# EFA: libfabric from the AWS EFA installer, and the AWS OFI NCCL plugin built against it.
ARG EFA_INSTALLER_VERSION=1.43.2
ARG AWS_OFI_NCCL_VERSION=1.16.3

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY operator operator
COPY trainer trainer
RUN pip wheel --no-deps --wheel-dir /wheels .

# The operator: pydantic, kopf and aiohttp; neither the ML stack nor the Kubernetes client
# (import-linter keeps it so).
FROM ${PYTHON_IMAGE} AS operator
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="dpo-operator" \
      org.opencontainers.image.description="Reconciles DPOJobs into GPU training pods" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/dpo-operator/dpo-operator"
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin dpo
COPY --from=wheel /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt \
        "$(ls /wheels/dpo_operator-*.whl)[operator]" \
    && rm -rf /wheels /tmp/constraints.txt
USER 10001:10001
ENTRYPOINT ["dpo"]
CMD ["operator", "--all-namespaces"]

# Fabric libraries for the trainer: libfabric with the EFA provider (the AWS EFA installer, without
# its kernel module) and the AWS OFI NCCL plugin, which is what NCCL_NET="AWS Libfabric" loads.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS fabric
ARG EFA_INSTALLER_VERSION
ARG AWS_OFI_NCCL_VERSION
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl autoconf automake libtool \
        make libhwloc-dev \
    && rm -rf /var/lib/apt/lists/*
RUN curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
        | tar -xz -C /tmp \
    && cd /tmp/aws-efa-installer \
    && ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify --minimal \
    && rm -rf /tmp/aws-efa-installer /var/lib/apt/lists/*
RUN curl -fsSL "https://github.com/aws/aws-ofi-nccl/releases/download/v${AWS_OFI_NCCL_VERSION}/aws-ofi-nccl-${AWS_OFI_NCCL_VERSION}.tar.gz" \
        | tar -xz -C /tmp \
    && cd "/tmp/aws-ofi-nccl-${AWS_OFI_NCCL_VERSION}" \
    && ./configure --prefix=/opt/aws-ofi-nccl --with-libfabric=/opt/amazon/efa \
        --with-cuda=/usr/local/cuda --enable-platform-aws \
    && make -j"$(nproc)" install \
    && rm -rf "/tmp/aws-ofi-nccl-${AWS_OFI_NCCL_VERSION}"

# The trainer: CUDA, PyTorch, TRL, PEFT, accelerate, and each network profile's transport:
# rdma-core/libibverbs (infiniband, roce), libfabric + the AWS OFI NCCL plugin (efa); GKE mounts
# the TCPXO plugin from the node, and the launcher appends its directory to LD_LIBRARY_PATH.
# Runs as uid 1000 (the pods' runAsUser); caches go to /tmp, which the pods mount as an emptyDir.
FROM ${TRAINER_BASE_IMAGE} AS trainer
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="dpo-operator-trainer" \
      org.opencontainers.image.description="TRL DPO trainer, eval gate and promotion for DPOJob pods" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/dpo-operator/dpo-operator"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface \
    DPO_CACHE=/tmp/dpo-cache \
    MPLCONFIGDIR=/tmp/matplotlib
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
        rdma-core ibverbs-providers libibverbs1 librdmacm1 libhwloc15 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/dpo
COPY --from=fabric /opt/amazon/efa /opt/amazon/efa
COPY --from=fabric /opt/aws-ofi-nccl /opt/aws-ofi-nccl
# Appended to the base image's own LD_LIBRARY_PATH (its /usr/local/nvidia/lib64 holds the driver
# libraries the GPU operator mounts), never replacing it.
ENV PATH=/opt/dpo/bin:$PATH \
    LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:/opt/amazon/efa/lib:/opt/aws-ofi-nccl/lib
COPY --from=wheel /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --constraint /tmp/constraints.txt "$(ls /wheels/dpo_operator-*.whl)[trainer]" \
    && rm -rf /wheels /tmp/constraints.txt
# Ubuntu 24.04 images ship a user "ubuntu" with uid 1000: the pods' uid becomes ours.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 dpo && useradd --uid 1000 --gid 1000 --no-create-home dpo
USER 1000:1000
ENTRYPOINT ["dpo-trainer"]
