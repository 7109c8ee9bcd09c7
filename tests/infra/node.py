"""A real single-node Kubernetes cluster on this machine, for end-to-end tests (needs root).

    from tests.infra.node import Cluster
    with Cluster(images=["step"]) as cluster:            # or cluster.start() ... cluster.stop()
        cluster.kubectl_run("get", "nodes")              # kubectl with the admin kubeconfig
        cluster.image_refs["step"]                       # the name pods use (docker.io/clusterfit/...)
        cluster.import_image(path)                       # any archive: ctr -n k8s.io images import

    python -m tests.infra.node up [IMAGE...]   # start one, leave it running, print how to reach it
    python -m tests.infra.node down            # tear down what `up` (or a killed test run) left

Before: `bash tests/infra/install_node_deps.sh` (root) and `bash tests/infra/build_bins.sh node`.
Images come from tests/infra/images.py (short names: pause, tools, base, step, cluster, controller):
pause and tools always, the others when asked for; they are built (cached by content) and imported
while the cluster starts. A missing piece raises: tests fail, not skip.

What runs, each a host process with its log in the run's temp folder (`logs_tail(component)`):
etcd and kube-apiserver (tests/infra/controlplane.py, ServiceAccount admission on, Node+RBAC
authorization) on NODE_IP, an address of a bridge interface of ours that pods and the host both
reach and that may be an Endpoints address (loopback may not: `kubernetes.default` must reach the
API server from pods); kube-controller-manager; kube-scheduler; Debian's containerd 1.6 with its own
config, socket and state (its image store under the user cache folder, so imported images survive
between runs); the kubelet; kube-proxy (iptables); CoreDNS on NODE_IP:53 (the kubelet's clusterDNS);
the Kubeflow training operator v1.9.4 (PyTorchJob only; webhook served on NODE_IP through a
selector-less Service, kube-apiserver routing to its EndpointSlice); MinIO on NODE_IP:9000 with a
bucket. One cluster per machine: node_host.py says what a run changes and how it is undone, also
when the test process is killed (a reaper process gets SIGTERM when it dies and cleans up); the
running one is recorded in /run/clusterfit/node.json. $CLUSTERFIT_KEEP_NODE=1 keeps the run folder
(logs, configs) after stop(); a failed start always keeps it and names it in the error.

Start on 2 cores (binaries built, images built): 7-13 s warm, about 20 s on a machine's first run
(images imported into the empty store, the operator's RSA certificates made); stop: about 1 s.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.infra import node_config as conf
from tests.infra import node_host as host
from tests.infra import node_pki
from tests.infra.controlplane import REPO_ROOT, ControlPlane, _tail, find_binary, free_port, spawn
from tests.infra.node_config import NODE_IP, NODE_NAME, Layout

NODE_TOOLS = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
    "coredns",
    "training-operator",
    "minio",
]
HOST_COMMANDS = [
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "iptables",
    "iptables-save",
    "iptables-restore",
    "conntrack",
    "ip",
    "unshare",
    "mount",
    "openssl",
]
CNI_PLUGINS = ["bridge", "host-local", "portmap", "loopback"]
COMPONENTS = [
    "etcd",
    "kube-apiserver",
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "coredns",
    "training-operator",
    "minio",
]
BASE_IMAGES = ("pause", "tools")
MINIO_USER = "clusterfit"
MINIO_BUCKET = "clusterfit"
RUN_PARENT = "/var/tmp"
STATE_DIR = Path("/run/clusterfit")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PDEATHSIG = 1  # prctl option


class ClusterError(RuntimeError):
    """The node could not start, or a component died or never became ready."""


def cache_dir() -> Path:
    """$CLUSTERFIT_NODE_CACHE, else <user cache>/clusterfit/node: containerd's image store, the
    operator's webhook certificates, import_image's record of imported archives."""
    if os.environ.get("CLUSTERFIT_NODE_CACHE"):
        return Path(os.environ["CLUSTERFIT_NODE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clusterfit" / "node"


def state_file() -> Path:
    """The running node's record (node_host.NodeState). In /run, like what it describes (processes,
    mounts, interfaces, cgroups): a reboot clears them all."""
    return STATE_DIR / "node.json"


def _prctl_pdeathsig(sig: int) -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PDEATHSIG, sig)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


class Cluster:
    """The node and everything on it; see the module docstring. Attributes are set by start()."""

    def __init__(
        self,
        images: Sequence[str] = (),
        start_timeout_s: float = 180.0,
        detach: bool = False,
        keep_dir: bool = False,
        operator_init_template: Path | None = conf.OPERATOR_INIT_TEMPLATE,
    ) -> None:
        # Short names for tests/infra/images.py; pause (the sandbox) and tools (the operator's init
        # container) are always needed.
        self.images = list(dict.fromkeys([*BASE_IMAGES, *images]))
        self.image_refs: dict[str, str] = {}  # short name -> containerd's name (what a pod spec says)
        self.start_timeout_s = start_timeout_s
        self.detach = detach  # `up`: no parent-death signal, no reaper; `down` ends it
        self.keep_dir = keep_dir or bool(os.environ.get("CLUSTERFIT_KEEP_NODE"))
        # The operator's init-container template: the project's (k8s/training-operator/), or None
        # for the operator's built-in one (which PodSecurity `restricted` refuses).
        self.operator_init_template = operator_init_template
        self.node_ip = NODE_IP
        self.node_name = NODE_NAME
        self.dir = Path()
        self.layout = Layout(Path(), cache_dir())
        self.control_plane: ControlPlane | None = None
        self.kubectl = Path()
        self.minio_access_key = MINIO_USER
        self.minio_secret_key = ""
        self.minio_bucket = MINIO_BUCKET
        self.minio_endpoint = f"http://{NODE_IP}:{conf.MINIO_PORT}"  # from the host
        self.minio_endpoint_pod = self.minio_endpoint  # from pods: the same address, NODE_IP is on the host
        self.start_seconds = 0.0
        self.timings: dict[str, float] = {}  # seconds from start() to each milestone
        self._bins: dict[str, Path] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ports: dict[str, int] = {}
        self._state: host.NodeState | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Cluster:
        """Start every component and wait until the node is Ready and every service answers."""
        self._t0 = time.monotonic()
        self._preflight()
        self._claim_machine()
        try:
            host.prepare_cgroups()
            host.setup_network()
            if not self.detach:
                self._start_reaper()
            self._write_files()
            self._start_containerd()
            self._start_minio()
            self._start_control_plane()
            # The 650 kB CRD costs the API server seconds of CPU: everything but the operator
            # starts meanwhile.
            crd_installed = _background(self._cp.install_crd)
            self._start_controllers()
            self._wait_containerd()
            self._start_kubelet()
            images_imported = _background(lambda: self.import_images(self.images))
            crd_installed()
            self._mark("CRD served")
            self._start_operator()
            self._wait_ready()
            self._wait_images(images_imported)
        except BaseException:
            self.stop(keep_dir=True)  # logs stay for a post-mortem; the error names the folder
            raise
        self.start_seconds = time.monotonic() - self._t0
        return self

    def stop(self, keep_dir: bool = False) -> None:
        """Kill everything of this run and undo its changes to the machine (see node_host.py)."""
        state = self._state
        if state is None:
            return
        self._state = None
        state.keep_dir = state.keep_dir or keep_dir
        if self._reaper is not None:  # first, so it does not clean up under our feet
            self._reaper.kill()
            self._reaper.wait()
            self._reaper, state.reaper_pid = None, 0
        for name in (
            "kubelet",
            "kube-proxy",
            "training-operator",
            "coredns",
            "kube-scheduler",
            "kube-controller-manager",
            "minio",
        ):
            self._kill(name)
        self._remove_containers()
        # Kills etcd and kube-apiserver too (a graceful stop takes seconds), so the control plane's
        # own stop() below only does its bookkeeping.
        host.cleanup(state, state_file())
        if self.control_plane is not None:
            self.control_plane.stop(keep_dir=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- clients ---------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The API server's URL (https://NODE_IP:6443)."""
        return self._cp.server

    @property
    def kubeconfig_path(self) -> Path:
        """An admin (system:masters) kubeconfig."""
        return self._cp.kubeconfig_path

    @property
    def containerd_socket(self) -> Path:
        return self.layout.containerd_socket

    @property
    def _cp(self) -> ControlPlane:
        if self.control_plane is None:
            raise ClusterError("start() first")
        return self.control_plane

    def api_client(self, token: str | None = None) -> Any:
        """A `kubernetes.client.ApiClient` (admin unless `token`)."""
        return self._cp.api_client(token)

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        """One raw API call as admin: (HTTP status, decoded JSON or text); see ControlPlane.request."""
        return self._cp.request(method, path, body, **kwargs)

    def kubectl_run(
        self, *args: str, check: bool = True, timeout_s: float = 120.0, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl --kubeconfig <admin> ARGS`, output captured; raises on failure when `check`."""
        argv = [str(self.kubectl), f"--kubeconfig={self.kubeconfig_path}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, input=input_text)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    def create_namespace(self, name: str, labels: dict[str, str] | None = None, timeout_s: float = 30.0) -> None:
        """Create a namespace and wait for its `default` ServiceAccount and `kube-root-ca.crt`
        (pods created before they exist are refused or cannot start)."""
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        status, got = self.request("POST", "/api/v1/namespaces", body)
        if status not in (201, 409):
            raise ClusterError(f"creating namespace {name} answered {status}: {got}")
        deadline = time.monotonic() + timeout_s
        paths = [
            f"/api/v1/namespaces/{name}/serviceaccounts/default",
            f"/api/v1/namespaces/{name}/configmaps/kube-root-ca.crt",
        ]
        while not all(self.request("GET", p)[0] == 200 for p in paths):
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"namespace {name}: no default ServiceAccount or kube-root-ca.crt after {timeout_s}s"
                )
            time.sleep(0.1)

    def ctr(self, *args: str, timeout_s: float = 600.0) -> str:
        """`ctr -n k8s.io ARGS` against this node's containerd; returns stdout, raises on failure."""
        argv = ["ctr", f"--address={self.layout.containerd_socket}", "--namespace=k8s.io", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def import_image(self, archive_path: Path | str) -> list[str]:
        """Import an image archive (docker-archive or oci-archive) into the node's containerd, unless
        this very file (path, size, mtime) was imported before and its images are still there.
        Returns the image names it holds."""
        archive = Path(archive_path).resolve()
        info = archive.stat()
        key = f"{archive}:{info.st_size}:{info.st_mtime_ns}"
        markers_path = cache_dir() / "imported.json"
        try:
            markers: dict[str, list[str]] = json.loads(markers_path.read_text())
        except (OSError, ValueError):
            markers = {}
        present = set(self.ctr("images", "list", "--quiet").split())
        names = markers.get(key)
        if names and all(n in present for n in names):
            return names
        out = self.ctr("images", "import", str(archive))
        names = re.findall(r"unpacking (\S+) \(sha256:", out)
        markers = {k: v for k, v in markers.items() if not k.startswith(f"{archive}:")}
        markers[key] = names
        markers_path.write_text(json.dumps(markers, indent=1))
        return names

    def import_images(self, names: Sequence[str]) -> dict[str, str]:
        """Build (if changed) and import images of tests/infra/images.py by short name; adds them to
        `image_refs` and returns {short name: containerd's name}."""
        from tests.infra import images as image_builds

        refs = image_builds.import_images(str(self.containerd_socket), list(names), log=self._image_log)
        self.image_refs.update(refs)
        return refs

    def _image_log(self, message: str) -> None:
        with (self.dir / "images.log").open("a") as out:
            out.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    def logs_tail(self, component: str, lines: int = 60) -> str:
        """The last lines of a component's log (see COMPONENTS; also 'reaper')."""
        return _tail(self.dir / f"{component}.log", lines)

    def all_logs_tail(self, lines: int = 25) -> str:
        """Every component's log tail, for failure messages."""
        return f"(logs in {self.dir})\n" + "\n".join(
            f"---- tail of {name}.log\n{self.logs_tail(name, lines)}"
            for name in COMPONENTS
            if (self.dir / f"{name}.log").exists()
        )

    # ---- start: machine --------------------------------------------------------------------------

    def _mark(self, milestone: str) -> None:
        self.timings[milestone] = round(time.monotonic() - self._t0, 2)

    def _preflight(self) -> None:
        """Everything this needs that a run cannot create; raises with the fix."""
        if os.geteuid() != 0:
            raise ClusterError("the test node needs root (it runs containerd, the kubelet, iptables)")
        self._bins, not_built = {}, []
        for tool in NODE_TOOLS:
            try:
                self._bins[tool] = find_binary(tool)
            except FileNotFoundError:
                not_built.append(tool)
        if not_built:
            raise ClusterError(f"not built: {', '.join(not_built)}: run `bash tests/infra/build_bins.sh node`")
        self.kubectl = self._bins["kubectl"]
        env_path = PATH.split(":")
        missing = [c for c in HOST_COMMANDS if not any(os.access(Path(d) / c, os.X_OK) for d in env_path)]
        missing += [f"{conf.CNI_BIN_DIR}/{p}" for p in CNI_PLUGINS if not (Path(conf.CNI_BIN_DIR) / p).exists()]
        if missing:
            raise ClusterError(
                f"missing on this machine: {', '.join(missing)}: run `bash tests/infra/install_node_deps.sh` as root"
            )
        if self.operator_init_template is not None and not self.operator_init_template.is_file():
            raise ClusterError(f"the operator's init-container template {self.operator_init_template} is missing")

    def _claim_machine(self) -> None:
        """Clean up after a previous run that died (or refuse if one is alive), then record ours."""
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with (STATE_DIR / "node.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = host.NodeState.load(state_file())
            if old is not None:
                owner_alive = host.pid_alive(old.owner_pid) if old.owner_pid else bool(host.cgroup_pids())
                if owner_alive:
                    raise ClusterError(
                        f"a test node is already running on this machine (folder {old.run_dir}, "
                        f"owner pid {old.owner_pid or 'none: started by up'}); "
                        "stop it with `python -m tests.infra.node down`"
                    )
                host.cleanup(old, state_file())
            elif host.cgroup_pids():  # processes without a state file: a run killed mid-way
                host.cleanup(host.NodeState(run_dir="/nonexistent", owner_pid=0))
            # Not under /tmp: the operator runs with a folder of ours mounted on its /tmp, and must
            # still see this one.
            self.dir = Path(tempfile.mkdtemp(prefix="clusterfit-node-", dir=RUN_PARENT))
            self.layout = Layout(self.dir, cache)
            self._state = host.NodeState(str(self.dir), 0 if self.detach else os.getpid(), keep_dir=self.keep_dir)
            self._state.save(state_file())
        if not self.detach:
            atexit.register(self.stop)

    def _start_reaper(self) -> None:
        """A process that cleans up when we die (SIGKILL included: the kernel sends it SIGTERM)."""
        parent = os.getpid()

        def preexec() -> None:
            os.setsid()  # no Ctrl-C from the terminal
            _prctl_pdeathsig(signal.SIGTERM)

        argv = [sys.executable, "-m", "tests.infra.node", "reap", str(state_file()), str(parent)]
        self._reaper = spawn(self.dir / "reaper.log", argv, cwd=REPO_ROOT, preexec=preexec)
        assert self._state is not None
        self._state.reaper_pid = self._reaper.pid
        self._state.save(state_file())

    def _preexec(self) -> None:
        """In each component's child process: own session, our cgroup, and (unless detached) death
        with the test process."""
        os.setsid()
        host.join_host_cgroup()
        if not self.detach:
            _prctl_pdeathsig(signal.SIGKILL)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {"PATH": PATH, "HOME": str(self.dir), "LANG": "C.UTF-8", **(env or {})}
        self._procs[name] = spawn(self.dir / f"{name}.log", argv, cwd=self.dir, preexec=self._preexec, env=full_env)

    def _kill(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _write_files(self) -> None:
        """Config files, and the certificates the API server needs before it starts."""
        layout = self.layout
        layout.cni_conf_dir.mkdir(parents=True)
        (layout.cni_conf_dir / "10-clusterfit.conflist").write_text(json.dumps(conf.cni_conflist(layout), indent=1))
        (self.dir / "containerd.toml").write_text(conf.containerd_config(layout))
        layout.kubelet_pki.mkdir()
        node_pki.kubelet_client_pki(layout.kubelet_pki)

    # ---- start: components -----------------------------------------------------------------------

    def _start_containerd(self) -> None:
        self._spawn("containerd", ["containerd", f"--config={self.dir / 'containerd.toml'}"])

    def _start_minio(self) -> None:
        self.minio_secret_key = secrets.token_hex(16)
        argv = conf.minio_argv(self._bins["minio"], self.layout, free_port())
        env = {
            "MINIO_ROOT_USER": MINIO_USER,
            "MINIO_ROOT_PASSWORD": self.minio_secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        }
        self._spawn("minio", argv, env)

    def _start_control_plane(self) -> None:
        cp = ControlPlane(
            conf.API_USERS,
            self.start_timeout_s,
            address=NODE_IP,
            port=conf.APISERVER_PORT,
            sans=conf.API_SERVER_SANS,
            groups=conf.API_GROUPS,
            apiserver_args=conf.apiserver_args(self.layout),
            base_dir=self.dir,
            preexec=self._preexec,
            key_alg="ec",
            install_crd=False,
        )
        self.control_plane = cp
        cp.start()
        if self.detach:  # `up` leaves it running: no stop when this process exits
            atexit.unregister(cp.stop)
        self._mark("api server ready")

    def _kubeconfig(self, user: str) -> Path:
        cp = self._cp
        return cp.kubeconfig_for(cp.user_tokens[user], name=user)

    def _start_controllers(self) -> None:
        """Everything that needs only the API: controller manager, scheduler, kube-proxy, CoreDNS."""
        self._spawn(
            "kube-controller-manager",
            conf.controller_manager_argv(
                self._bins["kube-controller-manager"], self._kubeconfig("controller-manager"), self.layout
            ),
        )
        self._spawn("kube-scheduler", conf.scheduler_argv(self._bins["kube-scheduler"], self._kubeconfig("scheduler")))
        self._ports.update(proxy_healthz=free_port(), proxy_metrics=free_port())
        proxy_conf = conf.kube_proxy_config(
            self._kubeconfig("proxy"), self._ports["proxy_healthz"], self._ports["proxy_metrics"]
        )
        (self.dir / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy_conf))
        self._spawn("kube-proxy", [str(self._bins["kube-proxy"]), f"--config={self.dir / 'kube-proxy.yaml'}"])
        self._ports.update(dns_health=free_port(), dns_ready=free_port())
        corefile = conf.corefile(self.kubeconfig_path, self._ports["dns_health"], self._ports["dns_ready"])
        (self.dir / "Corefile").write_text(corefile)
        self._spawn("coredns", [str(self._bins["coredns"]), "-conf", str(self.dir / "Corefile")])

    def _start_operator(self) -> None:
        """The operator, with its webhook certificates made by us and its objects in place. Its
        certificate folder is fixed (/tmp/k8s-webhook-server/...): it runs in a private mount
        namespace whose /tmp is a folder of ours."""
        certs = node_pki.operator_certs(cache_dir() / "webhook-certs")
        cert_dir = self.layout.operator_tmp / conf.OPERATOR_CERT_DIR.removeprefix("/tmp/")
        cert_dir.mkdir(parents=True)
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (cert_dir / name).write_bytes(certs[name])
        self._ports.update(op_webhook=free_port(), op_health=free_port(), op_metrics=free_port())
        for obj in conf.operator_objects(self._ports["op_webhook"], certs):
            self._create(obj)
        argv = conf.operator_argv(
            self._bins["training-operator"], self.layout, self.operator_init_template, self._ports
        )
        env = {"KUBECONFIG": str(self.kubeconfig_path), "MY_POD_NAMESPACE": conf.OPERATOR_NAMESPACE}
        self._spawn("training-operator", argv, env)

    def _create(self, obj: dict[str, Any]) -> None:
        """POST one object (a few kinds only), tolerating that it exists."""
        api = obj["apiVersion"]
        prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
        plural = {
            "Namespace": "namespaces",
            "Secret": "secrets",
            "Service": "services",
            "EndpointSlice": "endpointslices",
            "ValidatingWebhookConfiguration": "validatingwebhookconfigurations",
        }[obj["kind"]]
        namespace = obj["metadata"].get("namespace")
        path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
        status, body = self.request("POST", path, obj)
        if status not in (201, 409):
            raise ClusterError(f"creating {obj['kind']} {obj['metadata']['name']} answered {status}: {body}")

    def _start_kubelet(self) -> None:
        self._ports["kubelet_healthz"] = free_port()
        kubelet_conf = conf.kubelet_config(self.layout, self._ports["kubelet_healthz"])
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_conf))
        self._spawn("kubelet", conf.kubelet_argv(self._bins["kubelet"], self.layout, self._kubeconfig("kubelet")))

    # ---- start: waiting --------------------------------------------------------------------------

    def _wait_containerd(self) -> None:
        """Wait for containerd; drop containers a crashed run left in its (persistent) store."""

        def answers() -> bool:
            argv = ["ctr", f"--address={self.layout.containerd_socket}", "version"]
            return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0

        self._wait({"containerd": answers})
        stale = self.ctr("containers", "list", "--quiet").split()
        if stale:
            self.ctr("containers", "delete", *stale)
            # containerd's CRI plugin loaded them at startup; only a restart forgets them.
            self._kill("containerd")
            self._start_containerd()
            self._wait({"containerd (restarted)": answers})
        self._mark("containerd ready")

    def _wait_images(self, images_imported: Callable[[], None]) -> None:
        """Wait for the image thread (no deadline of ours: a cold build of the step image takes
        many minutes, and images.py fails on its own when a build breaks)."""
        try:
            images_imported()
        except Exception as err:
            raise ClusterError(f"building or importing images failed: {err}\n{self.logs_tail('images')}") from err
        self._mark("images imported")

    def _wait_ready(self) -> None:
        """Poll every readiness condition together until all hold."""
        p = self._ports
        self._wait(
            {
                "node Ready, not-ready taint gone": self._node_ready,
                "kube-proxy synced": lambda: _http_ok(f"http://127.0.0.1:{p['proxy_healthz']}/healthz"),
                "CoreDNS ready": lambda: _http_ok(f"http://127.0.0.1:{p['dns_ready']}/ready"),
                "training operator ready": lambda: _http_ok(f"http://127.0.0.1:{p['op_health']}/readyz"),
                "MinIO bucket": self._minio_bucket,
                "default ServiceAccount": lambda: (
                    self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
                ),
            }
        )

    def _node_ready(self) -> bool:
        status, node = self.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        if status != 200:
            return False
        conditions = node.get("status", {}).get("conditions", [])
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        taints = [t["key"] for t in node.get("spec", {}).get("taints") or []]
        return ready and "node.kubernetes.io/not-ready" not in taints

    def _minio_bucket(self) -> bool:
        if not _http_ok(f"{self.minio_endpoint}/minio/health/ready"):
            return False
        s3 = self.s3_client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=self.minio_bucket)
        return True

    def s3_client(self) -> Any:
        """A boto3 S3 client for MinIO (host view)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.minio_endpoint,
            aws_access_key_id=self.minio_access_key,
            aws_secret_access_key=self.minio_secret_key,
            region_name="us-east-1",
        )

    def _wait(self, checks: dict[str, Callable[[], bool]]) -> None:
        """Poll `checks` until each has held once; fail fast when a component exits."""
        pending = dict(checks)
        deadline = time.monotonic() + self.start_timeout_s
        errors: dict[str, str] = {}
        while pending:
            for name, proc in self._all_procs().items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with {proc.returncode} while waiting for "
                        f"{', '.join(pending)}\n---- {name}.log\n{self.logs_tail(name)}\n"
                        f"{self.all_logs_tail()}"
                    )
            for name, check in list(pending.items()):
                try:
                    if check():
                        del pending[name]
                        self._mark(name)
                except Exception as err:  # not listening yet, half a response, 5xx
                    errors[name] = repr(err)
            if pending and time.monotonic() > deadline:
                why = "; ".join(f"{n}: {errors.get(n, 'not yet')}" for n in pending)
                raise ClusterError(f"not ready after {self.start_timeout_s:.0f}s: {why}\n{self.all_logs_tail()}")
            if pending:
                time.sleep(0.2)

    # ---- stop ------------------------------------------------------------------------------------

    def _all_procs(self) -> dict[str, subprocess.Popen[bytes]]:
        procs = dict(self._procs)
        cp = self.control_plane
        if cp is not None:
            procs.update({n: p for n, p in (("etcd", cp._etcd), ("kube-apiserver", cp._apiserver)) if p is not None})
        return procs

    def _remove_containers(self) -> None:
        """Kill the pods' processes, then delete their containers through containerd while it still
        runs, so its persistent store starts the next run empty."""
        if "containerd" not in self._procs or self._procs["containerd"].poll() is not None:
            return
        host.kill_cgroup("kubepods")
        with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
            ids = self.ctr("containers", "list", "--quiet", timeout_s=30).split()
            if ids:
                self.ctr("containers", "delete", *ids, timeout_s=60)


def _background(task: Callable[[], object]) -> Callable[[], None]:
    """Run `task` in a daemon thread; the returned function waits for it and re-raises its error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            task()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if errors:
            raise errors[0]

    return wait


# ---- command line ------------------------------------------------------------------------------------


def _reap(state_path: Path, parent: int) -> None:
    """`reap`: wait for SIGTERM (our parent died: the kernel's parent-death signal), then clean up."""
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.getppid() == parent:  # a parent that died before prctl took effect is noticed here
        signal.pause()
    state = host.NodeState.load(state_path)
    if state is not None and state.owner_pid == parent:
        state.reaper_pid = 0
        host.cleanup(state, state_path)


def main(argv: list[str] | None = None) -> int:
    """`up` | `down` (| `reap STATE PARENT`, internal)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["up"]:
        cluster = Cluster(images=args[1:], detach=True).start()
        print(
            f"started in {cluster.start_seconds:.1f}s ({cluster.timings}); folder {cluster.dir}\n"
            f"export KUBECONFIG={cluster.kubeconfig_path}\nkubectl: {cluster.kubectl}\n"
            f"containerd socket: {cluster.containerd_socket}\n"
            f"MinIO: {cluster.minio_endpoint} user {cluster.minio_access_key} "
            f"password {cluster.minio_secret_key} bucket {cluster.minio_bucket}\n"
            f"stop: python -m tests.infra.node down"
        )
        return 0
    if args[:1] == ["down"]:
        state = host.NodeState.load(state_file())
        host.cleanup(state or host.NodeState(run_dir="/nonexistent", owner_pid=0), state_file())
        return 0
    if args[:1] == ["reap"] and len(args) == 3:
        _reap(Path(args[1]), int(args[2]))
        return 0
    print("usage: python -m tests.infra.node up [IMAGE...] | down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
