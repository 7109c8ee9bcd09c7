"""The controller: an experiment's steps as PyTorchJobs, each created only after the previous one Succeeded.

    clusterfit submit config=quickstart                 # from a workstation (clusterfit.kube.commands)
    clusterfit submit --in-cluster config=/etc/clusterfit/config.yaml --owner-configmap exp-config

Decisions are pure functions of the objects the API server returns (`kube.status`: `verdict`,
`pod_problems`, `start_problems`; here `plan`), so recorded status sequences test them;
`Controller` makes the calls. A job is finished only when its `Failed` or `Succeeded` condition is
True (Failed checked first); a job that disappears after it was seen is lost, never a success. A
pod that cannot start fails the step after POD_START_TIMEOUT_S. The experiment's Lease
(clusterfit/kube/lease.py) keeps a second controller out; one that lost it starts nothing more.
Imports neither torch nor faiss.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clusterfit.artifacts.layout import MANIFEST, pod_log, step_folders
from clusterfit.config import Config
from clusterfit.kube.client import Backoff, Conflict, Gone, Kube, KubeError, Unreachable
from clusterfit.kube.manifests import CONTAINER, build_step_job
from clusterfit.kube.status import (
    FINISHED,
    condition_text,
    container_problems,
    crashed,
    master_pod,
    pod_problems,
    restarts,
    spec_hash_of,
    start_problems,
    verdict,
)
from clusterfit.storage import StorageError, Store

if TYPE_CHECKING:
    from clusterfit.lease import Lease

log = logging.getLogger(__name__)

RESTART_MARK = "\n---- the container restarted; the log of the new one follows ----\n"


def joined_logs(crashed: str, current: str) -> str:
    """A pod's log across a restart: the crashed container's, then the new one's (when it has written any)."""
    if not crashed or crashed == current:
        return current
    return f"{crashed}{RESTART_MARK}{current}" if current else crashed


class ControllerError(RuntimeError):
    """A step failed, was lost, or cannot be started; the message says why and what to do."""


# ---- pure decisions --------------------------------------------------------------------------


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


@dataclass
class StepPods:
    """What the controller saw of one step's pods while the step ran. Kept here because the operator
    deletes a failed job's running pods (and with them their logs and status)."""

    stuck_since: dict[tuple[str, str], float] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    crash_logs: dict[str, str] = field(default_factory=dict)  # pod -> log of its last crashed container
    problems: list[str] = field(default_factory=list)  # OOMKilled, exit codes, ... in the order seen

    def note(self, found: list[str]) -> None:
        self.problems += [p for p in found if p not in self.problems]


def tail(text: str, lines: int) -> list[str]:
    return text.splitlines()[-lines:] if lines else []


# ---- the calls -----------------------------------------------------------------------------


