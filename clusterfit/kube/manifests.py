"""The Kubernetes objects of one experiment, as plain dicts: its config ConfigMap and one
kubeflow.org/v1 PyTorchJob per step.

    from clusterfit.kube.manifests import build_all
    objects = build_all(cfg)   # [ConfigMap quickstart-config-<digest>, PyTorchJob, ...]

Pure functions: no I/O, no API calls. `clusterfit render` writes what they return for `kubectl
apply`; the controller creates the same jobs one step at a time. The ConfigMap is immutable and
named after its content; a job records the digest of only the config keys its step reads
(clusterfit.config.reads), and its spec hash leaves out its owner and the ConfigMap's name, so a
rendered job, or one started before an edit to a key its step does not read, is adopted. `validate_job` repeats, client
side, the rules the training operator's admission webhook enforces, so a bad job fails here with a
message naming the field instead of at the API server.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

from clusterfit import __version__
from clusterfit.config import STEPS, Config, to_yaml
from clusterfit.config.kubernetes import CREDENTIAL_ENV
from clusterfit.config.reads import step_config_hash
from clusterfit.errors import UserError
from clusterfit.runtime import GPUS_ENV

API_VERSION, KIND = "kubeflow.org/v1", "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the training container (and its port) by this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's defaults; MASTER_PORT points here
CONFIG_DIR = "/etc/clusterfit"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
HASH_ANNOTATION = "clusterfit.io/spec-hash"
# The config lives in the ConfigMap, not the job: the digest of the keys its step reads, on the job, makes a
# change to one of them a changed job (and an edit elsewhere no change).
STEP_CONFIG_ANNOTATION = "clusterfit.io/step-config-hash"
CONFIG_DIGEST_ANNOTATION = "clusterfit.io/config-sha256"  # the ConfigMap's: sha256 of its config.yaml
CONFIG_VOLUME = "config"
# On the Helm chart's controller Job: `clusterfit cancel` finds (and suspends) it by the experiment's name.
EXPERIMENT_LABEL = "clusterfit.io/experiment"
MAX_JOB_NAME = 50  # pods are <job>-worker-<i> and services share the name: keep room under 63
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
REPLICA_TYPES = ("Master", "Worker")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
MANAGED_BY = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")
# The Pod Security Standard `restricted`, met by our own container. runAsNonRoot is set on the container,
# not the pod: a pod-level one also binds the init container the operator injects into Worker pods (it
# waits for the Master's DNS name and runs as root unless the operator's init-container template says
# otherwise), and the kubelet would refuse to start it. The seccomp profile is pod-wide: it suits both.
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
POD_SECURITY = {"seccompProfile": {"type": "RuntimeDefault"}}


class ManifestError(UserError, ValueError):
    """A config that cannot become valid Kubernetes objects; the message names the key or field."""


def job_name(cfg: Config, step: str) -> str:
    """`<experiment>-<step>`: a DNS-1035 label of at most 50 characters."""
    experiment = cfg.EXPERIMENT.NAME
    name = f"{experiment}-{step}"
    if not DNS1035.match(experiment):
        raise ManifestError(
            f"EXPERIMENT.NAME {experiment!r} cannot name Kubernetes objects: use lower-case letters, digits "
            "and '-', starting with a letter and ending with a letter or digit"
        )
    if len(name) > MAX_JOB_NAME:
        raise ManifestError(
            f"EXPERIMENT.NAME {experiment!r} is too long: job name {name!r} has {len(name)} characters, "
            f"at most {MAX_JOB_NAME} (keep EXPERIMENT.NAME to {MAX_JOB_NAME - len(step) - 1} or fewer)"
        )
    return name


def num_workers(cfg: Config) -> int:
    """Worker replicas of each job: every node but the Master's."""
    return cfg.DISTRIBUTED.NUM_NODES - 1


def labels(cfg: Config, component: str) -> dict[str, str]:
    """The standard app.kubernetes.io labels of every object of the experiment."""
    return {
        "app.kubernetes.io/name": "clusterfit",
        "app.kubernetes.io/instance": cfg.EXPERIMENT.NAME,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "clusterfit",
        "app.kubernetes.io/managed-by": "clusterfit",
        "app.kubernetes.io/version": __version__,
    }


