# syntax=docker/dockerfile:1.7
# pagoda server image. One file, two variants, picked with a build arg:
#   docker build -t pagoda:cuda .                              NVIDIA GPU (CUDA 12.8 PyTorch wheels)
#   docker build -t pagoda:cpu --build-arg VARIANT=cpu .       no GPU; serves the bundled model
# Both run the same install (scripts/setup.sh) on the same Ubuntu 24.04 userland; only the base
# image and the PyTorch wheel index differ, so one file keeps them from drifting apart.
# Run: docker run --gpus all -p 8000:8000 pagoda:cuda --model Qwen/Qwen2.5-1.5B-Instruct
# (arguments after the image are `pagoda serve` arguments). See docs/deploy.md.

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
FROM ${CPU_IMAGE} AS base-cpu

# ---- userland shared by the build and runtime stages (same Python at the same path) ----
# Distribution packages are not version-pinned (DL3008): the base image tag fixes the release,
# and pins to exact Ubuntu package versions break the build whenever the archive moves on.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---- build: compilers, pip, the venv ----
FROM base AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3-dev git \
 && rm -rf /var/lib/apt/lists/*
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# Empty = by variant: cu128 wheels for cuda (run on drivers >= 570; use .../cu130 with a CUDA 13
# CUDA_IMAGE for drivers >= 580), CPU-only wheels for cpu (no multi-GB CUDA libraries).
ARG TORCH_INDEX_URL=
ARG PAGODA_EXTRAS=
WORKDIR /opt/pagoda
# torch first, from the PyTorch index, in a layer of its own: editing pagoda's code doesn't
# reinstall gigabytes of CUDA libraries.
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    case "$VARIANT" in \
      cuda) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" ;; \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "VARIANT must be cuda or cpu, got '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    python3 -m venv .venv; \
    .venv/bin/python -m pip install --disable-pip-version-check -q --index-url "$index" "torch==${TORCH_VERSION}"
COPY . .
# setup.sh finds its torch==X pin already met (X+cu128 / X+cpu match it) and installs pagoda,
# the bundled model and the extras (bench everywhere, so `pagoda bench` works in the container).
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ "$VARIANT" = cuda ]; then default_extras=gpu,bench; else default_extras=bench; fi; \
    PAGODA_TORCH_SPEC="torch==${TORCH_VERSION}" PAGODA_EXTRAS="${PAGODA_EXTRAS:-$default_extras}" \
      PAGODA_VENV=.venv scripts/setup.sh; \
    .venv/bin/pagoda --version

# ---- runtime ----
FROM base AS runtime
ARG VARIANT
# Both images keep a C compiler: Triton (the GPU kernels) compiles a small launcher module the
# first time a kernel runs (it also needs the Python headers), and the CPU path builds its AVX2
# kernels (pagoda/kernels/cpu_*.c) on first use. Nothing else from build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && if [ "$VARIANT" = cuda ]; then apt-get install -y --no-install-recommends python3-dev; fi \
 && rm -rf /var/lib/apt/lists/*
# uid 1000 (Ubuntu's stock `ubuntu` user gives it up) so a host ~/.cache/huggingface, usually owned
# by uid 1000, mounts writable. The app and its venv stay root-owned: the server can't modify them.
RUN userdel --remove ubuntu 2>/dev/null || true; \
    useradd --uid 1000 --create-home --shell /usr/sbin/nologin pagoda \
 && install -d -m 1777 /home/pagoda/.cache \
 && install -d -o pagoda -g pagoda /home/pagoda/.cache/huggingface /models
COPY --from=build /opt/pagoda /opt/pagoda

# Every server flag also reads PAGODA_<FLAG> (e.g. PAGODA_MODEL, PAGODA_API_KEY, PAGODA_MAX_MODEL_LEN).
ENV PATH=/opt/pagoda/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PAGODA_HOST=0.0.0.0 \
    PAGODA_PORT=8000 \
    HF_HOME=/home/pagoda/.cache/huggingface \
    TRITON_CACHE_DIR=/home/pagoda/.cache/triton
VOLUME ["/home/pagoda/.cache/huggingface"]
USER 1000:1000
WORKDIR /home/pagoda
EXPOSE 8000
# Loading a large model (or downloading it) takes minutes: failures inside start-period don't count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PAGODA_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["pagoda", "serve"]
