# syntax=docker/dockerfile:1
# The fleetpulse image: ingest, query, dataflow, topics, simulator and rebuild-state as
# roles of one image (`docker run IMAGE ingest`, ... `help` lists them). One image because
# every role is the same Python code on the same pinned dependencies: one build, one
# version to deploy, and the 250 MB dependency layer shared on disk by every container.
#
# Build from the repository root (deploy/images/README.md; `just images` does it here):
#   docker build -f deploy/images/fleetpulse.Dockerfile -t localhost/fleetpulse:0.1.0 .
# BASE is any Debian bookworm image with Python 3.11 as `python3`; `just images` passes
# one made with debootstrap, because no registry is reachable on the machines it runs on.
ARG BASE=python:3.11-slim-bookworm

# --- dependencies: a venv from the runtime lock (hashed pins), cached apart from the code
FROM ${BASE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_COMPILE=1
RUN python3 -m venv /opt/fleetpulse/venv
COPY deploy/images/requirements.lock /opt/fleetpulse/requirements.lock
# build_ca (optional secret): extra CA certificates for a TLS-inspecting proxy between the
# build and the package index; used while building only, never stored in a layer.
RUN --mount=type=secret,id=build_ca \
    if [ -f /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi; \
    /opt/fleetpulse/venv/bin/pip install --no-cache-dir --require-hashes \
        -r /opt/fleetpulse/requirements.lock \
    && /opt/fleetpulse/venv/bin/pip uninstall --yes pip setuptools \
    && find /opt/fleetpulse/venv -depth -name __pycache__ -exec rm -rf {} +

# --- the image: the venv, the product's packages, a non-root user
FROM ${BASE}
LABEL org.opencontainers.image.title="fleetpulse" \
      org.opencontainers.image.description="Live state for robot fleets: ingest, query API, Bytewax dataflow" \
      org.opencontainers.image.version="0.1.0"
RUN groupadd --system --gid 10001 fleetpulse \
    && useradd --system --uid 10001 --gid fleetpulse --home-dir /var/lib/fleetpulse \
        --shell /usr/sbin/nologin fleetpulse \
    && mkdir -p /var/lib/fleetpulse/recovery /etc/fleetpulse \
    && chown -R fleetpulse:fleetpulse /var/lib/fleetpulse
COPY --from=deps /opt/fleetpulse/venv /opt/fleetpulse/venv
COPY deploy/images/fleetpulse-entrypoint deploy/images/fleetpulse-health /usr/local/bin/
# The Bytewax Helm chart's commands (`sh ./entrypoint.sh`) in the working folder: waxctl.
COPY deploy/images/chart-entrypoint.sh /var/lib/fleetpulse/entrypoint.sh
COPY deploy/images/chart-entrypoint-recovery.sh /var/lib/fleetpulse/entrypoint-recovery.sh
COPY fleetpulse /opt/fleetpulse/app/fleetpulse
COPY api /opt/fleetpulse/app/api
COPY dataflows /opt/fleetpulse/app/dataflows
COPY state /opt/fleetpulse/app/state
COPY observability /opt/fleetpulse/app/observability
COPY sim /opt/fleetpulse/app/sim
ENV PATH=/opt/fleetpulse/venv/bin:${PATH} \
    PYTHONPATH=/opt/fleetpulse/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLEETPULSE_RECOVERY_DIR=/var/lib/fleetpulse/recovery \
    FLEETPULSE_STACK_DIR=/var/lib/fleetpulse/stack
WORKDIR /var/lib/fleetpulse
USER 10001:10001
# No VOLUME: only the dataflow role keeps state (the recovery folder); compose and
# Kubernetes mount a volume there for it, and the other roles get no anonymous one.
# Role-aware: ingest and query answer /readyz, a dataflow process serves its /metrics.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 CMD ["fleetpulse-health"]
ENTRYPOINT ["fleetpulse-entrypoint"]
CMD ["help"]
