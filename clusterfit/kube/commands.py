"""`clusterfit submit | status | logs | cancel`: the controller and its companions on the command line.

    clusterfit submit config=quickstart                      # create and follow the step jobs in order
    clusterfit submit config=quickstart --wait               # after the controller that runs it now
    clusterfit submit config=quickstart --dry-run            # print the manifests, touch nothing
    clusterfit submit config=quickstart --server-dry-run     # the API server validates them, creates nothing
    clusterfit submit --in-cluster config=/etc/clusterfit/config.yaml --owner-configmap exp-config-1a2b3c  # the chart
    clusterfit status config=quickstart
    clusterfit logs cluster config=quickstart --follow       # the master pod's `pytorch` container
    clusterfit cancel config=quickstart [STEP] [--suspend]      # also stops the chart's controller Job first

Connection flags everywhere: --kubeconfig, --context, --namespace (else KUBERNETES.NAMESPACE), --in-cluster.
Exit codes: 0 done, 1 a step failed, the API server refused or another controller runs the experiment
(its Lease, clusterfit/kube/lease.py), 2 bad config, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml

from clusterfit.artifacts.layout import pod_log
from clusterfit.artifacts.manifest import ArtifactError
from clusterfit.config import Config, config_from_args
from clusterfit.kube.client import Conflict, Kube, KubeError, load_api_client
from clusterfit.kube.controller import Controller, ControllerError, outdated_keys, refuse_other_jobs
from clusterfit.kube.lease import hold_experiment
from clusterfit.kube.manifests import (
    CONTAINER,
    EXPERIMENT_LABEL,
    ManifestError,
    build_all,
    build_config_map,
    job_name,
)
from clusterfit.kube.pod_logs import joined_logs
from clusterfit.kube.status import FINISHED, condition_text, master_pod, restarts, verdict
from clusterfit.lease import LeaseError
from clusterfit.storage import StorageError, Store, open_store

log = logging.getLogger(__name__)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Flags shared by every command; `args` collects config=... and config.A.B=... (and a step name)."""
    p = argparse.ArgumentParser(prog=f"clusterfit {prog}", description=description)
    p.add_argument("args", nargs="*", help="config=<name or path>, config.KEY.PATH=value overrides")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: its current context)")
    p.add_argument("--namespace", help="namespace of the step jobs (default: KUBERNETES.NAMESPACE)")
    p.add_argument("--in-cluster", action="store_true", help="use the pod's service account (the chart's Job)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, Config, list[str]]:
    """Flags, the config (namespace override applied) and the bare words among the arguments."""
    ns = p.parse_intermixed_args(argv)
    words = [a for a in ns.args if "=" not in a]
    cfg = config_from_args([a for a in ns.args if "=" in a])
    if ns.namespace:
        cfg.KUBERNETES.NAMESPACE = ns.namespace
    return ns, cfg, words


def connect(ns: argparse.Namespace, cfg: Config) -> Kube:
    api = load_api_client(kubeconfig=ns.kubeconfig, context=ns.context, in_cluster=ns.in_cluster)
    return Kube(api, cfg.KUBERNETES.NAMESPACE, cfg.KUBERNETES.CONTROLLER)


def experiment_store(cfg: Config) -> Store:
    return open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)


