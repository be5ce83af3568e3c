# syntax=docker/dockerfile:1.7
# Two images from one tree:
#   docker build --target operator -t ghcr.io/dpo-operator/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/dpo-operator/trainer:0.1.0 .
# Dependencies are pinned by constraints.txt, the set the test suite ran with.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG TRAINER_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY operator operator
COPY trainer trainer
RUN pip wheel --no-deps --wheel-dir /wheels .

# The operator: pydantic, kopf and the Kubernetes client; no ML stack (import-linter keeps it so).
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

# The trainer: CUDA runtime, PyTorch, TRL, PEFT, accelerate. Runs as uid 1000 (the pods'
# runAsUser); caches go to /tmp, which the pods mount as an emptyDir.
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
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/dpo
ENV PATH=/opt/dpo/bin:$PATH
COPY --from=wheel /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --constraint /tmp/constraints.txt "$(ls /wheels/dpo_operator-*.whl)[trainer]" \
    && rm -rf /wheels /tmp/constraints.txt
RUN groupadd --gid 1000 dpo && useradd --uid 1000 --gid 1000 --no-create-home dpo
USER 1000:1000
ENTRYPOINT ["dpo-trainer"]
