"""The test node's images, for real: built with buildah (or taken from the cache), imported into a
throwaway containerd (its own root, state and socket) and run there with `ctr run`, as the kubelet
would run them; the 6 GB step image runs in a pod on the test node instead (it is imported there
anyway, and once per machine: a second import of it here would cost minutes every run). Needs root
and the packages of tests/infra/install_node_deps.sh; fails without them.

    .venv/bin/python -m pytest tests/node/test_images.py -m node

A cold cache builds every image (about 15 minutes on 2 cores, most of it the step image's torch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from tests.infra import images
from tests.infra.images import ScratchContainerd
from tests.infra.node import Cluster
from tests.node.conftest import wait_for

pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]

# The script of the Kubeflow training operator's built-in init container for PyTorchJob workers, v1.9.4
# (pkg/controller.v1/pytorch/initcontainer.go; it runs as root), and the project's own template for it.
OPERATOR_INIT_SCRIPT = (
    "err=1;for i in $(seq {{.MaxTries}}); do if nslookup {{.MasterAddr}}; then err=0 && break; fi;"
    "echo waiting for master; sleep 2; done; exit $err"
)
PROJECT_INIT_TEMPLATE = images.REPO_ROOT / "k8s" / "training-operator" / "initContainer.yaml"
UID = "10001"
SCRATCH_IMAGES = [name for name in images.ALL if name != "step"]


@pytest.fixture(scope="module")
def built() -> dict[str, images.Built]:
    """Every image, built or from the cache."""
    return images.build()


class Node(NamedTuple):
    """The throwaway containerd, containerd's name for each image, and what the import logged."""

    ctrd: ScratchContainerd
    names: dict[str, str]
    messages: list[str]

    def run(self, short: str, *argv: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return self.ctrd.run(self.names[short], *argv, options=options)


@pytest.fixture(scope="module")
def node(built: dict[str, images.Built]) -> Iterator[Node]:
    """A throwaway containerd holding every image but the step image. An older image (the base) sits
    under the controller image's name first, so that one is imported as an update (only the blobs
    containerd lacks), the others whole."""
    ctrd = ScratchContainerd(Path("/var/tmp") / f"ctrd-test-{time.monotonic_ns()}")
    ctrd.start()
    try:
        older = dataclasses.replace(built["base"], ref=images.CONTROLLER)
        ctrd.load(functools.partial(images.write_docker_archive, older))
        messages: list[str] = []
        start = time.monotonic()
        names = images.import_images(ctrd.address, SCRATCH_IMAGES, log=messages.append)
        print(f"imported every image in {time.monotonic() - start:.1f}s:", *messages, sep="\n  ")
        yield Node(ctrd, names, messages)
    finally:
        ctrd.stop()


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_a_second_build_only_hashes(built: dict[str, images.Built]) -> None:
    start = time.monotonic()
    again = images.build()
    assert all(b.cached for b in again.values()), {k: b.cached for k, b in again.items()}
    assert {k: b.image_id for k, b in again.items()} == {k: b.image_id for k, b in built.items()}
    assert time.monotonic() - start < 30


def test_containerd_lists_every_image_and_a_second_import_skips(node: Node) -> None:
    listed = node.ctrd.ctr("images", "ls", "--quiet").split()
    for short in SCRATCH_IMAGES:
        assert images.containerd_name(images.SPECS[short].ref, listed) == node.names[short]
    # The kubelet asks for unqualified references under Docker Hub's domain: the import names them so.
    controller = node.names["controller"]
    assert controller.endswith(f"/{images.CONTROLLER}") and controller != images.CONTROLLER
    assert node.names["pause"] == images.PAUSE
    assert [m for m in node.messages if m.startswith("controller: imported (changed blobs)")], node.messages
    assert [m for m in node.messages if m.startswith("cluster: imported (whole)")], node.messages
    messages: list[str] = []
    start = time.monotonic()
    assert images.import_images(node.ctrd.address, SCRATCH_IMAGES, log=messages.append) == node.names
    assert messages == [] and time.monotonic() - start < 60, messages


def test_an_exported_archive_imports_with_plain_ctr(node: Node, tmp_path: Path) -> None:
    archive = images.export_archive("tools", tmp_path / "tools.tar")
    with tarfile.open(archive) as tar:
        (entry,) = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert entry["RepoTags"] == [images.TOOLS]
    ctr = ["ctr", "--address", node.ctrd.address, "--namespace", "archive-check"]
    ok(subprocess.run([*ctr, "images", "import", str(archive)], capture_output=True, text=True))
    assert images.TOOLS in ok(subprocess.run([*ctr, "images", "ls", "--quiet"], capture_output=True, text=True))


def test_step_image(cluster: Cluster, namespace: str) -> None:
    # On the test node (see the module docstring), in a pod as the steps run: the image's own user.
    (name,) = cluster.import_images(["step"]).values()
    torch_version = "import torch, torchvision; print(torch.__version__.split('+')[0])"
    # Small as it can be: no caches, no build tools, nothing of the build left behind.
    leftovers = (
        "/root/.cache/pip /home/clusterfit/.cache/pip /wheels /tmp/src /tmp/requirements.txt /var/cache/apt/*.bin"
    )
    script = (
        f'clusterfit --version; id -u; python -c "{torch_version}"; '
        f"for p in {leftovers}; do test -e $p && echo left: $p; done; ls /mnt; command -v gcc cc || true"
    )
    log = run_pod(cluster, namespace, name, ["sh", "-c", script])
    version, uid, torch, *rest = log.splitlines()
    assert version == f"clusterfit {images.VERSION}" and uid == UID
    # the lock's pin, followed by its hashes (or a marker) on the same logical line
    assert f"\ntorch=={torch} " in (images.DOCKER / "requirements-step.txt").read_text()
    assert rest == [], rest


def run_pod(cluster: Cluster, namespace: str, image: str, command: list[str]) -> str:
    """Run one pod to completion (Never pulled: the image is on the node); its log."""
    container = {"name": "main", "image": image, "imagePullPolicy": "Never", "command": command}
    pod = {"metadata": {"name": "probe"}, "spec": {"restartPolicy": "Never", "containers": [container]}}
    status, body = cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    assert status == 201, body

    def phase() -> str:
        return str(cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/probe")[1]["status"].get("phase"))

    wait_for("the probe pod to finish", lambda: phase() in ("Succeeded", "Failed"), 300, cluster)
    status, log = cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/probe/log")
    assert status == 200 and phase() == "Succeeded", log
    return str(log)


def test_cluster_image_has_faiss_and_no_torch(node: Node) -> None:
    assert ok(node.run("cluster", "clusterfit", "--version")).strip() == f"clusterfit {images.VERSION}"
    assert ok(node.run("cluster", "id", "-u")).strip() == UID
    code = (
        "import sys, numpy as np, faiss, clusterfit\n"
        "rng = np.random.default_rng(0)\n"  # two far-apart blobs: the oracle for two clusters
        "x = np.concatenate([rng.normal(0, 1, (200, 8)), rng.normal(50, 1, (200, 8))]).astype('float32')\n"
        "km = faiss.Kmeans(8, 2, niter=10, seed=1); km.train(x)\n"
        "labels = km.index.search(x, 1)[1][:, 0]\n"
        "assert len(set(labels[:200])) == len(set(labels[200:])) == 1 and labels[0] != labels[-1]\n"
        "assert 'torch' not in sys.modules\n"
        "print('faiss', faiss.__version__)\n"
    )
    printed = ok(node.run("cluster", "python", "-c", code)).split()
    # the locked faiss: the GPU image's family (docker/README.md)
    assert printed[-2] == "faiss", printed
    assert f"\nfaiss-cpu=={printed[-1]} " in (images.DOCKER / "requirements-cluster-cpu.txt").read_text(), printed
    result = node.run("cluster", "python", "-c", "import torch")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr, result.stderr


def test_controller_image(node: Node) -> None:
    assert "submit" in ok(node.run("controller", "clusterfit", "--help"))
    assert ok(node.run("controller", "id", "-u")).strip() == UID
    for module in ("torch", "faiss"):
        result = node.run("controller", "python", "-c", f"import {module}")
        assert result.returncode != 0 and f"No module named '{module}'" in result.stderr, result.stderr


def test_base_image(node: Node) -> None:
    out = ok(node.run("base", "sh", "-c", "python3 -m venv /tmp/v && /tmp/v/bin/python --version && busybox true"))
    assert out.startswith("Python 3.11.")


def test_pause_image_sleeps_until_terminated(node: Node) -> None:
    assert ok(node.run("pause", "/pause", "-v")).strip() == "clusterfit-pause"
    cid = f"pause-{time.monotonic_ns()}"
    node.ctrd.ctr("run", "--detach", node.names["pause"], cid)
    try:
        time.sleep(1)
        assert "RUNNING" in node.ctrd.ctr("tasks", "ls")
        node.ctrd.ctr("tasks", "kill", "--signal", "SIGTERM", cid)
        deadline = time.monotonic() + 20
        while "RUNNING" in node.ctrd.ctr("tasks", "ls") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "STOPPED" in node.ctrd.ctr("tasks", "ls")
    finally:
        ctr = ["ctr", "--address", node.ctrd.address, "--namespace", node.ctrd.namespace]
        subprocess.run([*ctr, "tasks", "delete", "--force", cid], capture_output=True)
        node.ctrd.ctr("containers", "delete", cid)


class StubDNS:
    """A DNS server on 127.0.0.<n>:53 (UDP) that knows one name (A record) and nothing else."""

    def __init__(self, fqdn: str, address: str) -> None:
        self.fqdn, self.address = fqdn.rstrip(".").lower(), address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for last in range(53, 90):
            try:
                self.sock.bind((f"127.0.0.{last}", 53))
                break
            except OSError:
                continue
        else:
            raise RuntimeError("no free 127.0.0.x:53 for the stub DNS server")
        self.ip = self.sock.getsockname()[0]
        self.asked: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            self.sock.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode().lower())
            i += 1 + query[i]
        qtype = struct.unpack("!H", query[i + 1 : i + 3])[0]
        question = query[12 : i + 5]
        asked = ".".join(labels)
        self.asked.append(asked)
        known, answers = asked == self.fqdn, b""
        if known and qtype == 1:
            answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(self.address)
        flags = 0x8180 | (0 if known else 3)  # a response, recursion available; NXDOMAIN when unknown
        header = query[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
        return header + question + answers

    def close(self) -> None:
        self.sock.close()


def init_container(template: str, master: str, max_tries: int) -> list[str]:
    """The init container's command, rendered as the operator renders its template, run as the user
    the template asks for."""
    if template == "operator":
        script, uid = OPERATOR_INIT_SCRIPT, 0
    else:
        (container,) = yaml.safe_load(PROJECT_INIT_TEMPLATE.read_text().replace("{{.InitContainerImage}}", "tools"))
        script, uid = container["command"][2], container["securityContext"]["runAsUser"]
    script = script.replace("{{.MaxTries}}", str(max_tries)).replace("{{.MasterAddr}}", master)
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    return [*as_user, "sh", "-c", script]


@pytest.mark.parametrize("template", ["operator", "project"])
def test_tools_image_runs_the_operators_init_container(node: Node, tmp_path: Path, template: str) -> None:
    """The worker's init container waits for the master's DNS name, found through the pod's search
    list (the operator passes the short name `<job>-master-0`), within the operator's 20Mi limit."""
    dns = StubDNS("job-master-0.ns1.svc.cluster.local", "10.9.8.7")
    try:
        resolv = tmp_path / "resolv.conf"
        search = "search ns1.svc.cluster.local svc.cluster.local cluster.local"
        resolv.write_text(f"{search}\nnameserver {dns.ip}\noptions ndots:5\n")
        mount = f"type=bind,src={resolv},dst=/etc/resolv.conf,options=rbind:ro"
        # This process's network namespace, where the stub listens; not --net-host, whose mount of the
        # host's resolv.conf would hide ours.
        network = f"network:/proc/{os.getpid()}/ns/net"
        options = ("--with-ns", network, "--memory-limit", str(20 * 2**20), "--mount", mount)
        found = node.run("tools", *init_container(template, "job-master-0", 3), options=options)
        report = f"{found.stdout}\n{found.stderr}\n{dns.asked}"
        assert found.returncode == 0 and "waiting for master" not in found.stdout, report  # found at once
        assert "job-master-0.ns1.svc.cluster.local" in dns.asked, report
        missing = node.run("tools", *init_container(template, "other-master-0", 2), options=options)
        assert missing.returncode == 1 and missing.stdout.count("waiting for master") == 2, missing.stdout
    finally:
        dns.close()


def test_tools_image_runs_as_root_by_default(node: Node) -> None:
    assert ok(node.run("tools", "id", "-u")).strip() == "0"  # the operator's built-in template sets no user