def guarded(command: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Refusals from the API server, the manifests, a failed step or the experiment's Lease: one message, exit 1."""

    def run(argv: list[str]) -> int:
        try:
            return command(argv)
        except (KubeError, ControllerError, ManifestError, LeaseError) as exc:
            print(f"clusterfit: error: {exc}", file=sys.stderr)
            return 1

    run.__doc__ = command.__doc__
    return run


# ---- submit ------------------------------------------------------------------------------------


def owner_reference(config_map: dict[str, Any]) -> dict[str, Any]:
    """Jobs owned by the experiment's ConfigMap go when it goes (`helm uninstall`)."""
    meta = config_map["metadata"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"], "uid": meta["uid"]}


def ensure_config_map(kube: Kube, cfg: Config, owner_name: str | None) -> tuple[str, dict[str, Any]]:
    """The ConfigMap the step pods read their config from, and the ownerReference to it.

    With --owner-configmap (the chart) it must exist: the controller may only `get` ConfigMaps.
    Without, it is this config's immutable, content-addressed one (`manifests.build_config_map`), created
    when absent; another config is another ConfigMap, so a job started earlier keeps reading its own.
    """
    if owner_name:
        found = kube.get_config_map(owner_name)
        if found is None:
            raise ControllerError(f"--owner-configmap {owner_name}: no such ConfigMap in namespace {kube.namespace}")
        return owner_name, owner_reference(found)
    desired = build_config_map(cfg)
    name = desired["metadata"]["name"]
    found = kube.get_config_map(name)
    if found is None:
        try:
            found = kube.create_config_map(desired)
            log.info("created ConfigMap %s (immutable) with the experiment's config", name)
        except Conflict:  # another submit of the same config created it meanwhile
            found = kube.get_config_map(name)
    if found is None or found.get("data") != desired["data"]:
        raise ControllerError(
            f"ConfigMap {name} holds another config.yaml than this config's, although its name carries the digest "
            f"of its content (it was replaced by hand, or is being deleted): delete it (kubectl -n {kube.namespace} "
            f"delete configmap {name}) and submit again"
        )
    return name, owner_reference(found)


def print_manifests(objects: list[dict[str, Any]]) -> None:
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")


def server_dry_run(kube: Kube, jobs: list[dict[str, Any]]) -> int:
    """Have the API server validate each job (dryRun=All, strict fields); print its verdict for each."""
    failures = 0
    for job in jobs:
        try:
            kube.create_job(job, dry_run=True)
            print(f"pytorchjob/{job['metadata']['name']} valid (server dry run)")
        except KubeError as exc:
            failures += 1
            print(f"pytorchjob/{job['metadata']['name']} rejected by the API server: {exc}", file=sys.stderr)
    return 1 if failures else 0


def ask_cancel(job: str) -> bool:
    """On a terminal, ask whether Ctrl-C means cancel the running job or detach from it."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = input(f"\nPyTorchJob {job} is still running. [c]ancel it, or [d]etach and leave it running? [d] ")
    except (EOFError, KeyboardInterrupt):
        return False
    return answer.strip().lower().startswith("c")


def follow_pipeline(controller: Controller, kube: Kube) -> int:
    """Run the controller in the foreground; Ctrl-C cancels the running job or detaches from it (exit 130).

    Ctrl-C can land inside a library that turns the KeyboardInterrupt into an error of its own (pydantic,
    building the kubernetes client's validators on a method's first call, raises SchemaError). So the
    handler notes that the user interrupted, and any error after that note counts as the interrupt."""
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        controller.run()
        return 0
    except KeyboardInterrupt:
        return cancel_or_detach(controller.current, kube)
    except Exception:
        if interrupted.is_set():
            return cancel_or_detach(controller.current, kube)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def cancel_or_detach(job: str | None, kube: Kube) -> int:
    """After Ctrl-C: delete the running job when the user asks for it on a terminal, else leave it running."""
    if job and ask_cancel(job):
        kube.delete_job(job)
        print(f"clusterfit: cancelled: deleted PyTorchJob {job}", file=sys.stderr)
    elif job:
        print(
            f"clusterfit: detached: PyTorchJob {job} keeps running; `clusterfit submit` with the same "
            "config adopts it, `clusterfit status` shows it, `clusterfit cancel` stops it",
            file=sys.stderr,
        )
    return 130


@guarded
def cli_submit(argv: list[str]) -> int:
    """Create and follow the experiment's step jobs in order (see the module docstring)."""
    p = parser("submit", "run the pipeline on Kubernetes, one PyTorchJob per step, in order")
    p.add_argument("--dry-run", action="store_true", help="print the manifests and exit")
    p.add_argument(
        "--server-dry-run", action="store_true", help="have the API server validate the jobs; create nothing"
    )
    p.add_argument("--owner-configmap", metavar="NAME", help="existing ConfigMap with the config; jobs are owned by it")
    p.add_argument(
        "--wait",
        action="store_true",
        help="when another controller runs the experiment (its Lease), wait until it ends instead of refusing",
    )
    ns, cfg, _ = parse(p, argv)
    if ns.dry_run:
        print_manifests(build_all(cfg, config_map_name=ns.owner_configmap))
        return 0
    kube = connect(ns, cfg)
    if ns.server_dry_run:
        jobs = [o for o in build_all(cfg, config_map_name=ns.owner_configmap) if o.get("kind") == "PyTorchJob"]
        return server_dry_run(kube, jobs)
    with hold_experiment(kube, cfg, wait=ns.wait) as lease:
        store = experiment_store(cfg)
        if not ns.owner_configmap:
            refuse_other_jobs(cfg, kube, store)
        config_map_name, owner = ensure_config_map(kube, cfg, ns.owner_configmap)
        controller = Controller(cfg, kube, store, config_map_name=config_map_name, owner=owner, lease=lease)
        return follow_pipeline(controller, kube)


# ---- status, logs, cancel ----------------------------------------------------------------------


def step_jobs(cfg: Config, kube: Kube, steps: list[str] | None = None) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(step, job name, job or None) for the given steps, else every configured one."""
    chosen = steps or list(cfg.PIPELINE.STEPS)
    unknown = [s for s in chosen if s not in cfg.PIPELINE.STEPS]
    if unknown:
        raise ControllerError(f"unknown step {unknown[0]!r}; this experiment runs {', '.join(cfg.PIPELINE.STEPS)}")
    return [(step, job_name(cfg, step), kube.get_job(job_name(cfg, step))) for step in chosen]


def outputs_state(store: Store, cfg: Config, step: str) -> str:
    """`published`, `outdated` (published before a key the step reads changed: a submit reruns it) or `-`."""
    try:
        outdated = outdated_keys(cfg, store, step)
    except (StorageError, ArtifactError) as exc:
        return f"unknown ({exc})"
    return "-" if outdated is None else "outdated" if outdated else "published"


@guarded
def cli_status(argv: list[str]) -> int:
    """One line per step: its job's state (and why), and whether its outputs are published."""
    ns, cfg, words = parse(parser("status", "show the experiment's step jobs and their conditions"), argv)
    kube, store = connect(ns, cfg), experiment_store(cfg)
    print(f"{'STEP':<9} {'JOB':<40} {'STATE':<11} {'OUTPUTS':<10} DETAIL")
    for step, name, job in step_jobs(cfg, kube, words):
        state = verdict(job) if job else "absent"
        detail = condition_text(job, state) if job else ""
        print(f"{step:<9} {name:<40} {state:<11} {outputs_state(store, cfg, step):<10} {detail}".rstrip())
    return 0


def wait_for_pod(kube: Kube, pod: str, poll_s: float = 2.0) -> None:
    """Until the pod exists and its container started (its log is readable)."""
    announced = False
    while True:
        found = kube.get_pod(pod)
        phase = ((found or {}).get("status") or {}).get("phase")
        if phase in ("Running", "Succeeded", "Failed"):
            return
        if not announced:
            print(f"waiting for pod {pod} to start ...", file=sys.stderr)
            announced = True
        time.sleep(poll_s)


@guarded
def cli_logs(argv: list[str]) -> int:
    """The master pod's log of a step (default: the latest step with a job); --follow streams it. Once the pod is
    gone (deleted with its failed job, or by clean-up): the copy the controller saved while the step ran."""
    p = parser("logs", "print (or --follow) a step's master pod log")
    p.add_argument("--follow", "-f", action="store_true", help="wait for the pod, then stream its log")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    ns, cfg, words = parse(p, argv)
    kube = connect(ns, cfg)
    existing = [(step, name, job) for step, name, job in step_jobs(cfg, kube, words) if job or words]
    if not existing:
        raise ControllerError(f"experiment {cfg.EXPERIMENT.NAME} has no step jobs in namespace {kube.namespace}")
    step, name, job = existing[-1]
    pod = master_pod(name)
    found = kube.get_pod(pod)
    if ns.follow and (found is not None or (job is not None and verdict(job) not in FINISHED)):
        wait_for_pod(kube, pod)
        for line in kube.stream_log(pod, CONTAINER):
            print(line, flush=True)
        return 0
    if found is None:  # gone, or not coming: the copy the controller saved while the step ran
        store, key = experiment_store(cfg), pod_log(step, pod)
        if not store.exists(key):
            raise ControllerError(
                f"pod {pod} does not exist (yet, or any more) and no saved log is at {store.uri(key)}"
            )
        print(f"pod {pod} is gone; its log as the controller saved it at {store.uri(key)}:", file=sys.stderr)
        lines = store.get_bytes(key).decode(errors="replace").splitlines(keepends=True)
        print("".join(lines[-ns.tail :] if ns.tail else lines), end="")
        return 0
    text = kube.read_log(pod, CONTAINER, tail_lines=ns.tail)
    if restarts(found):  # the crash is what one looks for: the log of the container before the restart
        text = joined_logs(kube.read_log(pod, CONTAINER, tail_lines=ns.tail, previous=True), text)
    print(text, end="")
    return 0


def stop_controllers(kube: Kube, cfg: Config, timeout_s: float = 180.0, poll_s: float = 1.0) -> int:
    """Suspend the Helm chart's controller Jobs of the experiment (label EXPERIMENT_LABEL) and wait until their
    pods are gone: a controller left running would create a deleted step job again. Returns how many it stopped."""
    stopped = []
    for job in kube.list_batch_jobs(f"{EXPERIMENT_LABEL}={cfg.EXPERIMENT.NAME}"):
        name, spec = job["metadata"]["name"], job.get("spec") or {}
        finished = any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in (job.get("status") or {}).get("conditions") or []
        )
        if finished or spec.get("suspend"):
            continue
        kube.suspend_batch_job(name)
        print(f"suspended the controller Job {name}: it starts no further step")
        stopped.append(name)
    deadline = time.monotonic() + timeout_s
    for name in stopped:
        while kube.running_pods_of_batch_job(name):
            if time.monotonic() > deadline:
                raise ControllerError(
                    f"the controller Job {name} is suspended but its pod still runs after {timeout_s:.0f}s; delete "
                    f"it (kubectl -n {kube.namespace} delete job {name}) and cancel again"
                )
            time.sleep(poll_s)
    return len(stopped)


@guarded
def cli_cancel(argv: list[str]) -> int:
    """Stop the chart's controller Job, then delete (or --suspend) the experiment's unfinished or failed step
    jobs; with a STEP, that step's job."""
    p = parser("cancel", "stop the experiment's controller and delete (or --suspend) its running step jobs")
    p.add_argument("--suspend", action="store_true", help="set runPolicy.suspend=true instead of deleting")
    ns, cfg, words = parse(p, argv)
    kube = connect(ns, cfg)
    acted = 0 if words else stop_controllers(kube, cfg)
    for _, name, job in step_jobs(cfg, kube, words):
        state = verdict(job) if job else "absent"
        if job is None or (not words and state == "Succeeded") or (ns.suspend and state in ("Succeeded", "Failed")):
            continue
        if ns.suspend:
            kube.patch_job(name, {"spec": {"runPolicy": {"suspend": True}}})
            print(f"suspended PyTorchJob {name} (was {state})")
        elif kube.delete_job(name):
            print(f"deleted PyTorchJob {name} (was {state})")
        acted += 1
    if not acted:
        print(f"nothing to cancel for experiment {cfg.EXPERIMENT.NAME} in namespace {kube.namespace}")
    return 0
