# cache-router image: the router (`cache-router serve`) and, from the same image, the simulated
# engines and load generator (`python -m loadtest ...`) used by deploy/compose.yaml.
#
# Build:  docker build -t cache-router .
# Run:    docker run -p 8080:8080 -v $PWD/router.yaml:/etc/cache-router/config.yaml cache-router
# The config comes from the file named by CACHE_ROUTER_CONFIG (default: the mounted path below).

# --- build stage: the same install as the README (pip install of the project) into a venv ------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Metadata first so the dependency layer is reused while only sources change.
COPY pyproject.toml README.md ./
COPY router ./router
COPY loadtest ./loadtest
RUN pip install . && python -c "import router, loadtest"

# --- runtime stage: slim, no compilers, no sources, non-root -----------------------------------
FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="cache-router" \
      org.opencontainers.image.description="Cache-aware fleet router for LLM inference" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 router \
 && useradd --system --uid 10001 --gid router --no-create-home --home-dir /nonexistent router \
 && mkdir -p /etc/cache-router
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CACHE_ROUTER_CONFIG=/etc/cache-router/config.yaml
# A numeric USER lets Kubernetes' runAsNonRoot verify it without resolving names.
USER 10001:10001
EXPOSE 8080
# python is in the image; curl is not. The router's config must listen on 0.0.0.0:8080.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"]
# exec: the router is PID 1's only child and gets SIGTERM directly (graceful drain).
# Extra arguments (docker run ... IMAGE --log-level debug) are appended to `serve`.
ENTRYPOINT ["/bin/sh", "-c", "exec cache-router serve --config \"$CACHE_ROUTER_CONFIG\" \"$@\"", "cache-router"]
