"""The controller outlasts an API server outage longer than one call's retries (RETRY_TIMEOUT_S) and longer than its
Lease lasts: kube-apiserver is stopped for several seconds while a step runs, the step's job Succeeds only after
the server is back, and the controller still reaches that verdict, goes on to the next step and keeps its Lease.

Oracles: the jobs the fake operator saw created (one uid per name), the Lease object in the API server before and
after the outage, the exit code, and the warnings the controller logged while the server was down.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.infra.controlplane import ControlPlane
from tests.kube.helpers_controller import Experiment, FakeOperator, Script
from tests.s3server import S3Server

OUTAGE_S = 6.0  # kube-apiserver stays stopped this long (then takes a few seconds more to serve again)
RETRY_S = 1.0  # RETRY_TIMEOUT_S: one call gives up after this
LEASE_S = 3  # LEASE_DURATION_S: a renewal fails for longer than this during the outage


@pytest.fixture
def ex(control_plane: ControlPlane, namespace: str, s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> Experiment:
    return Experiment(control_plane, namespace, tmp_path, f"{s3_bucket}/runs", s3_env.endpoint_url)


def read_lease(ex: Experiment) -> dict[str, Any] | None:
    try:
        found = client.CoordinationV1Api(ex.cp.api_client()).read_namespaced_lease("fit-controller", ex.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(ex.cp.api_client().sanitize_for_serialization(found))


def test_the_controller_outlasts_an_apiserver_outage_longer_than_its_retries_and_keeps_its_lease(
    ex: Experiment, caplog: pytest.LogCaptureFixture
) -> None:
    config, cfg = ex.config(
        steps=["extract", "cluster"],
        RETRY_TIMEOUT_S=RETRY_S,
        BACKOFF_INITIAL_S=0.2,
        BACKOFF_MAX_S=1.0,
        LEASE_DURATION_S=LEASE_S,
        POD_CHECK_INTERVAL_S=1,
    )
    extract_hold, cluster_hold = threading.Event(), threading.Event()
    scripts = {"extract": Script(hold=extract_hold), "cluster": Script(hold=cluster_hold)}
    caplog.set_level(logging.INFO)
    with FakeOperator(ex, cfg, scripts) as operator:
        thread, result = ex.submit_in_background(config)
        assert scripts["extract"].running.wait(timeout=60), "the extract step never started"
        deadline = time.monotonic() + 30
        while "PyTorchJob fit-extract: Running" not in caplog.text:  # the controller follows the Running job
            assert time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.05)
        before = read_lease(ex)
        stopped = time.monotonic()
        ex.cp.restart_apiserver(down_s=OUTAGE_S)
        down_s = time.monotonic() - stopped
        extract_hold.set()  # Succeeded only after the outage: only a list or watch after it can see that
        deadline = time.monotonic() + 60
        while not scripts["cluster"].running.wait(timeout=0.1):  # the controller goes on to the next step
            assert thread.is_alive() and time.monotonic() < deadline, f"it did not go on:\n{caplog.text[-3000:]}"
        after = read_lease(ex)
        cluster_hold.set()
        thread.join(timeout=60)

    assert result == [0], caplog.text[-3000:]
    assert operator.names() == ["fit-extract", "fit-cluster"]  # each created once, cluster after the outage
    assert "PyTorchJob fit-extract: Succeeded" in caplog.text
    assert before is not None and after is not None
    assert after["spec"]["holderIdentity"] == before["spec"]["holderIdentity"]  # still its own Lease
    assert after["spec"]["renewTime"] > before["spec"]["renewTime"]  # renewed after the outage
    assert "was taken over" not in caplog.text and "went unrenewed" not in caplog.text
    failing = [
        float(found[1])
        for record in caplog.records
        if record.levelno == logging.WARNING and (found := re.search(r"failing for (\d+)s", record.getMessage()))
    ]
    assert failing and max(failing) >= OUTAGE_S - 1, failing  # it said how long the API server had been down
    print(
        f"kube-apiserver down {down_s:.1f}s (RETRY_TIMEOUT_S={RETRY_S}, LEASE_DURATION_S={LEASE_S}); "
        f"{len(failing)} warnings, the longest outage they named 'failing for {max(failing):.0f}s'; Lease still "
        f"{after['spec']['holderIdentity']}, renewed {before['spec']['renewTime']} -> {after['spec']['renewTime']}"
    )
