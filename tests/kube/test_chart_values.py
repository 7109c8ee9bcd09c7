"""The chart's platform values, rendered by the real helm binary: workload identity (no Secret),
pod labels and annotations, extra volumes, grace period, pull secrets, name overrides, `global`;
and the values table of its README, generated from values.yaml. Where a value reaches the step
pods, the oracle is the step job built (as the controller builds it) from the chart's ConfigMap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clusterfit.config import config_from_args
from clusterfit.kube.chart_readme import README_PATH, VALUES_PATH, render_readme
from clusterfit.kube.manifests import build_step_job
from tests.infra.controlplane import REPO_ROOT
from tests.kube.helpers_manifests import assert_valid_pytorchjob, chart_objects, helm_template

ROOT = ["--set", "experiment.EXPERIMENT.ROOT=s3://bucket/prefix"]
PLATFORM = [
    *ROOT,
    "--set",
    "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/clusterfit",
    "--set",
    "podLabels.team=vision",
    "--set",
    "podAnnotations.cost-centre=ml-42",
    "--set",
    "imagePullSecrets={registry}",
    "--set",
    "terminationGracePeriodSeconds=300",
    "--set",
    "extraVolumes[0].name=datasets",
    "--set",
    "extraVolumes[0].persistentVolumeClaim.claimName=imagenet",
    "--set",
    "extraVolumeMounts[0].name=datasets",
    "--set",
    "extraVolumeMounts[0].mountPath=/datasets",
    "--set",
    "extraVolumeMounts[0].readOnly=true",
    "--set",
    "experiment.KUBERNETES.RESOURCES.TRAIN.EPHEMERAL_STORAGE=100Gi",
]


def step_job(objects: list[dict[str, Any]], tmp_path: Path, step: str) -> dict[str, Any]:
    """The step's PyTorchJob, built as the controller builds it from the chart's ConfigMap."""
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    cfg = config_from_args([f"config={path}"])
    job = build_step_job(cfg, step, config_map_name=config_map["metadata"]["name"])
    assert_valid_pytorchjob(job)
    return job


def master_pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]


def test_readme_values_table_is_generated_from_values_yaml() -> None:
    readme = (REPO_ROOT / README_PATH).read_text()
    expected = render_readme(readme, (REPO_ROOT / VALUES_PATH).read_text())
    assert readme == expected, f"{README_PATH} is stale: python -m clusterfit.kube.chart_readme"
    for key in ("s3.secretName", "podLabels", "extraVolumeMounts", "global", "controller.extraVolumes"):
        assert f"| `{key}` |" in readme


def test_without_a_secret_name_no_pod_references_a_secret(helm_bin: Path, tmp_path: Path) -> None:
    objects = chart_objects(helm_bin, *ROOT)
    assert "secretKeyRef" not in json.dumps(objects)
    jobs = [step_job(objects, tmp_path, step) for step in ("pretrain", "cluster", "train")]
    assert "secretKeyRef" not in json.dumps(jobs) and "AWS_SECRET_ACCESS_KEY" not in json.dumps(jobs)


def test_platform_values_reach_the_controller_pod_and_the_step_pods(helm_bin: Path, tmp_path: Path) -> None:
    objects = chart_objects(helm_bin, *PLATFORM)
    kinds = {o["kind"]: o for o in objects}
    annotations = kinds["ServiceAccount"]["metadata"]["annotations"]
    assert annotations == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/clusterfit"}
    controller = kinds["Job"]["spec"]["template"]
    assert controller["metadata"]["labels"]["team"] == "vision"
    assert controller["metadata"]["annotations"]["cost-centre"] == "ml-42"
    assert controller["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert kinds["Pod"]["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    train = master_pod(step_job(objects, tmp_path, "train"))
    assert train["metadata"]["labels"]["team"] == "vision"
    assert train["metadata"]["labels"]["app.kubernetes.io/component"] == "train"
    assert train["metadata"]["annotations"] == {"cost-centre": "ml-42"}
    spec = train["spec"]
    assert spec["terminationGracePeriodSeconds"] == 300
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert {"name": "datasets", "persistentVolumeClaim": {"claimName": "imagenet"}} in spec["volumes"]
    (container,) = spec["containers"]
    assert {"name": "datasets", "mountPath": "/datasets", "readOnly": True} in container["volumeMounts"]
    assert container["resources"]["limits"]["ephemeral-storage"] == "100Gi"
    assert container["resources"]["requests"]["ephemeral-storage"] == "100Gi"
    assert "secretKeyRef" not in json.dumps(train)


def test_step_pods_get_a_grace_period_for_their_checkpoint_by_default(helm_bin: Path, tmp_path: Path) -> None:
    objects = chart_objects(helm_bin, *ROOT)
    assert master_pod(step_job(objects, tmp_path, "pretrain"))["spec"]["terminationGracePeriodSeconds"] == 120


def test_controller_extra_volumes_and_resources_pass_through(helm_bin: Path) -> None:
    objects = chart_objects(
        helm_bin,
        *ROOT,
        "--set",
        "controller.extraVolumes[0].name=ca",
        "--set",
        "controller.extraVolumes[0].configMap.name=corp-ca",
        "--set",
        "controller.extraVolumeMounts[0].name=ca",
        "--set",
        "controller.extraVolumeMounts[0].mountPath=/etc/ssl/corp",
        "--set",
        "controller.resources.limits.ephemeral-storage=1Gi",
    )
    (job,) = [o for o in objects if o["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    assert {"name": "ca", "configMap": {"name": "corp-ca"}} in spec["volumes"]
    (container,) = spec["containers"]
    assert {"name": "ca", "mountPath": "/etc/ssl/corp"} in container["volumeMounts"]
    assert container["resources"]["limits"]["ephemeral-storage"] == "1Gi"


def test_name_overrides_and_global_values(helm_bin: Path) -> None:
    objects = chart_objects(
        helm_bin, *ROOT, "--set", "fullnameOverride=exp7", "--set", "nameOverride=fit", "--set", "global.region=eu"
    )
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ServiceAccount", "exp7-controller") in names
    assert {kind for kind, name in names if name.startswith("exp7-")} >= {"Job", "ConfigMap", "Role", "Pod"}
    assert {o["metadata"]["labels"]["app.kubernetes.io/name"] for o in objects} == {"fit"}


def test_global_is_accepted_but_other_unknown_keys_are_not(helm_bin: Path) -> None:
    assert helm_template(helm_bin, *ROOT, "--set", "global.imageRegistry=mirror").returncode == 0
    refused = helm_template(helm_bin, *ROOT, "--set", "globals.x=1")
    assert refused.returncode != 0 and "additional properties 'globals' not allowed" in refused.stderr