def uses_torch(cfg: Config, step: str) -> bool:
    """Whether the step needs the torch image (cluster does only with the torch k-means backend)."""
    return step != "cluster" or cfg.CLUSTERFIT.CLUSTER_BACKEND == "torch"


def procs_per_pod(cfg: Config, step: str) -> int:
    """Processes per pod: NUM_PROC_PER_NODE under torchrun; cluster is one process per pod (no torch.distributed)."""
    return cfg.DISTRIBUTED.NUM_PROC_PER_NODE if step != "cluster" else 1


def step_command(cfg: Config, step: str) -> list[str]:
    """The container command: the step under clusterfit.launch, which exits 143 on SIGTERM (a retryable code
    for restartPolicy ExitCode) where torchrun would exit 1. With several processes per pod, torchrun starts
    them: the operator sets PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads as its
    defaults; its rendezvous across pods waits DISTRIBUTED.TIMEOUT_S, as init_process_group does.
    --no-lease: the controller holds the experiment (its Lease), and a pod the kubelet or the operator
    restarts must just continue, not wait for its dead predecessor's lease of the artifact root to expire."""
    step_args = [step, f"config={CONFIG_PATH}", "--no-lease"]
    launch = ["python", "-m", "clusterfit.launch"]
    nproc = procs_per_pod(cfg, step)
    if nproc == 1:
        return [*launch, "clusterfit", *step_args]
    return [
        *launch,
        "torchrun",
        f"--nnodes={cfg.DISTRIBUTED.NUM_NODES}",
        f"--nproc-per-node={nproc}",
        f"--rdzv-conf=timeout={max(1, round(cfg.DISTRIBUTED.TIMEOUT_S))}",
        "-m",
        "clusterfit",
        *step_args,
    ]


def restart_policy(cfg: Config, step: str) -> str:
    """The replicas' restartPolicy: KUBERNETES.RESTART_POLICY, where `auto` chooses per step.

    ExitCode where a lost pod fails nobody else: the training operator then recreates a pod stopped by
    a signal (preemption: 143) and fails the job at once on an error (1, 2). That is the cluster step
    (its ranks meet through storage) and any job of one pod. A torch step on several pods gets OnFailure:
    when one pod goes, the others' collectives fail with an ordinary error (exit 1), which must be retried
    too; the kubelet restarts them in place, BACKOFF_LIMIT times. Under ExitCode the operator never counts
    toward backoffLimit (it counts in-place restarts only) and recreates an OOMKilled pod (137) until
    activeDeadlineSeconds: the controller stops such a step (kube/status.py, `retry_problem`)."""
    chosen = cfg.KUBERNETES.RESTART_POLICY
    if chosen != "auto":
        return chosen
    return "ExitCode" if step == "cluster" or num_workers(cfg) == 0 else "OnFailure"


def container_env(cfg: Config) -> list[dict[str, Any]]:
    """S3 credentials by secretKeyRef only, the S3 endpoint and region, then KUBERNETES.ENV."""
    env: list[dict[str, Any]] = []
    secret = cfg.KUBERNETES.S3_SECRET_NAME
    if secret:
        for key in sorted(CREDENTIAL_ENV):
            ref: dict[str, Any] = {"name": secret, "key": key}
            if key == "AWS_SESSION_TOKEN":
                ref["optional"] = True  # only temporary credentials have one
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    s3 = cfg.STORAGE.S3
    if s3.ENDPOINT_URL:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.ENDPOINT_URL})
    if s3.REGION:
        env += [{"name": "AWS_REGION", "value": s3.REGION}, {"name": "AWS_DEFAULT_REGION", "value": s3.REGION}]
    env += [{"name": name, "value": value} for name, value in sorted(cfg.KUBERNETES.ENV.items())]
    return env


def gpu_env(cfg: Config, step: str) -> list[dict[str, Any]]:
    """GPUS_ENV in a step pod that is given GPUs: the step then fails at start when it finds none
    (runtime.check_requested_gpus) instead of training on the CPU."""
    gpus = getattr(cfg.KUBERNETES.RESOURCES, step.upper()).GPUS
    return [{"name": GPUS_ENV, "value": str(gpus)}] if gpus else []


