"""The test node's configuration files and bootstrap objects, as pure functions of its layout.

Used by tests/infra/node.py; nothing here touches the machine. Addresses and names are fixed
(one node per machine): the node's own address NODE_IP (on a bridge interface of ours, see
node_host.py), pods in POD_SUBNET on the bridge POD_BRIDGE, Services in SERVICE_CIDR.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_NAME = "clusterfit-node"
# The node's address: pods and the host both reach it, and it may be an Endpoints address (loopback
# may not). 10.200.200.1 is a private address no test machine is expected to use; override with
# $CLUSTERFIT_NODE_IP if it collides.
NODE_IP = os.environ.get("CLUSTERFIT_NODE_IP", "10.200.200.1")
NODE_LINK = "cfnode0"
POD_BRIDGE = "cfpods0"
CLUSTER_CIDR = "10.244.0.0/16"
POD_SUBNET = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/24"
KUBERNETES_SERVICE_IP = "10.96.0.1"
CLUSTER_DOMAIN = "cluster.local"
APISERVER_PORT = 6443
KUBELET_PORT = 10250
MINIO_PORT = 9000
# kubelet's cgroupRoot; our host processes go in <CGROUP_PARENT>/host, so one folder holds everything.
CGROUP_PARENT = "clusterfit-node"
PAUSE_IMAGE = "localhost/clusterfit/pause:3.10"
TOOLS_IMAGE = "localhost/clusterfit/tools:bookworm"
CNI_BIN_DIR = "/usr/lib/cni"
OPERATOR_NAMESPACE = "kubeflow"  # the operator reads $MY_POD_NAMESPACE, default kubeflow
OPERATOR_SERVICE = "training-operator"  # its --webhook-service-name default
OPERATOR_SECRET = "training-operator-webhook-cert"  # its --webhook-secret-name default
OPERATOR_WEBHOOK_CONFIG = "validator.training-operator.kubeflow.org"  # fixed in its main.go
OPERATOR_CERT_DIR = "/tmp/k8s-webhook-server/serving-certs"  # fixed in its pkg/cert
# The project's init-container template for the operator (what k8s/README.md tells users to deploy):
# passes PodSecurity `restricted`, and tests nslookup's output, not its exit status (Debian's static
# busybox in our tools image exits 1 when any search-domain expansion is NXDOMAIN, even after it
# printed the answer, so with the operator's built-in template the Worker would wait forever).
OPERATOR_INIT_TEMPLATE = Path(__file__).resolve().parents[2] / "k8s" / "training-operator" / "initContainer.yaml"
API_SERVER_SANS = [
    f"IP:{KUBERNETES_SERVICE_IP}",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}",
]


# Static tokens (tests/infra/controlplane.py); the kubelet is a node for the Node authorizer. The
# controller manager runs every controller under its own name (no per-controller ServiceAccounts,
# which cost start time), and its bootstrap role alone cannot even read nodes: system:masters.
API_USERS = {
    "controller": "clusterfit-controller",
    "kubelet": f"system:node:{NODE_NAME}",
    "controller-manager": "system:kube-controller-manager",
    "scheduler": "system:kube-scheduler",
    "proxy": "system:kube-proxy",
}
API_GROUPS = {"kubelet": ["system:nodes"], "controller-manager": ["system:masters"]}


@dataclass(frozen=True)
class Layout:
    """Where one run keeps its files: everything under `run` except the image store (under `cache`)."""

    run: Path
    cache: Path

    @property
    def certs(self) -> Path:
        return self.run / "certs"

    @property
    def containerd_root(self) -> Path:
        return self.cache / "containerd"  # images survive between runs

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd-state"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.run / "cni"

    @property
    def kubelet_root(self) -> Path:
        return self.run / "kubelet"

    @property
    def minio_data(self) -> Path:
        return self.run / "minio"

    @property
    def operator_tmp(self) -> Path:
        return self.run / "operator-tmp"  # bind-mounted on the operator's /tmp

    @property
    def kubelet_pki(self) -> Path:
        return self.run / "kubelet-pki"


def apiserver_args(layout: Layout) -> dict[str, str | None]:
    """kube-apiserver flags on top of tests/infra/controlplane.py's (None drops one)."""
    return {
        "disable-admission-plugins": None,  # ServiceAccount admission on: pods get their tokens
        "enable-admission-plugins": "NodeRestriction",
        "authorization-mode": "Node,RBAC",
        "service-cluster-ip-range": SERVICE_CIDR,
        # Webhooks reach the operator through its EndpointSlice (NODE_IP), not a ClusterIP.
        "enable-aggregator-routing": "true",
        # `kubectl logs/exec`: the kubelet trusts this client certificate (node_pki.py).
        "kubelet-client-certificate": str(layout.kubelet_pki / "apiserver-client.crt"),
        "kubelet-client-key": str(layout.kubelet_pki / "apiserver-client.key"),
        "kubelet-preferred-address-types": "InternalIP",
    }


