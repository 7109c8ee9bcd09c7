"""The whole pipeline on a real node: our images, the real training operator, real pods, MinIO.

    make e2e        # or: .venv/bin/python -m pytest tests/node -m node

Each test is one way a user runs ClusterFit on Kubernetes (helm install, kubectl apply of the
rendered manifests, clusterfit submit from a workstation) or one way it goes wrong (a failing step,
a pod that cannot start). Namespaces that enforce the `restricted` Pod Security Standard run the
helm and multi-node experiments: every pod we create, and the operator's init container configured
with k8s/training-operator/initContainer.yaml, must be admitted there.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.infra.node import Cluster
from tests.node.experiment import (
    CHART,
    RESTRICTED,
    STEP_IMAGES,
    Experiment,
    helm,
    jobs,
    pods,
    readme_apply_loop,
    setup_namespace,
    wait_until,
)

pytestmark = pytest.mark.node
ALL_STEPS = ["pretrain", "extract", "cluster", "train", "evaluate"]


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> Cluster:
    """The node with the project's three images imported (built on first use, cached)."""
    cluster.import_images(STEP_IMAGES)
    return cluster


@pytest.fixture()
def experiment(node: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Experiment]:
    """An experiment in a fresh namespace; the namespace is deleted afterwards (its pods go with it)."""
    short = request.node.name.removeprefix("test_")[:16].replace("_", "-").rstrip("-")
    namespace = f"e2e-{short}-{uuid.uuid4().hex[:6]}"
    setup_namespace(node, namespace, RESTRICTED if "restricted" in request.keywords else None)
    yield Experiment(node, namespace, "digits", tmp_path, {})
    node.request("DELETE", f"/api/v1/namespaces/{namespace}")


def controller_pods(ex: Experiment) -> list[dict]:
    return pods(ex.cluster, ex.namespace, "job-name=digits")


def finished(output: str, step: str) -> str:
    """The loop's verdict line for a step's job: `<name>: <its True conditions>`."""
    match = re.search(rf"^pytorchjob\.kubeflow\.org/digits-{step}: (.*)$", output, re.MULTILINE)
    return match[1] if match else ""


@pytest.mark.restricted
@pytest.mark.timeout(2400)
def test_helm_install_runs_every_step_in_pods_and_survives_a_killed_controller(experiment: Experiment) -> None:
    ex, node = experiment, experiment.cluster
    # Train long enough that the controller's next pod finds its job still running: 5 epochs (about
    # 20 s at 500m CPU) once finished before the next pod started, and the log said "already done".
    ex.overrides = {"PIPELINE.STEPS": ALL_STEPS, "OPTIMIZER.NUM_EPOCHS": 20}
    repository, tag = node.image_refs["controller"].rsplit(":", 1)
    values = {
        "experiment": ex.tree(),
        "s3": {"secretName": "clusterfit-s3"},
        "controller": {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}},
    }
    (ex.folder / "values.yaml").write_text(yaml.safe_dump(values))
    helm(node, "install", "digits", str(CHART), "-n", ex.namespace, "-f", str(ex.folder / "values.yaml"))

    # Kill the controller pod as soon as it has created the train job: the Job's next pod adopts it.
    def train_created() -> bool:
        return "digits-train" in jobs(node, ex.namespace)

    wait_until("helm: pretrain, extract, cluster done and train created", train_created, node, 900)
    (first,) = [p["metadata"]["name"] for p in controller_pods(ex) if p["status"].get("phase") == "Running"]
    node.kubectl_run("-n", ex.namespace, "delete", "pod", first, "--grace-period=0", "--force", "--wait=false")

    def controller_done() -> dict | None:
        status, job = node.request("GET", f"/apis/batch/v1/namespaces/{ex.namespace}/jobs/digits")
        conditions = {c["type"]: c["status"] for c in (job.get("status") or {}).get("conditions") or []}
        assert conditions.get("Failed") != "True", (job["status"], node.all_logs_tail())
        return job if conditions.get("Complete") == "True" else None

    wait_until("helm: the controller Job completes", controller_done, node, 900)
    second = [p for p in controller_pods(ex) if p["metadata"]["name"] != first]
    assert second, "no second controller pod"
    log = node.kubectl_run("-n", ex.namespace, "logs", second[-1]["metadata"]["name"]).stdout
    print(log)
    assert "step train: adopted the existing PyTorchJob digits-train" in log, log
    assert "experiment digits: all steps done" in log, log

    # Every step's job Succeeded, as `clusterfit status` shows; the report is in the bucket.
    status = ex.clusterfit("status")
    assert status.returncode == 0, status.stderr
    for step in ALL_STEPS:
        assert "Succeeded" in next(line for line in status.stdout.splitlines() if f"digits-{step}" in line)
    metrics = json.loads(ex.object("eval/metrics.json"))
    assert {r["model"] for r in metrics["rows"]} == {"pixels", "random", "start", "clusterfit"}
    report = ex.object("eval/report.md").decode()
    print(report.split("## Evaluation")[1].split("Cluster labels")[0])  # the table, for the closing note
    assert 'src="cluster_sizes.png"' in ex.object("eval/report.html").decode()
    # The chart's own check, in the restricted namespace too.
    helm(node, "test", "digits", "-n", ex.namespace, "--logs")

    # helm uninstall: the garbage collector removes the step jobs (owned by the config ConfigMap) and their pods.
    helm(node, "uninstall", "digits", "-n", ex.namespace, "--wait")
    wait_until("helm uninstall: no step job left", lambda: not jobs(node, ex.namespace), node, 120)

    # (The `helm test` pod is a hook, which Helm leaves in place; every other pod goes.)
    def left() -> list[str]:
        found = [p for p in pods(node, ex.namespace) if p["metadata"]["name"] != "digits-test-outputs"]
        return [f"{p['metadata']['name']} {p['status'].get('phase')} {p['metadata'].get('finalizers')}" for p in found]

    wait_until("helm uninstall: no pod left", lambda: not left() or print(left()), node, 120)


