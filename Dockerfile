# syntax=docker/dockerfile:1
# isales-gateway image: `make image` (or `docker build -t isales-gateway .`, which labels the
# version and revision "unknown").
# Configuration comes from the environment (GATEWAY_<SECTION>__<KEY>, see
# config/gateway.example.toml); the same image runs the simulator:
#   docker run isales-gateway simulate --host 0.0.0.0
#
# Reproducible: the base image is pinned by digest (PYTHON_IMAGE; refresh it with
# `docker buildx imagetools inspect python:3.11-slim`), the dependencies come from
# requirements.lock with their hashes (`make lock` writes it from pyproject.toml), and the
# dependency layers are cached apart from the code. Behind a corporate mirror:
#   docker build --build-arg PIP_INDEX_URL=https://pypi.mirror.corp/simple .
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# --- build: one wheel per locked dependency, then the gateway's own ------------------------
FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_INDEX_URL=${PIP_INDEX_URL}
WORKDIR /src
COPY requirements.lock ./
RUN pip wheel --require-hashes --wheel-dir /wheels/deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --wheel-dir /wheels/app .

# --- run: the wheels installed, no compiler, no sources, not root --------------------------
FROM ${PYTHON_IMAGE}
# `make image` passes both: the version from gateway/__init__.py (its one source), the commit.
ARG GIT_REVISION=unknown
ARG VERSION=unknown
LABEL org.opencontainers.image.title="isales-gateway" \
      org.opencontainers.image.description="Drop-in, rate-limiting, caching gateway for the CC-iSales call result query" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary" \
      org.opencontainers.image.source="https://git.example.com/isales-gateway" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    GATEWAY_SERVER__HOST=0.0.0.0 \
    GATEWAY_SERVER__PORT=8080 \
    GATEWAY_LOG__FORMAT=json \
    ISALES_GATEWAY_REVISION=${GIT_REVISION}
# Dependencies first: this layer stays cached while only the code changes.
RUN --mount=type=bind,from=build,source=/wheels/deps,target=/wheels \
    pip install --no-index --no-deps /wheels/*.whl \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
RUN --mount=type=bind,from=build,source=/wheels/app,target=/wheels \
    pip install --no-index --no-deps /wheels/*.whl
USER 10001:10001
EXPOSE 8080
# Alive = /healthz answers 200 (python: the slim image has no curl).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_SERVER__PORT', '8080'), timeout=2)"]
ENTRYPOINT ["isales-gateway"]
CMD ["serve"]
