# syntax=docker/dockerfile:1
# isales-gateway image: `docker build -t isales-gateway .`
# Configuration comes from the environment (GATEWAY_<SECTION>__<KEY>, see
# config/gateway.example.toml); the same image runs the simulator:
#   docker run isales-gateway simulate --host 0.0.0.0

# --- build: one wheel for the gateway and one for each dependency -------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --wheel-dir /wheels .

# --- run: the wheels installed, no compiler, no sources, not root --------------------------
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    GATEWAY_SERVER__HOST=0.0.0.0 \
    GATEWAY_SERVER__PORT=8080 \
    GATEWAY_LOG__FORMAT=json
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels isales-gateway \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
USER 10001:10001
EXPOSE 8080
# Alive = /healthz answers 200 (python: the slim image has no curl).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_SERVER__PORT', '8080'), timeout=2)"]
ENTRYPOINT ["isales-gateway"]
CMD ["serve"]
