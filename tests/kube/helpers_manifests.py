"""Shared helpers of the Kubernetes delivery tests (render, chart, images).

The PyTorchJob oracle is the CRD's own openAPIV3Schema, made strict: Kubernetes prunes unknown
fields of a structural schema silently, and a typo that silently vanishes is the bug we want to
see, so every object schema that lists its properties (and does not preserve unknown fields)
gets `additionalProperties: false`.
"""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from clusterfit.kube.manifests import validate_job
from clusterfit.kube.render import cli_render
from tests.infra.controlplane import REPO_ROOT, ControlPlane, shared_dir

CHART = REPO_ROOT / "helm" / "clusterfit"
CI_VALUES = CHART / "ci"
CRD_FILE = shared_dir() / "crds" / "kubeflow.org_pytorchjobs.yaml"
PYTORCHJOB_API = "kubeflow.org/v1/PyTorchJob"
# Fake credentials: set in the environment while rendering, they must appear in no output.
FAKE_SECRET = "test-secret-value-123"
FAKE_ACCESS_KEY = "test-access-key-456"
# kind -> (API path prefix, plural, namespaced)
API_PATHS = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Pod": ("/api/v1", "pods", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "PyTorchJob": ("/apis/kubeflow.org/v1", "pytorchjobs", True),
}


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object with `properties` and no
    x-kubernetes-preserve-unknown-fields rejects keys it does not list."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def pytorchjob_validator() -> jsonschema.Draft7Validator:
    """The strict validator of kubeflow.org/v1 PyTorchJob, from the CRD in ../shared/crds/."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = close_objects(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(job: dict[str, Any]) -> list[str]:
    """Every place `job` breaks the strict CRD schema, as 'path: message'."""
    errors = pytorchjob_validator().iter_errors(job)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors)


def assert_valid_pytorchjob(job: dict[str, Any]) -> None:
    """The CRD schema (strict) and the operator's webhook rules both accept `job`."""
    errors = crd_errors(job)
    assert not errors, f"{job['metadata']['name']} breaks the CRD schema:\n" + "\n".join(errors)
    validate_job(job)


def load_docs(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of `text`."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(args: list[str], out: Path) -> list[dict[str, Any]]:
    """`clusterfit render <args> --out <out>` in-process; the objects it wrote, in file order."""
    assert cli_render([*args, "--out", str(out)]) == 0
    return [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]


def helm(helm_bin: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real helm binary; never raises on a non-zero exit (tests read the message)."""
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120, env=env)


def helm_template(
    helm_bin: Path, *args: str, release: str = "digits", namespace: str = "clusterfit"
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart, telling it the cluster serves PyTorchJob (as the install check wants)."""
    return helm(
        helm_bin, "template", release, str(CHART), "--namespace", namespace, "--api-versions", PYTORCHJOB_API, *args
    )


def chart_objects(
    helm_bin: Path, *args: str, release: str = "digits", namespace: str = "clusterfit"
) -> list[dict[str, Any]]:
    """The objects `helm template` renders (failing the test with helm's message if it fails)."""
    result = helm_template(helm_bin, *args, release=release, namespace=namespace)
    assert result.returncode == 0, result.stderr
    return load_docs(result.stdout)


def server_dry_run(cp: ControlPlane, obj: dict[str, Any], namespace: str) -> tuple[int, Any]:
    """Create `obj` in `namespace` with dryRun=All and fieldValidation=Strict: the API server runs
    its full validation (and rejects unknown fields) but stores nothing."""
    prefix, plural, namespaced = API_PATHS[obj["kind"]]
    obj = copy.deepcopy(obj)
    if namespaced:
        obj["metadata"]["namespace"] = namespace
    where = f"/namespaces/{namespace}" if namespaced else ""
    return cp.request("POST", f"{prefix}{where}/{plural}?dryRun=All&fieldValidation=Strict", body=obj)


def rules_of(docs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs} of the one Role in `docs`."""
    (role,) = [d for d in docs if d["kind"] == "Role"]
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out
