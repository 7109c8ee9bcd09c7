"""The controller: an experiment's steps as PyTorchJobs, each created only after the previous one Succeeded.

    clusterfit submit config=quickstart                 # from a workstation (clusterfit.kube.commands)
    clusterfit submit --in-cluster config=/etc/clusterfit/config.yaml --owner-configmap exp-config

Decisions are pure functions of the objects the API server returns (`verdict`, `plan`,
`pod_problems`), so recorded status sequences test them; `Controller` makes the calls. A job is
finished only when its `Failed` or `Succeeded` condition is True (Failed checked first); a job
that disappears after it was seen is lost, never a success. Imports neither torch nor faiss.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from clusterfit.artifacts.layout import MANIFEST, pod_log, step_folders
from clusterfit.config import Config
from clusterfit.kube.client import Backoff, Conflict, Gone, Kube, KubeError, Unreachable
from clusterfit.kube.manifests import CONTAINER, HASH_ANNOTATION, build_step_job
from clusterfit.storage import StorageError, Store

log = logging.getLogger(__name__)

FINISHED = ("Succeeded", "Failed")
PROGRESS = ("Suspended", "Restarting", "Running", "Created")


class ControllerError(RuntimeError):
    """A step failed, was lost, or cannot be started; the message says why and what to do."""


# ---- pure decisions --------------------------------------------------------------------------


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


def plan(existing: dict[str, Any] | None, desired: dict[str, Any]) -> str:
    """`create` when no job has the name, `adopt` when one has the same spec hash; raises otherwise."""
    if existing is None:
        return "create"
    name = desired["metadata"]["name"]
    if spec_hash_of(existing) == spec_hash_of(desired):
        return "adopt"
    raise ControllerError(
        f"a PyTorchJob named {name} already exists with a different spec (spec-hash "
        f"{spec_hash_of(existing) or 'missing'}, this config gives {spec_hash_of(desired)}); refusing to replace it. "
        f"Cancel or delete it first (clusterfit cancel config=..., or kubectl delete pytorchjob {name}), then submit "
        "again."
    )


def step_done(store: Store, folders: list[str]) -> bool:
    """All the step's folders hold their `_SUCCESS.json` (what `clusterfit run` skips on, too)."""
    return bool(folders) and all(store.exists(f"{folder}/{MANIFEST}") for folder in folders)


def master_pod(job_name: str) -> str:
    return f"{job_name}-master-0"


def _container_problems(pod: str, status: dict[str, Any]) -> Iterable[str]:
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
        found.extend(_container_problems(name, status))
    warnings = [e for e in events if e.get("type") == "Warning"][-max_events:] if max_events else []
    for event in warnings:
        count = f" (x{event['count']})" if (event.get("count") or 1) > 1 else ""
        found.append(
            f"event on {event['involvedObject'].get('name')}: {event.get('reason')}: {event.get('message')}{count}"
        )
    return list(dict.fromkeys(found))


def tail(text: str, lines: int) -> list[str]:
    return text.splitlines()[-lines:] if lines else []


# ---- the calls -----------------------------------------------------------------------------