def run_readme_loop(ex: Experiment, rendered: Path) -> subprocess.CompletedProcess[str]:
    """k8s/README.md's apply-and-wait loop, verbatim, with the real kubectl."""
    env = {
        **os.environ,
        "PATH": f"{ex.cluster.kubectl.parent}:{os.environ['PATH']}",
        "KUBECONFIG": str(ex.cluster.kubeconfig_path),
        "NAMESPACE": ex.namespace,
        "DIR": str(rendered),
        "POLL_S": "2",
    }
    return subprocess.run(
        ["bash", "-c", readme_apply_loop()], capture_output=True, text=True, env=env, cwd=ex.folder, timeout=1200
    )


@pytest.mark.restricted
@pytest.mark.timeout(2400)
def test_kubectl_apply_as_the_readme_says_and_a_two_node_step_gives_the_same_features(
    experiment: Experiment,
) -> None:
    ex, node = experiment, experiment.cluster
    ex.overrides = {"PIPELINE.STEPS": ["extract", "cluster", "train", "evaluate"]}  # random-init start
    rendered = ex.folder / "rendered"
    render = ex.clusterfit("render", "--out", str(rendered))
    assert render.returncode == 0, render.stderr
    loop = run_readme_loop(ex, rendered)
    assert loop.returncode == 0, loop.stdout + loop.stderr
    print(loop.stdout)
    for step in ["extract", "cluster", "train", "evaluate"]:
        assert "Succeeded" in finished(loop.stdout, step).split() and "Failed" not in finished(loop.stdout, step)
    assert "eval/metrics.json" in ex.keys("eval/")

    # The same extraction on two nodes (a Master and a Worker, gloo over the pod network): the same features.
    two = Experiment(
        node,
        ex.namespace,
        "digits2",
        ex.folder,
        {
            "PIPELINE.STEPS": ["extract"],
            "DISTRIBUTED.NUM_NODES": 2,
            "EXTRACT.PARTITIONS": ["TRAIN"],
        },
    )
    submit = two.clusterfit("submit")
    assert submit.returncode == 0, submit.stderr
    # The worker's pod may be gone already: the job succeeds with its Master, and cleanPodPolicy Running then
    # deletes a Worker that has not exited yet. Where it is still there, its init container waited for the
    # Master's Service and exited 0; either way the chunk ranks below show that the worker extracted.
    code, worker = node.request("GET", f"/api/v1/namespaces/{ex.namespace}/pods/digits2-extract-worker-0")
    if code != 404:
        init = [s for s in worker["status"].get("initContainerStatuses") or [] if s["name"] == "init-pytorch"]
        assert init and init[0]["state"]["terminated"]["exitCode"] == 0, worker["status"]
    one_node, two_nodes = ex.features(), two.features()
    assert sorted(one_node) == sorted(two_nodes) == list(range(256))
    ranks = {json.loads(two.object(f"features/train/_chunks/chunk-{c:06d}.json"))["rank"] for c in range(4)}
    assert ranks == {0, 1}  # both pods extracted
    np.testing.assert_allclose(
        np.stack([two_nodes[i] for i in range(256)]), np.stack([one_node[i] for i in range(256)]), atol=1e-5
    )


