"""`helm install` of helm/clusterfit into the test API server, for real: the release's objects exist;
the controller, run with the chart's own ServiceAccount identity (a token from the API server's
TokenRequest API, so exactly the chart's Role applies) and the chart's ConfigMap, drives the step
jobs to the end with them owned by that ConfigMap; `helm uninstall` removes the release's objects.

This cluster has no kubelet (the controller Job's pod never runs: the test runs the same command
in-process) and no garbage collector (the step jobs' removal on uninstall is the collector's work,
following their ownerReference to the deleted ConfigMap; the test checks that reference)."""

from __future__ import annotations

import os
import re
import threading
import time
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


def helm_env(control_plane: ControlPlane, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig_path),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }


def controller_jobs(api: client.ApiClient, namespace: str) -> list[client.V1Job]:
    selector = "app.kubernetes.io/component=controller"
    return list(client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=selector).items)


def config_maps(api: client.ApiClient, namespace: str) -> list[client.V1ConfigMap]:
    selector = "app.kubernetes.io/component=config"
    return list(client.CoreV1Api(api).list_namespaced_config_map(namespace, label_selector=selector).items)


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
    notes = install.stdout.split("NOTES:")[1]
    print(notes)

    # The release's objects are in the API server.
    manifest = helm(helm_bin, "get", "manifest", "digits", "-n", namespace, env=env)
    objects = {(o["kind"], o["metadata"]["name"]) for o in load_docs(manifest.stdout)}
    names = {kind: name for kind, name in objects}
    assert re.fullmatch(r"digits-config-[0-9a-f]{10}", names["ConfigMap"]), names  # content-addressed
    assert re.fullmatch(r"digits-[0-9a-f]{8}", names["Job"]), names  # the revision: a new one per change
    assert objects == {
        ("ConfigMap", names["ConfigMap"]),
        ("ServiceAccount", "digits-controller"),
        ("Role", "digits-controller"),
        ("RoleBinding", "digits-controller"),
        ("Job", names["Job"]),
    }
    admin = control_plane.api_client()
    assert all(exists(admin, kind, name, namespace) for kind, name in objects)
    # NOTES.txt names this release's Job, its steps and the cancel and retry paths.
    assert f"kubectl -n {namespace} logs -f job/{names['Job']}" in notes
    assert "one PyTorchJob per step\n(extract, cluster)" in notes
    assert "clusterfit cancel config=digits.yaml <step>" in notes and "controller.rerun=" in notes
    job = client.BatchV1Api(admin).read_namespaced_job(names["Job"], namespace)
    command = [*job.spec.template.spec.containers[0].command, *job.spec.template.spec.containers[0].args]
    assert command == [
        "clusterfit",
        "submit",
        "--in-cluster",
        "config=/etc/clusterfit/config.yaml",
        "--owner-configmap",
        names["ConfigMap"],
        "--wait",
    ]

    # That command, with the chart's ServiceAccount token instead of --in-cluster (no kubelet mounts one here).
    core = client.CoreV1Api(admin)
    token = core.create_namespaced_service_account_token(
        "digits-controller", namespace, {"spec": {"expirationSeconds": 600}}
    )
    as_chart = control_plane.kubeconfig_for(token.status.token, name="chart-controller")
    config_map = core.read_namespaced_config_map(names["ConfigMap"], namespace)
    assert config_map.immutable is True
    (tmp_path / "config.yaml").write_text(config_map.data["config.yaml"])  # what /etc/clusterfit/config.yaml holds
    cfg = config_from_args([f"config={tmp_path / 'config.yaml'}"])
    ex = Experiment(control_plane, namespace, tmp_path, f"{s3_bucket}/runs", s3_env.endpoint_url)
    with FakeOperator(ex, cfg) as operator:
        argv = [
            f"config={tmp_path / 'config.yaml'}",
            "--kubeconfig",
            str(as_chart),
            "--owner-configmap",
            names["ConfigMap"],
            "--wait",
        ]
        assert commands.cli_submit(argv) == 0
    assert operator.names() == ["digits-extract", "digits-cluster"]
    owners = [j["metadata"]["ownerReferences"] for j in ex.jobs()]
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": names["ConfigMap"], "uid": config_map.metadata.uid}
    assert owners == [[owner]] * 2

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
    assert [j.metadata.name for j in controller_jobs(admin, namespace)]  # its lookup of Jobs was allowed, too


