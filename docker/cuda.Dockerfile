# The quantize, finetune and optimize images: CUDA-capable through PyPI's torch wheels (which carry their own
# CUDA runtime, so any Debian base works and only the host's NVIDIA driver is needed).
#
#   docker buildx build -f docker/cuda.Dockerfile --target quantize -t olivepress/quantize .
#   (targets: quantize, finetune, optimize; `olivepress build` builds them all)
#
# The three images share every layer up to `build` (the locked torch stack, ~7 GB, built once) and differ only
# in a small locked layer on top and their entrypoint. Behind a TLS-intercepting proxy add
# `--secret id=extra_ca,src=/path/to/ca.pem`: only the pip steps see it, and no image keeps it.
ARG BASE_IMAGE=debian:bookworm-slim
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/olivepress/olivepress

# --- base: the OS, Debian's Python 3.11 (what the locks target) and the non-root user ---------------------
FROM ${BASE_IMAGE} AS base

# python3-venv: the venv and its pip live in these images (the stages never shell out to a compiler).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* python3-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin olivepress \
    && install -d -o olivepress -g olivepress /workspace /hf-cache

# --- build: the shared torch stack (torch + CUDA wheels, transformers, olive-ai, datasets, accelerate) ------
# The venv built here is what the images run: copying 7 GB into a fresh stage would double build time and disk.
FROM base AS build
ARG PIP_INDEX_URL

RUN --mount=type=secret,id=extra_ca \
    --mount=type=tmpfs,target=/run/olivepress-ca \
    --mount=type=bind,source=docker/pip-install.sh,target=/usr/local/bin/pip-install \
    --mount=type=bind,source=docker/requirements/torch.txt,target=/requirements/torch.txt \
    python3 -m venv /opt/venv \
    && pip-install /opt/venv /requirements/torch.txt \
    && /opt/venv/bin/pip check

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/olivepress \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OLIVEPRESS_HOME=/workspace
WORKDIR /workspace

# --- code: what the stages import, copied whole into each stage image after its pip layer -------------------
# stages/ and data/, the contract, and runtime/ (the ONNX evaluation and infer run the torch-free engine).
FROM scratch AS code
COPY contract/ /opt/olivepress/contract/
COPY runtime/ /opt/olivepress/runtime/
COPY stages/ /opt/olivepress/stages/
COPY data/ /opt/olivepress/data/

# --- quantize: + AutoAWQ ---------------------------------------------------------------------------------
FROM build AS quantize
ARG PIP_INDEX_URL

# The full lock: pip skips what the shared layer already has (same versions, same hashes) and adds the rest.
RUN --mount=type=secret,id=extra_ca \
    --mount=type=tmpfs,target=/run/olivepress-ca \
    --mount=type=bind,source=docker/pip-install.sh,target=/usr/local/bin/pip-install \
    --mount=type=bind,source=docker/requirements/quantize.txt,target=/requirements/quantize.txt \
    pip-install /opt/venv /requirements/quantize.txt \
    && /opt/venv/bin/pip check

COPY --from=code /opt/olivepress/ /opt/olivepress/
USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.quantize"]
# Declared here, after every RUN: a new revision changes only the labels, never a cached layer.
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="olivepress-quantize" \
      org.opencontainers.image.description="olivepress quantize stage: 4-bit AWQ/GPTQ/RTN through Olive (CUDA or CPU)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

# --- finetune: + PEFT --------------------------------------------------------------------------------------
FROM build AS finetune
ARG PIP_INDEX_URL

RUN --mount=type=secret,id=extra_ca \
    --mount=type=tmpfs,target=/run/olivepress-ca \
    --mount=type=bind,source=docker/pip-install.sh,target=/usr/local/bin/pip-install \
    --mount=type=bind,source=docker/requirements/finetune.txt,target=/requirements/finetune.txt \
    pip-install /opt/venv /requirements/finetune.txt \
    && /opt/venv/bin/pip check

COPY --from=code /opt/olivepress/ /opt/olivepress/
USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.finetune"]
# Declared here, after every RUN: a new revision changes only the labels, never a cached layer.
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="olivepress-finetune" \
      org.opencontainers.image.description="olivepress finetune stage: LoRA on the quantized model through Olive (CUDA or CPU)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

# --- optimize: + onnxruntime and onnxruntime-genai 0.14.1 (the builder Olive 0.13 accepts) -------------------
FROM build AS optimize
ARG PIP_INDEX_URL

RUN --mount=type=secret,id=extra_ca \
    --mount=type=tmpfs,target=/run/olivepress-ca \
    --mount=type=bind,source=docker/pip-install.sh,target=/usr/local/bin/pip-install \
    --mount=type=bind,source=docker/requirements/optimize.txt,target=/requirements/optimize.txt \
    pip-install /opt/venv /requirements/optimize.txt \
    && /opt/venv/bin/pip check

COPY --from=code /opt/olivepress/ /opt/olivepress/
USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.optimize"]
# Declared here, after every RUN: a new revision changes only the labels, never a cached layer.
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="olivepress-optimize" \
      org.opencontainers.image.description="olivepress optimize stage: int4 ONNX for onnxruntime-genai plus a separate .onnx_adapter" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
