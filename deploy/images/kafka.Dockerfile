# syntax=docker/dockerfile:1
# Apache Kafka for fleetpulse: one KRaft node (broker + controller), the same Maven jars
# (deploy/local/kafka/pom.xml), server.properties template and logging config as the
# local stack, on Debian's JRE 17. Configured from KAFKA_* variables (kafka-entrypoint);
# formatted on first start, its log in the /var/lib/kafka volume.
#   docker build -f deploy/images/kafka.Dockerfile -t localhost/fleetpulse-kafka:4.1.1 .
# Locally `just images` builds with OFFLINE=1 and the machine's Maven repository lent to
# the jars stage (podman build -v), which the local stack's provisioning has filled.
ARG BASE=debian:bookworm-slim

# --- the runtime: Debian's headless JRE
FROM ${BASE} AS jre
# (openjdk's post-install links its man pages; slim bases lack the folder)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# --- the jars: mvn dependency:copy-dependencies of the local stack's pom
FROM jre AS jars
RUN apt-get update \
    && apt-get install -y --no-install-recommends maven \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/local/kafka/pom.xml /build/pom.xml
ARG OFFLINE=
RUN mvn -B ${OFFLINE:+--offline} -f /build/pom.xml dependency:copy-dependencies \
        -DoutputDirectory=/build/libs -DincludeScope=runtime \
    && test -n "$(ls /build/libs/kafka_2.13-*.jar)"

# --- the image: JRE + jars + entrypoint, non-root
FROM jre
LABEL org.opencontainers.image.title="fleetpulse-kafka" \
      org.opencontainers.image.description="Apache Kafka 4.1.1 (KRaft) for fleetpulse" \
      org.opencontainers.image.version="4.1.1"
RUN groupadd --system --gid 10002 kafka \
    && useradd --system --uid 10002 --gid kafka --home-dir /var/lib/kafka \
        --shell /usr/sbin/nologin kafka \
    && mkdir -p /var/lib/kafka/data /etc/kafka \
    && chown -R kafka:kafka /var/lib/kafka /etc/kafka
COPY --from=jars /build/libs /opt/kafka/libs
COPY deploy/local/kafka/server.properties.in deploy/local/kafka/log4j2.yaml /opt/kafka/config/
COPY deploy/images/kafka-entrypoint /usr/local/bin/
ENV KAFKA_PORT=9092 \
    KAFKA_CONTROLLER_PORT=9093 \
    KAFKA_PARTITIONS=6 \
    KAFKA_REPLICATION=1 \
    KAFKA_HEAP_MB=512
USER 10002:10002
VOLUME ["/var/lib/kafka/data"]
EXPOSE 9092 9093
# The client port answers once the broker is up (clients then see it in the metadata).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${KAFKA_PORT}"]
ENTRYPOINT ["kafka-entrypoint"]
