"""`clusterfit render` and the PyTorchJob builder: every job the real CRD schema (strict) and the
operator's webhook rules accept, the pod shape each setting promises, clear refusals, no secrets."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusterfit.config import ConfigError, config_from_args
from clusterfit.kube.manifests import (
    HASH_ANNOTATION,
    ManifestError,
    build_all,
    build_config_map,
    build_step_job,
    job_name,
    spec_hash,
)
from tests.infra.controlplane import REPO_ROOT, ControlPlane
from tests.kube.helpers_controller import EXPECTED_RULES
from tests.kube.helpers_manifests import (
    CI_VALUES,
    FAKE_ACCESS_KEY,
    FAKE_SECRET,
    assert_valid_pytorchjob,
    chart_objects,
    crd_errors,
    load_docs,
    render,
    rules_of,
    server_dry_run,
)

EXAMPLE = ["config=kubernetes-example"]
MULTINODE = [*EXAMPLE, "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=4"]
GPU = [
    *MULTINODE,
    *(f"config.KUBERNETES.RESOURCES.{s}.GPUS=4" for s in ("PRETRAIN", "EXTRACT", "TRAIN", "EVALUATE")),
    "config.KUBERNETES.RESOURCES.CLUSTER.GPUS=1",
    "config.KUBERNETES.NODE_SELECTOR={nvidia.com/gpu.present: 'true'}",
    "config.KUBERNETES.TOLERATIONS=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "config.KUBERNETES.AFFINITY={nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
    "{nodeSelectorTerms: [{matchExpressions: [{key: gpu, operator: In, values: [h100]}]}]}}}",
    "config.KUBERNETES.PRIORITY_CLASS_NAME=training",
    "config.KUBERNETES.SCHEDULER_NAME=volcano",
    "config.KUBERNETES.QUEUE_NAME=gpu-queue",
    "config.KUBERNETES.IMAGE_PULL_SECRETS=[registry]",
    "config.KUBERNETES.SERVICE_ACCOUNT=steps",
    "config.KUBERNETES.TTL_SECONDS_AFTER_FINISHED=86400",
    "config.KUBERNETES.RESTART_POLICY=ExitCode",
    "config.KUBERNETES.ENV={NCCL_DEBUG: INFO, NCCL_IB_DISABLE: '1'}",
    "config.STORAGE.S3.ENDPOINT_URL=http://minio:9000",
    "config.STORAGE.S3.REGION=eu-west-1",
]
VARIANTS = {"default": EXAMPLE, "multinode": MULTINODE, "gpu": GPU}


def jobs_of(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == "PyTorchJob"]


def container(job: dict[str, Any], replica: str = "Master") -> dict[str, Any]:
    (c,) = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_job_passes_the_crd_schema_and_webhook_rules(variant: str, tmp_path: Path) -> None:
    objects = render(VARIANTS[variant], tmp_path)
    steps = config_from_args(VARIANTS[variant]).PIPELINE.STEPS
    assert [p.name for p in sorted(tmp_path.glob("*.yaml"))] == ["00-configmap.yaml"] + [
        f"{i:02d}-{s}.yaml" for i, s in enumerate(steps, 1)
    ]
    assert objects[0]["kind"] == "ConfigMap" and len(jobs_of(objects)) == len(steps) == 5
    for job in jobs_of(objects):
        assert_valid_pytorchjob(job)
        assert job["metadata"]["annotations"][HASH_ANNOTATION] == spec_hash(job)


def test_strict_schema_catches_what_kubernetes_would_prune(tmp_path: Path) -> None:
    # The oracle itself: a misspelt pod-spec key and a wrong type must both be reported.
    job = jobs_of(render(EXAMPLE, tmp_path))[0]
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeSelectr"] = {"a": "b"}
    bad["spec"]["runPolicy"]["backoffLimit"] = "three"
    errors = crd_errors(bad)
    assert any("nodeSelectr" in e for e in errors) and any("backoffLimit" in e for e in errors), errors


def test_multinode_gpu_job_shape(tmp_path: Path) -> None:
    jobs = {j["metadata"]["name"]: j for j in jobs_of(render(GPU, tmp_path))}
    train, cluster = jobs["quickstart-train"], jobs["quickstart-cluster"]
    replicas = train["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert train["spec"]["nprocPerNode"] == "4"
    c = container(train, "Worker")
    assert c["name"] == "pytorch" and c["image"] == "clusterfit/clusterfit:0.1.0-cpu"
    assert c["command"] == [
        "python",
        "-m",
        "clusterfit.launch",  # torchrun in-process, exiting 143 on SIGTERM (retryable under ExitCode), not 1
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-conf=timeout=600",  # DISTRIBUTED.TIMEOUT_S
        "-m",
        "clusterfit",
        "train",
        "config=/etc/clusterfit/config.yaml",
        "--no-lease",  # the controller holds the experiment's Lease
    ]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"name": "CLUSTERFIT_GPUS", "value": "4"} in c["env"]  # a pod without them fails at start
    assert {"name": "CLUSTERFIT_GPUS", "value": "1"} in container(cluster)["env"]
    assert not [e for e in container(jobs_of(render(EXAMPLE, tmp_path))[0])["env"] if e["name"] == "CLUSTERFIT_GPUS"]
    assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in c["ports"]
    pod = replicas["Worker"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    name = build_config_map(config_from_args(GPU))["metadata"]["name"]
    assert {"name": "config", "configMap": {"name": name}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert (
        pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    assert (
        pod["affinity"]["nodeAffinity"] and pod["priorityClassName"] == "training" and pod["schedulerName"] == "volcano"
    )
    assert pod["serviceAccountName"] == "steps" and pod["imagePullSecrets"] == [{"name": "registry"}]
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert train["spec"]["runPolicy"] == {
        "cleanPodPolicy": "Running",
        "backoffLimit": 2,
        "activeDeadlineSeconds": 7200,
        "ttlSecondsAfterFinished": 86400,
        "schedulingPolicy": {"minAvailable": 2, "queue": "gpu-queue", "priorityClass": "training"},
    }
    assert replicas["Worker"]["restartPolicy"] == "ExitCode"
    env = {e["name"]: e for e in c["env"]}
    assert env["NCCL_DEBUG"]["value"] == "INFO" and env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    for job in (train, cluster):
        for key, value in {"app.kubernetes.io/name": "clusterfit", "app.kubernetes.io/instance": "quickstart"}.items():
            assert job["metadata"]["labels"][key] == value
            assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"][key] == value
    # cluster: its own torch-free image, one process per pod (its ranks meet through storage), 1 GPU
    assert (
        cluster["spec"]["nprocPerNode"] == "1"
        and container(cluster)["image"] == "clusterfit/clusterfit-cluster:0.1.0-cpu"
    )
    assert container(cluster)["command"] == [
        "python",
        "-m",
        "clusterfit.launch",
        "clusterfit",
        "cluster",
        "config=/etc/clusterfit/config.yaml",
        "--no-lease",
    ]
    assert cluster["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


def test_single_node_job_has_no_workers_and_runs_the_step_directly() -> None:
    job = build_step_job(config_from_args(EXAMPLE), "extract", config_map_name="cm")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    launch = ["python", "-m", "clusterfit.launch", "clusterfit"]  # exits 143 on SIGTERM (Python as PID 1 would not)
    assert container(job)["command"] == [*launch, "extract", "config=/etc/clusterfit/config.yaml", "--no-lease"]
    backend = config_from_args([*EXAMPLE, "config.CLUSTERFIT.CLUSTER_BACKEND=torch"])
    assert container(build_step_job(backend, "cluster", config_map_name="cm"))["image"] == backend.KUBERNETES.IMAGE


def test_torchrun_command_gives_every_process_its_rank_under_the_operators_env(tmp_path: Path) -> None:
    """Run the rendered command for 2 nodes x 2 processes with the env the training operator sets
    (its pkg/controller.v1/pytorch/envvar.go: MASTER_*, PET_MASTER_*, PET_NODE_RANK, PET_NNODES,
    PET_NPROC_PER_NODE, WORLD_SIZE, RANK), a probe module in place of the step."""
    job = build_step_job(
        config_from_args([*EXAMPLE, "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"]),
        "train",
        config_map_name="cm",
    )
    command = container(job)["command"]
    module_at = len(command) - 1 - command[::-1].index("-m")  # the last -m names the step's module
    probe = [sys.executable, *command[1 : module_at + 1], "probe_rank", str(tmp_path)]
    (tmp_path / "probe_rank.py").write_text(
        "import json, os, sys\n"
        "keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')\n"
        "seen = {k: os.environ.get(k) for k in keys}\n"
        "open(os.path.join(sys.argv[1], 'rank-%s.json' % seen['RANK']), 'w').write(json.dumps(seen))\n"
    )
    nodes, nproc = 1 + job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"], job["spec"]["nprocPerNode"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for node in range(nodes):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PET_MASTER_ADDR="127.0.0.1",
            PET_MASTER_PORT=port,
            WORLD_SIZE=str(nodes * int(nproc)),
            RANK=str(node),
            PET_NODE_RANK=str(node),
            PET_NNODES=str(nodes),
            PET_NPROC_PER_NODE=nproc,
            PYTHONPATH=str(tmp_path),
            OMP_NUM_THREADS="1",
        )
        procs.append(subprocess.Popen(probe, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]
    assert [s["WORLD_SIZE"] for s in seen] == ["4"] * 4
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "0", "1"]
    assert all(s["MASTER_ADDR"] == "127.0.0.1" for s in seen)


def test_no_credential_value_in_any_rendered_output(tmp_path: Path) -> None:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY}
    cli = [sys.executable, "-m", "clusterfit", "render", *GPU]
    files = subprocess.run([*cli, "--out", str(tmp_path)], env=env, capture_output=True, text=True, check=True)
    stdout = subprocess.run([*cli, "--stdout"], env=env, capture_output=True, text=True, check=True)
    texts = [files.stdout, files.stderr, stdout.stdout, stdout.stderr] + [p.read_text() for p in tmp_path.iterdir()]
    for text in texts:
        assert FAKE_SECRET not in text and FAKE_ACCESS_KEY not in text
    for job in jobs_of(load_docs(stdout.stdout)):
        env_vars = {e["name"]: e for e in container(job)["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env_vars[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "clusterfit-s3", "key": key}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("config.KUBERNETES.ENV={AWS_SECRET_ACCESS_KEY: x}", "AWS_SECRET_ACCESS_KEY is a credential"),
        ("config.KUBERNETES.ENV={RANK: '0'}", "RANK is set by the training operator or torchrun"),
        ("config.KUBERNETES.ENV={PET_NNODES: '2'}", "PET_NNODES is set by the training operator"),
        ("config.KUBERNETES.RESOURCES.TRAIN.MEMORY=lots", "KUBERNETES.RESOURCES.TRAIN.MEMORY"),
        ("config.KUBERNETES.CLEAN_POD_POLICY=Sometimes", "KUBERNETES.CLEAN_POD_POLICY"),
    ],
)
def test_bad_kubernetes_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_args([*EXAMPLE, override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["config.EXPERIMENT.NAME=" + "a" * 42],
            "EXPERIMENT.NAME 'aaaa.*' is too long: job name .* has 51 characters, at most 50",
        ),
        (["config.EXPERIMENT.NAME=My_Exp"], "EXPERIMENT.NAME 'My_Exp' cannot name Kubernetes objects"),
        (["config.EXPERIMENT.NAME=1exp"], "EXPERIMENT.NAME '1exp' cannot name"),
        (
            ["config.EXPERIMENT.ROOT=file:///data/runs"],
            "EXPERIMENT.ROOT must be an s3:// URI on Kubernetes, got file:///data/runs",
        ),
        (["config.EXPERIMENT.ROOT="], "EXPERIMENT.ROOT must be an s3:// URI on Kubernetes, got ''"),
        (
            ["config.DISTRIBUTED.NUM_PROC_PER_NODE=4", "config.KUBERNETES.RESOURCES.TRAIN.GPUS=2"],
            "KUBERNETES.RESOURCES.TRAIN.GPUS=2 is less than DISTRIBUTED.NUM_PROC_PER_NODE=4",
        ),
    ],
)
def test_configs_that_cannot_become_jobs_are_refused(
    overrides: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = config_from_args([*EXAMPLE, *overrides])
    with pytest.raises(ManifestError, match=message):
        build_all(cfg, config_map_name="cm")
    from clusterfit.kube.render import cli_render

    assert cli_render([*EXAMPLE, *overrides, "--out", str(tmp_path)]) == 2
    assert "clusterfit render: error:" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_job_names_up_to_50_characters_pass() -> None:
    cfg = config_from_args([*EXAMPLE, "config.EXPERIMENT.NAME=" + "a" * 41])
    assert len(job_name(cfg, "evaluate")) == 50
    assert_valid_pytorchjob(build_step_job(cfg, "evaluate", config_map_name="cm"))


def _valid_job() -> dict[str, Any]:
    return build_step_job(config_from_args(MULTINODE), "train", config_map_name="cm")


def _set(path: str, value: Any) -> Any:
    def mutate(job: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = job
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is ...:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value

    return mutate


MASTER = "spec/pytorchReplicaSpecs/Master"
WEBHOOK_CASES = {
    "master-replicas": (_set(f"{MASTER}/replicas", 2), "spec.pytorchReplicaSpecs.Master.replicas: must be 1, got 2"),
    "no-master": (_set(MASTER, ...), "spec.pytorchReplicaSpecs.Master: required"),
    "worker-replicas": (
        _set("spec/pytorchReplicaSpecs/Worker/replicas", 0),
        "Worker.replicas: must be at least 1, got 0",
    ),
    "replica-type": (_set("spec/pytorchReplicaSpecs/Chief", {"replicas": 1}), "Chief: unknown replica type"),
    "container-name": (
        _set(f"{MASTER}/template/spec/containers/0/name", "main"),
        "must have a container named 'pytorch'",
    ),
    "image": (_set(f"{MASTER}/template/spec/containers/0/image", ""), "containers[0].image: required"),
    "restart": (_set(f"{MASTER}/restartPolicy", "Sometimes"), "Master.restartPolicy: 'Sometimes' is not one of"),
    "clean-pod": (_set("spec/runPolicy/cleanPodPolicy", "Some"), "spec.runPolicy.cleanPodPolicy: 'Some' is not one of"),
    "backoff": (_set("spec/runPolicy/backoffLimit", -1), "spec.runPolicy.backoffLimit: must be a non-negative integer"),
    "managed-by": (_set("spec/runPolicy/managedBy", "me"), "spec.runPolicy.managedBy: 'me' is not one of"),
    "nproc-int": (_set("spec/nprocPerNode", 4), "spec.nprocPerNode: 4 must be a string"),
    "elastic-nproc": (
        _set("spec/elasticPolicy", {"nProcPerNode": 4}),
        "elasticPolicy.nProcPerNode: must not be used with",
    ),
    "name-long": (_set("metadata/name", "a" * 51), "51 characters, at most 50"),
    "name-dns": (_set("metadata/name", "Train_1"), "must be a DNS-1035 label"),
    "secret-value": (
        _set(f"{MASTER}/template/spec/containers/0/env/1", {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
        "env.AWS_SECRET_ACCESS_KEY: a credential must come from a Secret",
    ),
}


@pytest.mark.parametrize("case", WEBHOOK_CASES)
def test_webhook_rule_violations_raise_clear_errors(case: str) -> None:
    from clusterfit.kube.manifests import validate_job

    mutate, message = WEBHOOK_CASES[case]
    job = _valid_job()
    validate_job(job)
    mutate(job)
    with pytest.raises(ManifestError) as info:
        validate_job(job)
    assert message in str(info.value), str(info.value)


def test_spec_hash_covers_the_job_but_not_itself() -> None:
    cfg = config_from_args(MULTINODE)
    job = build_step_job(cfg, "train", config_map_name="cm")
    again = build_step_job(config_from_args(MULTINODE), "train", config_map_name="cm")
    assert job == again and spec_hash(job) == job["metadata"]["annotations"][HASH_ANNOTATION]
    job["metadata"]["annotations"][HASH_ANNOTATION] = "something else"
    assert spec_hash(job) == spec_hash(again)
    changed = build_step_job(
        config_from_args([*MULTINODE, "config.OPTIMIZER.NUM_EPOCHS=3"]), "train", config_map_name="cm"
    )
    # The config is in the ConfigMap, yet a job from another config must not pass for this one.
    assert spec_hash(changed) != spec_hash(again)
    assert build_step_job(cfg, "train", config_map_name="cm", owner=OWNER)["metadata"]["ownerReferences"] == [OWNER]
    # What does not decide what the pods do: the owner (a rendered job has none), the ConfigMap's name (it
    # follows every key), keys the step does not read. What does: a key the step reads.
    owned = build_step_job(cfg, "train", config_map_name="other-cm", owner=OWNER)
    assert spec_hash(owned) == spec_hash(job)
    evaluate = config_from_args([*MULTINODE, "config.EVALUATE.PROTOCOL=vissl_linear"])
    assert spec_hash(build_step_job(evaluate, "train", config_map_name="cm")) == spec_hash(job)
    assert spec_hash(build_step_job(evaluate, "evaluate", config_map_name="cm")) != spec_hash(
        build_step_job(cfg, "evaluate", config_map_name="cm")
    )


OWNER = {"apiVersion": "v1", "kind": "ConfigMap", "name": "quickstart-config", "uid": "1234"}


def test_committed_quickstart_manifests_are_current(tmp_path: Path) -> None:
    committed = REPO_ROOT / "k8s" / "quickstart"
    render(EXAMPLE, tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    stale = {p.name: p.read_text() for p in committed.iterdir()}
    fix = "clusterfit render config=kubernetes-example --out k8s/quickstart"
    assert sorted(fresh) == sorted(stale), f"k8s/quickstart is out of date: run `{fix}`"
    for name, text in fresh.items():
        body = text.split("\n", 2)[2]  # past the header naming the command line
        assert body == stale[name].split("\n", 2)[2], f"k8s/quickstart/{name} is out of date: run `{fix}`"


def test_k8s_examples_hold_no_secrets_and_the_controllers_exact_rules() -> None:
    secret = yaml.safe_load((REPO_ROOT / "k8s" / "s3-secret.example.yaml").read_text())
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"}
    rbac = load_docs((REPO_ROOT / "k8s" / "controller-rbac.yaml").read_text())
    assert {d["kind"] for d in rbac} == {"ServiceAccount", "Role", "RoleBinding"}
    assert rules_of(rbac) == EXPECTED_RULES["controller"]
    user = load_docs((REPO_ROOT / "k8s" / "user-rbac.yaml").read_text())
    assert {d["kind"] for d in user} == {"Role", "RoleBinding"}
    assert rules_of(user) == EXPECTED_RULES["user"]
    namespace = yaml.safe_load((REPO_ROOT / "k8s" / "namespace.yaml").read_text())["metadata"]["name"]
    assert namespace == config_from_args(EXAMPLE).KUBERNETES.NAMESPACE
    assert {d["metadata"]["namespace"] for d in rbac + user} == {namespace}


def test_the_api_server_accepts_every_rendered_and_example_object(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    objects = render(GPU, tmp_path / "gpu") + render(EXAMPLE, tmp_path / "default")
    for name in ("namespace.yaml", "controller-rbac.yaml", "s3-secret.example.yaml"):
        objects += load_docs((REPO_ROOT / "k8s" / name).read_text())
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj = {**obj, "metadata": {**obj["metadata"], "name": f"{namespace}-x"}}
        if obj["kind"] == "RoleBinding":
            obj["subjects"][0]["namespace"] = namespace
        status, body = server_dry_run(control_plane, obj, namespace)
        assert status == 201, f"{obj['kind']} {obj['metadata']['name']}: {status} {body}"
    # The server is strict too: an unknown field in a job is an error, not silently dropped.
    bad = copy.deepcopy(jobs_of(objects)[0])
    bad["spec"]["runPolicy"]["backofLimit"] = 1
    status, body = server_dry_run(control_plane, bad, namespace)
    assert status >= 400 and "backofLimit" in str(body), body


# The training operator v1.9's built-in init-container template (pkg/controller.v1/pytorch/initcontainer.go):
# no securityContext, so it runs as the image's user (root in busybox/alpine).
OPERATOR_DEFAULT_INIT = """
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits: {cpu: 100m, memory: 20Mi}
    requests: {cpu: 50m, memory: 10Mi}
  command: ['sh', '-c', 'until nslookup {{.MasterAddr}}; do sleep 2; done']
