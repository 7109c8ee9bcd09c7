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
import time
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


CONTROLLER = "app.kubernetes.io/instance=digits,app.kubernetes.io/component=controller"


def controller_jobs(ex: Experiment) -> list[dict]:
    """The release's controller Jobs (named <release>-<revision>), oldest first."""
    code, body = ex.cluster.request("GET", f"/apis/batch/v1/namespaces/{ex.namespace}/jobs?labelSelector={CONTROLLER}")
    assert code == 200, body
    return sorted(body["items"], key=lambda j: j["metadata"]["creationTimestamp"])


def install_release(ex: Experiment) -> dict:
    """`helm install digits` of the experiment with the node's controller image; its values."""
    repository, tag = ex.cluster.image_refs["controller"].rsplit(":", 1)
    values = {
        "experiment": ex.tree(),
        "s3": {"secretName": "clusterfit-s3"},
        "controller": {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}},
    }
    (ex.folder / "values.yaml").write_text(yaml.safe_dump(values))
    helm(ex.cluster, "install", "digits", str(CHART), "-n", ex.namespace, "-f", str(ex.folder / "values.yaml"))
    return values


def controller_pods(ex: Experiment, job: str | None = None) -> list[dict]:
    return pods(ex.cluster, ex.namespace, f"job-name={job or controller_jobs(ex)[-1]['metadata']['name']}")


def job_condition(job: dict, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or [])


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
    values = install_release(ex)

    # Kill the controller pod as soon as it has created the train job: the Job's next pod adopts it.
    def train_created() -> bool:
        return "digits-train" in jobs(node, ex.namespace)

    wait_until("helm: pretrain, extract, cluster done and train created", train_created, node, 900)
    (first,) = [p["metadata"]["name"] for p in controller_pods(ex) if p["status"].get("phase") == "Running"]
    node.kubectl_run("-n", ex.namespace, "delete", "pod", first, "--grace-period=0", "--force", "--wait=false")

    (controller,) = controller_jobs(ex)
    name = controller["metadata"]["name"]

    def controller_done() -> dict | None:
        status, job = node.request("GET", f"/apis/batch/v1/namespaces/{ex.namespace}/jobs/{name}")
        assert not job_condition(job, "Failed"), (job["status"], node.all_logs_tail())
        return job if job_condition(job, "Complete") else None

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
    # The chart's own check, in the restricted namespace too; its pod is deleted once it has run.
    tested = helm(node, "test", "digits", "-n", ex.namespace)
    assert re.search(r"Phase:\s+Succeeded", tested.stdout), tested.stdout
    wait_until(
        "helm test: its pod deleted", lambda: not pods(node, ex.namespace, "app.kubernetes.io/component=test"), node, 60
    )

    # helm upgrade of the finished experiment to another config (a key only evaluate reads): a new controller Job
    # and ConfigMap replace the old ones, the garbage collector deletes the old config's step jobs, and the new
    # controller finds the other steps published with this config (the config the pods dumped into their
    # _SUCCESS.json is the controller's) and reruns evaluate alone.
    values["experiment"]["EVALUATE"]["LINEAR_EPOCHS"] += 1
    (ex.folder / "values.yaml").write_text(yaml.safe_dump(values))
    helm(node, "upgrade", "digits", str(CHART), "-n", ex.namespace, "-f", str(ex.folder / "values.yaml"))
    wait_until("helm upgrade: the old config's step jobs deleted", lambda: not jobs(node, ex.namespace), node, 120)
    (upgraded,) = controller_jobs(ex)
    assert upgraded["metadata"]["name"] != name
    name = upgraded["metadata"]["name"]
    wait_until("helm upgrade: the new controller Job completes", controller_done, node, 600)
    log = node.kubectl_run("-n", ex.namespace, "logs", f"job/{name}").stdout
    assert all(f"step {step}: already done with this config" in log for step in ALL_STEPS[:-1]), log
    assert "step evaluate: published before EVALUATE.LINEAR_EPOCHS changed" in log, log
    assert list(jobs(node, ex.namespace)) == ["digits-evaluate"]
    rerun = json.loads(ex.object("eval/_SUCCESS.json"))
    assert rerun["config"]["EVALUATE"]["LINEAR_EPOCHS"] == values["experiment"]["EVALUATE"]["LINEAR_EPOCHS"]

    # helm uninstall: the garbage collector removes the step jobs (owned by the config ConfigMap) and every pod.
    helm(node, "uninstall", "digits", "-n", ex.namespace, "--wait")
    wait_until("helm uninstall: no step job left", lambda: not jobs(node, ex.namespace), node, 120)

    def left() -> list[str]:
        found = pods(node, ex.namespace)
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
    started = time.monotonic()
    submit = ex.clusterfit("submit")
    print(submit.stderr[-4000:])
    print(f"a real error: submit took {time.monotonic() - started:.0f}s")
    assert submit.returncode == 1
    message = "10 labels but the training dataset has 256 images"
    assert "step train failed: PyTorchJob digits-train" in submit.stderr
    # Failed once, not retried (restartPolicy ExitCode, exit code 2): the failed pod is kept, never restarted.
    code, pod = ex.cluster.request("GET", f"/api/v1/namespaces/{ex.namespace}/pods/digits-train-master-0")
    assert code == 200 and pod["status"]["containerStatuses"][0]["restartCount"] == 0, pod
    assert operator_exits(ex) == [f"Pod: {ex.namespace}.digits-train-master-0 exited with code 2"]
    assert "last 50 lines of pod digits-train-master-0:" in submit.stderr and message in submit.stderr
    assert "digits-evaluate" not in jobs(ex.cluster, ex.namespace)
    logs = ex.clusterfit("logs", "train")
    assert logs.returncode == 0 and message in logs.stdout, logs.stderr

    # A container killed for memory: OOMKilled and the memory key in the report, although the operator deletes
    # the pod; and no loop, although the operator recreates a pod that exits 137 until activeDeadlineSeconds.
    ex.overrides = {"PIPELINE.STEPS": ["extract"], "KUBERNETES.RESOURCES.EXTRACT": {"CPU": "500m", "MEMORY": "200Mi"}}
    started = time.monotonic()
    submit = ex.clusterfit("submit", timeout_s=300)
    print(submit.stderr[-4000:])
    print(f"OOMKilled: submit took {time.monotonic() - started:.0f}s; operator events: {operator_exits(ex)}")
    assert submit.returncode == 1
    assert "step extract failed: PyTorchJob digits-extract" in submit.stderr
    assert "OOMKilled" in submit.stderr and "KUBERNETES.RESOURCES.EXTRACT.MEMORY=200Mi" in submit.stderr
    # The controller suspended the job: the operator deletes its pods and recreates none.
    assert "PyTorchJob digits-extract is suspended (no more retries)" in submit.stderr
    assert jobs(ex.cluster, ex.namespace)["digits-extract"]["spec"]["runPolicy"]["suspend"] is True
    selector = "training.kubeflow.org/job-name=digits-extract"
    wait_until("the suspended job's pods deleted", lambda: not pods(ex.cluster, ex.namespace, selector), ex.cluster, 60)


