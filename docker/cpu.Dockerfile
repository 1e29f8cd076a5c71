# The slim CPU images: onnxruntime-genai and the torch-free runtime, nothing else (no torch, no transformers, no
# compilers), plus the Azure ML push image. One shared base and build, small targets:
#
#   infer    the infer stage (the pipeline's last): answers with the adapter on and off, then exits
#   server   the OpenAI-compatible API on port 8000, with a HEALTHCHECK (what a laptop runs)
#   push     olivepress push / pull to Azure ML (compose's push and pull services)
#
#   docker buildx build -f docker/cpu.Dockerfile --target server -t olivepress/server .
#   docker run --rm -p 8000:8000 -v "$PWD/artifacts:/workspace:ro" olivepress/server
#   docker run --rm -v "$PWD/artifacts:/workspace" olivepress/infer --prompt "Hi"
#   docker run --rm olivepress/infer --help
#
# The venv is built and trimmed in `build` (which has pip, binutils) and only the result is copied into the
# slim runtime, as TGI's images do. Behind a TLS-intercepting proxy add `--secret id=extra_ca,src=ca.pem`.
ARG BASE_IMAGE=debian:bookworm-slim
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/olivepress/olivepress

# --- base: the OS, Debian's Python 3.11 (what the locks target) and the non-root user ---------------------
FROM ${BASE_IMAGE} AS base

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11=3.11.* \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
    && ln -s python3.11 /usr/bin/python3 \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin olivepress \
    && install -d -o olivepress -g olivepress /workspace