def step_resources(cfg: Config, step: str) -> dict[str, Any]:
    """Requests and limits of one pod; GPUs are limits (requests follow), memory is capped."""
    res = getattr(cfg.KUBERNETES.RESOURCES, step.upper())
    if res.GPUS and uses_torch(cfg, step) and res.GPUS < cfg.DISTRIBUTED.NUM_PROC_PER_NODE:
        raise ManifestError(
            f"KUBERNETES.RESOURCES.{step.upper()}.GPUS={res.GPUS} is less than DISTRIBUTED.NUM_PROC_PER_NODE="
            f"{cfg.DISTRIBUTED.NUM_PROC_PER_NODE}: each process of a pod needs its own GPU"
        )
    requests: dict[str, Any] = {"cpu": res.CPU, "memory": res.MEMORY}
    limits: dict[str, Any] = {"memory": res.MEMORY}
    if res.EPHEMERAL_STORAGE:
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = res.EPHEMERAL_STORAGE
    if res.GPUS:
        limits["nvidia.com/gpu"] = res.GPUS
    return {"requests": requests, "limits": limits}


def pod_template(cfg: Config, step: str, config_map_name: str) -> dict[str, Any]:
    """The pod template of every replica of the step's job."""
    kube = cfg.KUBERNETES
    container = {
        "name": CONTAINER,
        "image": kube.IMAGE if uses_torch(cfg, step) else kube.CLUSTER_IMAGE,
        "imagePullPolicy": kube.IMAGE_PULL_POLICY,
        "command": step_command(cfg, step),
        "env": container_env(cfg) + gpu_env(cfg, step),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": step_resources(cfg, step),
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *copy.deepcopy(kube.VOLUME_MOUNTS),
        ],
        "securityContext": CONTAINER_SECURITY,
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": kube.SHM_SIZE}},
            *copy.deepcopy(kube.VOLUMES),
        ],
        "securityContext": POD_SECURITY,
        "terminationGracePeriodSeconds": kube.TERMINATION_GRACE_PERIOD_SECONDS,
    }
    optional = {
        "serviceAccountName": kube.SERVICE_ACCOUNT,
        "imagePullSecrets": [{"name": name} for name in kube.IMAGE_PULL_SECRETS],
        "nodeSelector": dict(kube.NODE_SELECTOR),
        "tolerations": [t.model_dump(exclude_none=True) for t in kube.TOLERATIONS],
        "affinity": kube.AFFINITY.model_dump(exclude_none=True),
        "priorityClassName": kube.PRIORITY_CLASS_NAME,
        "schedulerName": kube.SCHEDULER_NAME,
    }
    spec.update({key: value for key, value in optional.items() if value})
    metadata: dict[str, Any] = {"labels": {**kube.POD_LABELS, **labels(cfg, step)}}
    if kube.POD_ANNOTATIONS:
        metadata["annotations"] = dict(kube.POD_ANNOTATIONS)
    return {"metadata": metadata, "spec": spec}


def run_policy(cfg: Config) -> dict[str, Any]:
    """cleanPodPolicy, backoffLimit and activeDeadlineSeconds (a crash loop must end), and gang scheduling."""
    kube = cfg.KUBERNETES
    policy: dict[str, Any] = {
        "cleanPodPolicy": kube.CLEAN_POD_POLICY,
        "backoffLimit": kube.BACKOFF_LIMIT,
        "activeDeadlineSeconds": kube.ACTIVE_DEADLINE_SECONDS,
    }
    if kube.TTL_SECONDS_AFTER_FINISHED is not None:
        policy["ttlSecondsAfterFinished"] = kube.TTL_SECONDS_AFTER_FINISHED
    if kube.SCHEDULER_NAME:  # the operator's gang-scheduler integration reads schedulingPolicy
        gang: dict[str, Any] = {"minAvailable": cfg.DISTRIBUTED.NUM_NODES}
        if kube.QUEUE_NAME:
            gang["queue"] = kube.QUEUE_NAME
        if kube.PRIORITY_CLASS_NAME:
            gang["priorityClass"] = kube.PRIORITY_CLASS_NAME
        policy["schedulingPolicy"] = gang
    return policy


