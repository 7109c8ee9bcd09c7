"""The test control plane is the real thing: stamped versions, the CRD served, RBAC enforced, the
status subresource behaving as the training operator relies on, and data surviving a restart."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.infra.controlplane import CRD_NAME, ControlPlane, read_versions

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def pytorchjob(name: str) -> dict[str, Any]:
    """A minimal valid PyTorchJob: one master replica."""
    container = {"name": "pytorch", "image": "busybox:1.36", "command": ["true"]}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [container]}},
                }
            }
        },
    }


def condition(type_: str, reason: str, message: str) -> dict[str, str]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    }


def test_apiserver_reports_the_stamped_version(control_plane: ControlPlane, admin_api: client.ApiClient) -> None:
    want = read_versions()["KUBERNETES_VERSION"]  # e.g. v1.36.3
    info = client.VersionApi(admin_api).get_code()
    assert info.git_version == want
    assert (info.major, info.minor) == tuple(want.lstrip("v").split(".")[:2])


def test_pytorchjob_crd_is_established(control_plane: ControlPlane) -> None:
    status, crd = control_plane.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
    assert status == 200
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd["status"]["acceptedNames"]["kind"] == "PyTorchJob"


def test_pytorchjob_status_subresource_round_trip(admin_api: client.ApiClient, namespace: str) -> None:
    jobs = client.CustomObjectsApi(admin_api)
    created = cast(
        dict[str, Any],
        jobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pytorchjob("fit")),
    )
    assert "status" not in created or not created["status"].get("conditions")

    conditions = []
    for type_, reason in [
        ("Created", "PyTorchJobCreated"),
        ("Running", "PyTorchJobRunning"),
        ("Succeeded", "PyTorchJobSucceeded"),
    ]:
        conditions.append(condition(type_, reason, f"PyTorchJob {namespace}/fit is {type_.lower()}."))
        jobs.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "fit", {"status": {"conditions": conditions}}
        )
        got = cast(dict[str, Any], jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "fit"))
        assert [(c["type"], c["reason"]) for c in got["status"]["conditions"]] == [
            (c["type"], c["reason"]) for c in conditions
        ]
        assert got["spec"] == created["spec"]

    # The status subresource is real: status sent to the main resource is dropped by the server.
    got["status"] = {"conditions": [condition("Failed", "Tampered", "must be ignored")]}
    got["metadata"]["labels"] = {"touched": "yes"}
    updated = cast(dict[str, Any], jobs.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "fit", got))
    assert updated["metadata"]["labels"] == {"touched": "yes"}
    assert [c["type"] for c in updated["status"]["conditions"]] == ["Created", "Running", "Succeeded"]


def test_pytorchjob_schema_is_enforced(admin_api: client.ApiClient, namespace: str) -> None:
    bad = pytorchjob("bad")
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    with pytest.raises(ApiException) as err:
        client.CustomObjectsApi(admin_api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, bad)
    assert err.value.status == 422


def test_controller_token_needs_rbac(control_plane: ControlPlane, admin_api: client.ApiClient, namespace: str) -> None:
    controller_api = control_plane.api_client(control_plane.user_tokens["controller"])
    pods = client.CoreV1Api(controller_api)
    with pytest.raises(ApiException) as err:
        pods.list_namespaced_pod(namespace)
    assert err.value.status == 403  # authenticated (not 401), but not authorized
    assert "clusterfit-controller" in json.loads(err.value.body or "{}")["message"]

    # Granting a Role proves the refusal came from RBAC and not from a broken token.
    rbac = client.RbacAuthorizationV1Api(admin_api)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="read-pods"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="read-pods"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="read-pods"),
            subjects=[
                client.RbacV1Subject(api_group="rbac.authorization.k8s.io", kind="User", name="clusterfit-controller")
            ],
        ),
    )
    deadline = time.monotonic() + 10  # the authorizer reads RBAC objects through an informer
    while True:
        try:
            assert pods.list_namespaced_pod(namespace).items == []
            break
        except ApiException as exc:
            if exc.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with pytest.raises(ApiException) as err:
        pods.list_namespaced_pod("default")  # the Role is namespaced
    assert err.value.status == 403
    controller_api.close()


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
def test_restart_apiserver_cuts_watches_and_keeps_data(
    control_plane: ControlPlane, admin_api: client.ApiClient, namespace: str, graceful: bool
) -> None:
    jobs = client.CustomObjectsApi(admin_api)
    created = cast(
        dict[str, Any],
        jobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pytorchjob("kept")),
    )
    status = {"status": {"conditions": [condition("Running", "PyTorchJobRunning", "m")]}}
    jobs.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "kept", status)
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}?watch=1&timeoutSeconds=600"
    req = urllib.request.Request(
        control_plane.server + path, headers={"Authorization": f"Bearer {control_plane.admin_token}"}
    )
    # The socket timeout (60s) is far below the watch's own 600s: only a cut ends the read in time.
    with urllib.request.urlopen(req, context=control_plane.ssl_context, timeout=60) as watch:
        first = json.loads(watch.readline())
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "kept")
        t0 = time.monotonic()
        control_plane.restart_apiserver(graceful=graceful)
        try:
            rest = watch.read()  # a graceful stop ends the stream cleanly
        except (http.client.IncompleteRead, ConnectionError):
            rest = b""  # a killed server leaves the chunked stream broken or the connection reset
    assert b'"ADDED"' not in rest
    assert time.monotonic() - t0 < 30

    again = client.CustomObjectsApi(control_plane.api_client())
    got = cast(dict[str, Any], again.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "kept"))
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    assert [c["type"] for c in got["status"]["conditions"]] == ["Running"]
    again.api_client.close()


def test_helm_reports_the_stamped_version(helm_bin: Path, tmp_path: Path) -> None:
    versions = read_versions()
    out = subprocess.run(
        [str(helm_bin), "version", "--template", "{{.Version}}"], check=True, capture_output=True, text=True
    ).stdout
    assert out == versions["HELM_VERSION"]

    # Offline rendering assumes the Kubernetes minor helm was built for, not the unstamped 1.20.
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        'data: {kube: "{{ .Capabilities.KubeVersion.Major }}.{{ .Capabilities.KubeVersion.Minor }}"}\n'
    )
    rendered = subprocess.run(
        [str(helm_bin), "template", str(chart)], check=True, capture_output=True, text=True
    ).stdout
    kube_minor = ".".join(versions["KUBERNETES_VERSION"].lstrip("v").split(".")[:2])
    assert f'kube: "{kube_minor}"' in rendered


def test_helm_talks_to_the_control_plane(
    control_plane: ControlPlane, helm_bin: Path, namespace: str, tmp_path: Path
) -> None:
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "KUBECONFIG": str(control_plane.kubeconfig_path)}
    out = subprocess.run(
        [str(helm_bin), "list", "-n", namespace, "-o", "json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out) == []
