"""Two controllers on one experiment against the real API server: its Lease (clusterfit/kube/lease.py)
lets one run it; the other refuses, or waits (--wait) and then finds the steps done; a dead
controller's Lease is taken over once it has run out; a controller whose Lease was taken over
creates no further job. Both controllers run with the committed Role only (k8s/controller-rbac.yaml).

Oracles: the Lease object in the API server, the jobs the fake operator saw created (one uid per
name), the exit codes and the messages.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from clusterfit.kube.lease import OWNER_ANNOTATION, micro_time
from clusterfit.kube.manifests import build_config_map
from tests.infra.controlplane import ControlPlane
from tests.kube.helpers_controller import Experiment, FakeOperator, Script, grant_controller_role
from tests.s3server import S3Server


@pytest.fixture
def ex(control_plane: ControlPlane, namespace: str, s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> Experiment:
    """A fresh namespace and bucket; the controller's Role granted; its ConfigMap made by the admin (the Role
    may only read it, as under the chart)."""
    experiment = Experiment(control_plane, namespace, tmp_path, f"{s3_bucket}/runs", s3_env.endpoint_url)
    grant_controller_role(control_plane, namespace)
    return experiment


def submit(ex: Experiment, config: Path, *extra: str) -> int:
    """`clusterfit submit` as the chart's Job runs it, with the controller's Role."""
    as_controller = ex.cp.kubeconfig_for(ex.cp.user_tokens["controller"])
    return ex.submit(config, "--owner-configmap", "fit-config", *extra, kubeconfig=as_controller)


def in_background(ex: Experiment, config: Path, *extra: str) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(submit(ex, config, *extra)), daemon=True)
    thread.start()
    return thread, result


def setup(ex: Experiment, steps: list[str], **controller: Any) -> tuple[Path, Any]:
    config, cfg = ex.config(steps=steps, **controller)
    client.CoreV1Api(ex.cp.api_client()).create_namespaced_config_map(ex.namespace, build_config_map(cfg, "fit-config"))
    return config, cfg


def leases(ex: Experiment) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(ex.cp.api_client())


def read_lease(ex: Experiment) -> dict[str, Any] | None:
    try:
        found = leases(ex).read_namespaced_lease("fit-controller", ex.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(ex.cp.api_client().sanitize_for_serialization(found))


def take_over(ex: Experiment, lease: dict[str, Any]) -> None:
    """Replace the held Lease as another controller would: read, write with the read resourceVersion, and
    read again when the holder's heartbeat renewed it in between (409 Conflict)."""
    deadline = time.monotonic() + 30
    while True:
        current = read_lease(ex)
        assert current is not None
        lease["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            leases(ex).replace_namespaced_lease("fit-controller", ex.namespace, lease)
            return
        except ApiException as exc:
            if exc.status != 409 or time.monotonic() > deadline:
                raise


def foreign_lease(holder: str, host: str, renewed: float, duration_s: int) -> dict[str, Any]:
    owner = {"id": holder, "host": host, "pid": 4242, "user": "", "command": "clusterfit submit config=other"}
    return {
        "metadata": {"name": "fit-controller", "annotations": {OWNER_ANNOTATION: json.dumps(owner)}},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration_s,
            "acquireTime": micro_time(renewed),
            "renewTime": micro_time(renewed),
        },
    }


def test_a_second_controller_refuses_while_the_first_runs_and_with_wait_finds_the_steps_done(
    ex: Experiment, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config, cfg = setup(ex, ["extract", "cluster"], LEASE_DURATION_S=30)
    hold = threading.Event()
    with FakeOperator(ex, cfg, {"extract": Script(hold=hold)}) as operator:
        first, first_result = in_background(ex, config)
        assert operator.scripts["extract"].running.wait(timeout=60)
        lease = read_lease(ex)
        assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 30
        owner = json.loads(lease["metadata"]["annotations"][OWNER_ANNOTATION])
        assert lease["spec"]["holderIdentity"] == owner["id"] and owner["pid"] == os.getpid()

        assert submit(ex, config) == 1
        err = capsys.readouterr().err
        assert f"clusterfit: error: Lease fit-controller in namespace {ex.namespace} is held by " in err
        assert f"pid {os.getpid()} (clusterfit" in err and "expires at" in err and "add --wait" in err

        second, second_result = in_background(ex, config, "--wait")
        deadline = time.monotonic() + 30
        while "waiting for the lease" not in caplog.text:
            assert time.monotonic() < deadline and second.is_alive(), caplog.text[-2000:]
            time.sleep(0.05)
        hold.set()
        first.join(timeout=60)
        second.join(timeout=60)
    assert first_result == [0] and second_result == [0]
    assert operator.names() == ["fit-extract", "fit-cluster"]  # each job created once
    assert "step cluster: already done" in caplog.text  # the second found the first's work
    assert read_lease(ex) is None  # both released it


def test_a_dead_controllers_lease_is_refused_until_it_runs_out_then_taken_over(
    ex: Experiment, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config, cfg = setup(ex, ["extract"])
    leases(ex).create_namespaced_lease(ex.namespace, foreign_lease("dead", "gone-host", time.time(), 2))
    assert submit(ex, config) == 1
    assert "is held by gone-host pid 4242 (clusterfit submit config=other)" in capsys.readouterr().err
    time.sleep(2.5)
    with FakeOperator(ex, cfg) as operator:
        assert submit(ex, config) == 0
    assert "taking over the lease of gone-host pid 4242" in caplog.text
    assert operator.names() == ["fit-extract"] and read_lease(ex) is None


def test_a_controller_whose_lease_is_taken_over_creates_no_further_job(
    ex: Experiment, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config, cfg = setup(ex, ["extract", "cluster"], LEASE_DURATION_S=3, POD_CHECK_INTERVAL_S=1)
    hold = threading.Event()
    with FakeOperator(ex, cfg, {"extract": Script(hold=hold)}) as operator:
        thread, result = in_background(ex, config)
        assert operator.scripts["extract"].running.wait(timeout=60)
        take_over(ex, foreign_lease("usurper", "other-host", time.time(), 600))
        deadline = time.monotonic() + 30
        while "was taken over by other-host pid 4242" not in caplog.text:  # the heartbeat notices
            assert time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.05)
        hold.set()  # extract succeeds; the controller must not start cluster
        thread.join(timeout=60)
    assert result == [1]
    assert "was taken over by other-host pid 4242" in capsys.readouterr().err
    assert operator.names() == ["fit-extract"]
    lease = read_lease(ex)
    assert lease is not None and lease["spec"]["holderIdentity"] == "usurper"  # left to its holder
