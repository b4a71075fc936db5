# fleetpulse — `./dev <recipe>` on a fresh clone (it prepares .venv first), or `just <recipe>`
# with .venv/bin on PATH. `just --list` is the help.

set shell := ["bash", "-euo", "pipefail", "-c"]

py := justfile_directory() / ".venv/bin/python"

# list the recipes
default:
    @just --list --unsorted

# the whole product locally: stack, dataflow (2 processes), ingest + query API, 10 simulated robots (`--ha`: on the HA stack)
main *ARGS:
    {{py}} -m deploy.local.main {{ARGS}}

# what CI runs: lint, types, the config audit, then the whole test suite against the real stack
check: lint types audit-config test

# ruff: lint and format check
lint:
    {{py}} -m ruff check .
    {{py}} -m ruff format --check .

# mypy, strict on the source tree
types:
    {{py}} -m mypy

# check every fleetpulse setting in deploy/ (ConfigMaps, env, kustomize patches, compose, the hot-reload file) against the settings schema; PATHS: other files or folders
audit-config *PATHS:
    @{{py}} -m deploy.audit {{PATHS}}

# the test suite against the real stack and the local Kubernetes (started first, so first-run builds show progress)
test *ARGS: stack-up k8s-up
    {{py}} -m pytest {{ARGS}}

# unit tests only (no services)
test-unit *ARGS:
    {{py}} -m pytest tests/unit {{ARGS}}

# format the code in place
fmt:
    {{py}} -m ruff format .
    {{py}} -m ruff check --fix .

# start Kafka, Redis and Jaeger (provisioned on first use; `--ha`: 3 brokers, Redis Sentinel); harmless when up
stack-up *SERVICES:
    @{{py}} -m deploy.local.stack up {{SERVICES}}

# stop the processes the stack started (and only those)
stack-down:
    @{{py}} -m deploy.local.stack down

# pid, port and health of each service; fails unless all are healthy
stack-status:
    @{{py}} -m deploy.local.stack status

# the tail of the services' logs (e.g. `just stack-logs kafka -n 100`, `-f` to follow)
stack-logs *ARGS:
    @{{py}} -m deploy.local.stack logs {{ARGS}}

# fault injection by hand: signal one node of the stack (e.g. `just stack-kill kafka-2`, `--signal STOP`)
stack-kill *ARGS:
    @{{py}} -m deploy.local.stack kill {{ARGS}}

# stop the stack and delete its data and the dataflow's recovery store (binaries and jars stay)
stack-reset:
    @{{py}} -m deploy.local.stack reset

# the robot fleet simulator (e.g. `just sim --robots 50 --rate 2 --token fp_...`); see --help
sim *ARGS:
    {{py}} -m sim {{ARGS}}

# make an API token: prints it and its FLEETPULSE_API_TOKENS entry (SCOPE: ingest, read or admin)
token SCOPE="ingest":
    @{{py}} -m api.auth new --scope {{SCOPE}}

# schemathesis, every check and both modes, over HTTP against the running ingest and query servers (e.g. `just fuzz-api --read fp_... --ingest fp_... --admin fp_...`; see --help)
fuzz-api *ARGS:
    {{py}} -m deploy.local.fuzz {{ARGS}}

# serve the ingest routes (the webhook server) on FLEETPULSE_INGEST_PORT with granian
serve-ingest:
    {{py}} -m api.serve ingest

# serve the query routes (the API server) on FLEETPULSE_QUERY_PORT with granian
serve-query:
    {{py}} -m api.serve query

# export history, stats, alerts or incidents from the query server to a file, resuming on drops (e.g. `just export history --site plant-1 --format csv --out h.csv --token-file read.token`); see --help
export KIND *ARGS:
    {{py}} -m api.export {{KIND}} {{ARGS}}

# serve the dashboard (page, live feed, query routes) on FLEETPULSE_DASHBOARD_PORT with granian
serve-dashboard:
    {{py}} -m api.serve dashboard

# Debian's chromium for the dashboard's browser tests (apt-get on first use); prints its path
browser:
    {{py}} -m deploy.local.browser

# run the fleet dataflow (recovery on: FLEETPULSE_RECOVERY_DIR); ARGS go to bytewax.run, e.g. `-w 2`
dataflow *ARGS:
    {{py}} -m bytewax.run "dataflows.fleet:build_flow()" {{ARGS}}

# run the notifier: incident versions (robot.incidents) -> the rules file's webhook targets
notify:
    {{py}} -m dataflows.notify

# dataflow benchmark: drain rate and freshness for 1 and 2 processes (writes bench/results)
bench-dataflow *ARGS: stack-up
    {{py}} -m bench.dataflow {{ARGS}}

# drain by fleet size (1k, 10k, 100k robots): Bytewax flow layouts, a raw loop, Quix Streams (writes bench/results)
bench-drain *ARGS: stack-up
    {{py}} -m bench.drain {{ARGS}}

# the three headline figures in under 2 minutes (drain vs raw loop, ingest and query per worker)
bench-quick *ARGS: stack-up
    {{py}} -m bench.quick {{ARGS}}

# sustained HTTP -> Redis at fixed rates on the main job's layout: freshness and lag over time (writes bench/results)
bench-sustained *ARGS: stack-up
    {{py}} -m bench.sustained {{ARGS}}