# --- build: the venv, installed from the lock and trimmed to what inference loads --------------------------
FROM base AS build
ARG PIP_INDEX_URL

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-venv=3.11.* binutils=2.40-* \
    && rm -rf /var/lib/apt/lists/*

RUN --mount=type=secret,id=extra_ca \
    --mount=type=tmpfs,target=/run/olivepress-ca \
    --mount=type=bind,source=docker/pip-install.sh,target=/usr/local/bin/pip-install \
    --mount=type=bind,source=docker/requirements/infer.txt,target=/requirements/infer.txt \
    python3 -m venv /opt/venv \
    && pip-install /opt/venv /requirements/infer.txt

# Trim, in this stage so no layer of the final image ever holds the removed bytes:
# - pip and setuptools: nothing installs at run time;
# - debug info: libonnxruntime-genai.so ships 180 MB of DWARF around 11 MB of code (only libraries that have
#   it are stripped: a blanket strip breaks the patchelf'd wheels' libraries, numpy's openblas among them;
#   grep reads all of readelf's output, as grep -q under pipefail would race readelf to SIGPIPE);
# - onnxruntime's Python package: onnxruntime_genai only dlopens capi/libonnxruntime.so* from it (found by
#   importlib.util.find_spec, never imported), so its bindings, tools and quantizers are dead weight;
# - tests, headers and type stubs.
WORKDIR /opt/venv/lib/python3.11/site-packages
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN /opt/venv/bin/python -m pip uninstall -y -q pip setuptools \
    && find . -name '*.so*' -type f | while read -r lib; do \
           if readelf -S "$lib" | grep '\.debug_info' >/dev/null; then strip --strip-debug "$lib"; fi; \
       done \
    && find onnxruntime -mindepth 1 -maxdepth 1 ! -name capi ! -name __init__.py -exec rm -rf {} + \
    && find onnxruntime/capi -mindepth 1 ! -name 'libonnxruntime.so*' -exec rm -rf {} + \
    && rm -rf onnxruntime_genai/models numpy/_core/include numpy/f2py numpy/typing numpy/_pyinstaller \
    && find . -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} + \
    && find . -name '*.pyi' -delete \
    && /opt/venv/bin/python -m compileall -q -j 0 . \
    && /opt/venv/bin/python -c "import onnxruntime_genai as og, numpy, click, rich; print('onnxruntime-genai', og.__version__)"

# --- rootfs: base minus what a Python program never runs ----------------------------------------------------
# apt and its crypto stack, perl, util-linux, PAM and login tools, and glibc's iconv modules make up ~45 MB of
# debian:bookworm-slim that inference never touches. Layers only add bytes, so the final image is FROM scratch
# with this pruned tree as one layer. Packages go through dpkg --purge, so the image's package list stays true
# for scanners; dpkg itself stays.
FROM base AS rootfs

# perl goes last: the other packages' removal scripts (debconf) still need it.
RUN export DEBIAN_FRONTEND=noninteractive \
    && dpkg --purge --force-remove-essential --force-depends \
        apt libapt-pkg6.0 gpgv debian-archive-keyring libgnutls30 libgcrypt20 libp11-kit0 libunistring2 \
        libidn2-0 libtasn1-6 libhogweed6 libnettle8 libgpg-error0 libxxhash0 libsystemd0 libseccomp2 \
        adduser passwd login libpam-runtime libpam-modules libpam-modules-bin libpam0g libsemanage2 \
        libsemanage-common libsepol2 libaudit1 libaudit-common libcap-ng0 util-linux libblkid1 libmount1 \
        libsmartcols1 e2fsprogs libext2fs2 libss2 logsave mount sysvinit-utils bsdutils util-linux-extra \
    && dpkg --purge --force-remove-essential --force-depends debconf perl-base \
    && rm -rf /usr/lib/x86_64-linux-gnu/gconv /var/lib/apt /var/cache/apt /var/cache/debconf/* \
        /var/log/* /usr/share/common-licenses /usr/share/zoneinfo/right /usr/share/zoneinfo/posix \
    && python3 -c "import ssl, sqlite3, hashlib, json, zoneinfo, ctypes; print('python ok')"

# --- slim: the runtime both slim targets share -----------------------------------------------------------
FROM scratch AS slim

# The whole pruned tree is the point (see rootfs above).
# hadolint ignore=DL3067
COPY --from=rootfs / /
COPY --from=build /opt/venv /opt/venv
COPY contract/ /opt/olivepress/contract/
COPY runtime/ /opt/olivepress/runtime/
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONPATH=/opt/olivepress \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OLIVEPRESS_HOME=/workspace
WORKDIR /workspace
USER 1000:1000

# --- infer: the infer stage, the pipeline's last ------------------------------------------------------------
FROM slim AS infer

COPY stages/__init__.py stages/common.py stages/infer.py /opt/olivepress/stages/
ENTRYPOINT ["python", "-m", "stages.infer"]
# Declared here, after every RUN: a new revision changes only the labels, never a cached layer.
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="olivepress-infer" \
      org.opencontainers.image.description="olivepress infer stage: onnxruntime-genai on CPU, answers with the adapter on and off; no torch" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

# --- server: the OpenAI-compatible API ---------------------------------------------------------------------
FROM slim AS server

ENV OLIVEPRESS_SERVE_HOST=0.0.0.0 \
    OLIVEPRESS_SERVE_PORT=8000
EXPOSE 8000
# No curl here: Python's urllib asks the server.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(f\"http://127.0.0.1:{os.environ.get('OLIVEPRESS_SERVE_PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["python", "-m", "runtime.serve"]
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="olivepress-server" \
      org.opencontainers.image.description="olivepress serve: an OpenAI-compatible API on onnxruntime-genai (CPU), LoRA adapters by name; no torch" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

# --- push: olivepress push / pull in a container (the compose `push` and `pull` services) -------------------
# The Azure ML SDK and sign-in, the volume contract and nothing of torch. Credentials come from the environment
# at run time (a service principal's AZURE_* variables, or a managed identity), never from the image.
FROM build AS push-build
ARG PIP_INDEX_URL

RUN --mount=type=secret,id=extra_ca \
    --mount=type=tmpfs,target=/run/olivepress-ca \
    --mount=type=bind,source=docker/pip-install.sh,target=/usr/local/bin/pip-install \
    --mount=type=bind,source=docker/requirements/push.txt,target=/requirements/push.txt \
    python3 -m venv /opt/push-venv \
    && pip-install /opt/push-venv /requirements/push.txt \
    && /opt/push-venv/bin/python -m pip uninstall -y -q pip setuptools

FROM base AS push

COPY --from=push-build /opt/push-venv /opt/venv
COPY contract/ /opt/olivepress/contract/
COPY olivepress/__init__.py /opt/olivepress/olivepress/
COPY olivepress/azureml/ /opt/olivepress/olivepress/azureml/
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONPATH=/opt/olivepress \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OLIVEPRESS_HOME=/workspace
WORKDIR /workspace
USER 1000:1000
ENTRYPOINT ["python", "-m", "olivepress.azureml"]
CMD ["push"]
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="olivepress-push" \
      org.opencontainers.image.description="olivepress push and pull: the optimized model to and from an Azure ML model registry; no torch" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
