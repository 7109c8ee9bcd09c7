"""The logs of a step's pods, kept while the step runs: the operator deletes a failed job's pods, and
with them their logs. What the controller saw of the pods is a `StepPods`; `PodLogs` reads the logs
through the API server and saves them to <root>/logs/<step>/<pod>.log (the crashed container's
first, across a restart), so the failure report and `clusterfit logs` have them afterwards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from clusterfit.artifacts.layout import pod_log
from clusterfit.config import ControllerConfig
from clusterfit.kube.client import Kube, KubeError, Unreachable
from clusterfit.kube.manifests import CONTAINER
from clusterfit.kube.status import Retries, container_problems
from clusterfit.storage import StorageError, Store

log = logging.getLogger("clusterfit.kube.controller")  # the controller's own lines, as users know them

RESTART_MARK = "\n---- the container restarted; the log of the new one follows ----\n"


def joined_logs(crashed: str, current: str) -> str:
    """A pod's log across a restart: the crashed container's, then the new one's (when it has written any)."""
    if not crashed or crashed == current:
        return current
    return f"{crashed}{RESTART_MARK}{current}" if current else crashed


@dataclass
class StepPods:
    """What the controller saw of one step's pods while the step ran. Kept because the operator deletes a
    failed job's running pods (and with them their logs and status)."""

    stuck_since: dict[tuple[str, str], float] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    crash_logs: dict[str, str] = field(default_factory=dict)  # pod -> log of its last crashed container
    logs: dict[str, str] = field(default_factory=dict)  # pod -> its log as last read (crashed container's first)
    logs_read_at: float = float("-inf")  # time.monotonic() of the last reading of the running pods' logs
    problems: list[str] = field(default_factory=list)  # OOMKilled, exit codes, ... in the order seen
    retries: Retries = field(default_factory=Retries)  # pods recreated and restarted (kube/status.py)

    def note(self, found: list[str]) -> None:
        self.problems += [p for p in found if p not in self.problems]


class PodLogs:
    """Reads and saves one experiment's pod logs (KUBERNETES.CONTROLLER.SAVE_LOGS, LOG_SAVE_INTERVAL_S,
    LOG_MAX_BYTES)."""

    def __init__(self, kube: Kube, store: Store, settings: ControllerConfig) -> None:
        self.kube = kube
        self.store = store
        self.settings = settings

    def keep_crash(self, step: str, pod: str, previous: bool, seen: StepPods) -> None:
        """The log of the pod's crashed container (the instance before its restart when `previous`)."""
        try:
            text = self.kube.read_log(pod, CONTAINER, previous=previous, max_bytes=self.settings.LOG_MAX_BYTES)
        except KubeError as exc:
            log.warning("step %s: cannot read the log of crashed pod %s: %s", step, pod, exc)
            return
        seen.crash_logs[pod] = text
        self.save(step, pod, seen)  # with the new container's log after it, once it has written some

    def save_running(self, step: str, pods: list[dict[str, Any]], seen: StepPods) -> None:
        """Every LOG_SAVE_INTERVAL_S, save the log of each pod whose container has started. One try each: a
        kubelet the API server cannot reach must not hold up following the job."""
        now = time.monotonic()
        if not self.settings.SAVE_LOGS or now - seen.logs_read_at < self.settings.LOG_SAVE_INTERVAL_S:
            return
        seen.logs_read_at = now
        for pod in pods:
            if (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"):
                self.save(step, pod["metadata"]["name"], seen, retry_s=0)

    def save(self, step: str, pod: str, seen: StepPods, retry_s: float | None = None) -> None:
        """Read the pod's log, after its crashed container's when there was a crash, into `seen.logs`, and save it
        when it changed."""
        try:
            current = self.kube.read_log(pod, CONTAINER, max_bytes=self.settings.LOG_MAX_BYTES, retry_s=retry_s)
        except KubeError as exc:
            log.warning("step %s: cannot read the log of pod %s: %s", step, pod, exc)
            return
        text = joined_logs(seen.crash_logs.get(pod, ""), current)
        if text != seen.logs.get(pod):
            self.put(step, pod, text, again=pod in seen.logs)
            seen.logs[pod] = text

    def put(self, step: str, pod: str, text: str, again: bool = False) -> None:
        """Save the log to <root>/logs/<step>/<pod>.log (announced the first time, `again` False)."""
        if not self.settings.SAVE_LOGS:
            return
        try:
            self.store.put_bytes(pod_log(step, pod), text.encode())
        except StorageError as exc:
            log.warning("step %s: cannot save the log of pod %s: %s", step, pod, exc)
            return
        level = logging.DEBUG if again else logging.INFO
        log.log(level, "step %s: saved the log of pod %s to %s", step, pod, self.store.uri(pod_log(step, pod)))

    def save_all(self, step: str, job: dict[str, Any], seen: StepPods) -> dict[str, str]:
        """Every pod's log, also saved to <root>/logs/<step>/<pod>.log before clean-up or TTL removes the
        pods: the current container's, after the last crashed one's when there was a crash. Raises
        Unreachable when the pods cannot be listed (the caller tries again)."""
        logs = {**seen.crash_logs, **seen.logs}  # pods the operator has deleted keep what was seen of them
        try:
            pods = self.kube.list_pods(job["metadata"]["name"])
        except Unreachable:
            raise
        except KubeError as exc:
            log.warning("step %s: cannot list its pods to save their logs: %s", step, exc)
            return logs
        for pod in pods:
            name = pod["metadata"]["name"]
            seen.note(list(container_problems(name, pod.get("status") or {})))
            self.save(step, name, seen)
            if name in seen.logs:
                logs[name] = seen.logs[name]
        return logs
