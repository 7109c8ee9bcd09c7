"""A thin wrapper over the official kubernetes client: the calls the controller makes, nothing more.

    kube = Kube(load_api_client(kubeconfig=None, context=None, in_cluster=False), "default", settings)
    job = kube.get_job("exp-extract")            # dict, or None when absent
    for kind, obj in kube.watch_job("exp-extract", resource_version): ...

Every call needs only the controller's Role (k8s/controller-rbac.yaml): pytorchjobs get, list,
watch, create, delete, patch; pods get, list, watch; pods/log get; events get, list, watch;
configmaps get; leases (coordination.k8s.io) get, create, update, delete. 429 and 5xx answers
and dropped connections are retried with a doubling wait for up to RETRY_TIMEOUT_S per call (the
controller retries the call again after that, up to its step's STEP_TIMEOUT_S); every other
refusal becomes a KubeError whose message is the API server's own, and a 403 names the verb and
the resource that the Role would have to grant.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from clusterfit.config import ControllerConfig

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
BATCH_JOB_LABEL = "batch.kubernetes.io/job-name"  # on the pods of a batch/v1 Job
JOB_LABEL = "training.kubeflow.org/job-name"  # the training operator labels each pod with its job
RETRYABLE = {429, 500, 502, 503, 504}
T = TypeVar("T")


class KubeError(RuntimeError):
    """The API server refused or failed a call; the message says what and why."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Forbidden(KubeError):
    """403: the credentials lack a permission; the message names the verb and the resource."""


class Conflict(KubeError):
    """409: the object already exists (or changed under us)."""


class Gone(KubeError):
    """410: the watch's resourceVersion is too old; list again."""


class Unreachable(KubeError):
    """The connection failed or dropped, or the server kept answering 429/5xx."""


def load_api_client(*, kubeconfig: str | None, context: str | None, in_cluster: bool) -> client.ApiClient:
    """An ApiClient from the pod's service account (`in_cluster`) or from a kubeconfig file."""
    try:
        if in_cluster:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError, TypeError) as exc:
        where = "the pod's service account" if in_cluster else (kubeconfig or "$KUBECONFIG or ~/.kube/config")
        raise KubeError(f"cannot load Kubernetes credentials from {where}: {exc}") from None


