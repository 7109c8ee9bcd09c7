"""What the API server's objects say about a step: pure functions over PyTorchJob and pod dicts.

A job is finished only when its `Failed` or `Succeeded` condition is True (Failed checked first);
a pod's status and Warning events say why it failed or cannot start. No API calls here: recorded
objects test these, and the controller acts on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clusterfit.kube.manifests import CONTAINER, HASH_ANNOTATION

FINISHED = ("Succeeded", "Failed")
PROGRESS = ("Suspended", "Restarting", "Running", "Created")


def true_condition(job: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The job's condition of type `kind` when its status is "True", else None."""
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def verdict(job: dict[str, Any] | None) -> str:
    """Failed, Succeeded (only from a True condition, Failed first), else the latest True progress
    condition (Suspended, Restarting, Running, Created), else Pending."""
    if true_condition(job, "Failed"):
        return "Failed"
    if true_condition(job, "Succeeded"):
        return "Succeeded"
    latest = "Pending"
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") in PROGRESS and condition.get("status") == "True":
            latest = str(condition["type"])  # the operator appends: the last True one is the newest
    return latest


def condition_text(job: dict[str, Any] | None, kind: str) -> str:
    """`reason: message` of the job's True condition `kind` ("" when there is none)."""
    condition = true_condition(job, kind) or {}
    return ": ".join(str(condition[k]) for k in ("reason", "message") if condition.get(k))


def spec_hash_of(job: dict[str, Any] | None) -> str:
    return str((((job or {}).get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION, ""))


def master_pod(job_name: str) -> str:
    return f"{job_name}-master-0"


def container_problems(pod: str, status: dict[str, Any]) -> Iterable[str]:
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        where = f"pod {pod} container {container.get('name')}"
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            yield f"{where}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
        for state in (container.get("state") or {}, container.get("lastState") or {}):
            ended = state.get("terminated") or {}
            if ended and (ended.get("exitCode") or ended.get("reason") not in (None, "Completed")):
                yield f"{where}: terminated {ended.get('reason', '')} (exit code {ended.get('exitCode')})"


def pod_problems(pods: list[dict[str, Any]], events: list[dict[str, Any]], max_events: int = 20) -> list[str]:
    """Why pods failed, from their status (OOMKilled, ImagePullBackOff, Unschedulable) and Warning events."""
    found: list[str] = []
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                found.append(f"pod {name}: not scheduled: {condition.get('reason')}: {condition.get('message', '')}")
        found.extend(container_problems(name, status))
    warnings = [e for e in events if e.get("type") == "Warning"][-max_events:] if max_events else []
    for event in warnings:
        count = f" (x{event['count']})" if (event.get("count") or 1) > 1 else ""
        found.append(
            f"event on {event['involvedObject'].get('name')}: {event.get('reason')}: {event.get('message')}{count}"
        )
    return list(dict.fromkeys(found))


# Waiting reasons of a container that will not start by itself: the step would otherwise sit until
# activeDeadlineSeconds. CrashLoopBackOff is not here: the job's backoffLimit ends that one.
CANNOT_START = (
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def start_problems(pods: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(pod, what: "scheduling" or a container's name) -> what keeps it from starting: Unschedulable, or
    the container waiting on one of CANNOT_START. The key stays the same while a pull alternates
    between ErrImagePull and ImagePullBackOff. Pods starting normally, running or finished are left out."""
    found: dict[tuple[str, str], str] = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
                found[(name, "scheduling")] = f"pod {name}: Unschedulable: {condition.get('message', '')}"
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in CANNOT_START:
                where = f"pod {name} container {container.get('name')}"
                found[(name, str(container.get("name")))] = f"{where}: {reason}: {waiting.get('message', '')}"
    return found


def restarts(pod: dict[str, Any]) -> int:
    """How often the step's container of `pod` has restarted."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return sum(int(c.get("restartCount") or 0) for c in statuses if c.get("name") == CONTAINER)


def crashed(pod: dict[str, Any]) -> bool:
    """Whether the step's container of `pod` has ended with an error (and will not be restarted in place)."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        ended = (container.get("state") or {}).get("terminated") or {}
        if container.get("name") == CONTAINER and ended and ended.get("exitCode"):
            return True
    return False
