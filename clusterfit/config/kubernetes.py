"""The KUBERNETES section of the experiment config: how each step runs as a PyTorchJob.

    clusterfit render config=kubernetes-example config.KUBERNETES.RESOURCES.TRAIN.GPUS=8

Upper-case keys like the rest of the config. Some values go into the pod spec verbatim and so keep
Kubernetes' own (lower-case) field names: TOLERATIONS entries, AFFINITY, VOLUMES and VOLUME_MOUNTS. The number of
Worker replicas is not a key: it is DISTRIBUTED.NUM_NODES - 1 (see `num_workers`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A Kubernetes resource quantity (a subset of the API's grammar: no exponents).
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the operator or torchrun (a step must never set its own rank), or secrets (by reference only).
RESERVED_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"}
# The step pods' own volumes (the config, /dev/shm): VOLUMES and VOLUME_MOUNTS may not shadow them.
RESERVED_VOLUMES = ("config", "dshm")
RESERVED_MOUNTS = ("/etc/clusterfit", "/dev/shm")
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StepResources(_Section):
    CPU: str = Field(
        "2", pattern=QUANTITY, description="CPU request per pod (Kubernetes quantity, e.g. '8' or '500m')."
    )
    MEMORY: str = Field("8Gi", pattern=QUANTITY, description="Memory request and limit per pod (e.g. '32Gi').")
    GPUS: int = Field(
        0, ge=0, description="nvidia.com/gpu per pod; torch steps need at least DISTRIBUTED.NUM_PROC_PER_NODE when > 0."
    )
    EPHEMERAL_STORAGE: str = Field(
        "",
        pattern=r"^$|" + QUANTITY,
        description="ephemeral-storage request and limit per pod (e.g. '50Gi' for local scratch); empty: none.",
    )


class ResourcesConfig(_Section):
    PRETRAIN: StepResources = Field(default_factory=StepResources, description="Each pod of the pretrain step.")
    EXTRACT: StepResources = Field(default_factory=StepResources, description="Each pod of the extract step.")
    CLUSTER: StepResources = Field(
        default_factory=StepResources, description="Each pod of the cluster step (faiss uses every GPU it is given)."
    )
    TRAIN: StepResources = Field(default_factory=StepResources, description="Each pod of the train step.")
    EVALUATE: StepResources = Field(default_factory=StepResources, description="Each pod of the evaluate step.")


class Toleration(_Section):
    """One pod toleration, with Kubernetes' field names (it is copied into the pod spec as is)."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (the default).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; empty: all."
    )
    tolerationSeconds: int | None = Field(
        None, description="NoExecute only: how long the pod stays bound after the taint appears."
    )


class Affinity(_Section):
    """Pod affinity, with Kubernetes' field names; each part is passed through to the pod spec."""

    nodeAffinity: dict[str, Any] | None = Field(None, description="Kubernetes NodeAffinity.")
    podAffinity: dict[str, Any] | None = Field(None, description="Kubernetes PodAffinity.")
    podAntiAffinity: dict[str, Any] | None = Field(None, description="Kubernetes PodAntiAffinity.")