def test_helm_upgrade_refuses_while_the_controller_runs_and_replaces_it_once_cancelled(
    control_plane: ControlPlane, namespace: str, helm_bin: Path, tmp_path: Path
) -> None:
    env, admin = helm_env(control_plane, tmp_path), control_plane.api_client()
    base = ["-n", namespace, "--set", "experiment.EXPERIMENT.ROOT=s3://bucket/runs"]
    assert helm(helm_bin, "install", "digits", str(CHART), *base, env=env).returncode == 0
    (first,) = controller_jobs(admin, namespace)
    (config,) = config_maps(admin, namespace)
    assert first.spec.template.spec.volumes[0].config_map.name == config.metadata.name

    # Another config while the controller Job has not finished: refused before anything changes.
    edit = ["--reuse-values", "--set", "experiment.EVALUATE.LINEAR_EPOCHS=7"]
    refused = helm(helm_bin, "upgrade", "digits", str(CHART), "-n", namespace, *edit, env=env)
    print(refused.stderr.strip())
    assert refused.returncode != 0
    assert f"release digits is running: its controller Job {first.metadata.name} has not finished" in refused.stderr
    assert "clusterfit cancel" in refused.stderr
    assert [j.metadata.uid for j in controller_jobs(admin, namespace)] == [first.metadata.uid]
    assert [c.metadata.uid for c in config_maps(admin, namespace)] == [config.metadata.uid]

    # `clusterfit cancel` suspends the controller Job, and waits until its pod is gone before it deletes any
    # step job (here a pod that no kubelet runs: the test deletes it, as the job controller would).
    (tmp_path / "exp.yaml").write_text(config.data["config.yaml"])
    pod = {
        "metadata": {"name": "digits-controller-pod", "labels": {"batch.kubernetes.io/job-name": first.metadata.name}},
        "spec": {"containers": [{"name": "controller", "image": "clusterfit/clusterfit-controller:0.1.0"}]},
    }
    core = client.CoreV1Api(admin)
    core.create_namespaced_pod(namespace, pod)

    def job_controller() -> None:  # what kube-controller-manager does for a suspended Job
        while not client.BatchV1Api(admin).read_namespaced_job(first.metadata.name, namespace).spec.suspend:
            time.sleep(0.1)
        time.sleep(1.0)
        core.delete_namespaced_pod("digits-controller-pod", namespace, grace_period_seconds=0)

    thread = threading.Thread(target=job_controller, daemon=True)
    thread.start()
    argv = [f"config={tmp_path / 'exp.yaml'}", "--kubeconfig", str(control_plane.kubeconfig_path)]
    started = time.monotonic()
    assert commands.cli_cancel(argv) == 0
    assert time.monotonic() - started >= 1.0  # it waited for the pod
    thread.join(timeout=10)
    assert client.BatchV1Api(admin).read_namespaced_job(first.metadata.name, namespace).spec.suspend is True

    # Now the upgrade replaces the controller Job and the ConfigMap (an immutable one, of the new config).
    upgrade = helm(helm_bin, "upgrade", "digits", str(CHART), "-n", namespace, *edit, env=env)
    assert upgrade.returncode == 0, upgrade.stderr
    (second,) = controller_jobs(admin, namespace)
    (new_config,) = config_maps(admin, namespace)
    assert second.metadata.name != first.metadata.name and new_config.metadata.name != config.metadata.name
    assert new_config.immutable is True and "LINEAR_EPOCHS: 7" in new_config.data["config.yaml"]
    assert second.spec.template.spec.volumes[0].config_map.name == new_config.metadata.name

    # A failed experiment is rerun with a new `controller.rerun` value: a new Job, the same config.
    status = {
        "startTime": "2026-12-03T00:00:00Z",
        "conditions": [
            {
                "type": kind,
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "the pod failed",
                "lastTransitionTime": "2026-12-03T00:01:00Z",
                "lastProbeTime": "2026-12-03T00:01:00Z",
            }
            for kind in ("FailureTarget", "Failed")
        ],
    }
    client.BatchV1Api(admin).patch_namespaced_job_status(second.metadata.name, namespace, {"status": status})
    rerun = helm(
        helm_bin,
        "upgrade",
        "digits",
        str(CHART),
        "-n",
        namespace,
        "--reuse-values",
        "--set",
        "controller.rerun=1",
        env=env,
    )
    assert rerun.returncode == 0, rerun.stderr
    (third,) = controller_jobs(admin, namespace)
    assert third.metadata.name not in (first.metadata.name, second.metadata.name)
    assert [c.metadata.uid for c in config_maps(admin, namespace)] == [new_config.metadata.uid]
