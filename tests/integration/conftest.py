"""Integration tests run against the real local stack, started here if it is not running.

A service that cannot start fails the test run with its log tail; it is never skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from deploy.local.cluster import Cluster
from deploy.local.harness import remove_made
from deploy.local.stack import Stack
from fleetpulse.errors import StackError
from fleetpulse.settings import Settings
from tests.integration.k8s_util import apply_crds


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Stack]:
    """The local stack, up and healthy; what the session's tests made in it goes at the end."""
    stack = Stack(settings)
    try:
        stack.up()
    except StackError as exc:
        pytest.fail(f"the local stack could not start:\n{exc}", pytrace=False)
    yield stack
    remove_made(settings)


@pytest.fixture(scope="session")
def k8s(settings: Settings) -> Cluster:
    """The local Kubernetes control plane, up, with every CRD of deploy/k8s/crds applied
    (server-side, for real), so that custom resources are validated against them."""
    cluster = Cluster(settings)
    try:
        cluster.up()
        apply_crds(settings)
    except StackError as exc:
        pytest.fail(f"the local Kubernetes or its CRDs failed:\n{exc}", pytrace=False)
    return cluster


@pytest.fixture(scope="session")
def kafka_admin(stack: Stack, settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})


@pytest.fixture
def make_topic(kafka_admin: AdminClient) -> Iterator[callable]:  # type: ignore[valid-type]
    """Create uniquely named topics for one test; they are deleted afterwards."""
    created: list[str] = []

    def make(partitions: int = 1) -> str:
        name = f"test.{uuid.uuid4().hex[:12]}"
        for future in kafka_admin.create_topics([NewTopic(name, partitions, 1)]).values():
            future.result(timeout=30)
        created.append(name)
        return name

    yield make
    if created:
        for future in kafka_admin.delete_topics(created).values():
            future.result(timeout=30)
