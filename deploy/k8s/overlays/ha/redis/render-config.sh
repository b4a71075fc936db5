#!/bin/sh
# Renders redis.conf and sentinel.conf for one pod of the ha overlay's Redis StatefulSet
# into CONF_DIR, a writable emptyDir: Sentinel rewrites its own file with what it learns
# (the current master, the other Sentinels, the replicas) and sends CONFIG REWRITE to the
# Redis it reconfigures, so neither file can be a read-only ConfigMap mount.
#
# Which master: the one the other pods' Sentinels know now, if any answers, so that a
# restarted pod rejoins the current master after a failover instead of redis-0; on a
# first start (no Sentinel answers) pod 0 is the master and the others its replicas.
# Hostnames are announced and resolved (the pods' stable names on the headless Service),
# never pod IPs, which change when a pod is replaced.
#
# Inputs (environment): POD_NAME (redis-N), SERVICE (headless Service = StatefulSet
# name), REPLICAS, REDIS_PORT, SENTINEL_PORT, SENTINEL_QUORUM, CONF_DIR, and the
# product's settings FLEETPULSE_REDIS_SENTINEL_MASTER, FLEETPULSE_SENTINEL_DOWN_AFTER_MS,
# FLEETPULSE_SENTINEL_FAILOVER_TIMEOUT_MS (the fleetpulse-env ConfigMap), so the monitor
# name is the one the product asks for. REDIS_ADMIN_PASSWORD (the redis-acl Secret; may
# be empty) is the `default` user's: replicas authenticate to their master with it
# (masterauth) and the Sentinels to every node (auth-pass), so HA keeps working when the
# ACL file (ACL_FILE, state/acl.py) gives the product's pods users of least privilege.
# REDIS_CLI overrides the client (tests).
set -eu
: "${POD_NAME:?}" "${SERVICE:?}" "${REPLICAS:?}" "${REDIS_PORT:?}" "${SENTINEL_PORT:?}"
: "${SENTINEL_QUORUM:?}" "${CONF_DIR:?}" "${FLEETPULSE_REDIS_SENTINEL_MASTER:?}"
: "${FLEETPULSE_SENTINEL_DOWN_AFTER_MS:?}" "${FLEETPULSE_SENTINEL_FAILOVER_TIMEOUT_MS:?}"
cli="${REDIS_CLI:-redis-cli}"
name="$FLEETPULSE_REDIS_SENTINEL_MASTER"
self="$POD_NAME.$SERVICE"

master_host=""
master_port=""
i=0
while [ "$i" -lt "$REPLICAS" ]; do
    peer="$SERVICE-$i.$SERVICE"
    i=$((i + 1))
    [ "$peer" = "$self" ] && continue
    # Two lines (host, port) when that Sentinel monitors the master; nothing otherwise.
    answer=$($cli -h "$peer" -p "$SENTINEL_PORT" --raw \
        sentinel get-master-addr-by-name "$name" 2>/dev/null || true)
    host=$(printf '%s\n' "$answer" | sed -n 1p)
    port=$(printf '%s\n' "$answer" | sed -n 2p)
    case "$port" in
        '' | *[!0-9]*) continue ;;  # no answer, an error, or not monitoring it yet
    esac
    master_host="$host"
    master_port="$port"
    echo "master $master_host:$master_port (from the Sentinel on $peer)"
    break
done
if [ -z "$master_host" ]; then
    master_host="$SERVICE-0.$SERVICE"
    master_port="$REDIS_PORT"
    echo "no Sentinel answered: first start, master $master_host:$master_port"
fi

mkdir -p "$CONF_DIR"
umask 077  # the files hold the admin password
{
    echo "port $REDIS_PORT"
    echo "bind * -::*"
    echo "protected-mode no"
    echo "dir /data"
    echo "appendonly yes"
    echo "save \"\""
    echo "replica-announce-ip $self"
    echo "replica-announce-port $REDIS_PORT"
    if [ -n "${ACL_FILE:-}" ]; then
        echo "aclfile $ACL_FILE"
    fi
    if [ -n "${REDIS_ADMIN_PASSWORD:-}" ]; then
        echo "masterauth $REDIS_ADMIN_PASSWORD"
    fi
    if [ "$master_host" != "$self" ]; then
        echo "replicaof $master_host $master_port"
    fi
} > "$CONF_DIR/redis.conf"
{
    echo "port $SENTINEL_PORT"
    echo "bind * -::*"
    echo "protected-mode no"
    echo "dir $CONF_DIR"
    echo "sentinel resolve-hostnames yes"
    echo "sentinel announce-hostnames yes"
    echo "sentinel announce-ip $self"
    echo "sentinel announce-port $SENTINEL_PORT"
    echo "sentinel monitor $name $master_host $master_port $SENTINEL_QUORUM"
    echo "sentinel down-after-milliseconds $name $FLEETPULSE_SENTINEL_DOWN_AFTER_MS"
    echo "sentinel failover-timeout $name $FLEETPULSE_SENTINEL_FAILOVER_TIMEOUT_MS"
    echo "sentinel parallel-syncs $name 1"
    if [ -n "${REDIS_ADMIN_PASSWORD:-}" ]; then
        echo "sentinel auth-pass $name $REDIS_ADMIN_PASSWORD"
    fi
} > "$CONF_DIR/sentinel.conf"
if [ "$master_host" = "$self" ]; then
    echo "$self starts as the master"
else
    echo "$self starts as a replica of $master_host:$master_port"
fi