def server_message(exc: ApiException) -> str:
    """The `message` of the API server's Status body, else the HTTP reason."""
    try:
        return str(json.loads(exc.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason or exc.body or f"HTTP {exc.status}")


def translate(exc: ApiException, verb: str, resource: str, namespace: str) -> KubeError:
    """One clear KubeError for a refused call."""
    message, status = server_message(exc), int(exc.status or 0)
    if status == 403:
        return Forbidden(
            f"forbidden: cannot {verb} {resource} in namespace {namespace!r}; the credentials in use need "
            f"that permission (the controller's Role is k8s/controller-rbac.yaml). API server: {message}",
            status,
        )
    if status == 401:
        return KubeError(f"unauthorized: the API server rejected the credentials ({message})", status)
    kinds: dict[int, type[KubeError]] = {409: Conflict, 410: Gone}
    if status in RETRYABLE:
        return Unreachable(f"{verb} {resource}: the API server kept failing (HTTP {status}): {message}", status)
    return kinds.get(status, KubeError)(f"{verb} {resource}: {message}", status)


class Backoff:
    """Doubling waits from BACKOFF_INITIAL_S up to BACKOFF_MAX_S while the API server keeps failing. `wait` gives up
    (raises the error) once failures have lasted RETRY_TIMEOUT_S in a row, or, given `until` (a time.monotonic()
    deadline), only at that deadline: the controller outlasts an API server outage until its step's STEP_TIMEOUT_S."""

    def __init__(
        self, settings: ControllerConfig, until: float | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.settings = settings
        self.until = until
        self.sleep = sleep
        self.first_failure: float | None = None
        self.delay_s = settings.BACKOFF_INITIAL_S

    def reset(self) -> None:
        self.first_failure = None
        self.delay_s = self.settings.BACKOFF_INITIAL_S

    def wait(self, error: KubeError, retry_after_s: float | None = None, failing_since: float | None = None) -> None:
        """Sleep before the next try, or raise `error` when failures have lasted too long. `failing_since`: when
        the failures began (time.monotonic()), if earlier than this Backoff's first (Kube.failing_since)."""
        now = time.monotonic()
        self.first_failure = self.first_failure or now
        give_up_at = self.until if self.until is not None else self.first_failure + self.settings.RETRY_TIMEOUT_S
        if now >= give_up_at:
            raise error
        delay = min(retry_after_s or self.delay_s, self.settings.BACKOFF_MAX_S, give_up_at - now)
        failing_s = now - min(self.first_failure, failing_since or now)
        log.warning("%s; failing for %.0fs, retrying in %.1fs", error, failing_s, delay)
        self.sleep(delay)
        self.delay_s = min(self.delay_s * 2, self.settings.BACKOFF_MAX_S)


def last_bytes(chunks: Iterable[bytes], max_bytes: int) -> str:
    """The text of `chunks`, cut to its last `max_bytes` bytes from a line start after a line saying how much was
    left out. Memory stays within twice `max_bytes` and one chunk."""
    kept, left_out = bytearray(), 0
    for chunk in chunks:
        kept += chunk
        if len(kept) > 2 * max_bytes:  # trimmed in batches: a cut per chunk would copy max_bytes per chunk
            left_out += len(kept) - max_bytes
            del kept[: len(kept) - max_bytes]
    if len(kept) > max_bytes:
        left_out += len(kept) - max_bytes
        del kept[: len(kept) - max_bytes]
    if not left_out:
        return kept.decode(errors="replace")
    partial_line = kept.find(b"\n") + 1  # 0 when there is no line break: keep the cut line
    left_out += partial_line
    return f"[... {left_out} earlier bytes left out ...]\n" + kept[partial_line:].decode(errors="replace")


def _retry_after_s(exc: ApiException) -> float | None:
    try:
        return float((exc.headers or {}).get("Retry-After", ""))
    except (TypeError, ValueError):
        return None


class Kube:
    """The controller's API calls in one namespace; objects come back as plain dicts (camelCase keys)."""

    def __init__(self, api: client.ApiClient, namespace: str, settings: ControllerConfig) -> None:
        self.api = api
        self.namespace = namespace
        self.settings = settings
        self.jobs = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.batch = client.BatchV1Api(api)
        # time.monotonic() of the first failure (429/5xx, no connection) of the calls failing now; None after a success.
        self.failing_since: float | None = None

    def call(
        self, verb: str, resource: str, fn: Callable[..., T], *args: Any, retry_s: float | None = None, **kwargs: Any
    ) -> T:
        """`fn(*args, **kwargs)` with the request timeout, retrying 429/5xx and dropped connections for up to
        `retry_s` (default RETRY_TIMEOUT_S; 0: one try)."""
        until = None if retry_s is None else time.monotonic() + retry_s
        backoff = Backoff(self.settings, until)
        while True:
            try:
                result = fn(*args, _request_timeout=self.settings.REQUEST_TIMEOUT_S, **kwargs)
                self.failing_since = None
                return result
            except ApiException as exc:
                error = translate(exc, verb, resource, self.namespace)
                if not isinstance(error, Unreachable):
                    raise error from None
                retry_after_s = _retry_after_s(exc)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                host = self.api.configuration.host
                error = Unreachable(f"{verb} {resource}: cannot reach the API server at {host}: {exc}")
                retry_after_s = None
            self.failing_since = self.failing_since or time.monotonic()
            backoff.wait(error, retry_after_s, self.failing_since)

    def job_call(self, verb: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A CustomObjectsApi call on kubeflow.org/v1 pytorchjobs in the namespace."""
        return self.call(verb, "pytorchjobs", method, GROUP, VERSION, self.namespace, PLURAL, *args, **kwargs)

    def plain(self, obj: Any) -> dict[str, Any]:
        """A client model (or dict) as the JSON dict the API server sent."""
        return dict(self.api.sanitize_for_serialization(obj))

    # ---- PyTorchJobs -------------------------------------------------------------------------

    def get_job(self, name: str) -> dict[str, Any] | None:
        try:
            job = self.job_call("get", self.jobs.get_namespaced_custom_object, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(job)

    def list_jobs(self, name: str | None = None, label_selector: str | None = None) -> tuple[list[dict[str, Any]], str]:
        """The jobs (one, by `name`, or all matching `label_selector`) and the list's resourceVersion."""
        selector = {"field_selector": f"metadata.name={name}"} if name else {}
        if label_selector:
            selector["label_selector"] = label_selector
        listing = self.job_call("list", self.jobs.list_namespaced_custom_object, **selector)
        return list(listing.get("items") or []), str(listing["metadata"]["resourceVersion"])

    def create_job(self, job: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        # A dry run also refuses unknown fields, so it catches what a real create would silently drop.
        extra = {"dry_run": "All", "field_validation": "Strict"} if dry_run else {}
        created = self.job_call("create", self.jobs.create_namespaced_custom_object, job, **extra)
        return dict(created)

    def delete_job(self, name: str) -> bool:
        """Delete the job and, through the operator, its pods; False when it was already gone."""
        body = client.V1DeleteOptions(propagation_policy="Background")
        try:
            self.job_call("delete", self.jobs.delete_namespaced_custom_object, name, body=body)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def patch_job(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (the client sends dict bodies to custom objects as merge patches)."""
        patched = self.job_call("patch", self.jobs.patch_namespaced_custom_object, name, patch)
        return dict(patched)

    def watch_job(
        self, name: str, resource_version: str, timeout_s: int | None = None
    ) -> Generator[tuple[str, dict[str, Any]], None, None]:
        """(event type, object) for one job from `resource_version` until the server ends the watch
        (after `timeout_s`, default WATCH_TIMEOUT_S).

        Raises Gone (list again), Unreachable (connection dropped or 429/5xx: back off, list again),
        Forbidden, or KubeError.
        """
        watcher = watch.Watch()
        timeout_s = timeout_s or self.settings.WATCH_TIMEOUT_S
        try:
            for event in watcher.stream(
                self.jobs.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=resource_version,
                timeout_seconds=timeout_s,
                allow_watch_bookmarks=True,
                _request_timeout=(self.settings.REQUEST_TIMEOUT_S, timeout_s + self.settings.REQUEST_TIMEOUT_S),
            ):
                yield str(event["type"]), dict(event["raw_object"])
        except ApiException as exc:
            error = translate(exc, "watch", "pytorchjobs", self.namespace)
            if exc.status == 0 or isinstance(error, Unreachable):
                self.failing_since = self.failing_since or time.monotonic()
            raise (Unreachable(str(error), error.status) if exc.status == 0 else error) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self.failing_since = self.failing_since or time.monotonic()
            raise Unreachable(
                f"watch pytorchjobs: the connection to {self.api.configuration.host} dropped: {exc}"
            ) from None
        finally:
            watcher.stop()

    # ---- the experiment's Lease (clusterfit/kube/lease.py) ----------------------------------------

    def get_lease(self, name: str) -> dict[str, Any] | None:
        try:
            return self.plain(self.call("get", "leases", self.coordination.read_namespaced_lease, name, self.namespace))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def create_lease(self, lease: dict[str, Any]) -> dict[str, Any]:
        """Raises Conflict when a Lease of that name exists."""
        return self.plain(
            self.call("create", "leases", self.coordination.create_namespaced_lease, self.namespace, lease)
        )

    def replace_lease(self, lease: dict[str, Any]) -> dict[str, Any]:
        """An update guarded by the metadata.resourceVersion in `lease`: Conflict when the Lease changed since."""
        name = lease["metadata"]["name"]
        return self.plain(
            self.call("update", "leases", self.coordination.replace_namespaced_lease, name, self.namespace, lease)
        )

    def delete_lease(self, name: str, resource_version: str) -> bool:
        """Delete the Lease if it is still at `resource_version`; False when it changed or is gone."""
        precondition = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=resource_version))
        try:
            self.call(
                "delete", "leases", self.coordination.delete_namespaced_lease, name, self.namespace, body=precondition
            )
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    # ---- ConfigMaps, pods, events, logs -------------------------------------------------------

    def get_config_map(self, name: str) -> dict[str, Any] | None:
        try:
            return self.plain(
                self.call("get", "configmaps", self.core.read_namespaced_config_map, name, self.namespace)
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def create_config_map(self, config_map: dict[str, Any]) -> dict[str, Any]:
        """Not in the controller's Role: only `clusterfit submit` without --owner-configmap calls it."""
        return self.plain(
            self.call("create", "configmaps", self.core.create_namespaced_config_map, self.namespace, config_map)
        )

    def get_pod(self, name: str) -> dict[str, Any] | None:
        try:
            return self.plain(self.call("get", "pods", self.core.read_namespaced_pod, name, self.namespace))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list_pods(self, job_name: str) -> list[dict[str, Any]]:
        pods = self.call(
            "list",
            "pods",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"{JOB_LABEL}={job_name}",
        )
        return [self.plain(pod) for pod in pods.items]

    def list_events(self, object_name: str) -> list[dict[str, Any]]:
        """Core events about one object (a job or a pod), oldest first."""
        events = self.call(
            "list",
            "events",
            self.core.list_namespaced_event,
            self.namespace,
            field_selector=f"involvedObject.name={object_name}",
        )
        return [self.plain(event) for event in events.items]

    def read_log(
        self,
        pod: str,
        container: str,
        tail_lines: int | None = None,
        previous: bool = False,
        *,
        max_bytes: int | None = None,
        retry_s: float | None = None,
    ) -> str:
        """The container's log; `previous`: of its last terminated instance (before a restart); `max_bytes`: only
        its end, read as a stream so that a long log never sits in memory whole; `retry_s` as for `call`."""
        extra: dict[str, Any] = {"tail_lines": tail_lines} if tail_lines else {}
        if previous:
            extra["previous"] = True
        args = ("get", "pods/log", self.core.read_namespaced_pod_log, pod, self.namespace)
        if max_bytes is None:
            return str(self.call(*args, container=container, retry_s=retry_s, **extra))
        response = self.call(*args, container=container, retry_s=retry_s, _preload_content=False, **extra)
        try:
            return last_bytes(response.stream(64 * 1024), max_bytes)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unreachable(f"get pods/log: reading the log of pod {pod} broke off: {exc}") from None
        finally:
            response.release_conn()

    def stream_log(self, pod: str, container: str) -> Iterator[str]:
        """The container's log, line by line, following it until the container ends."""
        watcher = watch.Watch()
        try:
            yield from watcher.stream(
                self.core.read_namespaced_pod_log, pod, self.namespace, container=container, follow=True
            )
        except ApiException as exc:
            raise translate(exc, "get", "pods/log", self.namespace) from None
        finally:
            watcher.stop()

    # ---- the Helm chart's controller Jobs (batch/v1): only `clusterfit cancel` calls these ---------

    def list_batch_jobs(self, label_selector: str) -> list[dict[str, Any]]:
        jobs = self.call("list", "jobs", self.batch.list_namespaced_job, self.namespace, label_selector=label_selector)
        return [self.plain(job) for job in jobs.items]

    def suspend_batch_job(self, name: str) -> None:
        """spec.suspend=true: the job controller deletes the Job's running pods and starts no new one."""
        patch = {"spec": {"suspend": True}}
        self.call("patch", "jobs", self.batch.patch_namespaced_job, name, self.namespace, patch)

    def running_pods_of_batch_job(self, name: str) -> list[str]:
        """Names of the Job's pods that have not ended (being deleted counts as not ended until they are gone)."""
        selector = f"{BATCH_JOB_LABEL}={name}"
        pods = self.call("list", "pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        ended = ("Succeeded", "Failed")
        return [str(p.metadata and p.metadata.name) for p in pods.items if not p.status or p.status.phase not in ended]