# query benchmark: reads/s and p99 of the main GET routes with 10,000 robots (writes bench/results)
bench-query *ARGS: stack-up
    {{py}} -m bench.query {{ARGS}}

# end-to-end freshness: HTTP 202 -> state visible in Redis at 2,000 and 10,000 reports/s
bench-freshness *ARGS: stack-up
    {{py}} -m bench.freshness {{ARGS}}

# what alert rules cost: drain and freshness with no rules and with 100 rules over 10,000 robots (writes bench/results)
bench-rules *ARGS: stack-up
    {{py}} -m bench.rules {{ARGS}}

# what alert rules cost in the shard step alone, in-process (no services): quiet and storm books against none (writes bench/results)
bench-rules-step *ARGS:
    {{py}} -m bench.rules_step {{ARGS}}

# py-spy profile of one dataflow process draining a pre-filled topic (writes bench/results)
bench-profile *ARGS: stack-up
    {{py}} -m bench.profile_flow {{ARGS}}

# recovery after kill -9: restart -> caught up at 1k, 10k and 100k robots (writes bench/results)
bench-recovery *ARGS: stack-up
    {{py}} -m bench.recovery {{ARGS}}

# every benchmark, one after the other (each writes bench/results and bench/README.md)
bench: bench-ingest bench-dataflow bench-drain bench-freshness bench-query bench-recovery bench-sustained bench-rules bench-rules-step

# ingest benchmark: accepted reports/s, p50/p99, single and batch posts (writes bench/results)
bench-ingest *ARGS: stack-up
    {{py}} -m bench.ingest {{ARGS}}

# ask the running dataflow to write every robot's live state to Redis again, and wait (progress shown)
rebuild-state *ARGS:
    eval "$({{py}} -m deploy.local.stack env)" && {{py}} -m dataflows.republish {{ARGS}}

# shell exports the product's processes need on the running stack layout (HA: every broker, the Sentinels)
stack-env:
    @{{py}} -m deploy.local.stack env

# the HA fault tests on an HA stack of their own, then their figures page docs/ha.md (+ docs/ha.png)
ha-figures *ARGS: stack-up
    find .stack/figures -maxdepth 1 -name '*.json' ! -name '*-*x*.json' -delete 2>/dev/null || true
    HA_FIGURES_DIR={{justfile_directory()}}/.stack/figures {{py}} -m pytest -m ha -v {{ARGS}}
    {{py}} -m deploy.local.figures --from .stack/figures

# build the container images with podman (Debian bases made once; cached layers); prints names and sizes
images *NAMES:
    @{{py}} -m deploy.containers images {{NAMES}}

# the compose topology in containers (deploy/docker-compose-local.yml): build, start in order, wait healthy (`--sim`: with robots)
compose-up *ARGS:
    @{{py}} -m deploy.containers up {{ARGS}}

# stop and remove the compose topology's containers (`--volumes`: and its data)
compose-down *ARGS:
    @{{py}} -m deploy.containers down {{ARGS}}

# the compose topology's containers and their state
compose-ps:
    @{{py}} -m deploy.containers ps

# shell exports for podman with the project's storage and config (`eval "$(just compose-env)"`)
compose-env:
    @{{py}} -m deploy.containers env

# the local Kubernetes: control plane, volume provisioner and a node (containerd, kubelet, kube-proxy, DNS; built once per version)
k8s-up:
    @{{py}} -m deploy.local.cluster up

# deploy an overlay of deploy/k8s to the local Kubernetes (images built and imported, CRDs applied, rollout waited for, where to look printed)
k8s-deploy overlay="minikube": k8s-up
    @{{py}} -m deploy.local.cluster deploy {{overlay}}

# stop the local Kubernetes processes (and only those) and put back what its node changed on the machine; its data stays
k8s-down:
    @{{py}} -m deploy.local.cluster down

# pid, port and health of each local Kubernetes process; fails unless all are healthy
k8s-status:
    @{{py}} -m deploy.local.cluster status

# kubectl (the locally built one) against the local cluster as its admin, e.g. `just kubectl get ns`
kubectl *ARGS:
    @"$({{py}} -m deploy.local.cluster kubectl-path)" --kubeconfig "$({{py}} -m deploy.local.cluster kubeconfig)" {{ARGS}}

# write a Redis ACL file for the writer and reader users of the FLEETPULSE_REDIS_* settings, e.g. `just redis-acl users.acl --admin-password-file pw`
redis-acl *ARGS:
    @{{py}} -m state.acl {{ARGS}}

# make a self-signed CA and a server certificate into DIR with openssl, e.g. `just tls .stack/tls --san DNS:redis`
tls DIR *ARGS:
    @{{py}} -m deploy.local.tls {{DIR}} {{ARGS}}

# print the settings table (the README carries it)
settings-table:
    @{{py}} -m fleetpulse.settings

# regenerate requirements.lock (hashed pins) and the images' runtime lock from pyproject.toml
lock:
    {{py}} -m uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 -o requirements.lock
    {{py}} -m uv pip compile pyproject.toml --generate-hashes --python-version 3.11 -c requirements.lock -o deploy/images/requirements.lock
