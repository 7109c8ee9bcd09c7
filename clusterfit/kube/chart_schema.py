"""The Helm chart's values.schema.json, generated from the pydantic config: one source of truth.

    python -m clusterfit.kube.chart_schema > helm/clusterfit/values.schema.json

`experiment` is the experiment config itself (Config.model_json_schema() reduced to its structure,
its $defs hoisted to the top so its $refs resolve; `clusterfit config schema` has the documented
one); the chart's own values are declared here. Every object schema that
lists properties rejects unknown keys, so a typo fails `helm install` instead of being ignored.
tests/kube/test_chart.py fails when the committed file differs from what this module prints.
"""

from __future__ import annotations

import json
from typing import Any

from clusterfit.config import Config

SCHEMA_PATH = "helm/clusterfit/values.schema.json"


def _obj(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": False, "properties": properties}


def _str(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _int(description: str, minimum: int, nullable: bool = False) -> dict[str, Any]:
    return {"type": ["integer", "null"] if nullable else "integer", "minimum": minimum, "description": description}


def _open_map(description: str) -> dict[str, Any]:
    """A Kubernetes object passed through as is (resources, nodeSelector): keys are not ours to close."""
    return {"type": "object", "description": description}


def _names(description: str) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string", "minLength": 1}, "description": description}


def _string_map(description: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}, "description": description}


def _objects(description: str, required: list[str]) -> dict[str, Any]:
    """A list of Kubernetes objects passed through (volumes, mounts): only their required keys are ours."""
    return {"type": "array", "items": {"type": "object", "required": required}, "description": description}


def controller_schema() -> dict[str, Any]:
    image = _obj(
        "The controller image (docker/Dockerfile.controller).",
        {
            "repository": _str("Image repository.", minLength=1),
            "tag": _str("Image tag; empty: the chart's appVersion."),
            "pullPolicy": _str("Image pull policy.", enum=["Always", "IfNotPresent", "Never"]),
        },
    )
    return _obj(
        "The Job that runs `clusterfit submit --in-cluster`: it creates the step PyTorchJobs one by one.",
        {
            "image": image,
            "imagePullSecrets": _names("Names of docker-registry Secrets for the controller and test pods."),
            "resources": _open_map("Kubernetes resources of the controller container."),
            "backoffLimit": _int("Retries of the controller pod; a rerun resumes from the step jobs that exist.", 0),
            "activeDeadlineSeconds": _int("The whole pipeline must finish within this many seconds.", 1),
            "ttlSecondsAfterFinished": _int(
                "Delete the finished controller Job after this many seconds; null: keep it.", 0, nullable=True
            ),
            "nodeSelector": _string_map("nodeSelector of the controller pod."),
            "tolerations": {
                "type": "array",
                "items": {"type": "object"},
                "description": "Tolerations of the controller pod.",
            },
            "extraVolumes": _objects("Extra volumes of the controller pod.", ["name"]),
            "extraVolumeMounts": _objects("Extra volumeMounts of the controller container.", ["name", "mountPath"]),
            "rerun": {
                "type": ["string", "integer"],
                "description": "Any new value starts a new controller Job: how a failed experiment is retried once "
                "its failed step's job is deleted (clusterfit cancel config=... STEP).",
            },
        },
    )


def pod_values_schema() -> dict[str, Any]:
    """The release-wide pod values; the chart passes them on to the step pods through the config."""
    return {
        "serviceAccount": _obj(
            "The controller's ServiceAccount.",
            {"annotations": _string_map("Its annotations (workload identity: eks.amazonaws.com/role-arn, ...).")},
        ),
        "podLabels": _string_map("Extra labels on the controller and step pods."),
        "podAnnotations": _string_map("Extra annotations on the controller and step pods."),
        "imagePullSecrets": _names("Names of docker-registry Secrets for every pod."),
        "extraVolumes": _objects("Extra volumes of the step pods.", ["name"]),
        "extraVolumeMounts": _objects("Extra volumeMounts of the step container.", ["name", "mountPath"]),
        "terminationGracePeriodSeconds": _int(
            "Seconds from SIGTERM to SIGKILL for step pods; null: the experiment's.", 0, nullable=True
        ),
        "nameOverride": _str("Replaces the chart name in the app.kubernetes.io/name label."),
        "fullnameOverride": _str("Prefix of the chart's objects (the controller Job: <it>-<revision>)."),
        "global": {"type": "object", "description": "Values shared with a parent chart (unused)."},
    }


def structure_only(node: Any) -> Any:
    """A pydantic schema without titles, descriptions and defaults: what helm checks (keys, types,
    bounds) stays, and the chart's schema changes only when the config's structure does."""
    if isinstance(node, list):
        return [structure_only(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("title", "description", "default"):
            continue
        if key in ("properties", "$defs"):  # maps of names to schemas: keep every name
            out[key] = {name: structure_only(schema) for name, schema in value.items()}
        else:
            out[key] = structure_only(value)
    return out


def values_schema() -> dict[str, Any]:
    """The JSON schema of the chart's values."""
    config = structure_only(Config.model_json_schema())
    defs = config.pop("$defs")
    config["description"] = "The experiment config, as in configs/*.yaml (EXPERIMENT.ROOT must be s3://)."
    properties = {
        "experiment": config,
        "s3": _obj(
            "Object storage credentials, by reference only.",
            {
                "secretName": _str(
                    "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (see k8s/s3-secret.example.yaml); "
                    "empty: no credentials in any pod (workload identity)."
                )
            },
        ),
        **pod_values_schema(),
        "controller": controller_schema(),
        "checks": _obj(
            "Early failures at install time.",
            {
                "pytorchJobCRD": {
                    "type": "boolean",
                    "description": "Fail unless the kubeflow.org/v1 PyTorchJob CRD is served "
                    "(off for offline rendering).",
                }
            },
        ),
        "tests": _obj("The `helm test` pod.", {"image": _str("Image of the test pod; empty: the controller image.")}),
    }
    schema = _obj("Values of the clusterfit chart: one release per experiment.", properties)
    schema["$defs"] = defs
    return schema


def render_schema() -> str:
    """The schema as the committed file holds it."""
    return json.dumps(values_schema(), indent=2) + "\n"


if __name__ == "__main__":
    print(render_schema(), end="")