def controller_manager_argv(binary: Path, kubeconfig: Path, layout: Layout) -> list[str]:
    """Every default controller (garbage collector, namespace, ServiceAccount and token, root CA
    publisher, node lifecycle, Jobs, EndpointSlices, ...), no leader election, no serving port."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--controllers=*",
        "--use-service-account-credentials=false",
        f"--service-account-private-key-file={layout.certs / 'sa.key'}",
        f"--root-ca-file={layout.certs / 'ca.crt'}",
        "--secure-port=0",
        "--node-monitor-period=2s",
        "--configure-cloud-routes=false",
    ]


def scheduler_argv(binary: Path, kubeconfig: Path) -> list[str]:
    return [str(binary), f"--kubeconfig={kubeconfig}", "--leader-elect=false", "--secure-port=0"]


def kubelet_argv(binary: Path, layout: Layout, kubeconfig: Path) -> list[str]:
    return [
        str(binary),
        f"--config={layout.run / 'kubelet.yaml'}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={layout.kubelet_root}",
        f"--node-ip={NODE_IP}",
        f"--hostname-override={NODE_NAME}",
    ]


def minio_argv(binary: Path, layout: Layout, console_port: int) -> list[str]:
    return [
        str(binary),
        "server",
        str(layout.minio_data),
        f"--address={NODE_IP}:{MINIO_PORT}",
        f"--console-address=127.0.0.1:{console_port}",
        f"--certs-dir={layout.run / 'minio-certs'}",
        "--quiet",
    ]


def operator_argv(binary: Path, layout: Layout, template: Path | None, ports: dict[str, int]) -> list[str]:
    """The training operator (PyTorchJob only) in a private mount namespace whose /tmp is
    `layout.operator_tmp`: its webhook certificate folder is fixed under /tmp. `template`: its
    init-container template file (None: its built-in one)."""
    template_flag = [] if template is None else [f"--pytorch-init-container-template-file={template}"]
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "sh",
        "-c",
        'mount --bind "$0" /tmp && exec "$@"',
        str(layout.operator_tmp),
        str(binary),
        "--enable-scheme=pytorchjob",
        f"--pytorch-init-container-image={TOOLS_IMAGE}",
        *template_flag,
        f"--webhook-server-port={ports['op_webhook']}",
        f"--health-probe-bind-address=127.0.0.1:{ports['op_health']}",
        f"--metrics-bind-address=127.0.0.1:{ports['op_metrics']}",
    ]


def containerd_config(layout: Layout) -> str:
    """containerd 1.6 config (TOML, version 2): own root/state/socket, CRI with our pause image and CNI."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{layout.containerd_root}"
state = "{layout.containerd_state}"
# Snapshotters this kernel or machine lacks only log errors; /opt/containerd is not ours to create.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.opt"]

[grpc]
  address = "{layout.containerd_socket}"

[ttrpc]
  address = "{layout.containerd_socket}.ttrpc"

[metrics]
  address = ""

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # The sandbox lacks CAP_SYS_RESOURCE here: without this every sandbox fails with
  # "runc create failed: can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  # Pods' network namespaces under our state folder, not /run/netns: nothing of a run outside it.
  netns_mounts_under_state_dir = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  # runc's state under our run folder, not /run/containerd/runc (shared with any other containerd).
  Root = "{layout.run / "runc"}"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{layout.cni_conf_dir}"
  max_conf_num = 1