class Controller:
    """Runs cfg.PIPELINE.STEPS as jobs in `kube`'s namespace; `current` names the job being followed."""

    def __init__(
        self, cfg: Config, kube: Kube, store: Store, *, config_map_name: str, owner: dict[str, Any] | None
    ) -> None:
        self.cfg = cfg
        self.kube = kube
        self.store = store
        self.config_map_name = config_map_name
        self.owner = owner
        self.settings = cfg.KUBERNETES.CONTROLLER
        self.current: str | None = None

    def run(self) -> None:
        """Every step in order; raises ControllerError (with the failure report) when one fails."""
        for step in self.cfg.PIPELINE.STEPS:
            if step_done(self.store, step_folders(self.cfg, step)):
                log.info("step %s: already done (its %s exists): skipped", step, MANIFEST)
                continue
            job = self.start(step)
            self.current = job["metadata"]["name"]
            job = self.follow(job)
            logs = self.save_logs(step, job)
            if verdict(job) == "Failed":
                raise ControllerError(self.failure_report(step, job, logs))
            self.check_outputs(step, job)
            self.current = None
            log.info("step %s: Succeeded", step)
        log.info("experiment %s: all steps done; artifacts under %s", self.cfg.EXPERIMENT.NAME, self.store.uri(""))

    def start(self, step: str) -> dict[str, Any]:
        """Create the step's job, or adopt the identical one that already exists."""
        desired = build_step_job(self.cfg, step, config_map_name=self.config_map_name, owner=self.owner)
        name = desired["metadata"]["name"]
        existing = self.kube.get_job(name)
        if plan(existing, desired) == "create":
            try:
                created = self.kube.create_job(desired)
                log.info("step %s: created PyTorchJob %s", step, name)
                return created
            except Conflict:  # created meanwhile (a retried create, another controller): judge that one
                existing = self.kube.get_job(name)
                if existing is None or plan(existing, desired) != "adopt":
                    raise ControllerError(
                        f"PyTorchJob {name} appeared and vanished while creating it; submit again"
                    ) from None
        assert existing is not None
        log.info("step %s: adopted the existing PyTorchJob %s (same spec), now %s", step, name, verdict(existing))
        return existing

    def follow(self, job: dict[str, Any]) -> dict[str, Any]:
        """Watch the job until Failed or Succeeded; list again on 410 and after a dropped connection."""
        name = job["metadata"]["name"]
        deadline = time.monotonic() + self.settings.STEP_TIMEOUT_S
        backoff = Backoff(self.settings)
        state = self.announce(job, "")
        while state not in FINISHED:
            if time.monotonic() > deadline:
                raise ControllerError(
                    f"PyTorchJob {name} did not finish within {self.settings.STEP_TIMEOUT_S:.0f}s "
                    f"(KUBERNETES.CONTROLLER.STEP_TIMEOUT_S); it is still {state}"
                )
            try:
                items, resource_version = self.kube.list_jobs(name=name)
                job = self.same_job(items[0] if items else None, job)
                state = self.announce(job, state)
                if state not in FINISHED:
                    job = self.watch(job, resource_version, deadline)
                    state = verdict(job)
                backoff.reset()
            except Gone:
                log.info("PyTorchJob %s: watch expired (410 Gone); listing again", name)
            except Unreachable as exc:
                backoff.wait(exc)
        return job

    def watch(self, job: dict[str, Any], resource_version: str, deadline: float) -> dict[str, Any]:
        """Follow one watch request until the job finishes, the deadline passes or the server ends it."""
        state, started = verdict(job), time.monotonic()
        with contextlib.closing(self.kube.watch_job(job["metadata"]["name"], resource_version)) as events:
            for kind, obj in events:
                if kind == "BOOKMARK":
                    continue
                job = self.same_job(None if kind == "DELETED" else obj, job)
                state = self.announce(job, state)
                if state in FINISHED or time.monotonic() > deadline:
                    return job
        elapsed_s = time.monotonic() - started
        if elapsed_s < self.settings.WATCH_TIMEOUT_S:  # not the server's timeout: a restart or a proxy cut it
            log.info(
                "PyTorchJob %s: the watch ended after %.1fs; listing again",
                job["metadata"]["name"],
                elapsed_s,
            )
        return job

    def same_job(self, job: dict[str, Any] | None, seen: dict[str, Any]) -> dict[str, Any]:
        """`job`, unless it vanished or another job took its name since `seen`: then the step is lost."""
        name, uid = seen["metadata"]["name"], seen["metadata"].get("uid")
        if job is None or (uid and job["metadata"].get("uid") != uid):
            what = "was deleted" if job is None else "was replaced by another job of the same name"
            raise ControllerError(
                f"PyTorchJob {name} {what} before it finished (TTL, clean-up or a person): the step is lost, "
                f"not succeeded; submit again to rerun it"
            )
        return job

    def announce(self, job: dict[str, Any], previous: str) -> str:
        """Log the job's state when it changed; return it."""
        state = verdict(job)
        if state != previous:
            detail = condition_text(job, state)
            log.info("PyTorchJob %s: %s%s", job["metadata"]["name"], state, f" ({detail})" if detail else "")
        return state

    def check_outputs(self, step: str, job: dict[str, Any]) -> None:
        """Never start a step before its input exists: a Succeeded job must have published its outputs."""
        folders = step_folders(self.cfg, step)
        if self.settings.VERIFY_OUTPUTS and not step_done(self.store, folders):
            missing = [self.store.uri(f"{f}/{MANIFEST}") for f in folders if not self.store.exists(f"{f}/{MANIFEST}")]
            raise ControllerError(
                f"step {step}: PyTorchJob {job['metadata']['name']} Succeeded but its outputs are not published "
                f"(missing {', '.join(missing)}); not starting the next step"
            )

    def save_logs(self, step: str, job: dict[str, Any]) -> dict[str, str]:
        """Copy every pod's log to <root>/logs/<step>/<pod>.log before clean-up or TTL removes the pods."""
        logs: dict[str, str] = {}
        if not self.settings.SAVE_LOGS:
            return logs
        try:
            pods = self.kube.list_pods(job["metadata"]["name"])
        except KubeError as exc:
            log.warning("step %s: cannot list its pods to save their logs: %s", step, exc)
            return logs
        for pod in (p["metadata"]["name"] for p in pods):
            try:
                logs[pod] = self.kube.read_log(pod, CONTAINER)
                self.store.put_bytes(pod_log(step, pod), logs[pod].encode())
                log.info("step %s: saved the log of pod %s to %s", step, pod, self.store.uri(pod_log(step, pod)))
            except (KubeError, StorageError) as exc:
                log.warning("step %s: cannot save the log of pod %s: %s", step, pod, exc)
        return logs

    def failure_report(self, step: str, job: dict[str, Any], logs: dict[str, str]) -> str:
        """The Failed condition, the pods' problems and events, and the tail of the master pod's log."""
        name = job["metadata"]["name"]
        lines = [f"step {step} failed: PyTorchJob {name}: {condition_text(job, 'Failed') or 'Failed'}"]
        try:
            pods = self.kube.list_pods(name)
            events = [e for obj in [name, *(p["metadata"]["name"] for p in pods)] for e in self.kube.list_events(obj)]
            lines += [f"  {p}" for p in pod_problems(pods, events, self.settings.MAX_EVENTS)]
        except KubeError as exc:
            pods = []
            lines.append(f"  (cannot read the pods and events: {exc})")
        master = master_pod(name)
        if master in logs or any(p["metadata"]["name"] == master for p in pods):
            lines += self.log_tail(master, logs)
        elif not pods:
            lines.append("  (no pods left to show a log from)")
        lines.append(
            "  the job is kept for inspection; delete it (clusterfit cancel config=...) before submitting again"
        )
        return "\n".join(lines)

    def log_tail(self, pod: str, logs: dict[str, str]) -> list[str]:
        count = self.settings.LOG_TAIL_LINES
        try:
            text = logs[pod] if pod in logs else self.kube.read_log(pod, CONTAINER, tail_lines=count)
        except KubeError as exc:
            return [f"  (no log from pod {pod}: {exc})"]
        return [f"  last {count} lines of pod {pod}:", *(f"    {line}" for line in tail(text, count))]
