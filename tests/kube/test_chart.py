"""The Helm chart, rendered by the real helm binary: lint, every object validated (the step jobs
its controller will create against the CRD, the rest by a real API server), bad values refused
with messages that name the problem, the test pod's check, and no credential anywhere."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusterfit.artifacts.layout import step_folders
from clusterfit.config import config_from_args
from clusterfit.kube.chart_schema import SCHEMA_PATH, render_schema
from clusterfit.kube.manifests import build_all
from tests.infra.controlplane import REPO_ROOT, ControlPlane
from tests.kube.helpers_manifests import (
    CHART,
    CI_VALUES,
    FAKE_ACCESS_KEY,
    FAKE_SECRET,
    assert_valid_pytorchjob,
    chart_objects,
    helm,
    helm_template,
    load_docs,
    render,
    rules_of,
    server_dry_run,
)

VALUES = {name: CI_VALUES / f"{name}-values.yaml" for name in ("default", "multinode", "gpu")}
REQUIRED = ["--set", "s3.secretName=clusterfit-s3", "--set", "experiment.EXPERIMENT.ROOT=s3://bucket/prefix"]
KINDS = {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job", "Pod"}


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    assert sorted(o["kind"] for o in objects) == sorted(KINDS), [o["kind"] for o in objects]
    return {o["kind"]: o for o in objects}


def experiment_file(objects: list[dict[str, Any]], path: Path) -> Path:
    """The chart's experiment config (its ConfigMap's config.yaml), written to `path`."""
    path.write_text(by_kind(objects)["ConfigMap"]["data"]["config.yaml"])
    return path


def test_values_schema_is_generated_from_the_config_models() -> None:
    committed = (REPO_ROOT / SCHEMA_PATH).read_text()
    assert committed == render_schema(), (
        f"{SCHEMA_PATH} is stale: python -m clusterfit.kube.chart_schema > {SCHEMA_PATH}"
    )


def test_values_schema_closes_every_object() -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(json.loads((REPO_ROOT / SCHEMA_PATH).read_text()), "")


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint_strict(helm_bin: Path, values: str) -> None:
    result = helm(helm_bin, "lint", "--strict", str(CHART), "-f", str(VALUES[values]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUES)
def test_template_renders_a_valid_release_and_valid_step_jobs(helm_bin: Path, values: str, tmp_path: Path) -> None:
    objects = chart_objects(helm_bin, "-f", str(VALUES[values]), release="digits", namespace="exp-ns")
    kinds = by_kind(objects)
    cfg = config_from_args([f"config={experiment_file(objects, tmp_path / 'experiment.yaml')}"])
    assert cfg.EXPERIMENT.NAME == "digits" and cfg.KUBERNETES.NAMESPACE == "exp-ns"
    assert cfg.KUBERNETES.S3_SECRET_NAME == "clusterfit-s3"
    job, config_map = kinds["Job"], kinds["ConfigMap"]
    config_map_name = config_map["metadata"]["name"]
    assert re.fullmatch(r"digits-config-[0-9a-f]{10}", config_map_name) and config_map["immutable"] is True
    assert re.fullmatch(r"digits-[0-9a-f]{8}", job["metadata"]["name"])
    assert job["metadata"]["labels"]["clusterfit.io/experiment"] == "digits"  # what `clusterfit cancel` finds
    (controller,) = job["spec"]["template"]["spec"]["containers"]
    assert controller["command"] + controller["args"] == [
        "clusterfit",
        "submit",
        "--in-cluster",
        "config=/etc/clusterfit/config.yaml",
        "--owner-configmap",
        config_map_name,
        "--wait",
    ]
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 604800
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    env = {e["name"]: e for e in controller["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "clusterfit-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert rules_of(objects) == rules_of(load_docs((REPO_ROOT / "k8s" / "controller-rbac.yaml").read_text()))
    assert kinds["Pod"]["metadata"]["annotations"]["helm.sh/hook"] == "test"
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "digits"
    # The step jobs the in-cluster controller will create from this config, rendered the same way.
    rendered = render([f"config={tmp_path / 'experiment.yaml'}", "--config-map-name", config_map_name], tmp_path / "j")
    jobs = [o for o in rendered if o["kind"] == "PyTorchJob"]
    assert [j["metadata"]["name"] for j in jobs] == [f"digits-{s}" for s in cfg.PIPELINE.STEPS]
    for step_job in jobs:
        assert_valid_pytorchjob(step_job)
        assert step_job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"][0]["configMap"] == {
            "name": config_map_name
        }
    if values != "default":
        assert jobs[0]["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


def test_the_config_names_its_configmap_and_every_value_names_the_controller_job(helm_bin: Path) -> None:
    def names(*extra: str) -> tuple[str, str]:
        kinds = by_kind(chart_objects(helm_bin, *REQUIRED, *extra))
        return kinds["ConfigMap"]["metadata"]["name"], kinds["Job"]["metadata"]["name"]

    base = names()
    assert names() == base  # the same values, the same names: an upgrade without changes changes nothing
    edited = names("--set", "experiment.EVALUATE.LINEAR_EPOCHS=7")
    assert edited[0] != base[0] and edited[1] != base[1]
    resources = names("--set", "controller.resources.limits.memory=1Gi")  # not the config: the same ConfigMap
    assert resources[0] == base[0] and resources[1] != base[1]
    rerun = names("--set", "controller.rerun=2")
    assert rerun[0] == base[0] and rerun[1] not in (base[1], resources[1])
    long_release = by_kind(
        chart_objects(helm_bin, *REQUIRED, "--set", "experiment.EXPERIMENT.NAME=digits", release="r" * 53)
    )
    assert len(long_release["Job"]["metadata"]["name"]) == 62  # within a Job name's 63


BAD_VALUES = {
    "unknown key": (REQUIRED + ["--set", "workers=2"], "additional properties 'workers' not allowed"),
    "unknown experiment key": (
        REQUIRED + ["--set", "experiment.DISTRIBUTED.NUM_WORKERS=2"],
        "at '/experiment/DISTRIBUTED': additional properties 'NUM_WORKERS' not allowed",
    ),
    "podLabels value not a string": (REQUIRED + ["--set", "podLabels.gpu=1"], "at '/podLabels/gpu'"),
    "extra volume without a name": (
        REQUIRED + ["--set", "extraVolumes[0].emptyDir.medium=Memory"],
        "at '/extraVolumes/0': missing property 'name'",
    ),
    "extra mount without a path": (
        REQUIRED + ["--set", "extraVolumeMounts[0].name=data"],
        "at '/extraVolumeMounts/0': missing property 'mountPath'",
    ),
    "negative grace period": (
        REQUIRED + ["--set", "terminationGracePeriodSeconds=-1"],
        "at '/terminationGracePeriodSeconds': minimum: got -1, want 0",
    ),
    "ephemeral storage not a quantity": (
        REQUIRED + ["--set", "experiment.KUBERNETES.RESOURCES.TRAIN.EPHEMERAL_STORAGE=lots"],
        "at '/experiment/KUBERNETES/RESOURCES/TRAIN/EPHEMERAL_STORAGE'",
    ),
    "negative worker count": (
        REQUIRED + ["--set", "experiment.DISTRIBUTED.NUM_NODES=-1"],
        "at '/experiment/DISTRIBUTED/NUM_NODES': minimum: got -1, want 1",
    ),
    "zero nodes (-1 workers)": (
        REQUIRED + ["--set", "experiment.DISTRIBUTED.NUM_NODES=0"],
        "at '/experiment/DISTRIBUTED/NUM_NODES': minimum: got 0, want 1",
    ),
    "wrong type": (REQUIRED + ["--set", "controller.backoffLimit=many"], "at '/controller/backoffLimit'"),
    "root not s3": (["--set", "s3.secretName=x"], 'experiment.EXPERIMENT.ROOT must be an s3:// URI (got "")'),
    "experiment name too long": (
        REQUIRED + ["--set", "experiment.EXPERIMENT.NAME=" + "a" * 42],
        'is too long: step job "' + "a" * 42 + '-pretrain" has 51 characters, at most 50',
    ),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_fail_with_a_message_naming_the_problem(helm_bin: Path, case: str) -> None:
    args, message = BAD_VALUES[case]
    result = helm_template(helm_bin, *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    print(f"{case}: {result.stderr.strip()}")  # the messages, for the record (pytest -s)


def test_release_name_over_53_characters_fails(helm_bin: Path) -> None:
    # helm refuses it before any template runs; the chart's own `fail` guards any other path.
    result = helm_template(helm_bin, *REQUIRED, release="r" * 54)
    assert result.returncode != 0 and "must not be longer than 53" in result.stderr, result.stderr
    ok = helm_template(helm_bin, *REQUIRED, "--set", "experiment.EXPERIMENT.NAME=exp", release="r" * 53)
    assert ok.returncode == 0, ok.stderr
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert "gt (len .Release.Name) 53" in helpers


def test_missing_pytorchjob_crd_fails_unless_the_check_is_off(helm_bin: Path) -> None:
    plain = helm(helm_bin, "template", "digits", str(CHART), *REQUIRED)  # no --api-versions: no CRD
    assert plain.returncode != 0 and "does not serve kubeflow.org/v1 PyTorchJob" in plain.stderr, plain.stderr
    skipped = helm(helm_bin, "template", "digits", str(CHART), *REQUIRED, "--set", "checks.pytorchJobCRD=false")
    assert skipped.returncode == 0, skipped.stderr


def test_no_credential_value_in_chart_output(helm_bin: Path, tmp_path: Path) -> None:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY}
    outputs = []
    for values in VALUES.values():
        result = helm(
            helm_bin,
            "template",
            "digits",
            str(CHART),
            "-f",
            str(values),
            "--api-versions",
            "kubeflow.org/v1/PyTorchJob",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        outputs += [result.stdout, result.stderr]
    assert not [o for o in outputs if FAKE_SECRET in o or FAKE_ACCESS_KEY in o]


def test_the_test_pods_check_passes_only_when_every_step_published(helm_bin: Path, tmp_path: Path) -> None:
    objects = chart_objects(helm_bin, "-f", str(VALUES["default"]))
    (check,) = by_kind(objects)["Pod"]["spec"]["containers"]
    script, config_path = check["args"]
    assert check["command"] == ["python", "-c"] and config_path == "/etc/clusterfit/config.yaml"
    # Same config, a local root instead of S3: the check is storage-agnostic.
    tree = yaml.safe_load(by_kind(objects)["ConfigMap"]["data"]["config.yaml"])
    tree["EXPERIMENT"]["ROOT"] = (tmp_path / "runs").as_uri()
    local = tmp_path / "experiment.yaml"
    local.write_text(yaml.safe_dump(tree))
    cfg = config_from_args([f"config={local}"])
    folders = [f for step in cfg.PIPELINE.STEPS for f in step_folders(cfg, step)]
    assert len(folders) == 6  # pretrain, features/train, features/test, clusters/..., train, eval

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script, str(local)], capture_output=True, text=True, cwd=tmp_path)

    for published in (0, 5, 6):
        result = check()
        if published < len(folders):
            missing = len(folders) - published
            assert result.returncode == 1, result.stdout + result.stderr
            assert f"{missing} of 6 step outputs not published" in result.stderr, result.stderr
        else:
            assert result.returncode == 0 and result.stdout.count("published") == 6, result.stdout + result.stderr
        for folder in folders[published : published + 5]:
            (tmp_path / "runs" / folder).mkdir(parents=True, exist_ok=True)
            (tmp_path / "runs" / folder / "_SUCCESS.json").write_text("{}")


def test_the_api_server_accepts_the_release(
    control_plane: ControlPlane, namespace: str, helm_bin: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig_path),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
    }
    # Against a real server: the CRD check sees the installed CRD (lookup), no --api-versions needed.
    install = helm(
        helm_bin,
        "install",
        "digits",
        str(CHART),
        "-n",
        namespace,
        "-f",
        str(VALUES["gpu"]),
        "--dry-run=server",
        env=env,
    )
    assert install.returncode == 0, install.stderr
    assert FAKE_SECRET not in install.stdout + install.stderr and FAKE_ACCESS_KEY not in install.stdout + install.stderr
    notes = install.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {namespace} logs -f job/digits" in notes and f"helm test digits -n {namespace}" in notes, notes
    objects = load_docs(install.stdout.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0])
    tests = load_docs(install.stdout.split("HOOKS:", 1)[1].split("MANIFEST:", 1)[0])
    cfg_file = experiment_file(objects + tests, tmp_path / "experiment.yaml")
    jobs = [
        o
        for o in build_all(config_from_args([f"config={cfg_file}"]), config_map_name="digits-config")
        if o["kind"] == "PyTorchJob"
    ]
    for obj in objects + tests + jobs:
        status, body = server_dry_run(control_plane, obj, namespace)
        assert status == 201, f"{obj['kind']} {obj['metadata']['name']}: {status} {body}"


def test_the_controller_jobs_command_line_reaches_clusterfit_submit(helm_bin: Path, tmp_path: Path) -> None:
    # The Job's exact argv through the real entry point (`--help` appended so nothing runs): the
    # top-level parser must hand every argument, the leading --in-cluster too, to `submit`.
    (job,) = [o for o in chart_objects(helm_bin, "-f", str(VALUES["default"])) if o["kind"] == "Job"]
    (controller,) = job["spec"]["template"]["spec"]["containers"]
    argv = [*controller["command"][1:], *controller["args"], "--help"]
    result = subprocess.run([sys.executable, "-m", "clusterfit", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "--in-cluster" in result.stdout, result.stdout + result.stderr