def check_root(cfg: Config) -> None:
    """Pods share nothing but object storage: the artifact root must be s3://. One seed per experiment."""
    if cfg.EXPERIMENT.SEEDS:
        raise ManifestError(
            f"EXPERIMENT.SEEDS={cfg.EXPERIMENT.SEEDS} runs the pipeline once per seed in `clusterfit run`; on "
            "Kubernetes install one experiment per seed (EXPERIMENT.SEED, its own EXPERIMENT.NAME and ROOT)"
        )
    if not cfg.EXPERIMENT.ROOT.startswith("s3://"):
        shown = cfg.EXPERIMENT.ROOT or f"'' (which means {cfg.EXPERIMENT.root_uri})"
        raise ManifestError(
            f"EXPERIMENT.ROOT must be an s3:// URI on Kubernetes, got {shown}: each step runs in other pods, "
            "which share nothing but object storage"
        )


def build_step_job(
    cfg: Config, step: str, *, config_map_name: str, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One PyTorchJob for `step`: a Master and NUM_NODES-1 Workers, annotated with its spec hash."""
    if step not in STEPS:
        raise ManifestError(f"unknown step {step!r}: one of {', '.join(STEPS)}")
    check_root(cfg)
    kube = cfg.KUBERNETES
    name = job_name(cfg, step)
    template = pod_template(cfg, step, config_map_name)
    policy = restart_policy(cfg, step)
    replicas = {"Master": {"replicas": 1, "restartPolicy": policy, "template": template}}
    if num_workers(cfg) > 0:
        replicas["Worker"] = {
            "replicas": num_workers(cfg),
            "restartPolicy": policy,
            "template": copy.deepcopy(template),
        }
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": kube.NAMESPACE,
        "labels": labels(cfg, step),
        "annotations": {STEP_CONFIG_ANNOTATION: step_config_hash(cfg, step)},
    }
    if kube.QUEUE_NAME:
        metadata["labels"][kube.QUEUE_LABEL] = kube.QUEUE_NAME
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    job: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(procs_per_pod(cfg, step)),
            "runPolicy": run_policy(cfg),
            "pytorchReplicaSpecs": replicas,
        },
    }
    metadata["annotations"][HASH_ANNOTATION] = spec_hash(job)
    validate_job(job)
    return job


def build_config_map(cfg: Config, name: str | None = None) -> dict[str, Any]:
    """The immutable ConfigMap whose `config.yaml` is the resolved experiment config every step reads:
    a pod restarted later reads what its job was created with. Unless named, it is
    `<experiment>-config-<10 hex digits of the config's sha256>`: another config is another ConfigMap."""
    text = to_yaml(cfg)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name or f"{cfg.EXPERIMENT.NAME}-config-{digest[:10]}",
            "namespace": cfg.KUBERNETES.NAMESPACE,
            "labels": labels(cfg, "config"),
            "annotations": {CONFIG_DIGEST_ANNOTATION: digest},
        },
        "immutable": True,
        "data": {"config.yaml": text},
    }


def build_all(cfg: Config, *, config_map_name: str | None = None) -> list[dict[str, Any]]:
    """The ConfigMap (content-addressed unless named), then one job per step of PIPELINE.STEPS in order."""
    config_map = build_config_map(cfg, config_map_name)
    name = config_map["metadata"]["name"]
    return [config_map] + [build_step_job(cfg, step, config_map_name=name) for step in cfg.PIPELINE.STEPS]


def spec_hash(job: dict[str, Any]) -> str:
    """sha256 of the job's canonical JSON without what does not decide what its pods do: the hash annotation
    itself, the job's owner (a rendered job has none) and the name of the ConfigMap its pods mount (it changes
    with keys the step does not read; the keys it reads are in STEP_CONFIG_ANNOTATION)."""
    stripped = copy.deepcopy(job)
    metadata = stripped.get("metadata", {})
    metadata.get("annotations", {}).pop(HASH_ANNOTATION, None)
    metadata.pop("ownerReferences", None)
    for replica in ((stripped.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values():
        for volume in (((replica or {}).get("template") or {}).get("spec") or {}).get("volumes") or []:
            if volume.get("name") == CONFIG_VOLUME and "configMap" in volume:
                volume["configMap"]["name"] = ""
    canonical = json.dumps(stripped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The training operator's admission rules (pkg/webhooks/pytorch), checked before the API server.


def validate_job(job: dict[str, Any]) -> None:
    """Raise ManifestError listing every rule `job` breaks; return None when the operator would accept it."""
    errors: list[str] = []
    if job.get("apiVersion") != API_VERSION or job.get("kind") != KIND:
        errors.append(f"apiVersion/kind: must be {API_VERSION} {KIND}, got {job.get('apiVersion')} {job.get('kind')}")
    name = str(job.get("metadata", {}).get("name", ""))
    if not DNS1035.match(name):
        errors.append(
            f"metadata.name {name!r}: must be a DNS-1035 label (lower-case letters, digits, '-', starting with a "
            "letter)"
        )
    if len(name) > MAX_JOB_NAME:
        errors.append(f"metadata.name {name!r}: {len(name)} characters, at most {MAX_JOB_NAME}")
    spec = job.get("spec") or {}
    errors += _replica_errors(spec.get("pytorchReplicaSpecs"))
    errors += _run_policy_errors(spec.get("runPolicy") or {})
    errors += _nproc_errors(spec)
    if errors:
        raise ManifestError(f"PyTorchJob {name or '<unnamed>'} would be rejected:\n  " + "\n  ".join(errors))


def _replica_errors(replicas: Any) -> list[str]:
    path = "spec.pytorchReplicaSpecs"
    if not isinstance(replicas, dict) or not replicas:
        return [f"{path}: required (a Master with replicas: 1)"]
    errors = [
        f"{path}.{rtype}: unknown replica type, one of {', '.join(REPLICA_TYPES)}"
        for rtype in replicas
        if rtype not in REPLICA_TYPES
    ]
    if "Master" not in replicas:
        errors.append(f"{path}.Master: required (the controller follows <job>-master-0)")
    for rtype, rspec in replicas.items():
        rpath = f"{path}.{rtype}"
        count = (rspec or {}).get("replicas")
        if rtype == "Master" and count != 1:
            errors.append(f"{rpath}.replicas: must be 1, got {count}")
        elif rtype != "Master" and (not isinstance(count, int) or count < 1):
            errors.append(f"{rpath}.replicas: must be at least 1, got {count}")
        policy = (rspec or {}).get("restartPolicy")
        if policy is not None and policy not in RESTART_POLICIES:
            errors.append(f"{rpath}.restartPolicy: {policy!r} is not one of {', '.join(RESTART_POLICIES)}")
        containers = (((rspec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        errors += _container_errors(f"{rpath}.template.spec.containers", containers)
    return errors


def _container_errors(path: str, containers: list[dict[str, Any]]) -> list[str]:
    if not containers:
        return [f"{path}: must be specified"]
    errors = []
    if not any(c.get("name") == CONTAINER for c in containers):
        errors.append(f"{path}: must have a container named {CONTAINER!r}")
    for i, container in enumerate(containers):
        if not container.get("image"):
            errors.append(f"{path}[{i}].image: required")
        for var in container.get("env") or []:
            if var.get("name") in CREDENTIAL_ENV and "value" in var:
                errors.append(
                    f"{path}[{i}].env.{var['name']}: a credential must come from a Secret (valueFrom.secretKeyRef), "
                    "never a value"
                )
    return errors


def _run_policy_errors(policy: dict[str, Any]) -> list[str]:
    path = "spec.runPolicy"
    errors = []
    clean = policy.get("cleanPodPolicy")
    if clean is not None and clean not in CLEAN_POD_POLICIES:
        errors.append(f"{path}.cleanPodPolicy: {clean!r} is not one of {', '.join(CLEAN_POD_POLICIES)}")
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        value = policy.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            errors.append(f"{path}.{key}: must be a non-negative integer, got {value!r}")
    managed_by = policy.get("managedBy")
    if managed_by is not None and managed_by not in MANAGED_BY:
        errors.append(f"{path}.managedBy: {managed_by!r} is not one of {', '.join(MANAGED_BY)}")
    return errors


def _nproc_errors(spec: dict[str, Any]) -> list[str]:
    errors = []
    nproc = spec.get("nprocPerNode")
    if nproc is not None and not (isinstance(nproc, str) and (nproc in ("auto", "cpu", "gpu") or nproc.isdigit())):
        errors.append(f"spec.nprocPerNode: {nproc!r} must be a string: an integer, auto, cpu or gpu")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in (spec.get("pytorchReplicaSpecs") or {}):
            errors.append("spec.pytorchReplicaSpecs.Worker: must be configured if elastic policy is used")
        if elastic.get("nProcPerNode") is not None and nproc is not None:
            errors.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    return errors
