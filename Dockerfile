# syntax=docker/dockerfile:1
# Laneway's server image: `laneway broker`, `laneway worker`, any `laneway` command.
#
#   docker build -t laneway:0.1.0 .
#   docker run --rm laneway:0.1.0 --help
#
# Two stages: the builder makes the wheel from the source and fetches the wheels of
# every `[server]` dependency; the final stage installs `laneway[server]` from those
# wheels alone (no index, no compiler, no source tree, no dev tools) and runs as an
# unprivileged numeric user, so Kubernetes' runAsNonRoot can check it.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
RUN python -m pip install --no-cache-dir "build>=1.2"
# .dockerignore lets in only what the wheel is made of.
COPY . .
# The wheel by its path (never a same-named package from an index), with its extra.
RUN python -m build --wheel --outdir /dist \
    && python -m pip wheel --no-cache-dir --wheel-dir /wheels "$(ls /dist/laneway-*.whl)[server]"

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/laneway/bin:$PATH
# The wheels are bind-mounted for this one step, so none of them stays in a layer; the
# venv has no pip of its own (the base image's installs into it).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/laneway \
    && python -m pip --python /opt/laneway/bin/python install --no-cache-dir --no-index \
        --find-links /wheels "laneway[server]" \
    && groupadd --gid 10001 laneway \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin laneway
WORKDIR /tmp
USER 10001:10001
# gRPC API of `laneway broker`; /metrics ports are set in the config (metrics block).
EXPOSE 50051
ENTRYPOINT ["laneway"]
CMD ["--help"]
