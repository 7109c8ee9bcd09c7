"""A real Kubernetes control plane for tests: etcd + kube-apiserver on 127.0.0.1, envtest style.

    from tests.infra.controlplane import ControlPlane
    with ControlPlane() as cp:           # or cp.start() ... cp.stop()
        print(cp.server, cp.kubeconfig_path)
        cp.restart_apiserver()           # cuts every watch for real; etcd keeps the data

The binaries come from `bash tests/infra/build_bins.sh` (versions in tests/infra/versions.env);
`find_binary` raises, so tests fail rather than skip, when they are missing.

What this cluster is: etcd with `--unsafe-no-fsync` and kube-apiserver with RBAC, static token
authentication and our own CA. What it lacks: scheduler, kubelet, controller-manager (no garbage
collection, no namespace deletion, no ServiceAccount tokens) and the training operator; tests play
the operator by patching each PyTorchJob's `/status`. The PyTorchJob CRD from
`<repo>/../shared/crds/` (or `$CLUSTERFIT_SHARED_DIR/crds/`) is installed and Established.

Users (static tokens, see `--token-auth-file`):
- admin: user `clusterfit-admin` in group `system:masters` -> `admin_token`, `kubeconfig_path`.
- controller: user `clusterfit-controller`, no groups beyond `system:authenticated`, so it may do
  nothing until a test grants it a Role -> `user_tokens["controller"]`, `kubeconfig_for(...)`.
- user: `clusterfit-user`, the same, for the Role of a person at a workstation (k8s/user-rbac.yaml).

The API server writes an audit log of every request's metadata: `requests_by(user)` says which
verbs on which resources a user called, and with which answer.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = Path(__file__).with_name("versions.env")
BUILD_HINT = "run `bash tests/infra/build_bins.sh` from the repository root"
CRD_FILE = "kubeflow.org_pytorchjobs.yaml"
CRD_NAME = "pytorchjobs.kubeflow.org"
PYTORCHJOBS_PATH = "/apis/kubeflow.org/v1/pytorchjobs"
ADMIN_USER = "clusterfit-admin"
DEFAULT_USERS = {"controller": "clusterfit-controller", "user": "clusterfit-user"}
# Every request's metadata (user, verb, resource, response code), for tests of exactly what a user calls.
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
"""
_KUBE_TOOLS = ["kube-apiserver", "kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl"]
_VERSION_KEYS = {
    "helm": "HELM_VERSION",
    "etcd": "ETCD_VERSION",
    **dict.fromkeys(_KUBE_TOOLS, "KUBERNETES_VERSION"),
    "coredns": "COREDNS_VERSION",
    "training-operator": "TRAINING_OPERATOR_VERSION",
    "minio": "MINIO_VERSION",
    "toxiproxy-server": "TOXIPROXY_VERSION",
}


class ControlPlaneError(RuntimeError):
    """etcd or kube-apiserver did not start, or the cluster did not become usable."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """KEY=VALUE pairs of versions.env (the one place the tool versions are set)."""
    versions = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def bin_cache_dir() -> Path:
    """Same rule as build_bins.sh: $CLUSTERFIT_BIN_CACHE, else the user cache dir + clusterfit/bin."""
    if os.environ.get("CLUSTERFIT_BIN_CACHE"):
        return Path(os.environ["CLUSTERFIT_BIN_CACHE"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "clusterfit" / "bin"


def find_binary(tool: str) -> Path:
    """Cached path of `tool` (helm, etcd, kube-apiserver, kubelet, ..., see build_bins.sh) at its
    versions.env version; raises if absent."""
    if tool not in _VERSION_KEYS:
        raise ValueError(f"unknown tool {tool!r}; expected one of {sorted(_VERSION_KEYS)}")
    version = read_versions()[_VERSION_KEYS[tool]]
    path = bin_cache_dir() / f"{tool}-{version}" / tool
    if not (path.is_file() and os.access(path, os.X_OK)):
        hint = BUILD_HINT if tool in ("helm", "etcd", "kube-apiserver") else BUILD_HINT.replace(".sh`", ".sh node`")
        raise FileNotFoundError(f"{tool} {version} is not built ({path} is missing): {hint}")
    return path


def shared_dir() -> Path:
    """The shared folder beside the repository (holds crds/), or $CLUSTERFIT_SHARED_DIR."""
    return Path(os.environ.get("CLUSTERFIT_SHARED_DIR") or REPO_ROOT.parent / "shared")


def free_port() -> int:
    """A port the kernel just said is free on 127.0.0.1 (racy, as envtest's; good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; nothing when it already ended."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the test process dies, so no etcd outlives a killed pytest.
    (SIGKILL, not SIGTERM: both servers would get it at once, and a terminating kube-apiserver
    hangs for minutes trying to reach the etcd that just went away.)"""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(
    log: Path,
    argv: list[str],
    cwd: Path,
    preexec: Callable[[], None] = _die_with_parent,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log` (after a line naming the command)."""
    with log.open("ab") as out:
        out.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, preexec_fn=preexec, env=env
        )


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _openssl(cert_dir: Path, args: str) -> None:
    subprocess.run(["openssl", *args.split()], cwd=cert_dir, check=True, capture_output=True)


