"""The real node works end to end: scheduling, pod network, cluster DNS, Services, ServiceAccount
tokens, MinIO, the training operator (pods, init container, webhook) and garbage collection.

    .venv/bin/python -m pytest tests/node -m node
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.infra.node import Cluster
from tests.infra.node_config import KUBERNETES_SERVICE_IP, NODE_NAME
from tests.infra.node_host import cgroup_pids
from tests.node.conftest import wait_for

pytestmark = pytest.mark.node

PYTORCHJOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"

# Runs in the base image (Debian's python3): each line of output is one JSON fact for the test.
POD_PROBE = r"""
import json, os, socket, ssl, urllib.error, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
def say(**kw): print(json.dumps(kw), flush=True)
say(dns=socket.gethostbyname("kubernetes.default.svc.cluster.local"))
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
req = urllib.request.Request("https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
    headers={"Authorization": "Bearer " + open(f"{sa}/token").read(), "Content-Type": "application/json"})
say(whoami=json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["status"]["userInfo"]["username"])
minio = os.environ["MINIO"]
say(minio_live=urllib.request.urlopen(minio + "/minio/health/live", timeout=10).status)
try:
    urllib.request.urlopen(minio + "/" + os.environ["BUCKET"], timeout=10)
    say(anonymous_list=200)
except urllib.error.HTTPError as err:
    say(anonymous_list=err.code)
