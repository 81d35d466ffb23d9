# vpt-serve on an NVIDIA GPU: `docker build -t vpt-serve .`, or `docker compose up` (docker-compose.yml).
#
# The torch wheels carry their own CUDA runtime libraries, so the base only has to be an NVIDIA
# CUDA image (driver hooks, NVIDIA_* variables); the `base` flavour keeps the image small.
# Builder and runtime share the base so the virtualenv's interpreter path stays valid.
# Without Docker Hub, see deploy/standin/ for a locally built stand-in base.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# Extra CA certificates, for hosts behind a TLS-intercepting proxy: a PEM bundle inside the build
# context, e.g. `--build-arg EXTRA_CA_CERTS=deploy/ca/corp.pem` (deploy/ca/*.pem is git-ignored).
# Each certificate becomes its own file under /usr/local/share/ca-certificates (so later
# `update-ca-certificates` runs keep it) and is trusted by apt, pip, Python and the server.
FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive
ARG EXTRA_CA_CERTS=deploy/ca/none.pem
COPY ${EXTRA_CA_CERTS} /tmp/extra-ca.pem
RUN mkdir -p /etc/ssl/certs /usr/local/share/ca-certificates/extra \
 && awk '/-----BEGIN CERTIFICATE-----/ { n++; f = sprintf("/usr/local/share/ca-certificates/extra/extra-%03d.crt", n); p = 1 } \
         p { print > f } /-----END CERTIFICATE-----/ { p = 0; close(f) }' /tmp/extra-ca.pem \
 && if ls /usr/local/share/ca-certificates/extra/*.crt >/dev/null 2>&1; then \
        cat /usr/local/share/ca-certificates/extra/*.crt >> /etc/ssl/certs/ca-certificates.crt; fi \
 && rm /tmp/extra-ca.pem \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && update-ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# pip and requests carry their own CA list: point them (and Python's ssl) at the system's.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

FROM base AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Torch first, in its own layer: the biggest download, and it changes least. Linux x86_64 wheels
# from PyPI are CUDA builds; set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128)
# to pick another CUDA flavour. Versions match pyproject.toml.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
RUN pip install --upgrade pip \
 && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
# The other dependencies, read from the two pyproject files: rebuilt only when those change.
COPY pyproject.toml ./
COPY client/pyproject.toml client/
RUN python3 -c "import tomllib; [print(d) for f in ('pyproject.toml', 'client/pyproject.toml') \
                for d in tomllib.load(open(f, 'rb'))['project']['dependencies']]" > /tmp/deps.txt \
 && pip install -r /tmp/deps.txt

# The project itself as wheels, installed over the copied environment in the runtime stage: a
# source change rebuilds only these small layers, not the environment's gigabytes.
FROM builder AS wheels
COPY README.md ./
COPY kernels kernels
COPY vpt vpt
COPY prompt_store prompt_store
COPY server server
COPY client client
RUN pip wheel --no-deps --wheel-dir /wheels . ./client

FROM base AS runtime
# Triton compiles a small C launcher on first use: it needs a C compiler and Python's headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 --user-group vpt \
 && mkdir -p /cache /data \
 && chown vpt:vpt /cache /data
COPY --from=builder /opt/venv /opt/venv
# The server, plus the `vpt` client CLI (handy inside the container: `docker compose exec server vpt tasks`).
COPY --from=wheels /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels
# /cache: downloaded backbone weights and compiled kernels (a volume, so they survive restarts).
# /data: the file store and uploaded datasets when no Redis store is configured.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache \
    VPT_HOST=0.0.0.0 \
    VPT_PORT=8000 \
    VPT_STORE=file:///data/store
VOLUME ["/cache", "/data"]
USER vpt
WORKDIR /data
EXPOSE 8000
# Readiness, not mere liveness: backbone loaded, store reachable, batcher running (no key needed).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VPT_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["vpt-serve"]
CMD ["serve"]
