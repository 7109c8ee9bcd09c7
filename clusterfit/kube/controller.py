"""The controller: an experiment's steps as PyTorchJobs, each created only after the previous one Succeeded.

    clusterfit submit config=quickstart                 # from a workstation (clusterfit.kube.commands)
    clusterfit submit --in-cluster config=/etc/clusterfit/config.yaml --owner-configmap exp-config

Decisions are pure functions of the objects the API server returns (`kube.status`: `verdict`,
`pod_problems`, `start_problems`; here `plan`), so recorded status sequences test them;
`Controller` makes the calls. A job is finished only when its `Failed` or `Succeeded` condition is
True (Failed checked first); a job that disappears after it was seen is lost, never a success. A
pod that cannot start fails the step after POD_START_TIMEOUT_S. A step published with the same values
of the keys it reads is skipped; from the first that is not (`steps_to_run`) on, every step runs.
The experiment's Lease (clusterfit/kube/lease.py) keeps a second controller out; one that lost it
starts nothing more.
An API server that is unreachable or failing (a restart, an upgrade) pauses the controller, with a
warning every try, until the step's STEP_TIMEOUT_S. The pods' logs are saved while the step runs
(the operator deletes a failed job's pods, and their logs with them). Imports neither torch nor faiss.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from clusterfit.artifacts.layout import MANIFEST, step_folders
from clusterfit.artifacts.manifest import read_manifest
from clusterfit.config import Config
from clusterfit.config.reads import changed_keys
from clusterfit.kube.client import Backoff, Conflict, Gone, Kube, KubeError, Unreachable
from clusterfit.kube.manifests import CONTAINER, build_step_job, job_name
from clusterfit.kube.pod_logs import PodLogs, StepPods
from clusterfit.kube.status import (
    FINISHED,
    condition_text,
    container_problems,
    crashed,
    exit_events,
    master_pod,
    oom_hint,
    pod_problems,
    restarts,
    retry_problem,
    spec_hash_of,
    start_problems,
    verdict,
)
from clusterfit.storage import Store

if TYPE_CHECKING:
    from clusterfit.lease import Lease

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def refuse_other_jobs(cfg: Config, kube: Kube, store: Store) -> None:
    """Before anything is created: raise ControllerError when a step still to run has a job of another spec
    (what `Controller.start` would find only when it reaches that step, after a ConfigMap was made for nothing)."""
    for step in steps_to_run(cfg, store):
        existing = kube.get_job(job_name(cfg, step))
        if existing is not None and not existing["metadata"].get("deletionTimestamp"):
            plan(existing, build_step_job(cfg, step, config_map_name=""))


def name_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def step_done(store: Store, folders: list[str]) -> bool:
    """All the step's folders hold their `_SUCCESS.json`."""
    return bool(folders) and all(store.exists(f"{folder}/{MANIFEST}") for folder in folders)


def outdated_keys(cfg: Config, store: Store, step: str) -> list[str] | None:
    """None when the step has not published; else the keys it reads that changed since its manifests were
    written (`changed_keys`; []: its outputs stand for this config)."""
    folders = step_folders(cfg, step)
    if not step_done(store, folders):
        return None
    return sorted({key for f in folders for key in changed_keys(read_manifest(store, f).get("config", {}), cfg, step)})