"""


def cni_conflist(layout: Layout) -> dict[str, Any]:
    """bridge + host-local + portmap (loopback is added by containerd itself) on our own bridge."""
    return {
        "cniVersion": "0.4.0",
        "name": "clusterfit",
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": True,
                # Pods only talk to each other and to NODE_IP (local to the host): no masquerading,
                # so no per-pod CNI-* NAT chains to leak when a run is killed.
                "ipMasq": False,
                "hairpinMode": True,  # a pod reaching its own Service's ClusterIP
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.run / "cni-ipam"),  # not /var/lib/cni: nothing outlives a run
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(layout: Layout, healthz_port: int) -> dict[str, Any]:
    """KubeletConfiguration for this machine: cgroup v1 with cgroupfs, no swap check, no eviction."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            # Only the API server presents a client certificate (see node.py's _kubelet_client_pki).
            "x509": {"clientCAFile": str(layout.kubelet_pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "cgroupDriver": "cgroupfs",  # PID 1 is not systemd
        "cgroupRoot": f"/{CGROUP_PARENT}",
        "failCgroupV1": False,  # Kubernetes >= 1.35 refuses cgroup v1 otherwise
        "failSwapOn": False,
        "enforceNodeAllocatable": [],
        "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE games (see containerd's restrict_oom_score_adj)
        "clusterDNS": [NODE_IP],  # CoreDNS runs on the host, on NODE_IP:53
        "clusterDomain": CLUSTER_DOMAIN,
        "podLogsDir": str(layout.run / "pod-logs"),
        "volumePluginDir": str(layout.run / "volume-plugins"),
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        # Never garbage-collect or evict for disk: the images are imported, not pulled, and a CI
        # machine's disk may well be fuller than a real node's thresholds.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "nodeStatusUpdateFrequency": "4s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "shutdownGracePeriod": "0s",
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    """KubeProxyConfiguration: iptables mode, leaves the host's conntrack sysctls alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "hostnameOverride": NODE_NAME,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [f"{NODE_IP}/32"],  # never open NodePorts on the machine's real interfaces
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
    }


def corefile(kubeconfig: Path, health_port: int, ready_port: int) -> str:
    """CoreDNS on NODE_IP:53 serving cluster.local from the API (short TTL: workers poll for the
    master's name), anything else forwarded to the host's resolvers."""
    return f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} admin
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 2
    }}
    forward . /etc/resolv.conf
    loadbalance
}}
"""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def operator_objects(webhook_port: int, certs: dict[str, bytes]) -> list[dict[str, Any]]:
    """What the training operator expects to find: its namespace, its webhook Secret (filled with our
    certificates, so its cert rotator keeps them), a selector-less Service whose EndpointSlice points
    at the webhook server on NODE_IP, and the ValidatingWebhookConfiguration it injects its CA into.
    `certs`: ca.crt, ca.key (PKCS#1), tls.crt, tls.key."""
    labels = {"app.kubernetes.io/name": "training-operator"}
    rules = [
        {
            "apiGroups": ["kubeflow.org"],
            "apiVersions": ["v1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["pytorchjobs"],
        }
    ]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": OPERATOR_SECRET, "namespace": OPERATOR_NAMESPACE},
            "data": {name: _b64(data) for name, data in certs.items()},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": OPERATOR_SERVICE, "namespace": OPERATOR_NAMESPACE, "labels": labels},
            "spec": {"ports": [{"name": "webhook", "port": 443, "targetPort": webhook_port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{OPERATOR_SERVICE}-host",
                "namespace": OPERATOR_NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": OPERATOR_SERVICE,
                    "endpointslice.kubernetes.io/managed-by": "clusterfit-tests",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "webhook", "port": webhook_port, "protocol": "TCP"}],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": OPERATOR_WEBHOOK_CONFIG},
            "webhooks": [
                {
                    "name": "validator.pytorchjob.training-operator.kubeflow.org",
                    "clientConfig": {
                        "service": {
                            "namespace": OPERATOR_NAMESPACE,
                            "name": OPERATOR_SERVICE,
                            "path": "/validate-kubeflow-org-v1-pytorchjob",
                            "port": 443,
                        },
                        "caBundle": _b64(certs["ca.crt"]),
                    },
                    "rules": rules,
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 10,
                }
            ],
        },
    ]