def operator_exits(ex: Experiment) -> list[str]:
    """The distinct `Pod: <ns>.<pod> exited with code N` events of the training operator, in order."""
    code, body = ex.cluster.request("GET", f"/api/v1/namespaces/{ex.namespace}/events")
    assert code == 200, body
    found = sorted(
        (e for e in body["items"] if e.get("reason") == "ExitedWithCode"), key=lambda e: str(e.get("firstTimestamp"))
    )
    return list(dict.fromkeys(str(e["message"]) for e in found))


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


def test_cancel_stops_the_helm_controller_before_it_deletes_the_step_jobs(experiment: Experiment) -> None:
    ex, node = experiment, experiment.cluster
    # A pretrain long enough to be cancelled while it runs.
    ex.overrides = {"PIPELINE.STEPS": ["pretrain", "extract"], "PRETRAIN.OPTIMIZER.NUM_EPOCHS": 200}
    install_release(ex)

    def pretrain_running() -> bool:
        found = pods(node, ex.namespace, "training.kubeflow.org/job-name=digits-pretrain")
        return any(p["status"].get("phase") == "Running" for p in found)

    wait_until("helm: the pretrain step runs", pretrain_running, node, 300)
    cancel = ex.clusterfit("cancel", timeout_s=300)
    print(cancel.stdout, cancel.stderr)
    assert cancel.returncode == 0, cancel.stderr
    (controller,) = controller_jobs(ex)
    assert f"suspended the controller Job {controller['metadata']['name']}" in cancel.stdout
    assert "deleted PyTorchJob digits-pretrain (was Running)" in cancel.stdout
    assert controller["spec"]["suspend"] is True
    # The job controller stopped the controller's pod before the step job went: nothing creates it again.
    assert not [p for p in controller_pods(ex) if p["status"].get("phase") in ("Pending", "Running")]
    time.sleep(15)
    assert "digits-pretrain" not in jobs(node, ex.namespace) and "digits-extract" not in jobs(node, ex.namespace)
    assert not [p for p in controller_pods(ex) if p["status"].get("phase") in ("Pending", "Running")]
    helm(node, "uninstall", "digits", "-n", ex.namespace, "--wait")