class Controller:
    """Runs cfg.PIPELINE.STEPS as jobs in `kube`'s namespace; `current` names the job being followed;
    `lease`, the experiment's, is checked before every step and while following one."""

    def __init__(
        self,
        cfg: Config,
        kube: Kube,
        store: Store,
        *,
        config_map_name: str,
        owner: dict[str, Any] | None,
        lease: Lease | None = None,
    ) -> None:
        self.cfg = cfg
        self.kube = kube
        self.store = store
        self.config_map_name = config_map_name
        self.owner = owner
        self.lease = lease
        self.settings = cfg.KUBERNETES.CONTROLLER
        self.current: str | None = None

    def run(self) -> None:
        """Every step in order; raises ControllerError (with the failure report) when one fails."""
        for step in self.cfg.PIPELINE.STEPS:
            if step_done(self.store, step_folders(self.cfg, step)):
                log.info("step %s: already done (its %s exists): skipped", step, MANIFEST)
                continue
            self.check_lease()
            job = self.start(step)
            self.current = job["metadata"]["name"]
            seen = StepPods()
            job = self.follow(step, job, seen)
            logs = self.save_logs(step, job, seen)
            if verdict(job) == "Failed":
                raise ControllerError(self.failure_report(step, job, logs, seen))
            self.check_outputs(step, job)
            self.current = None
            log.info("step %s: Succeeded", step)
        log.info("experiment %s: all steps done; artifacts under %s", self.cfg.EXPERIMENT.NAME, self.store.uri(""))

    def check_lease(self) -> None:
        """Raises LeaseLost once another controller has taken the experiment over (it adopts the running job)."""
        if self.lease is not None:
            self.lease.check()

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

    def follow(self, step: str, job: dict[str, Any], seen: StepPods) -> dict[str, Any]:
        """Watch the job until Failed or Succeeded; list again on 410 and after a dropped connection.
        Every POD_CHECK_INTERVAL_S, look at its pods: fail the step when one cannot start for
        POD_START_TIMEOUT_S, and keep the log of every container that crashed."""
        name = job["metadata"]["name"]
        deadline = time.monotonic() + self.settings.STEP_TIMEOUT_S
        backoff = Backoff(self.settings)
        state = self.announce(job, "")
        while state not in FINISHED:
            self.check_lease()
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
                    self.inspect_pods(step, job, seen)
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
        timeout_s = self.settings.POD_CHECK_INTERVAL_S
        with contextlib.closing(self.kube.watch_job(job["metadata"]["name"], resource_version, timeout_s)) as events:
            for kind, obj in events:
                if kind == "BOOKMARK":
                    continue
                job = self.same_job(None if kind == "DELETED" else obj, job)
                state = self.announce(job, state)
                if state in FINISHED or time.monotonic() > deadline:
                    return job
        elapsed_s = time.monotonic() - started
        if elapsed_s < timeout_s - 0.5:  # not the server's timeout: a restart or a proxy cut it
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

    def inspect_pods(self, step: str, job: dict[str, Any], seen: StepPods) -> None:
        """Fail the step when a pod cannot start for too long; keep the logs of crashed containers."""
        pods = self.kube.list_pods(job["metadata"]["name"])
        now = time.monotonic()
        problems = start_problems(pods)
        for key, text in problems.items():
            if key not in seen.stuck_since:
                limit_s = self.settings.POD_START_TIMEOUT_S
                log.warning("step %s: %s (the step fails if this lasts %.0fs)", step, text, limit_s)
        seen.stuck_since = {key: seen.stuck_since.get(key, now) for key in problems}
        for key, since in seen.stuck_since.items():
            if now - since >= self.settings.POD_START_TIMEOUT_S:
                raise ControllerError(self.start_failure(step, job, problems[key], now - since, pods))
        for pod in pods:
            name = pod["metadata"]["name"]
            if restarts(pod) > seen.restarts.get(name, 0) or (crashed(pod) and name not in seen.crash_logs):
                seen.note(list(container_problems(name, pod.get("status") or {})))
                self.keep_crash_log(step, name, previous=not crashed(pod), seen=seen)
            seen.restarts[name] = restarts(pod)

    def keep_crash_log(self, step: str, pod: str, previous: bool, seen: StepPods) -> None:
        """The log of the pod's crashed container (the instance before its restart when `previous`)."""
        try:
            seen.crash_logs[pod] = self.kube.read_log(pod, CONTAINER, previous=previous)
        except KubeError as exc:
            log.warning("step %s: cannot read the log of crashed pod %s: %s", step, pod, exc)
            return
        self.put_log(step, pod, seen.crash_logs[pod])

    def put_log(self, step: str, pod: str, text: str) -> None:
        if not self.settings.SAVE_LOGS:
            return
        try:
            self.store.put_bytes(pod_log(step, pod), text.encode())
            log.info("step %s: saved the log of pod %s to %s", step, pod, self.store.uri(pod_log(step, pod)))
        except StorageError as exc:
            log.warning("step %s: cannot save the log of pod %s: %s", step, pod, exc)

    def save_logs(self, step: str, job: dict[str, Any], seen: StepPods) -> dict[str, str]:
        """Every pod's log, also saved to <root>/logs/<step>/<pod>.log before clean-up or TTL removes the
        pods: the current container's, after the last crashed one's when there was a crash."""
        logs = dict(seen.crash_logs)  # pods the operator has deleted keep what was seen of them
        try:
            pods = self.kube.list_pods(job["metadata"]["name"])
        except KubeError as exc:
            log.warning("step %s: cannot list its pods to save their logs: %s", step, exc)
            return logs
        for pod in pods:
            name = pod["metadata"]["name"]
            seen.note(list(container_problems(name, pod.get("status") or {})))
            try:
                current = self.kube.read_log(name, CONTAINER)
            except KubeError as exc:
                log.warning("step %s: cannot read the log of pod %s: %s", step, name, exc)
                continue
            logs[name] = joined_logs(seen.crash_logs.get(name, ""), current)
            self.put_log(step, name, logs[name])
        return logs

    def failure_report(self, step: str, job: dict[str, Any], logs: dict[str, str], seen: StepPods) -> str:
        """The Failed condition, the pods' problems and events (also of pods already deleted, as seen
        while the step ran), and the tail of the master pod's log."""
        name = job["metadata"]["name"]
        lines = [f"step {step} failed: PyTorchJob {name}: {condition_text(job, 'Failed') or 'Failed'}"]
        try:
            pods = self.kube.list_pods(name)
            events = [e for obj in [name, *(p["metadata"]["name"] for p in pods)] for e in self.kube.list_events(obj)]
            problems = pod_problems(pods, events, self.settings.MAX_EVENTS)
        except KubeError as exc:
            pods, problems = [], []
            lines.append(f"  (cannot read the pods and events: {exc})")
        lines += [f"  {p}" for p in dict.fromkeys([*seen.problems, *problems])]
        master = master_pod(name)
        if master in logs or any(p["metadata"]["name"] == master for p in pods):
            lines += self.log_tail(master, logs)
        elif not pods:
            lines.append("  (no pods left to show a log from)")
        lines.append(
            "  the job is kept for inspection; delete it (clusterfit cancel config=...) before submitting again"
        )
        return "\n".join(lines)

    def start_failure(
        self, step: str, job: dict[str, Any], problem: str, waited_s: float, pods: list[dict[str, Any]]
    ) -> str:
        """Why the step fails although its job has not: a pod that does not start."""
        name = job["metadata"]["name"]
        lines = [
            f"step {step} failed: PyTorchJob {name}: {problem} for {waited_s:.0f}s "
            f"(KUBERNETES.CONTROLLER.POD_START_TIMEOUT_S={self.settings.POD_START_TIMEOUT_S:.0f})"
        ]
        events = [e for obj in [name, *(p["metadata"]["name"] for p in pods)] for e in self.kube.list_events(obj)]
        lines += [f"  {p}" for p in pod_problems(pods, events, self.settings.MAX_EVENTS)]
        lines.append(
            "  the job is kept for inspection; fix the cause (image, resources, node selector), delete the job "
            "(clusterfit cancel config=...) and submit again"
        )
        return "\n".join(lines)

    def log_tail(self, pod: str, logs: dict[str, str]) -> list[str]:
        count = self.settings.LOG_TAIL_LINES
        try:
            text = logs[pod] if pod in logs else self.kube.read_log(pod, CONTAINER, tail_lines=count)
        except KubeError as exc:
            return [f"  (no log from pod {pod}: {exc})"]
        return [f"  last {count} lines of pod {pod}:", *(f"    {line}" for line in tail(text, count))]
