# syntax=docker/dockerfile:1
#
# headserve on a CUDA runtime, with the backbone weights baked in.
#
#   docker build -t headserve .                          # online: downloads torchvision weights
#   docker build --build-arg FETCH_WEIGHTS=0 -t headserve .   # offline weights: provide them at run time
#
# See deploy/README.md for running it (GPU, volume, offline weights).
#
# CUDA: the PyPI builds of torch and onnxruntime-gpu this project installs are CUDA 13 builds
# (onnxruntime-gpu 1.31 is built for CUDA 13.0 + cuDNN 9; torch wheels bring their own CUDA 13.x libraries).
# The base image supplies what onnxruntime's CUDA provider links against but torch's wheels do not
# ship (libcurand, and a system cuDNN 9). The host needs an NVIDIA driver for CUDA 13 (R580 or newer).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------------------
# base: Python 3.11 (Ubuntu 22.04's own package) and tini, shared by every stage so the venv's
# interpreter path (/usr/bin/python3.11) is the same where the venv is built and where it runs.
FROM ${CUDA_IMAGE} AS base
# hadolint global ignore=DL3008,DL3013
# (apt packages follow the base image's Ubuntu release; Python packages follow pyproject.toml's bounds.)
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------------
# builder: the project and its dependencies in /opt/venv (non-editable, no dev extras).
FROM base AS builder
RUN python3.11 -m venv /opt/venv \
 && python -m pip install --no-cache-dir --upgrade pip
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so code changes do not reinstall torch.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && python -m pip install -r /tmp/requirements.txt
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --no-deps . \
 && python -m pip check \
 && headserve --help > /dev/null

# ---------------------------------------------------------------------------------------------------------
# weights: torchvision checkpoints into /opt/headserve/weights/hub/checkpoints (TORCH_HOME layout).
# FETCH_WEIGHTS=0 skips the download (offline builds: provide the files at run time, see deploy/README.md).
# WEIGHTS_ARCHS narrows the list, e.g. "minilm-l6 mobilenet_v2"; empty means every built-in backbone.
# MiniLM is inside its pip package; the script only checks that it is there.
FROM builder AS weights
ARG FETCH_WEIGHTS=1
ARG WEIGHTS_ARCHS=""
RUN mkdir -p /opt/headserve/weights/hub/checkpoints \
 && if [ "$FETCH_WEIGHTS" = "1" ]; then \
      python scripts/fetch_weights.py --torch-home /opt/headserve/weights $WEIGHTS_ARCHS; \
    else \
      echo "FETCH_WEIGHTS=$FETCH_WEIGHTS: no torchvision weights baked in" \
      && python scripts/fetch_weights.py --torch-home /opt/headserve/weights minilm-l6; \
    fi

# ---------------------------------------------------------------------------------------------------------
# runtime: the venv, the weights, a non-root user and nothing else.
FROM base AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} headserve \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --home-dir /home/headserve --create-home \
      --shell /usr/sbin/nologin headserve \
 && mkdir -p /data \
 && chown ${APP_UID}:${APP_UID} /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=weights /opt/headserve/weights /opt/headserve/weights

# The weights are read-only for the server (allow_download stays off); the data volume is its only
# writable state: the SQLite store (when store_url is empty) and the trunk ONNX cache.
ENV HEADSERVE_WEIGHTS_DIR=/opt/headserve/weights \
    HEADSERVE_DATA_DIR=/data \
    HEADSERVE_TRUNK_CACHE_DIR=/data/trunks \
    TORCH_HOME=/opt/headserve/weights \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/headserve
VOLUME ["/data"]
WORKDIR /home/headserve
USER ${APP_UID}:${APP_UID}
EXPOSE 50051

# Ready = the HeadServe service reports SERVING on the standard gRPC health service. Start-up loads
# every backbone and exports their trunks to ONNX, which takes minutes on a cold /data: hence the
# long start period (failures during it do not count).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service='headserve.v1.HeadServe'), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

# tini as PID 1 forwards SIGTERM to the server (graceful stop) and reaps children.
ENTRYPOINT ["/usr/bin/tini", "--", "headserve", "serve", "--address", "0.0.0.0:50051"]
CMD []
