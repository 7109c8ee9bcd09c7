"""Fixtures for tests that talk to a real kube-apiserver (etcd + kube-apiserver, no other components).

`control_plane` starts once per session (a few seconds; the binaries must have been built by
`bash tests/infra/build_bins.sh`, or the tests fail). `namespace` gives each test a fresh namespace.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.infra.controlplane import ControlPlane, find_binary


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver on loopback with the PyTorchJob CRD installed and Established."""
    cp = ControlPlane().start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The helm binary built by build_bins.sh at the versions.env version."""
    return find_binary("helm")


@pytest.fixture()
def admin_api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An admin (system:masters) `kubernetes.client.ApiClient`."""
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture()
def namespace(control_plane: ControlPlane, admin_api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace for one test. Deleting it only marks it Terminating: no namespace
    controller runs in this cluster, so its objects stay in etcd (harmless, names are unique)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(admin_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)
