"""What the end-to-end tests share: a tiny digits experiment whose artifacts go to the node's MinIO,
the real `clusterfit`, `kubectl` and `helm` commands, and what the API server says about jobs and pods."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clusterfit.config import load_config
from tests.infra.controlplane import REPO_ROOT, find_binary
from tests.infra.node import Cluster
from tests.node.conftest import wait_for

PYTORCHJOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
SECRET = "clusterfit-s3"
STEP_IMAGES = ["step", "cluster", "controller"]
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}

# The quickstart made small: 256 training and 100 test digits, one epoch each, K=10. The steps' own
# tests measure quality; here the point is that every step runs in its pod and publishes.
TINY = {
    "DATA.TRAIN.DATA_LIMIT": 256,
    "DATA.TEST.DATA_LIMIT": 100,
    "PRETRAIN.OPTIMIZER.NUM_EPOCHS": 1,
    "OPTIMIZER.NUM_EPOCHS": 1,
    "CLUSTERFIT.NUM_CLUSTERS": 10,
    "CLUSTERFIT.N_ITER": 5,
    "EXTRACT.CHUNK_SIZE": 64,
    "EVALUATE.LINEAR_EPOCHS": 3,
    "EVALUATE.LOW_SHOT": [1],
    "EVALUATE.LOW_SHOT_DRAWS": 2,
    "LOG.PROGRESS_INTERVAL_S": 5,
}


@dataclass
class Experiment:
    """One experiment on the node: its namespace, config file and artifact root in MinIO."""

    cluster: Cluster
    namespace: str
    name: str
    folder: Path
    overrides: dict[str, Any]

    @property
    def root(self) -> str:
        return f"s3://{self.cluster.minio_bucket}/{self.namespace}/{self.name}"

    def tree(self) -> dict[str, Any]:
        """The resolved config as the pods see it (S3 endpoint: the pods' view of MinIO)."""
        refs, cluster = self.cluster.image_refs, self.cluster
        resources = {"CPU": "500m", "MEMORY": "2Gi"}
        settings = {
            **TINY,
            "EXPERIMENT.NAME": self.name,
            "EXPERIMENT.ROOT": self.root,
            "STORAGE.S3.ENDPOINT_URL": cluster.minio_endpoint_pod,
            "STORAGE.S3.ADDRESSING_STYLE": "path",
            "STORAGE.S3.REGION": "us-east-1",
            "KUBERNETES.NAMESPACE": self.namespace,
            "KUBERNETES.IMAGE": refs["step"],
            "KUBERNETES.CLUSTER_IMAGE": refs["cluster"],
            "KUBERNETES.IMAGE_PULL_POLICY": "Never",  # imported into the node: there is no registry
            "KUBERNETES.S3_SECRET_NAME": SECRET,
            "KUBERNETES.BACKOFF_LIMIT": 2,
            "KUBERNETES.CONTROLLER.POD_CHECK_INTERVAL_S": 2,
            "KUBERNETES.CONTROLLER.POD_START_TIMEOUT_S": 30,
            **{f"KUBERNETES.RESOURCES.{step}": resources for step in ("PRETRAIN", "EXTRACT", "CLUSTER", "TRAIN")},
            "KUBERNETES.RESOURCES.EVALUATE": resources,
            **self.overrides,
        }
        return load_config("quickstart", settings).model_dump(mode="json")

    def write(self) -> Path:
        path = self.folder / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.tree(), sort_keys=False))
        return path

    def env(self) -> dict[str, str]:
        """What a workstation running clusterfit needs: credentials for MinIO (reached at the same address)."""
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.cluster.minio_access_key,
            "AWS_SECRET_ACCESS_KEY": self.cluster.minio_secret_key,
            "PYTHONUNBUFFERED": "1",
        }

    def clusterfit(self, *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
        """`clusterfit ARGS config=<this experiment> --kubeconfig <admin>` on the host, as a user runs it."""
        argv = [sys.executable, "-m", "clusterfit", *args, f"config={self.write()}"]
        if args[0] in ("submit", "status", "logs", "cancel"):
            argv += ["--kubeconfig", str(self.cluster.kubeconfig_path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=self.env(), cwd=self.folder)

    def object(self, key: str) -> bytes:
        """An artifact of this experiment, read from MinIO."""
        prefix = self.root.removeprefix(f"s3://{self.cluster.minio_bucket}/")
        body = self.cluster.s3_client().get_object(Bucket=self.cluster.minio_bucket, Key=f"{prefix}/{key}")["Body"]
        return bytes(body.read())

    def keys(self, folder: str = "") -> list[str]:
        prefix = self.root.removeprefix(f"s3://{self.cluster.minio_bucket}/") + "/"
        pages = self.cluster.s3_client().get_paginator("list_objects_v2")
        found = [
            o["Key"]
            for page in pages.paginate(Bucket=self.cluster.minio_bucket, Prefix=prefix + folder)
            for o in page.get("Contents", [])
        ]
        return [key.removeprefix(prefix) for key in found]

    def features(self, split: str = "train", layer: str = "res5") -> dict[int, np.ndarray]:
        """{dataset index: feature row} of the published features."""
        manifest = json.loads(self.object(f"features/{split}/_SUCCESS.json"))
        rows: dict[int, np.ndarray] = {}
        for name in manifest["files"]:
            if name.startswith(f"{layer}/part-") and not name.endswith("-index.npy"):
                feats = np.load(io.BytesIO(self.object(f"features/{split}/{name}")))
                index = np.load(io.BytesIO(self.object(f"features/{split}/{name[:-4]}-index.npy")))
                rows.update(zip(index.tolist(), feats, strict=True))
        return rows


def setup_namespace(cluster: Cluster, namespace: str, labels: dict[str, str] | None = None) -> None:
    """A namespace with the S3 Secret the steps reference."""
    cluster.create_namespace(namespace, labels)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET},
        "stringData": {
            "AWS_ACCESS_KEY_ID": cluster.minio_access_key,
            "AWS_SECRET_ACCESS_KEY": cluster.minio_secret_key,
        },
    }
    status, body = cluster.request("POST", f"/api/v1/namespaces/{namespace}/secrets", secret)
    assert status == 201, body


def jobs(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    """name -> PyTorchJob of the namespace."""
    status, body = cluster.request("GET", PYTORCHJOBS.format(ns=namespace))
    assert status == 200, body
    return {job["metadata"]["name"]: job for job in body["items"]}


def true_conditions(job: dict[str, Any]) -> list[str]:
    return [c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"]


def pods(cluster: Cluster, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    query = f"?labelSelector={selector}" if selector else ""
    status, body = cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods{query}")
    assert status == 200, body
    return list(body["items"])


def helm(cluster: Cluster, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [str(find_binary("helm")), "--kubeconfig", str(cluster.kubeconfig_path), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"helm {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result


def wait_until(what: str, check: Any, cluster: Cluster, timeout_s: float = 600) -> Any:
    started = time.monotonic()
    result = wait_for(what, check, timeout_s, cluster)
    print(f"{what}: {time.monotonic() - started:.0f}s")
    return result


CHART = REPO_ROOT / "helm" / "clusterfit"
K8S_README = REPO_ROOT / "k8s" / "README.md"


def readme_apply_loop() -> str:
    """The bash block of k8s/README.md that applies the rendered steps one after the other."""
    text = K8S_README.read_text()
    blocks = [b.split("\n", 1)[1] for b in text.split("```bash")[1:]]
    (loop,) = [b.split("```")[0] for b in blocks if 'for job in "$dir"' in b]
    return loop
