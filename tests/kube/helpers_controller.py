"""What the controller tests play against the real API server: the training operator (it patches
each job's `/status` and publishes the step's `_SUCCESS.json`), a kubelet that serves pod logs
to the API server's `pods/log` proxy, the controller's Role from k8s/controller-rbac.yaml, and a
small experiment config."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from clusterfit.artifacts.layout import MANIFEST, step_folders
from clusterfit.config import Config, config_from_args
from clusterfit.kube import commands
from clusterfit.kube.client import GROUP, JOB_LABEL, PLURAL, VERSION
from clusterfit.kube.manifests import job_name
from clusterfit.storage import open_store
from tests.infra.controlplane import REPO_ROOT, ControlPlane

# Who runs clusterfit against the cluster: the controller in its pod, a person at a workstation.
RBAC_FILES = {"controller": REPO_ROOT / "k8s" / "controller-rbac.yaml", "user": REPO_ROOT / "k8s" / "user-rbac.yaml"}
USERS = {"controller": "clusterfit-controller", "user": "clusterfit-user"}
ALL_STEPS = ["pretrain", "extract", "cluster", "train", "evaluate"]
T = TypeVar("T")

# What each is allowed, exactly; the committed Roles must say the same, and a run must use all of it.
EXPECTED_RULES = {
    "controller": {
        ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "patch"},
        ("", "pods"): {"list"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"list"},
        ("", "configmaps"): {"get"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update", "delete"},
    },
    "user": {
        ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "delete", "patch"},
        ("", "pods"): {"get", "list"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"list"},
        ("", "configmaps"): {"get", "create"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update", "delete"},
        ("batch", "jobs"): {"list", "patch"},
    },
}


def normalized_rules(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs} of a Role's rules (resourceNames must be absent)."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("resourceNames"), rule
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.setdefault((group, resource), set()).update(rule.get("verbs", []))
    return out


def committed_role_rules(who: str = "controller") -> list[dict[str, Any]]:
    """The rules of the Role in k8s/controller-rbac.yaml (the file the chart's Role must match) or
    k8s/user-rbac.yaml."""
    docs = [d for d in yaml.safe_load_all(RBAC_FILES[who].read_text()) if d]
    roles = [d for d in docs if d.get("kind") == "Role"]
    assert len(roles) == 1, f"{RBAC_FILES[who]}: expected one Role, found {len(roles)}"
    return list(roles[0]["rules"])


def used_rules(cp: ControlPlane, who: str) -> tuple[dict[tuple[str, str], set[str]], list[str]]:
    """{(apiGroup, resource): verbs} that `who` called (from the API server's audit log), and the calls
    it was refused (403)."""
    used: dict[tuple[str, str], set[str]] = {}
    refused = []
    for group, resource, verb, code in cp.requests_by(USERS[who]):
        used.setdefault((group, resource), set()).add(verb)
        if code == 403:
            refused.append(f"{verb} {group or 'core'}/{resource}")
    return used, refused


def retry(fn: Callable[[], T], timeout_s: float = 60.0) -> T:
    """`fn()` until it stops failing with a refused connection or a 5xx (the API server may be restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except ApiException as exc:
            if exc.status and exc.status < 500 or time.monotonic() > deadline:
                raise
        except Exception:  # urllib3 wraps refused connections in its own errors
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def grant_controller_role(cp: ControlPlane, namespace: str, who: str = "controller") -> Path:
    """Bind the committed Role of `who` (controller or user) to its token user in `namespace`, wait
    until the authorizer (fed by an informer) lets that user list jobs; return a kubeconfig as that user."""
    rbac = client.RbacAuthorizationV1Api(cp.api_client())
    name = USERS[who]
    rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": committed_role_rules(who)})
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    subject = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": name}
    binding = {"metadata": {"name": name}, "roleRef": role_ref, "subjects": [subject]}
    rbac.create_namespaced_role_binding(namespace, binding)
    path, token = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", cp.user_tokens[who]
    deadline = time.monotonic() + 10
    while cp.request("GET", path, token=token)[0] != 200:
        assert time.monotonic() < deadline, f"the {who} Role never took effect"
        time.sleep(0.1)
    return cp.kubeconfig_for(token)


def write_config(
    folder: Path,
    namespace: str,
    root: str,
    endpoint: str,
    steps: list[str] | None = None,
    name: str = "fit",
    controller_settings: dict[str, Any] | None = None,
) -> Path:
    """A config for the experiment `name` in `namespace`, its artifacts under `root` (s3://: jobs need it)."""
    controller = {"WATCH_TIMEOUT_S": 60, "BACKOFF_INITIAL_S": 0.2, "BACKOFF_MAX_S": 1.0, "RETRY_TIMEOUT_S": 60}
    controller |= controller_settings or {}
    tree = {
        "EXPERIMENT": {"NAME": name, "ROOT": f"{root}/{name}"},
        "STORAGE": {"S3": {"ENDPOINT_URL": endpoint, "ADDRESSING_STYLE": "path", "MAX_ATTEMPTS": 2}},
        "DATA": {"TRAIN": {"DATA_SOURCES": ["synthetic"]}},
        "PIPELINE": {"STEPS": steps or ALL_STEPS},
        "KUBERNETES": {"NAMESPACE": namespace, "CONTROLLER": controller},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@dataclass
class Experiment:
    """What one test needs: the control plane, its namespace and folder, an artifact root on the test S3 server."""

    cp: ControlPlane
    namespace: str
    folder: Path
    root: str  # s3://bucket/prefix
    endpoint: str  # the S3 server

    def config(self, steps: list[str] | None = None, name: str = "fit", **controller: Any) -> tuple[Path, Config]:
        """The experiment's config file and its Config; keyword arguments are KUBERNETES.CONTROLLER settings."""
        path = write_config(self.folder, self.namespace, self.root, self.endpoint, steps, name, controller)
        return path, config_from_args([f"config={path}"])

    def submit(self, config: Path, *extra: str, kubeconfig: Path | None = None) -> int:
        """`clusterfit submit` in this process (admin credentials unless `kubeconfig`)."""
        return commands.cli_submit(
            [f"config={config}", "--kubeconfig", str(kubeconfig or self.cp.kubeconfig_path), *extra]
        )

    def submit_command(self, config: Path) -> list[str]:
        """`clusterfit submit` as a command line (admin credentials), for a subprocess."""
        kubeconfig = str(self.cp.kubeconfig_path)
        return [sys.executable, "-m", "clusterfit", "submit", f"config={config}", "--kubeconfig", kubeconfig]

    def submit_in_background(
        self, config: Path, *extra: str, kubeconfig: Path | None = None
    ) -> tuple[threading.Thread, list[int]]:
        """`submit` in a daemon thread; the list receives its exit code."""
        result: list[int] = []
        run = lambda: result.append(self.submit(config, *extra, kubeconfig=kubeconfig))  # noqa: E731
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, result

    def jobs(self) -> list[dict[str, Any]]:
        api = client.CustomObjectsApi(self.cp.api_client())
        return list(api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"])


# ---- a kubelet that only serves logs ---------------------------------------------------------


class FakeKubelet:
    """An HTTPS server answering the API server's `GET /containerLogs/<ns>/<pod>/<container>`, and
    a Node pointing at it. kube-apiserver without --kubelet-certificate-authority does not verify
    the kubelet's certificate, so a self-signed one does."""

    def __init__(self, cp: ControlPlane) -> None:
        self.logs: dict[str, str] = {}  # "<ns>/<pod>/<container>" -> text
        # The same, of the container before its restart (?previous=true); absent: the current one's.
        self.previous_logs: dict[str, str] = {}
        self.node = f"node-{uuid.uuid4().hex[:8]}"
        self.cp = cp
        key, cert = cp.dir / "kubelet.key", cp.dir / "kubelet.crt"
        if not cert.exists():
            args = f"req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=kubelet -keyout {key} -out {cert}"
            subprocess.run(["openssl", *args.split()], check=True, capture_output=True)
        kubelet = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path, _, query = self.path.partition("?")
                key = path.removeprefix("/containerLogs/")
                text = kubelet.logs.get(key, "")
                if "previous=true" in query:
                    text = kubelet.previous_logs.get(key, text)
                if "tailLines=" in query:
                    count = int(query.split("tailLines=")[1].split("&")[0])
                    text = "".join(text.splitlines(keepends=True)[-count:])
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]

    def __enter__(self) -> FakeKubelet:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        core = client.CoreV1Api(self.cp.api_client())
        core.create_node({"metadata": {"name": self.node}})
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
        }
        core.patch_node_status(self.node, {"status": status})
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        client.CoreV1Api(self.cp.api_client()).delete_node(self.node)


# ---- the training operator -------------------------------------------------------------------


@dataclass
class Script:
    """What the operator does with one step's job: Created, Running, then Succeeded or `fail`."""

    fail: tuple[str, str] | None = None  # (reason, message) of the Failed condition
    hold: threading.Event | None = None  # stay Running until this is set
    running: threading.Event = field(default_factory=threading.Event)  # set once the job is Running
    log: str = ""  # the master pod's log (served by the FakeKubelet)
    pod_status: dict[str, Any] | None = None  # the master pod's status while Running (default: phase Running)
    delete_pods: bool = False  # delete the job's pods before marking it Failed, as cleanPodPolicy Running does


def condition(kind: str, reason: str, message: str) -> dict[str, str]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    }


class FakeOperator:
    """Polls the namespace's PyTorchJobs (a poll survives API server restarts) and plays each new
    one (by uid) through its step's Script. Records what it saw for the tests' oracles."""

    def __init__(
        self, ex: Experiment, cfg: Config, scripts: dict[str, Script] | None = None, kubelet: FakeKubelet | None = None
    ) -> None:
        cp, namespace = ex.cp, ex.namespace
        self.namespace = namespace
        self.cfg = cfg
        self.scripts = scripts or {}
        self.kubelet = kubelet
        self.jobs = client.CustomObjectsApi(cp.api_client())
        self.core = client.CoreV1Api(cp.api_client())
        self.step_of = {job_name(cfg, step): step for step in cfg.PIPELINE.STEPS}
        self.store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
        self.created: list[dict[str, Any]] = []  # each job as first seen (creation resourceVersion)
        self.succeeded_rv: dict[str, int] = {}  # job name -> resourceVersion of its Succeeded patch
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FakeOperator:
        self._spawn(self._poll)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for script in self.scripts.values():
            if script.hold:
                script.hold.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not self.errors, f"the fake operator failed: {self.errors!r}"

    def names(self) -> list[str]:
        return [job["metadata"]["name"] for job in self.created]

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:  # surfaced by __exit__
                self.errors.append(exc)

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll(self) -> None:
        seen: set[str] = set()
        while not self._stop.is_set():
            try:
                listing = self.jobs.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
            except Exception:  # the API server is restarting
                time.sleep(0.1)
                continue
            for job in listing["items"]:
                if job["metadata"]["uid"] not in seen:
                    seen.add(job["metadata"]["uid"])
                    self.created.append(job)
                    self._spawn(self._play, job)
            time.sleep(0.05)

    def _status(self, name: str, conditions: list[dict[str, str]]) -> dict[str, Any]:
        body = {"status": {"conditions": conditions}}
        return retry(
            lambda: self.jobs.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name, body)
        )

    def _play(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        step = self.step_of[name]
        script = self.scripts.setdefault(step, Script())
        conditions = [condition("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")]
        self._status(name, conditions)
        master_status = script.pod_status or {"phase": "Running"}
        self._pod(name, "master-0", master_status, script.log or f"{step}: starting\n{step}: done\n")
        conditions.append(condition("Running", "PyTorchJobRunning", f"PyTorchJob {name} is running."))
        self._status(name, conditions)
        script.running.set()
        if script.hold:
            script.hold.wait()
        else:
            time.sleep(0.1)
        if self._stop.is_set():
            return
        if script.fail:
            if script.delete_pods:
                pods = f"{JOB_LABEL}={name}"
                self.core.delete_collection_namespaced_pod(self.namespace, label_selector=pods, grace_period_seconds=0)
            else:
                self._problems(name)
            conditions.append(condition("Failed", *script.fail))
            self._status(name, conditions)
            return
        for folder in step_folders(self.cfg, step):
            manifest = {"step": step, "config": self.cfg.model_dump(mode="json")}  # as artifacts.publish writes it
            self.store.put_bytes(f"{folder}/{MANIFEST}", json.dumps(manifest).encode())
        conditions.append(
            condition("Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed.")
        )
        self.succeeded_rv[name] = int(self._status(name, conditions)["metadata"]["resourceVersion"])

    def _pod(self, job: str, replica: str, status: dict[str, Any], log: str = "") -> str:
        pod = f"{job}-{replica}"
        spec: dict[str, Any] = {"containers": [{"name": "pytorch", "image": "clusterfit:test"}]}
        if self.kubelet:
            spec["nodeName"] = self.kubelet.node
            self.kubelet.logs[f"{self.namespace}/{pod}/pytorch"] = log
        body = {"metadata": {"name": pod, "labels": {JOB_LABEL: job}}, "spec": spec}
        try:
            retry(lambda: self.core.create_namespaced_pod(self.namespace, body))
        except ApiException as exc:  # a deleted job's pod: the garbage collector (not running here) would delete it
            if exc.status != 409:
                raise
            retry(lambda: self.core.delete_namespaced_pod(pod, self.namespace, grace_period_seconds=0))
            retry(lambda: self.core.create_namespaced_pod(self.namespace, body))
        retry(lambda: self.core.patch_namespaced_pod_status(pod, self.namespace, {"status": status}))
        return pod

    def _problems(self, job: str) -> None:
        """What a failed job's pods look like: the master OOMKilled, a worker unschedulable, another
        unable to pull its image, and the kubelet's and scheduler's Warning events."""
        master = f"{job}-master-0"
        oom = container_status("clusterfit:test", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, restarts=1)
        retry(
            lambda: self.core.patch_namespaced_pod_status(
                master, self.namespace, {"status": {"phase": "Failed", "containerStatuses": [oom]}}
            )
        )
        no_gpu = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
        unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": no_gpu}
        self._pod(job, "worker-0", {"phase": "Pending", "conditions": [unschedulable]})
        backoff = container_status(
            "clusterfit:typo",
            {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "clusterfit:typo"'}},
        )
        self._pod(job, "worker-1", {"phase": "Pending", "containerStatuses": [backoff]})
        for pod, reason, message in [
            (master, "OOMKilling", "Memory cgroup out of memory: Killed process 4242 (python)"),
            (f"{job}-worker-0", "FailedScheduling", no_gpu),
            (f"{job}-worker-1", "Failed", 'Failed to pull image "clusterfit:typo": not found'),
        ]:
            involved = {"kind": "Pod", "name": pod, "namespace": self.namespace}
            event = {
                "metadata": {"name": f"{pod}.{uuid.uuid4().hex[:6]}"},
                "type": "Warning",
                "reason": reason,
                "message": message,
                "involvedObject": involved,
            }
            retry(lambda event=event: self.core.create_namespaced_event(self.namespace, event))


def oom_restarted() -> dict[str, Any]:
    """The step container's status once the kubelet restarted it after an OOMKilled run."""
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    return {**container_status("clusterfit:test", {"running": {}}, restarts=1), "lastState": oom}


def container_status(image: str, state: dict[str, Any], restarts: int = 0) -> dict[str, Any]:
    return {"name": "pytorch", "image": image, "imageID": "", "ready": False, "restartCount": restarts, "state": state}