# openssl arguments for a new key: RSA as before, or EC P-256 (a hundred times faster to generate on a
# busy 2-core machine, where each RSA key takes most of a second).
_NEWKEY = {"rsa": "-newkey rsa:2048", "ec": "-newkey ec -pkeyopt ec_paramgen_curve:P-256"}
# The service-account key: kube-apiserver reads EC keys only in SEC1 form ("EC PRIVATE KEY"), not
# PKCS#8 ("data does not contain any valid RSA or ECDSA public keys").
_SA_KEY = {
    "rsa": "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key",
    "ec": "ecparam -name prime256v1 -genkey -noout -out sa.key",
}


def _write_certs(cert_dir: Path, address: str = "127.0.0.1", sans: Sequence[str] = (), key_alg: str = "rsa") -> None:
    """A CA, a serving cert for `address`/localhost (+ `sans`, "IP:..."/"DNS:...") signed by it, and the
    service-account key."""
    names = ",".join(dict.fromkeys([f"IP:{address}", "IP:127.0.0.1", "DNS:localhost", *sans]))
    (cert_dir / "serving.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        f"subjectAltName={names}\n"
    )
    newkey = _NEWKEY[key_alg]
    for args in [
        f"req -x509 {newkey} -nodes -days 2 -subj /CN=clusterfit-test-ca -keyout ca.key -out ca.crt",
        f"req {newkey} -nodes -subj /CN={address} -keyout serving.key -out serving.csr",
        "x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile serving.ext"
        " -out serving.crt",
        _SA_KEY[key_alg],
    ]:
        _openssl(cert_dir, args)


