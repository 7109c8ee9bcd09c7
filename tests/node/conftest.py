"""Fixtures for tests on a real single-node cluster (tests/infra/node.py); marked `node`.

They need root, `bash tests/infra/install_node_deps.sh`, `bash tests/infra/build_bins.sh node` and the
images (built on first use by tests/infra/images.py); anything missing fails them. They are not part
of the default run: `node` tests are deselected unless the marker expression names them:

    .venv/bin/python -m pytest tests/node -m node
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.infra.node import Cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect `node` tests unless `-m` mentions the marker (they take minutes and need root)."""
    if "node" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("node")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("node")]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The node with every component ready; `base` (Debian + python3) imported besides pause and tools."""
    node = Cluster(images=["base"]).start()
    print(f"\ntest node started in {node.start_seconds:.1f}s: {node.timings}")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture()
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    yield name
    cluster.request("DELETE", f"/api/v1/namespaces/{name}")


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 120.0, cluster: Cluster | None = None) -> Any:
    """Poll `check` until it returns something truthy (returned); fail with `what` (and the node's
    log tails) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    logs = cluster.all_logs_tail() if cluster is not None else ""
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{logs}")
