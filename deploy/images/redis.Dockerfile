# syntax=docker/dockerfile:1
# Debian's redis-server and redis-sentinel (the same packages as the local stack), non-root,
# data in a volume. The ha overlay runs a Sentinel beside each Redis (`redis-sentinel CONF`).
#   docker build -f deploy/images/redis.Dockerfile -t localhost/fleetpulse-redis:bookworm .
# REDIS_PORT (6379) and REDIS_BIND (0.0.0.0) set where it listens; more redis-server
# arguments can follow the image name (`... --maxmemory 2gb`).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
LABEL org.opencontainers.image.title="fleetpulse-redis" \
      org.opencontainers.image.description="Debian's redis-server for fleetpulse"
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-sentinel redis-tools \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && mkdir -p /data && chown redis:redis /data
ENV REDIS_PORT=6379 REDIS_BIND=0.0.0.0
USER redis
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["sh", "-c", "redis-cli -p \"$REDIS_PORT\" ping | grep -q PONG"]
# Append-only file on, as in the local stack. Protected mode stays on: without a password
# only loopback clients are served (host networking here); elsewhere pass --requirepass.
ENTRYPOINT ["sh", "-c", "exec redis-server --port \"$REDIS_PORT\" --bind \"$REDIS_BIND\" --dir /data --appendonly yes --save '' \"$@\"", "redis-server"]