class ControllerConfig(_Section):
    """KUBERNETES.CONTROLLER: how the controller follows the step jobs."""

    STEP_TIMEOUT_S: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="Give up on a step that has not finished after this long; until then the controller outlasts "
        "an API server that is unreachable or failing (a restart, an upgrade), however long.",
    )
    WATCH_TIMEOUT_S: int = Field(
        300,
        ge=1,
        description="Server-side timeout of one watch request; the controller then re-lists and watches again.",
    )
    REQUEST_TIMEOUT_S: float = Field(
        30.0,
        gt=0,
        description="Client-side timeout of one API call; a watch may stay silent this much longer than "
        "WATCH_TIMEOUT_S.",
    )
    BACKOFF_INITIAL_S: float = Field(
        0.5, gt=0, description="First wait before retrying a 429/5xx answer or a dropped connection."
    )
    BACKOFF_MAX_S: float = Field(
        15.0, gt=0, description="Longest wait between two retries (the wait doubles up to this)."
    )
    RETRY_TIMEOUT_S: float = Field(
        300.0,
        gt=0,
        description="How long one API call is retried while the API server keeps failing (429/5xx, unreachable) "
        "before it fails: a command (status, logs, cancel, submit before its first step) then gives up; the "
        "controller tries again, waiting up to BACKOFF_MAX_S between tries, until the step's STEP_TIMEOUT_S.",
    )
    POD_CHECK_INTERVAL_S: int = Field(
        10,
        ge=1,
        description="While a step runs, look at its pods this often: pods that cannot start, and the logs of "
        "containers that crashed (the operator deletes such pods when the job fails).",
    )
    POD_START_TIMEOUT_S: float = Field(
        300.0,
        gt=0,
        description="Fail the step when one of its pods cannot start for this long (image pull failing, "
        "unschedulable, bad container config) instead of waiting for activeDeadlineSeconds.",
    )
    LOG_TAIL_LINES: int = Field(50, ge=0, description="Lines of the master pod's log printed when a step fails.")
    MAX_EVENTS: int = Field(
        20, ge=0, description="Most recent warning events of the step's pods printed when a step fails."
    )
    SAVE_LOGS: bool = Field(
        True,
        description="Save each step's pod logs to <root>/logs/<step>/<pod>.log while the step runs (every "
        "LOG_SAVE_INTERVAL_S, and a crashed container's log as soon as it is seen) and when it ends: the operator "
        "deletes a failed job's pods with their logs; `clusterfit logs` reads the saved copy once a pod is gone.",
    )
    LOG_SAVE_INTERVAL_S: float = Field(
        60.0,
        gt=0,
        description="While a step runs, save its running pods' logs this often (checked every POD_CHECK_INTERVAL_S; "
        "a log that did not change is not written again).",
    )
    LOG_MAX_BYTES: int = Field(
        1024 * 1024,
        ge=1024,
        description="Keep at most the last this many bytes of each container's log (the crashed one's and the "
        "current one's) in the controller's memory and in the saved copy.",
    )
    VERIFY_OUTPUTS: bool = Field(
        True,
        description="After a step's job Succeeded, require its _SUCCESS.json in storage before starting the next step.",
    )
    LEASE_DURATION_S: int = Field(
        60,
        ge=1,
        description="leaseDurationSeconds of the Lease <EXPERIMENT.NAME>-controller that keeps a second controller "
        "of the experiment out; renewed every third of this, taken over once a dead controller's has run out.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ControllerConfig:
        if self.BACKOFF_MAX_S < self.BACKOFF_INITIAL_S:
            raise ValueError(
                f"BACKOFF_MAX_S ({self.BACKOFF_MAX_S}) must be at least BACKOFF_INITIAL_S ({self.BACKOFF_INITIAL_S})"
            )
        return self


class KubernetesConfig(_Section):
    NAMESPACE: str = Field("default", description="Namespace the step jobs run in.")
    IMAGE: str = Field(
        "clusterfit/clusterfit:0.1.0",
        description="Step image with torch (pretrain, extract, train, evaluate; cluster with CLUSTER_BACKEND torch).",
    )
    CLUSTER_IMAGE: str = Field(
        "clusterfit/clusterfit-cluster:0.1.0", description="Step image for cluster with the faiss backend (no torch)."
    )
    IMAGE_PULL_POLICY: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the step images."
    )
    IMAGE_PULL_SECRETS: list[str] = Field(
        default_factory=list, description="Names of docker-registry Secrets for pulling the step images."
    )
    S3_SECRET_NAME: str = Field(
        "",
        description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (optional AWS_SESSION_TOKEN), passed by "
        "reference only; "
        "empty: no credentials in the pod (workload identity).",
    )
    SERVICE_ACCOUNT: str = Field("", description="ServiceAccount of the step pods; empty: the namespace's default.")
    RESOURCES: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="CPU, memory and GPUs per pod, per step."
    )
    SHM_SIZE: str = Field(
        "2Gi",
        pattern=QUANTITY,
        description="Size of the memory-backed /dev/shm (DataLoader workers and NCCL need more than the default 64M).",
    )
    NODE_SELECTOR: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the step pods (e.g. a GPU node pool label)."
    )
    TOLERATIONS: list[Toleration] = Field(
        default_factory=list, description="Tolerations of the step pods (e.g. nvidia.com/gpu NoSchedule)."
    )
    AFFINITY: Affinity = Field(default_factory=Affinity, description="Affinity of the step pods.")
    PRIORITY_CLASS_NAME: str = Field("", description="priorityClassName of the step pods; empty: the cluster default.")
    SCHEDULER_NAME: str = Field(
        "",
        description="schedulerName of the step pods (e.g. volcano for gang scheduling); empty: the default scheduler.",
    )
    QUEUE_NAME: str = Field(
        "", description="Queue for gang scheduling, set as the QUEUE_LABEL label on each job; empty: none."
    )
    QUEUE_LABEL: str = Field(
        "kueue.x-k8s.io/queue-name", description="Label key that names the queue (Kueue's by default)."
    )
    BACKOFF_LIMIT: int = Field(
        3,
        ge=0,
        description="runPolicy.backoffLimit: pod restarts before the step's job fails. The operator counts only "
        "in-place restarts (OnFailure), summed over the pods: on several pods one lost pod costs a restart of "
        "each. The controller also fails a step whose pods were restarted or recreated more often than this "
        "(ExitCode).",
    )
    ACTIVE_DEADLINE_SECONDS: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="runPolicy.activeDeadlineSeconds: a step's job running longer than this fails (ends crash loops "
        "too).",
    )
    TTL_SECONDS_AFTER_FINISHED: int | None = Field(
        None,
        ge=0,
        description="runPolicy.ttlSecondsAfterFinished; empty: finished jobs stay (the controller treats a job that "
        "vanishes as lost).",
    )
    RESTART_POLICY: Literal["auto", "ExitCode", "OnFailure", "Never", "Always"] = Field(
        "auto",
        description="Replica restartPolicy. ExitCode: the operator recreates a pod that exited with 128 or more "
        "(SIGTERM on preemption: 143) and fails the job at once on any other code (a real error). OnFailure: the "
        "kubelet restarts the container on any error, BACKOFF_LIMIT times. auto: ExitCode for cluster and for "
        "one-pod jobs; OnFailure for jobs of several pods of the torch steps, whose surviving ranks fail with an "
        "ordinary error when a peer is lost. The controller fails a step whose container was OOMKilled under every "
        "policy.",
    )
    CLEAN_POD_POLICY: Literal["Running", "All", "None"] = Field(
        "Running",
        description="runPolicy.cleanPodPolicy: which pods are deleted when a job finishes (Running keeps failed "
        "pods' logs).",
    )
    POD_LABELS: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on the step pods (cost centre, policy selectors); the app.kubernetes.io ones win.",
    )
    POD_ANNOTATIONS: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations on the step pods (e.g. a workload identity's, a sidecar injector's).",
    )
    VOLUMES: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra volumes of the step pods, as Kubernetes Volume objects (a dataset PVC, NVMe scratch).",
    )
    VOLUME_MOUNTS: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra volumeMounts of the step container, as Kubernetes VolumeMount objects; each names a "
        "volume of VOLUMES.",
    )
    TERMINATION_GRACE_PERIOD_SECONDS: int = Field(
        120,
        ge=0,
        description="terminationGracePeriodSeconds of the step pods: time between SIGTERM and SIGKILL to write a "
        "checkpoint (Kubernetes' default 30 s is short for a large model).",
    )
    ENV: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment on every step container (e.g. NCCL_DEBUG: INFO, NCCL_SOCKET_IFNAME: eth0). "
        "Not for credentials, ranks or rendezvous variables.",
    )
    CONTROLLER: ControllerConfig = Field(
        default_factory=ControllerConfig, description="How the controller follows the step jobs."
    )

    @model_validator(mode="after")
    def _volumes(self) -> KubernetesConfig:
        names = [str(v.get("name", "")) for v in self.VOLUMES]
        for name in names:
            if not name or name in RESERVED_VOLUMES:
                raise ValueError(f"VOLUMES: each volume needs a name other than {', '.join(RESERVED_VOLUMES)}")
        for mount in self.VOLUME_MOUNTS:
            if mount.get("name") not in names:
                raise ValueError(f"VOLUME_MOUNTS: {mount.get('name')!r} is not the name of a volume in VOLUMES")
            if mount.get("mountPath") in RESERVED_MOUNTS or not mount.get("mountPath"):
                raise ValueError(
                    f"VOLUME_MOUNTS: {mount.get('name')!r} needs a mountPath other than {', '.join(RESERVED_MOUNTS)}"
                )
        return self

    @field_validator("ENV")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name in CREDENTIAL_ENV:
                raise ValueError(f"{name} is a credential: put it in the Secret named by KUBERNETES.S3_SECRET_NAME")
            if name in RESERVED_ENV or name.startswith("PET_"):
                raise ValueError(f"{name} is set by the training operator or torchrun, never by the config")
        return env
