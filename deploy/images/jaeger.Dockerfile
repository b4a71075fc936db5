# syntax=docker/dockerfile:1
# Jaeger v2 for fleetpulse: the version pinned by the local stack's helper module
# (deploy/local/jaeger/go.mod), built with Go; OTLP in, in-memory storage, query API out,
# configured like the local stack (deploy/local/jaeger/config.yaml.in) from JAEGER_*
# variables. No web UI (the Go module ships none); fleetpulse reads the query API.
#   docker build -f deploy/images/jaeger.Dockerfile -t localhost/fleetpulse-jaeger:1.76.0 .
# Locally `just images` passes GO_BASE=the Debian base and lends the build stage the
# machine's Go toolchain and caches (podman build -v) with OFFLINE=1: the local stack's
# provisioning built the same module with the same flags, so this is mostly a link.
ARG GO_BASE=golang:1.26-bookworm
ARG BASE=debian:bookworm-slim

# --- build: a static binary (CGO off), paths trimmed so build caches are shared
FROM ${GO_BASE} AS build
ENV PATH=/usr/local/go/bin:${PATH} GOPATH=/go CGO_ENABLED=0 GOFLAGS="-buildvcs=false -trimpath"
WORKDIR /src
COPY deploy/local/jaeger/go.mod deploy/local/jaeger/go.sum ./
ARG OFFLINE=
RUN if [ -n "$OFFLINE" ]; then export GOPROXY=off; fi; \
    go build -v -ldflags="-s -w" -o /out/jaeger github.com/jaegertracing/jaeger/cmd/jaeger \
    && /out/jaeger --help >/dev/null

# --- the image: the binary, its config template, an entrypoint, non-root
FROM ${BASE}
LABEL org.opencontainers.image.title="fleetpulse-jaeger" \
      org.opencontainers.image.description="Jaeger v2 (OTLP in, in-memory, query API) for fleetpulse"
RUN groupadd --system --gid 10003 jaeger \
    && useradd --system --uid 10003 --gid jaeger --no-create-home --shell /usr/sbin/nologin jaeger \
    && mkdir -p /etc/jaeger && chown jaeger:jaeger /etc/jaeger
COPY --from=build /out/jaeger /usr/local/bin/jaeger
COPY deploy/local/jaeger/config.yaml.in /etc/jaeger/config.yaml.in
COPY deploy/images/jaeger-entrypoint /usr/local/bin/
ENV JAEGER_HOST=0.0.0.0 \
    JAEGER_QUERY_PORT=16686 \
    JAEGER_QUERY_GRPC_PORT=16685 \
    JAEGER_OTLP_GRPC_PORT=4317 \
    JAEGER_OTLP_HTTP_PORT=4318
USER 10003:10003
EXPOSE 16686 16685 4317 4318
# The query API answers once storage and receivers are up.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${JAEGER_QUERY_PORT} && printf 'GET /api/services HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["jaeger-entrypoint"]
