"""What the API server's objects say about a step: pure functions over PyTorchJob and pod dicts.

A job is finished only when its `Failed` or `Succeeded` condition is True (Failed checked first);
a pod's status and Warning events say why it failed or cannot start. No API calls here: recorded
objects test these, and the controller acts on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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


# ---- retries the operator does not bound ------------------------------------------------------
# Under restartPolicy ExitCode the training operator deletes and recreates a pod that exited with 128 or
# more, and its backoffLimit counts only restarts of running pods (always 0 here): a container that is
# OOMKilled (137) every time would be recreated until activeDeadlineSeconds. The controller counts the
# retries itself, and stops a step at its first OOMKilled container under every policy.

OOM_KILLED = "OOMKilled"
EXITED_WITH_CODE = "ExitedWithCode"  # the operator's event on the job for each pod it saw exit


def step_exits(pod: dict[str, Any]) -> list[tuple[str, int]]:
    """(reason, exit code) of each ended instance of the step's container `pod` still shows (state, lastState)."""
    found = []
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") != CONTAINER:
            continue
        for state in (container.get("state") or {}, container.get("lastState") or {}):
            ended = state.get("terminated") or {}
            if ended:
                found.append((str(ended.get("reason") or ""), int(ended.get("exitCode") or 0)))
    return found


@dataclass
class Retries:
    """One step's pods as the controller saw them, poll after poll: every UID under each pod name (a new
    UID is a pod the operator recreated) and the restart count of each (the kubelet's in-place restarts)."""

    uids: dict[str, list[str]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)  # uid -> restartCount of the step's container

    def see(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            name, uid = pod["metadata"]["name"], str(pod["metadata"].get("uid") or pod["metadata"]["name"])
            if uid not in self.uids.setdefault(name, []):
                self.uids[name].append(uid)
            self.restarts[uid] = max(self.restarts.get(uid, 0), restarts(pod))

    @property
    def recreated(self) -> int:
        return sum(len(uids) - 1 for uids in self.uids.values())

    @property
    def count(self) -> int:
        """Retries so far: pods recreated plus containers restarted in place."""
        return self.recreated + sum(self.restarts.values())


def memory_key(step: str) -> str:
    return f"KUBERNETES.RESOURCES.{step.upper()}.MEMORY"


def retry_problem(step: str, pods: list[dict[str, Any]], retries: Retries, backoff_limit: int, memory: str) -> str:
    """Why the controller must stop the step although its job has not failed ("" when it need not): a
    container of `pods` OOMKilled, or `retries` past `backoff_limit` (KUBERNETES.BACKOFF_LIMIT). `memory`
    is the step's KUBERNETES.RESOURCES.<STEP>.MEMORY, named in the message."""
    for pod in pods:
        if any(reason == OOM_KILLED for reason, _ in step_exits(pod)):
            return (
                f"pod {pod['metadata']['name']}: container {CONTAINER} was {OOM_KILLED}: the step needs more memory "
                f"than {memory_key(step)}={memory} (raise it, or lower the batch size); a retry would only repeat it"
            )
    if retries.count > backoff_limit:
        in_place = retries.count - retries.recreated
        return (
            f"its pods were retried {retries.count} times ({retries.recreated} recreated by the operator, "
            f"{in_place} restarted in place), more than KUBERNETES.BACKOFF_LIMIT={backoff_limit}"
        )
    return ""


def exit_events(events: list[dict[str, Any]], hint_137: str = "") -> list[str]:
    """The operator's `Pod: <ns>.<pod> exited with code N` events, oldest first; `hint_137` follows a 137
    (SIGKILL: the kernel's OOM killer, unless the grace period ran out)."""
    found = []
    for event in events:
        if event.get("reason") == EXITED_WITH_CODE:
            message = str(event.get("message") or "")
            hint = f" ({hint_137})" if hint_137 and message.endswith(" 137") else ""
            found.append(f"event on {event['involvedObject'].get('name')}: {message}{hint}")
    return list(dict.fromkeys(found))


def oom_hint(step: str, memory: str) -> str:
    return f"SIGKILL: OOMKilled, most likely; {memory_key(step)}={memory}"
