"""Restarts on the real node: a preempted step is retried, a real error is not (issue 13).

    .venv/bin/python -m pytest -m node tests/node -k restarts

The kubelet stops a container with SIGTERM to its first process (preemption, a drain, a deleted pod).
Here `ctr tasks kill` sends exactly that to the step container of a running torchrun step (two
processes): under the default `KUBERNETES.RESTART_POLICY: auto` (ExitCode for a one-pod job) the real
training operator v1.9.4 sees exit code 143 from clusterfit.launch, recreates the pod, and the step
resumes from its checkpoint and succeeds. (torchrun alone exits 1, and the same job would have failed
for good.) The real-error and OOMKilled cases are in test_e2e.py's
test_a_failing_step_ends_the_pipeline_with_its_reason_and_log: each fails once, promptly.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.node import Cluster
from tests.node.experiment import STEP_IMAGES, Experiment, jobs, setup_namespace, true_conditions, wait_until

pytestmark = pytest.mark.node
MASTER = "digits-pretrain-master-0"


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> Cluster:
    cluster.import_images(STEP_IMAGES)
    return cluster


@pytest.fixture()
def experiment(node: Cluster, tmp_path: Path) -> Iterator[Experiment]:
    namespace = f"restarts-{uuid.uuid4().hex[:6]}"
    setup_namespace(node, namespace)
    yield Experiment(node, namespace, "digits", tmp_path, {})
    node.request("DELETE", f"/api/v1/namespaces/{namespace}")


def master(ex: Experiment) -> dict[str, Any] | None:
    code, pod = ex.cluster.request("GET", f"/api/v1/namespaces/{ex.namespace}/pods/{MASTER}")
    return pod if code == 200 else None


def running_container(ex: Experiment) -> tuple[str, str] | None:
    """(pod uid, containerd id) of the master's running step container, once rank 0 finished an epoch."""
    pod = master(ex)
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    if not statuses or "running" not in statuses[0].get("state", {}):
        return None
    log = ex.cluster.kubectl_run("-n", ex.namespace, "logs", MASTER, check=False).stdout
    if "pretrain epoch 1/" not in log:
        return None
    return str(pod["metadata"]["uid"]), statuses[0]["containerID"].removeprefix("containerd://")  # type: ignore[index]


def exits(ex: Experiment) -> list[str]:
    """The operator's `Pod: <ns>.<pod> exited with code N` events on the job, oldest first."""
    code, body = ex.cluster.request("GET", f"/api/v1/namespaces/{ex.namespace}/events")
    assert code == 200, body
    found = [e for e in body["items"] if e.get("reason") == "ExitedWithCode"]
    return [str(e["message"]) for e in sorted(found, key=lambda e: str(e.get("firstTimestamp") or ""))]


@pytest.mark.timeout(900)
def test_a_sigterm_to_a_torchrun_step_exits_143_and_the_operator_retries_it(experiment: Experiment) -> None:
    ex, node = experiment, experiment.cluster
    ex.overrides = {
        "PIPELINE.STEPS": ["pretrain"],
        "DISTRIBUTED.NUM_PROC_PER_NODE": 2,
        "PRETRAIN.OPTIMIZER.NUM_EPOCHS": 3,
        "KUBERNETES.RESOURCES.PRETRAIN": {"CPU": "1", "MEMORY": "3Gi"},
    }
    argv = [sys.executable, "-m", "clusterfit", "submit", f"config={ex.write()}"]
    argv += ["--kubeconfig", str(node.kubeconfig_path)]
    started = time.monotonic()
    submit = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ex.env(), cwd=ex.folder
    )
    try:
        uid, container = wait_until(
            "pretrain: rank 0 finished its first epoch", lambda: running_container(ex), node, 600
        )
        replicas = jobs(node, ex.namespace)["digits-pretrain"]["spec"]["pytorchReplicaSpecs"]
        assert {r["restartPolicy"] for r in replicas.values()} == {"ExitCode"}  # auto, for a job of one pod
        node.ctr("tasks", "kill", "--signal", "SIGTERM", container)  # what the kubelet sends on preemption
        out, err = submit.communicate(timeout=600)
    finally:
        if submit.poll() is None:
            submit.kill()
    print(err[-3000:])
    print(f"submit took {time.monotonic() - started:.0f}s; operator events: {exits(ex)}")
    assert submit.returncode == 0, err
    assert f"Pod: {ex.namespace}.{MASTER} exited with code 143" in exits(ex)  # torchrun alone: code 1, Failed
    job = jobs(node, ex.namespace)["digits-pretrain"]
    assert "Succeeded" in true_conditions(job) and "Failed" not in true_conditions(job)
    assert (master(ex) or {"metadata": {"uid": uid}})["metadata"]["uid"] != uid  # a new pod, not a restart in place
    log = ex.clusterfit("logs", "pretrain").stdout
    assert "pretrain: resuming from epoch" in log, log[-3000:]