"""


def _pod(name: str, image: str, command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                }
            ],
        },
    }


def _pod_phase(cluster: Cluster, ns: str, name: str) -> str:
    status, pod = cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    return str(pod.get("status", {}).get("phase", "")) if status == 200 else ""


def _pod_log(cluster: Cluster, ns: str, name: str, container: str | None = None) -> str:
    query = f"?container={container}" if container else ""
    status, body = cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}/log{query}")
    assert status == 200, f"pod log of {ns}/{name}: {status} {body}"
    return body if isinstance(body, str) else json.dumps(body)


def test_node_is_ready_without_not_ready_taint(cluster: Cluster) -> None:
    status, node = cluster.request("GET", f"/api/v1/nodes/{NODE_NAME}")
    assert status == 200
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", node["status"]["conditions"]
    assert not [t for t in node["spec"].get("taints") or [] if t["key"].startswith("node.kubernetes.io/")]
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == cluster.node_ip


def test_pod_resolves_dns_reaches_api_with_its_token_and_minio(cluster: Cluster, namespace: str) -> None:
    pod = _pod(
        "probe",
        cluster.image_refs["base"],
        ["python3", "-c", POD_PROBE],
        {"MINIO": cluster.minio_endpoint_pod, "BUCKET": cluster.minio_bucket},
    )
    status, body = cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    assert status == 201, body
    phase = wait_for(
        "the probe pod to finish",
        lambda: (
            _pod_phase(cluster, namespace, "probe") in ("Succeeded", "Failed")
            and _pod_phase(cluster, namespace, "probe")
        ),
        120,
        cluster,
    )
    log = _pod_log(cluster, namespace, "probe")
    assert phase == "Succeeded", log
    facts: dict[str, Any] = {}
    for line in log.splitlines():
        facts.update(json.loads(line))
    assert facts["dns"] == KUBERNETES_SERVICE_IP
    assert facts["whoami"] == f"system:serviceaccount:{namespace}:default"
    assert facts["minio_live"] == 200
    assert facts["anonymous_list"] == 403  # MinIO enforces its root credentials


RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# What PodSecurity `restricted` demands of a pod and its containers (the tools image runs as root).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pytorchjob(name: str, image: str, master_replicas: int = 1, restricted: bool = False) -> dict[str, Any]:
    # The master waits for one message on MASTER_PORT; the worker (after the operator's init
    # container saw the master's name in DNS) looks the name up and sends it: DNS + pod network,
    # as gloo's rendezvous uses them. busybox's nc (the tools image has busybox, maybe not its
    # applet links) takes addresses only, hence nslookup.
    nc = 'command -v nc >/dev/null || nc() { busybox nc "$@"; }; '
    master = nc + 'echo "master rank $RANK of $WORLD_SIZE"; nc -l -p "$MASTER_PORT"'
    worker = nc + (
        "for i in $(seq 30); do "
        "ip=$(nslookup \"$MASTER_ADDR\" | awk '/^Name:/ {n=1} n && /^Address/ {print $NF; exit}'); "
        'echo "master at ${ip:-?}"; '
        '[ -n "$ip" ] && echo "hello from rank $RANK" | nc "$ip" "$MASTER_PORT" && exit 0; sleep 1; done; exit 1'
    )

    def replica(replicas: int, script: str) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": "pytorch",
            "image": image,
            "imagePullPolicy": "Never",
            "command": ["sh", "-c", script],
        }
        spec: dict[str, Any] = {"terminationGracePeriodSeconds": 1, "containers": [container]}
        if restricted:
            container["securityContext"] = CONTAINER_SECURITY
            spec["securityContext"] = POD_SECURITY
        return {"replicas": replicas, "restartPolicy": "Never", "template": {"spec": spec}}

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "runPolicy": {"backoffLimit": 0, "activeDeadlineSeconds": 300},
            "pytorchReplicaSpecs": {"Master": replica(master_replicas, master), "Worker": replica(1, worker)},
        },
    }


def _job_conditions(cluster: Cluster, ns: str, name: str) -> dict[str, str]:
    status, job = cluster.request("GET", PYTORCHJOBS.format(ns=ns) + f"/{name}")
    assert status == 200, job
    return {c["type"]: c["status"] for c in job.get("status", {}).get("conditions") or []}


@pytest.mark.parametrize("labels", [{}, RESTRICTED], ids=["baseline", "restricted"])
def test_pytorchjob_master_and_worker_succeed(cluster: Cluster, labels: dict[str, str]) -> None:
    """In a `restricted` namespace too: the operator's init container (the project's template)
    must be admitted there."""
    namespace = f"t-job-{'restricted' if labels else 'baseline'}"
    cluster.create_namespace(namespace, labels)
    job = _pytorchjob("ddp", cluster.image_refs["tools"], restricted=bool(labels))
    status, body = cluster.request("POST", PYTORCHJOBS.format(ns=namespace), job)
    assert status == 201, body

    def finished() -> dict[str, str] | None:
        conditions = _job_conditions(cluster, namespace, "ddp")
        return conditions if "True" in (conditions.get("Succeeded"), conditions.get("Failed")) else None

    conditions = wait_for("the PyTorchJob to finish", finished, 180, cluster)
    master_log = _pod_log(cluster, namespace, "ddp-master-0")
    assert conditions.get("Succeeded") == "True", (conditions, master_log, cluster.logs_tail("training-operator"))
    assert "master rank 0 of 2" in master_log
    assert "hello from rank 1" in master_log
    _, worker = cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/ddp-worker-0")
    init = [s for s in worker["status"].get("initContainerStatuses") or [] if s["name"] == "init-pytorch"]
    assert init and init[0]["state"]["terminated"]["exitCode"] == 0, worker["status"]
    cluster.request("DELETE", f"/api/v1/namespaces/{namespace}")


def test_operator_webhook_refuses_two_masters(cluster: Cluster, namespace: str) -> None:
    job = _pytorchjob("two-masters", cluster.image_refs["tools"], master_replicas=2)
    status, body = cluster.request("POST", PYTORCHJOBS.format(ns=namespace), job)
    message = body.get("message", "") if isinstance(body, dict) else str(body)
    assert status in (400, 403, 422), body
    assert "denied the request" in message, message  # the operator answered (not a webhook call failure)
    assert "must be 1" in message, message


def test_namespace_deletion_removes_its_pods(cluster: Cluster) -> None:
    name = "t-gc-namespace"
    cluster.create_namespace(name)
    pod = _pod("sleeper", cluster.image_refs["tools"], ["sleep", "3600"])
    status, body = cluster.request("POST", f"/api/v1/namespaces/{name}/pods", pod)
    assert status == 201, body
    wait_for("the pod to run", lambda: _pod_phase(cluster, name, "sleeper") == "Running", 60, cluster)
    assert _sleepers(), "the pod's process is not under the kubelet's cgroup"
    status, _ = cluster.request("DELETE", f"/api/v1/namespaces/{name}")
    assert status == 200
    wait_for(
        "the namespace and its pod to be gone",
        lambda: cluster.request("GET", f"/api/v1/namespaces/{name}")[0] == 404,
        90,
        cluster,
    )
    assert cluster.request("GET", f"/api/v1/namespaces/{name}/pods/sleeper")[0] == 404
    assert not _sleepers(), "the pod's process survived its namespace"


def _sleepers() -> list[int]:
    """Processes of pods on the node running `sleep 3600`."""
    found = []
    for pid in cgroup_pids("kubepods"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"3600"]:
                found.append(pid)
    return found


def test_garbage_collector_deletes_dependents(cluster: Cluster, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    status, owner = cluster.request("POST", path, {"metadata": {"name": "owner"}})
    assert status == 201, owner
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    status, body = cluster.request("POST", path, {"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    assert status == 201, body
    assert cluster.request("DELETE", f"{path}/owner")[0] == 200
    wait_for(
        "the dependent ConfigMap to be collected",
        lambda: cluster.request("GET", f"{path}/dependent")[0] == 404,
        60,
        cluster,
    )