class ControlPlane:
    """etcd + kube-apiserver in a temp dir on free loopback ports; see the module docstring.

    The keyword-only options exist for tests/infra/node.py, which runs this control plane for a real
    node: `address`/`port` (bind and advertise; default 127.0.0.1 and a free port), `sans` (more
    subjectAltNames for the serving cert), `groups` (token name -> groups of that user),
    `apiserver_args` (flag name -> value, replacing or adding to the defaults; None drops a flag),
    `base_dir` (use this folder, which stop() then leaves in place), `preexec` (runs in each child
    instead of the parent-death signal), `key_alg` ("rsa" or "ec"), `install_crd` (False: the caller
    runs install_crd() when it suits it)."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        start_timeout_s: float = 180.0,
        *,
        address: str = "127.0.0.1",
        port: int | None = None,
        sans: Sequence[str] = (),
        groups: Mapping[str, Sequence[str]] | None = None,
        apiserver_args: Mapping[str, str | None] | None = None,
        base_dir: Path | None = None,
        preexec: Callable[[], None] | None = None,
        key_alg: str = "rsa",
        install_crd: bool = True,
    ) -> None:
        self.users = dict(DEFAULT_USERS if users is None else users)  # token name -> user name
        self.start_timeout_s = start_timeout_s
        self.address = address
        self.groups = {name: list(g) for name, g in (groups or {}).items()}
        self._fixed_port = port
        self._sans = list(sans)
        self._apiserver_args = dict(apiserver_args or {})
        self._base_dir = base_dir
        self._preexec = preexec or _die_with_parent
        self._key_alg = key_alg
        self._with_crd = install_crd
        self.dir = Path()
        self.server = ""
        self.kubeconfig_path = Path()
        self.admin_token = ""
        self.user_tokens: dict[str, str] = {}
        self.etcd_url = ""
        self.start_seconds = 0.0  # wall time of the last start(), for the curious
        self._port = 0
        self._apiserver_bin = Path()
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        """Start etcd and kube-apiserver, write the kubeconfig, install the PyTorchJob CRD."""
        t0 = time.monotonic()
        etcd_bin, apiserver_bin = find_binary("etcd"), find_binary("kube-apiserver")
        self._apiserver_bin = apiserver_bin
        if self._base_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="clusterfit-controlplane-"))
        else:
            self.dir = self._base_dir
            self.dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            (self.dir / "certs").mkdir()
            _write_certs(self.dir / "certs", self.address, self._sans, self._key_alg)
            self._ssl = ssl.create_default_context(cafile=str(self.dir / "certs" / "ca.crt"))
            self._write_tokens()
            self._start_etcd(etcd_bin)
            self._port = self._fixed_port or free_port()
            self.server = f"https://{self.address}:{self._port}"
            self._start_apiserver()
            self.kubeconfig_path = self.kubeconfig_for(self.admin_token, name="admin")
            if self._with_crd:
                self.install_crd()
        except BaseException:
            self.stop(keep_dir=True)  # the logs stay for a post-mortem; the error names the dir
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self, keep_dir: bool = False) -> None:
        """Terminate kube-apiserver then etcd (kill if they linger) and remove the temp dir
        (kept with keep_dir or $CLUSTERFIT_KEEP_CONTROLPLANE set)."""
        self._stop(self._apiserver)
        self._apiserver = None
        self._stop(self._etcd)
        self._etcd = None
        atexit.unregister(self.stop)
        keep = keep_dir or os.environ.get("CLUSTERFIT_KEEP_CONTROLPLANE") or self._base_dir is not None
        if self.dir != Path() and self.dir.exists() and not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart_apiserver(self, graceful: bool = True, down_s: float = 0.0) -> None:
        """Stop kube-apiserver and start it again on the same etcd and port: every watch is cut.

        graceful: SIGTERM, and the server ends open watches cleanly within a second (a rolling
        apiserver update); otherwise SIGKILL, and clients see their connections reset (a crash).
        down_s: stay stopped this long first (an outage: every connection is refused meanwhile).
        Returns once the server is ready and serves PyTorchJobs again (a few seconds)."""
        if graceful:
            self._stop(self._apiserver)
        elif self._apiserver is not None:
            self._apiserver.kill()
            self._apiserver.wait()
        self._apiserver = None
        time.sleep(down_s)
        self._start_apiserver()
        self._wait_served(PYTORCHJOBS_PATH)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- clients ---------------------------------------------------------------------------------

    def kubeconfig_for(self, token: str, name: str | None = None) -> Path:
        """Write a kubeconfig for this server authenticating with `token`; return its path."""
        if name is None:
            name = next((n for n, t in self.user_tokens.items() if t == token), f"user-{token[:6]}")
        ca = base64.b64encode(self.ca_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name, "namespace": "default"}}],
            "current-context": name,
        }
        path = self.dir / f"kubeconfig-{name}"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    @property
    def ca_path(self) -> Path:
        """The CA that signed the API server's serving certificate."""
        return self.dir / "certs" / "ca.crt"

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the API server's certificate (for raw urllib calls such as watches)."""
        assert self._ssl is not None, "start() first"
        return self._ssl

    def api_client(self, token: str | None = None) -> Any:
        """A `kubernetes.client.ApiClient` for this server (admin unless `token` is given)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_path)
        cfg.api_key = {"authorization": token or self.admin_token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        content_type: str = "application/json",
        timeout_s: float = 10.0,
    ) -> tuple[int, Any]:
        """One raw API call (admin unless `token`); returns (HTTP status, decoded JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    # ---- internals -------------------------------------------------------------------------------

    def _write_tokens(self) -> None:
        self.admin_token = secrets.token_hex(16)
        self.user_tokens = {name: secrets.token_hex(16) for name in self.users}
        # token,user,uid,"group1,group2"
        rows = [f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"']
        rows += [self._token_row(name, user) for name, user in self.users.items()]
        path = self.dir / "tokens.csv"
        path.write_text("\n".join(rows) + "\n")
        path.chmod(0o600)

    def _token_row(self, name: str, user: str) -> str:
        row = f"{self.user_tokens[name]},{user},{user}"
        return row + (f',"{",".join(self.groups[name])}"' if self.groups.get(name) else "")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        return spawn(self.dir / f"{name}.log", argv, cwd=self.dir, preexec=self._preexec)

    def _start_etcd(self, etcd_bin: Path) -> None:
        client_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        self.etcd_url = client_url
        self._etcd = self._spawn(
            "etcd",
            [
                str(etcd_bin),
                "--name=test",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(client_url + "/health", timeout=2) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")

        self._wait("etcd", self._etcd, healthy)

    def _start_apiserver(self) -> None:
        certs = self.dir / "certs"
        flags: dict[str, str | None] = {
            "etcd-servers": self.etcd_url,
            "bind-address": self.address,
            "advertise-address": self.address,
            "secure-port": str(self._port),
            "cert-dir": str(certs),
            "tls-cert-file": str(certs / "serving.crt"),
            "tls-private-key-file": str(certs / "serving.key"),
            "client-ca-file": str(certs / "ca.crt"),
            "service-cluster-ip-range": "10.0.0.0/24",
            "allow-privileged": "true",
            "authorization-mode": "RBAC",
            # Without it, a SIGTERM waits up to the 60s request timeout for open watches.
            "shutdown-watch-termination-grace-period": "1s",
            "disable-admission-plugins": "ServiceAccount",
            "token-auth-file": str(self.dir / "tokens.csv"),
            "service-account-issuer": self.server,
            "service-account-key-file": str(certs / "sa.key"),
            "service-account-signing-key-file": str(certs / "sa.key"),
            "audit-policy-file": str(self.dir / "audit-policy.yaml"),
            "audit-log-path": str(self.dir / "audit.log"),
        }
        (self.dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
        # Replace, not append: list-valued flags given twice would accumulate.
        flags.update(self._apiserver_args)
        argv = [str(self._apiserver_bin)] + [f"--{k}={v}" for k, v in flags.items() if v is not None]
        self._apiserver = self._spawn("kube-apiserver", argv)

        def ready() -> bool:
            status, _ = self.request("GET", "/readyz", timeout_s=3)
            return status == 200

        self._wait("kube-apiserver", self._apiserver, ready)

    def requests_by(self, user: str) -> list[tuple[str, str, str, int]]:
        """(apiGroup, resource[/subresource], verb, response code) of each request `user` made, in order,
        from the audit log (a watch counts once, when its response started)."""
        found = []
        for line in (self.dir / "audit.log").read_text().splitlines():
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            if event.get("user", {}).get("username") != user or not ref.get("resource"):
                continue
            if event["stage"] != ("ResponseStarted" if event["verb"] == "watch" else "ResponseComplete"):
                continue
            resource = "/".join(filter(None, [ref["resource"], ref.get("subresource")]))
            code = int((event.get("responseStatus") or {}).get("code", 0))
            found.append((ref.get("apiGroup", ""), resource, event["verb"], code))
        return found

    def install_crd(self) -> None:
        """Create the PyTorchJob CRD and wait until PyTorchJobs are served (start() does this unless
        constructed with install_crd=False: the 650 kB CRD takes the API server seconds of CPU)."""
        crd_path = shared_dir() / "crds" / CRD_FILE
        if not crd_path.is_file():
            raise ControlPlaneError(f"PyTorchJob CRD not found at {crd_path} (set CLUSTERFIT_SHARED_DIR)")
        # libyaml's loader when present: the pure-Python one takes seconds on this 650 kB file.
        crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        status, body = self.request(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd, timeout_s=60
        )
        if status not in (201, 409):
            raise ControlPlaneError(f"creating the CRD answered {status}: {str(body)[:2000]}")

        def established() -> bool:
            _, got = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
            conditions = ((got.get("status") or {}).get("conditions") or []) if isinstance(got, dict) else []
            return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

        self._wait("CRD Established", self._apiserver, established)
        self._wait_served(PYTORCHJOBS_PATH)

    def _wait_served(self, path: str) -> None:
        """Established precedes the handler answering; wait until a list really works."""
        self._wait(f"GET {path}", self._apiserver, lambda: self.request("GET", path)[0] == 200)

    def _wait(self, what: str, proc: subprocess.Popen[bytes] | None, check: Any) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ControlPlaneError(f"{what}: process exited with {proc.returncode}\n{self._logs_tail()}")
            try:
                if check():
                    return
            except (OSError, ValueError) as err:  # not listening yet, TLS not up yet, half a response
                last_error = repr(err)
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{what}: not ready after {self.start_timeout_s:.0f}s ({last_error})\n{self._logs_tail()}"
        )

    def _logs_tail(self) -> str:
        return f"(logs in {self.dir})\n" + "\n".join(
            f"---- tail of {p.name}\n{_tail(p)}" for p in (self.dir / "etcd.log", self.dir / "kube-apiserver.log")
        )

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None, grace_s: float = 15.0) -> None:
        stop_process(proc, grace_s)