"""
INIT_TEMPLATE = REPO_ROOT / "k8s" / "training-operator" / "initContainer.yaml"


def injected_init_containers(template: str, master: str) -> list[dict[str, Any]]:
    """What the operator adds to a Worker pod from an init-container template (its Go template fields)."""
    values = {"{{.InitContainerImage}}": "busybox:1.36", "{{.MaxTries}}": "100", "{{.MasterAddr}}": master}
    for field_, value in values.items():
        template = template.replace(field_, value)
    return list(yaml.safe_load(template))


def as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": copy.deepcopy(template["spec"])}


def test_every_pod_we_create_is_admitted_by_a_restricted_namespace(
    control_plane: ControlPlane, namespace: str, helm_bin: Path, tmp_path: Path
) -> None:
    # The API server's PodSecurity admission is the oracle: it enforces the standard the label names.
    labels = {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    status, body = control_plane.request(
        "PATCH", f"/api/v1/namespaces/{namespace}", labels, content_type="application/merge-patch+json"
    )
    assert status == 200, body
    pods: list[dict[str, Any]] = []
    for job in [o for o in render(MULTINODE, tmp_path / "multinode") if o["kind"] == "PyTorchJob"]:
        name, replicas = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]
        pods.append(as_pod(replicas["Master"]["template"], f"{name}-master-0"))
        worker = as_pod(replicas["Worker"]["template"], f"{name}-worker-0")
        worker["spec"]["initContainers"] = injected_init_containers(INIT_TEMPLATE.read_text(), f"{name}-master-0")
        pods.append(worker)
    chart = chart_objects(helm_bin, "-f", str(CI_VALUES / "default-values.yaml"))
    (controller_job,) = [o for o in chart if o["kind"] == "Job"]
    pods.append(as_pod(controller_job["spec"]["template"], "controller"))
    pods += [o for o in chart if o["kind"] == "Pod"]  # the chart's `helm test` pod
    for pod in pods:
        status, body = server_dry_run(control_plane, pod, namespace)
        assert status == 201, f"pod {pod['metadata']['name']}: {status} {body}"
    # With the operator's own template, the Worker pods of every multi-node job would be refused.
    worker = copy.deepcopy(pods[1])
    worker["spec"]["initContainers"] = injected_init_containers(OPERATOR_DEFAULT_INIT, "x-master-0")
    status, body = server_dry_run(control_plane, worker, namespace)
    assert status == 403 and "init-pytorch" in str(body) and "runAsNonRoot" in str(body), body


def test_worker_pods_leave_the_operators_init_container_free_to_run_as_its_image_user() -> None:
    # A pod-level runAsNonRoot binds the injected init container too; the kubelet then refuses to start
    # a root image (busybox, alpine) and the Worker never leaves Init.
    job = build_step_job(config_from_args(MULTINODE), "train", config_map_name="cm")
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert "runAsNonRoot" not in template["securityContext"]
    assert container(job, "Worker")["securityContext"]["runAsNonRoot"] is True
