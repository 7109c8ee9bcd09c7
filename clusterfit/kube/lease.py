"""One controller per experiment: a coordination.k8s.io/v1 Lease `<EXPERIMENT.NAME>-controller` in its namespace.

    clusterfit submit config=quickstart          # refuses while another controller runs the experiment
    clusterfit submit config=quickstart --wait   # waits until it ends or its Lease runs out, then adopts its jobs

The protocol of the experiment root's lease (clusterfit/lease.py) on the API server's optimistic
concurrency: acquired by a create (409 when the Lease exists), renewed and taken over by an update
that carries the resourceVersion last read (409 when another write came between), released by a
delete with that resourceVersion as its precondition. `spec.holderIdentity` is the owner's id and
`renewTime` + `leaseDurationSeconds` its expiry, as for node and leader-election Leases; the owner
(host, pid, user, command) is in an annotation, for the message a second controller prints.
`kubectl get lease -n <namespace>` shows the holder. The step pods take no lease of their own.

Unlike a lease at the experiment root, the Lease is not given up when renewals fail because the API
server is unreachable: the controller acts only through that API server, so while it cannot renew
nothing it would do can happen either. It waits (`ControllerLease.check` raises Unreachable) until
a renewal succeeds, and goes on, or finds the Lease taken over by another controller, and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from clusterfit.config import Config
from clusterfit.kube.client import Conflict, Kube, KubeError, Unreachable
from clusterfit.kube.manifests import labels
from clusterfit.lease import TRUSTED_FRACTION, Lease, LeaseLost, Owner, Record, unix

OWNER_ANNOTATION = "clusterfit.io/owner"


def lease_name(cfg: Config) -> str:
    return f"{cfg.EXPERIMENT.NAME}-controller"


def micro_time(unix_s: float) -> str:
    """A MicroTime, as the API server writes it."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_object(name: str, record: Record, object_labels: dict[str, str]) -> dict[str, Any]:
    """The Lease that says `record`."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": object_labels,
            "annotations": {OWNER_ANNOTATION: json.dumps(dataclasses.asdict(record.owner))},
        },
        "spec": {
            "holderIdentity": record.owner.id,
            "leaseDurationSeconds": round(record.expires_at - record.renewed_at),
            "acquireTime": micro_time(record.acquired_at),
            "renewTime": micro_time(record.renewed_at),
        },
    }


def record_of(lease: dict[str, Any]) -> Record:
    """What a Lease says; one without a holder (or a renewTime) has expired, one written by something other
    than clusterfit names its holder by holderIdentity only."""
    spec = lease.get("spec") or {}
    holder = str(spec.get("holderIdentity") or "")
    try:
        owner = Owner.from_dict(json.loads(((lease.get("metadata") or {}).get("annotations") or {})[OWNER_ANNOTATION]))
    except (KeyError, TypeError, ValueError, AttributeError):
        owner = Owner(holder, holder, 0, "", "")
    if owner.id != holder:
        owner = Owner(holder, holder, 0, "", "")
    renewed = unix(spec["renewTime"]) if spec.get("renewTime") else 0.0
    acquired = unix(spec["acquireTime"]) if spec.get("acquireTime") else renewed
    expires = renewed + float(spec.get("leaseDurationSeconds") or 0) if holder else 0.0
    return Record(owner, acquired, renewed, expires)


class KubeSlot:
    """The experiment's Lease object; its resourceVersion is the token."""

    def __init__(self, kube: Kube, name: str, object_labels: dict[str, str]) -> None:
        self.kube = kube
        self.name = name
        self.labels = object_labels
        self.where = f"Lease {name} in namespace {kube.namespace}"

    def read(self) -> tuple[Record, str] | None:
        found = self.kube.get_lease(self.name)
        return None if found is None else (record_of(found), str(found["metadata"]["resourceVersion"]))

    def create(self, record: Record) -> str | None:
        try:
            created = self.kube.create_lease(lease_object(self.name, record, self.labels))
        except Conflict:
            return None
        return str(created["metadata"]["resourceVersion"])

    def replace(self, record: Record, token: str) -> str | None:
        desired = lease_object(self.name, record, self.labels)
        desired["metadata"]["resourceVersion"] = token
        try:
            replaced = self.kube.replace_lease(desired)
        except KubeError as exc:
            if exc.status in (404, 409):  # gone, or changed since `token`
                return None
            raise
        return str(replaced["metadata"]["resourceVersion"])

    def delete(self, token: str) -> bool:
        return self.kube.delete_lease(self.name, token)


class ControllerLease(Lease):
    """The controller's hold on the Lease: the heartbeat renews it as for any lease, but renewals that fail for
    longer than the lease lasts do not lose it (see the module docstring)."""

    def check(self) -> None:
        """Raise LeaseLost once the Lease was taken over (or deleted); raise Unreachable while renewals have failed
        for so long that it may have expired (the caller waits and asks again). No I/O."""
        if self.lost:
            raise LeaseLost(self.lost)
        now = time.monotonic()
        if now > self._valid_until:
            unrenewed_s = now - self._valid_until + self.ttl_s * TRUSTED_FRACTION
            why = self._last_error or "renewals did not finish"
            raise Unreachable(
                f"{self.slot.where}: not renewed for {unrenewed_s:.0f}s ({why}); waiting for a renewal to say "
                "whether this controller still holds it"
            )


@contextlib.contextmanager
def hold_experiment(kube: Kube, cfg: Config, *, wait: bool = False) -> Iterator[Lease]:
    """Hold the experiment's Lease for the block: acquire it (refusing, or waiting), release it at the end."""
    slot = KubeSlot(kube, lease_name(cfg), labels(cfg, "controller"))
    lease = ControllerLease(slot, float(cfg.KUBERNETES.CONTROLLER.LEASE_DURATION_S)).acquire(wait)
    try:
        yield lease
    finally:
        lease.release()