def steps_to_run(cfg: Config, store: Store) -> dict[str, str]:
    """{step: why} from the first step not published with this config on; the steps after it run too, their
    inputs may change (a step's pod skips itself when its fingerprint, config and inputs, is unchanged)."""
    steps: list[str] = list(cfg.PIPELINE.STEPS)
    for i, step in enumerate(steps):
        outdated = outdated_keys(cfg, store, step)
        if outdated == []:
            continue
        why = "not published yet"
        if outdated:
            why = f"published before {', '.join(outdated[:4])}{', ...' if len(outdated) > 4 else ''} changed"
        return {step: why} | {later: f"runs after {step}" for later in steps[i + 1 :]}
    return {}


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
        self.logs = PodLogs(kube, store, self.settings)
        self.current: str | None = None

    def run(self) -> None:
        """Every step in order; raises ControllerError (with the failure report) when one fails."""
        todo = steps_to_run(self.cfg, self.store)
        for step in self.cfg.PIPELINE.STEPS:
            if step not in todo:
                log.info("step %s: already done with this config (its %s): skipped", step, MANIFEST)
                continue
            log.info("step %s: %s", step, todo[step])
            deadline = time.monotonic() + self.settings.STEP_TIMEOUT_S
            job = self.outlast(deadline, self.start, step)
            self.current = job["metadata"]["name"]
            seen = StepPods()
            job = self.follow(step, job, seen, deadline)
            logs = self.outlast(deadline, self.logs.save_all, step, job, seen)
            if verdict(job) == "Failed":
                raise ControllerError(self.failure_report(step, job, logs, seen))
            self.check_outputs(step, job)
            self.current = None
            log.info("step %s: Succeeded", step)
        log.info("experiment %s: all steps done; artifacts under %s", self.cfg.EXPERIMENT.NAME, self.store.uri(""))

    def check_lease(self) -> None:
        """Raises LeaseLost once another controller has taken the experiment over (it adopts the running job), and
        Unreachable while renewals fail (an API server outage; kube/lease.py's ControllerLease)."""
        if self.lease is not None:
            self.lease.check()

    def outlast(self, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, tried again while the API server is unreachable or failing, until `deadline` (the step's
        STEP_TIMEOUT_S): an outage of the API server pauses the controller instead of ending the pipeline."""
        backoff = Backoff(self.settings, until=deadline)
        while True:
            try:
                return fn(*args)
            except Unreachable as exc:
                if time.monotonic() >= deadline:
                    raise ControllerError(
                        f"{exc}; giving up: the step's time (KUBERNETES.CONTROLLER.STEP_TIMEOUT_S="
                        f"{self.settings.STEP_TIMEOUT_S:.0f}) has run out"
                    ) from None
                backoff.wait(exc, failing_since=self.kube.failing_since)

    def start(self, step: str) -> dict[str, Any]:
        """Create the step's job, or adopt the identical one that already exists (once the Lease is confirmed)."""
        self.check_lease()
        desired = build_step_job(self.cfg, step, config_map_name=self.config_map_name, owner=self.owner)
        name = desired["metadata"]["name"]
        existing = self.outlive(self.kube.get_job(name))
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
        if ((existing.get("spec") or {}).get("runPolicy") or {}).get("suspend"):
            raise ControllerError(
                f"PyTorchJob {name} is suspended (by clusterfit cancel --suspend, or by a controller that stopped its "
                f"retries): resume it (kubectl -n {self.kube.namespace} patch pytorchjob {name} --type merge -p "
                f'\'{{"spec":{{"runPolicy":{{"suspend":false}}}}}}\') or delete it (clusterfit cancel '
                f"config=... {step}), then submit again"
            )
        log.info("step %s: adopted the existing PyTorchJob %s (same spec), now %s", step, name, verdict(existing))
        return existing

    def outlive(self, job: dict[str, Any] | None, poll_s: float = 1.0) -> dict[str, Any] | None:
        """`job`, or None once it is gone when it is on its way out: being deleted, or owned by a ConfigMap that
        no longer exists (`helm upgrade` to another config deleted the old one; the garbage collector deletes
        its jobs next). Waits up to POD_START_TIMEOUT_S; then the job is judged as it is."""
        deadline = time.monotonic() + self.settings.POD_START_TIMEOUT_S
        announced = False
        while job is not None and self.departing(job) and time.monotonic() < deadline:
            if not announced:
                log.info("PyTorchJob %s belongs to a config that is gone: waiting until it is deleted", name_of(job))
                announced = True
            time.sleep(poll_s)
            job = self.kube.get_job(name_of(job))
        return job

    def departing(self, job: dict[str, Any]) -> bool:
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return True
        for owner in meta.get("ownerReferences") or []:
            if owner.get("kind") == "ConfigMap":
                found = self.kube.get_config_map(owner["name"])
                if found is None or found["metadata"].get("uid") != owner.get("uid"):
                    return True
        return False

    def follow(self, step: str, job: dict[str, Any], seen: StepPods, deadline: float) -> dict[str, Any]:
        """Watch the job until Failed or Succeeded; list again on 410 and after a dropped connection, and
        keep trying while the API server is unreachable, until `deadline`. Every POD_CHECK_INTERVAL_S, look
        at its pods: fail the step when one cannot start for POD_START_TIMEOUT_S, keep the log of every
        container that crashed, and save the pods' logs every LOG_SAVE_INTERVAL_S."""
        name = job["metadata"]["name"]
        backoff = Backoff(self.settings, until=deadline)
        state = self.announce(job, "")
        while state not in FINISHED:
            if time.monotonic() > deadline:
                raise ControllerError(
                    f"PyTorchJob {name} did not finish within {self.settings.STEP_TIMEOUT_S:.0f}s "
                    f"(KUBERNETES.CONTROLLER.STEP_TIMEOUT_S); it is still {state}"
                )
            try:
                self.check_lease()
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
                backoff.wait(exc, failing_since=self.kube.failing_since)
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
                report = self.start_failure(step, job, problems[key], now - since, pods)
                raise ControllerError(f"{report}\n{self.halt(step, job)}")
        for pod in pods:
            name = pod["metadata"]["name"]
            if restarts(pod) > seen.restarts.get(name, 0) or (crashed(pod) and name not in seen.crash_logs):
                seen.note(list(container_problems(name, pod.get("status") or {})))
                self.logs.keep_crash(step, name, previous=not crashed(pod), seen=seen)
            seen.restarts[name] = restarts(pod)
        self.logs.save_running(step, pods, seen)
        seen.retries.see(pods)
        memory = getattr(self.cfg.KUBERNETES.RESOURCES, step.upper()).MEMORY
        problem = retry_problem(step, pods, seen.retries, self.cfg.KUBERNETES.BACKOFF_LIMIT, memory)
        if problem:
            raise ControllerError(f"{self.retry_failure(step, job, problem, pods, seen)}\n{self.halt(step, job)}")

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
        lines.append("  fix the cause (image, resources, node selector)")
        return "\n".join(lines)

    def retry_failure(
        self, step: str, job: dict[str, Any], problem: str, pods: list[dict[str, Any]], seen: StepPods
    ) -> str:
        """Why the step fails although the operator would retry it again (an OOMKilled container, too many
        retries): what was seen of the pods, the exit codes the operator saw, the master's log."""
        name = job["metadata"]["name"]
        lines = [f"step {step} failed: PyTorchJob {name}: {problem}"]
        try:
            events = [e for obj in [name, *(p["metadata"]["name"] for p in pods)] for e in self.kube.list_events(obj)]
        except KubeError as exc:
            events = []
            lines.append(f"  (cannot read the events: {exc})")
        hint = oom_hint(step, getattr(self.cfg.KUBERNETES.RESOURCES, step.upper()).MEMORY)
        found = [*seen.problems, *exit_events(events, hint), *pod_problems(pods, events, self.settings.MAX_EVENTS)]
        lines += [f"  {p}" for p in dict.fromkeys(found)]
        seen_logs = {pod: text for pod, text in {**seen.crash_logs, **seen.logs}.items() if text}
        lines += self.log_tail(master_pod(name), seen_logs)
        return "\n".join(lines)

    def halt(self, step: str, job: dict[str, Any]) -> str:
        """Suspend a job the operator would go on retrying (or waiting for) until activeDeadlineSeconds: the
        operator deletes its pods; the job stays for inspection, its logs saved. Returns what to do next."""
        name = job["metadata"]["name"]
        try:
            self.kube.patch_job(name, {"spec": {"runPolicy": {"suspend": True}}})
        except KubeError as exc:
            return (
                f"  (cannot suspend PyTorchJob {name}: {exc}); the operator retries it until activeDeadlineSeconds: "
                f"delete it (clusterfit cancel config=... {step}), fix the cause and submit again"
            )
        log.info("step %s: suspended PyTorchJob %s: no more retries", step, name)
        return (
            f"  PyTorchJob {name} is suspended (no more retries) and kept for inspection: delete it (clusterfit cancel "
            f"config=... {step}), fix the cause and submit again"
        )

    def log_tail(self, pod: str, logs: dict[str, str]) -> list[str]:
        count = self.settings.LOG_TAIL_LINES
        try:
            text = logs[pod] if pod in logs else self.kube.read_log(pod, CONTAINER, tail_lines=count)
        except KubeError as exc:
            return [f"  (no log from pod {pod}: {exc})"]
        return [f"  last {count} lines of pod {pod}:", *(f"    {line}" for line in tail(text, count))]