@pytest.mark.timeout(1200)
def test_the_readme_loop_ends_on_a_failed_step(experiment: Experiment) -> None:
    ex = experiment
    bad = np.zeros(10, dtype=np.int64)  # 10 labels for 256 images
    buffer = io.BytesIO()
    np.save(buffer, bad)
    key = f"{ex.namespace}/bad-labels.npy"
    ex.cluster.s3_client().put_object(Bucket=ex.cluster.minio_bucket, Key=key, Body=buffer.getvalue())
    ex.overrides = {
        "PIPELINE.STEPS": ["train", "evaluate"],
        "DATA.TRAIN.LABEL_PATHS": [f"s3://{ex.cluster.minio_bucket}/{key}"],
    }
    rendered = ex.folder / "rendered"
    assert ex.clusterfit("render", "--out", str(rendered)).returncode == 0
    loop = run_readme_loop(ex, rendered)
    print(loop.stdout)
    assert "Failed" in finished(loop.stdout, "train").split(), loop.stdout
    assert "digits-evaluate" not in jobs(ex.cluster, ex.namespace)  # the loop stopped


@pytest.mark.timeout(1200)
def test_a_failing_step_ends_the_pipeline_with_its_reason_and_log(experiment: Experiment) -> None:
    ex = experiment
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(10, dtype=np.int64))  # 10 labels for 256 images
    key = f"{ex.namespace}/bad-labels.npy"
    ex.cluster.s3_client().put_object(Bucket=ex.cluster.minio_bucket, Key=key, Body=buffer.getvalue())
    ex.overrides = {"PIPELINE.STEPS": ["train", "evaluate"], "DATA.TRAIN.LABEL_PATHS": [f"s3://clusterfit/{key}"]}
    submit = ex.clusterfit("submit")
    print(submit.stderr[-4000:])
    assert submit.returncode == 1
    message = "10 labels but the training dataset has 256 images"
    assert "step train failed: PyTorchJob digits-train" in submit.stderr
    assert "last 50 lines of pod digits-train-master-0:" in submit.stderr and message in submit.stderr
    assert "digits-evaluate" not in jobs(ex.cluster, ex.namespace)
    logs = ex.clusterfit("logs", "train")
    assert logs.returncode == 0 and message in logs.stdout, logs.stderr

    # A container killed for memory: OOMKilled in the report, although the operator deletes the pod.
    ex.overrides = {"PIPELINE.STEPS": ["extract"], "KUBERNETES.RESOURCES.EXTRACT": {"CPU": "500m", "MEMORY": "200Mi"}}
    submit = ex.clusterfit("submit")
    print(submit.stderr[-4000:])
    assert submit.returncode == 1
    assert "step extract failed: PyTorchJob digits-extract" in submit.stderr
    assert "terminated OOMKilled (exit code 137)" in submit.stderr


@pytest.mark.parametrize(
    "override, reason",
    [
        (
            {"KUBERNETES.IMAGE": "clusterfit/no-such-image:0", "KUBERNETES.IMAGE_PULL_POLICY": "IfNotPresent"},
            "ImagePull",
        ),
        ({"KUBERNETES.RESOURCES.EXTRACT": {"CPU": "64", "MEMORY": "1Gi"}}, "Unschedulable"),
    ],
    ids=["missing-image", "unschedulable"],
)
def test_a_pod_that_cannot_start_is_reported_within_the_start_timeout(
    experiment: Experiment, override: dict, reason: str
) -> None:
    ex = experiment
    ex.overrides = {"PIPELINE.STEPS": ["extract", "cluster"], **override}
    submit = ex.clusterfit("submit", timeout_s=300)
    print(submit.stderr[-3000:])
    assert submit.returncode == 1
    assert "step extract failed: PyTorchJob digits-extract: pod digits-extract-master-0" in submit.stderr
    assert reason in submit.stderr and "POD_START_TIMEOUT_S=30" in submit.stderr
    assert "digits-cluster" not in jobs(ex.cluster, ex.namespace)
