"""`helm install` of helm/clusterfit into the test API server, for real: the release's objects exist;
the controller, run with the chart's own ServiceAccount identity (a token from the API server's
TokenRequest API, so exactly the chart's Role applies) and the chart's ConfigMap, drives the step
jobs to the end with them owned by that ConfigMap; `helm uninstall` removes the release's objects.

This cluster has no kubelet (the controller Job's pod never runs: the test runs the same command
in-process) and no garbage collector (the step jobs' removal on uninstall is the collector's work,
following their ownerReference to the deleted ConfigMap; the test checks that reference)."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException

from clusterfit.config import config_from_args
from clusterfit.kube import commands
from tests.infra.controlplane import ControlPlane
from tests.kube.helpers_controller import Experiment, FakeOperator
from tests.kube.helpers_manifests import CHART, helm, load_docs
from tests.s3server import S3Server

READERS = {
    "ConfigMap": lambda api, name, ns: client.CoreV1Api(api).read_namespaced_config_map(name, ns),
    "ServiceAccount": lambda api, name, ns: client.CoreV1Api(api).read_namespaced_service_account(name, ns),
    "Role": lambda api, name, ns: client.RbacAuthorizationV1Api(api).read_namespaced_role(name, ns),
    "RoleBinding": lambda api, name, ns: client.RbacAuthorizationV1Api(api).read_namespaced_role_binding(name, ns),
    "Job": lambda api, name, ns: client.BatchV1Api(api).read_namespaced_job(name, ns),
}


def exists(api: client.ApiClient, kind: str, name: str, namespace: str) -> bool:
    try:
        READERS[kind](api, name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_helm_install_creates_the_release_its_controller_runs_with_it_and_uninstall_removes_it(
    control_plane: ControlPlane, namespace: str, helm_bin: Path, s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig_path),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }
    values = {
        "s3.secretName": "clusterfit-s3",  # referenced only; the controller here reads S3 keys from its env
        "experiment.EXPERIMENT.ROOT": f"{s3_bucket}/runs",
        "experiment.STORAGE.S3.ENDPOINT_URL": s3_env.endpoint_url,
        "experiment.STORAGE.S3.ADDRESSING_STYLE": "path",
        "experiment.PIPELINE.STEPS": "{extract,cluster}",
    }
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    install = helm(helm_bin, "install", "digits", str(CHART), "-n", namespace, *sets, env=env)
    assert install.returncode == 0, install.stderr

    # The release's objects are in the API server.
    manifest = helm(helm_bin, "get", "manifest", "digits", "-n", namespace, env=env)
    objects = {(o["kind"], o["metadata"]["name"]) for o in load_docs(manifest.stdout)}
    assert objects == {
        ("ConfigMap", "digits-config"),
        ("ServiceAccount", "digits-controller"),
        ("Role", "digits-controller"),
        ("RoleBinding", "digits-controller"),
        ("Job", "digits"),
    }
    admin = control_plane.api_client()
    assert all(exists(admin, kind, name, namespace) for kind, name in objects)
    job = client.BatchV1Api(admin).read_namespaced_job("digits", namespace)
    command = [*job.spec.template.spec.containers[0].command, *job.spec.template.spec.containers[0].args]
    assert command == [
        "clusterfit",
        "submit",
        "--in-cluster",
        "config=/etc/clusterfit/config.yaml",
        "--owner-configmap",
        "digits-config",
        "--wait",
    ]

    # That command, with the chart's ServiceAccount token instead of --in-cluster (no kubelet mounts one here).
    core = client.CoreV1Api(admin)
    token = core.create_namespaced_service_account_token(
        "digits-controller", namespace, {"spec": {"expirationSeconds": 600}}
    )
    as_chart = control_plane.kubeconfig_for(token.status.token, name="chart-controller")
    config_map = core.read_namespaced_config_map("digits-config", namespace)
    (tmp_path / "config.yaml").write_text(config_map.data["config.yaml"])  # what /etc/clusterfit/config.yaml holds
    cfg = config_from_args([f"config={tmp_path / 'config.yaml'}"])
    ex = Experiment(control_plane, namespace, tmp_path, f"{s3_bucket}/runs", s3_env.endpoint_url)
    with FakeOperator(ex, cfg) as operator:
        argv = [
            f"config={tmp_path / 'config.yaml'}",
            "--kubeconfig",
            str(as_chart),
            "--owner-configmap",
            "digits-config",
            "--wait",
        ]
        assert commands.cli_submit(argv) == 0
    assert operator.names() == ["digits-extract", "digits-cluster"]
    owners = [j["metadata"]["ownerReferences"] for j in ex.jobs()]
    assert (
        owners
        == [[{"apiVersion": "v1", "kind": "ConfigMap", "name": "digits-config", "uid": config_map.metadata.uid}]] * 2
    )

    uninstall = helm(helm_bin, "uninstall", "digits", "-n", namespace, "--wait", env=env)
    assert uninstall.returncode == 0, uninstall.stderr
    assert [(kind, name) for kind, name in objects if exists(admin, kind, name, namespace)] == []
    assert helm(helm_bin, "status", "digits", "-n", namespace, env=env).returncode != 0  # no release left


def test_a_user_allowed_only_its_namespace_can_install(
    control_plane: ControlPlane, namespace: str, helm_bin: Path, tmp_path: Path
) -> None:
    # A namespace admin (a Role, no ClusterRole): the chart may read nothing cluster-scoped, such as
    # the PyTorchJob CRD; API discovery (what .Capabilities reads) is open to every user.
    admin = control_plane.api_client()
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "deployer"}})
    everything = {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "deployer"}, "rules": [everything]})
    binding = {
        "metadata": {"name": "deployer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deployer"},
        "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": namespace}],
    }
    rbac.create_namespaced_role_binding(namespace, binding)
    token = core.create_namespaced_service_account_token("deployer", namespace, {"spec": {"expirationSeconds": 600}})
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig_for(token.status.token, name="namespace-admin")),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }
    root = "experiment.EXPERIMENT.ROOT=s3://bucket/prefix"
    install = helm(helm_bin, "install", "digits", str(CHART), "-n", namespace, "--set", root, env=env)
    assert install.returncode == 0, install.stderr
    assert exists(admin, "Job", "digits", namespace)
