"""One run at a time per experiment: a lease at the experiment root names its owner and its expiry.

    clusterfit run config=quickstart           # refuses at once while another run holds the root
    clusterfit run config=quickstart --wait    # waits until that run releases the root or its lease expires

`clusterfit run` and the single-step commands hold `<ROOT>/_lease.json` while they work: rank 0
only (the other ranks of a torch.distributed run never touch it), renewed every third of
PIPELINE.LEASE_TTL_S by a heartbeat thread, deleted at the end, also after an error or Ctrl-C.
A lease whose owner died is taken over, with a warning naming that owner: at once when the owner
ran on this machine (the same Linux boot and pid namespace) and its process is gone, so a rerun
after kill -9 just continues; else once the lease has expired (a lost machine, another
container). Acquiring, renewing, taking over and releasing are each one conditional write
(storage's `put_if_absent`, `put_if_match`, `delete_if_match`), so of two processes racing for a
lease exactly one wins.

The holder fences its own writes below the root (`storage.fence_writes`): once a renewal finds the
lease taken over, or renewals have failed for so long that the lease may have expired in the
others' eyes, every write raises LeaseLost; a publication (`_SUCCESS.json`) first confirms with the
lease object itself. So a run that lost its lease publishes nothing more. Expiry compares the
owner's `expires_at` with the reader's clock, so hosts sharing a root need clocks within a few
seconds of each other (NTP), as readers of Kubernetes Leases do.

On Kubernetes the controller holds a coordination.k8s.io Lease of the same shape
(clusterfit/kube/lease.py) and its step pods run with --no-lease: pods restart, and a restarted
pod must just continue. This module imports no deep-learning library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from clusterfit.artifacts.layout import LEASE
from clusterfit.errors import UserError
from clusterfit.storage import NotFound, Store, fence_writes

log = logging.getLogger(__name__)

TTL_S = 60.0
RENEWALS_PER_TTL = 3  # a holder renews every third of the TTL: two renewals may fail before it expires
TRUSTED_FRACTION = 0.9  # of the TTL a holder trusts an unrenewed lease for: a tenth for clock skew between hosts
HOW_TO_PROCEED = (
    "add --wait to start once it has finished (what it published is then skipped, not redone), or stop it first; "
    "a lease whose owner died is taken over automatically (once it has expired, or at once when that process ran "
    "on this machine)"
)


class LeaseError(UserError):
    """The experiment's lease cannot be had or was lost; the message names it, its owner and what to do."""


class LeaseHeld(LeaseError):
    """Another owner holds the lease and it has not expired."""


class LeaseLost(LeaseError):
    """This process held the lease and no longer does: it must not write anything more."""


@dataclass(frozen=True)
class Owner:
    id: str  # random, one per acquisition: what tells two owners apart
    host: str
    pid: int
    user: str
    command: str
    # Which process exactly, for a reader on the same machine: the kernel's boot id, the pid namespace, the
    # process's start time (clock ticks after boot; a reused pid has another). Empty where there is no /proc.
    boot_id: str = ""
    pid_namespace: str = ""
    start_ticks: int = 0

    @classmethod
    def this_process(cls) -> Owner:
        command = shlex.join(["clusterfit", *sys.argv[1:]])[:300]
        boot_id, pid_namespace = this_machine()
        pid = os.getpid()
        return cls(
            secrets.token_hex(8),
            socket.gethostname(),
            pid,
            _user(),
            command,
            boot_id,
            pid_namespace,
            start_ticks(pid) or 0,
        )

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> Owner:
        """The owner a lease names; fields a later version added are left out, not refused."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in tree.items() if key in names})

    def __str__(self) -> str:
        who = f"{self.user}@{self.host}" if self.user else self.host
        return who + (f" pid {self.pid}" if self.pid else "") + (f" ({self.command})" if self.command else "")

    def gone(self, here: tuple[str, str]) -> bool:
        """Whether this owner's process has ended, judged from `here` (this_machine()): only an owner on the
        same boot and pid namespace can be judged (its pid means the same process); any other is not gone."""
        if not self.boot_id or (self.boot_id, self.pid_namespace) != here:
            return False
        return start_ticks(self.pid) != self.start_ticks


def this_machine() -> tuple[str, str]:
    """(boot id, pid namespace) of this process; empty where there is no /proc."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return boot_id, os.readlink("/proc/self/ns/pid")
    except OSError:
        return "", ""


def start_ticks(pid: int) -> int | None:
    """When the process `pid` started (field 22 of /proc/<pid>/stat), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # after the command name, which may hold spaces


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return ""


def iso(unix_s: float, timespec: str = "milliseconds") -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec=timespec)


def unix(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True)
class Record:
    """What a lease says: who holds it, since when, and until when unless renewed (unix seconds)."""

    owner: Owner
    acquired_at: float
    renewed_at: float
    expires_at: float

    def to_json(self) -> bytes:
        times = {name: iso(getattr(self, name)) for name in ("acquired_at", "renewed_at", "expires_at")}
        return json.dumps({"owner": dataclasses.asdict(self.owner), **times}, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Record:
        try:
            tree = json.loads(data)
            times = [unix(tree[name]) for name in ("acquired_at", "renewed_at", "expires_at")]
            return cls(Owner.from_dict(tree["owner"]), *times)
        except (ValueError, KeyError, TypeError) as exc:
            raise LeaseError(
                f"{where}: not a clusterfit lease ({type(exc).__name__}: {exc}); if no clusterfit run is using this "
                "experiment, delete it"
            ) from None


def held_message(where: str, record: Record, now: float) -> str:
    return (
        f"{where} is held by {record.owner} since {iso(record.acquired_at, 'seconds')}, renewed "
        f"{now - record.renewed_at:.0f}s ago; it expires at {iso(record.expires_at, 'seconds')} "
        f"(in {record.expires_at - now:.0f}s) unless renewed. Another process runs this experiment: "
        f"{HOW_TO_PROCEED}"
    )


def lost_message(where: str, record: Record | None) -> str:
    if record is None:
        what = "was deleted while this process held it"
    else:
        what = f"was taken over by {record.owner} at {iso(record.acquired_at, 'seconds')}"
    return (
        f"{where} {what}: this process stopped before publishing anything more. What it published stands; the new "
        "owner resumes the rest (or rerun with --wait)"
    )


class Slot(Protocol):
    """Where a lease lives: an object at the experiment root, or a Kubernetes Lease. A token names one version
    of it; create and replace return the new token, or None when another write came first."""

    where: str  # what messages call it

    def read(self) -> tuple[Record, str] | None: ...
    def create(self, record: Record) -> str | None: ...
    def replace(self, record: Record, token: str) -> str | None: ...
    def delete(self, token: str) -> bool: ...


class ObjectSlot:
    """`<root>/_lease.json` through the store's conditional writes."""

    def __init__(self, store: Store, key: str = LEASE) -> None:
        self.store = store
        self.key = key
        self.where = store.uri(key)

    def read(self) -> tuple[Record, str] | None:
        try:
            data, token = self.store.get_with_token(self.key)
        except NotFound:
            return None
        return Record.from_json(data, self.where), token

    def create(self, record: Record) -> str | None:
        return self.store.put_if_absent(self.key, record.to_json())

    def replace(self, record: Record, token: str) -> str | None:
        return self.store.put_if_match(self.key, record.to_json(), token)

    def delete(self, token: str) -> bool:
        return self.store.delete_if_match(self.key, token)


class Lease:
    """One owner's hold on a slot: `acquire` (refusing, or waiting), renewal by a heartbeat thread,
    `check`/`confirm` before writing, `release`."""

    def __init__(
        self,
        slot: Slot,
        ttl_s: float = TTL_S,
        owner: Owner | None = None,
        clock: Callable[[], float] = time.time,
        here: tuple[str, str] | None = None,
    ) -> None:
        self.slot = slot
        self.ttl_s = ttl_s
        self.owner = owner or Owner.this_process()
        self.clock = clock
        self.here = this_machine() if here is None else here  # where owners' processes can be looked up
        self.record: Record | None = None
        self.token = ""
        self._lost = ""  # why this process may no longer write, once it may not
        self._valid_until = 0.0  # time.monotonic() after which the others may see the lease expired
        self._last_error = ""
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def fresh(self) -> Record:
        now = self.clock()
        return Record(self.owner, now, now, now + self.ttl_s)

    def acquire(self, wait: bool = False, poll_s: float | None = None) -> Lease:
        """Hold the lease: create it, take it over when it has expired, else raise LeaseHeld (or, with `wait`,
        poll until it is released or expires). Starts the heartbeat."""
        poll_s = poll_s or min(max(self.ttl_s / 4, 0.1), 5.0)
        waiting_for = ""
        while True:
            started, record = time.monotonic(), self.fresh()
            found = self.slot.read()
            if found is None:
                token = self.slot.create(record)
            elif found[0].owner.id == self.owner.id:  # our own write, answered as failed (a retried request)
                record, token = found
            elif found[0].expires_at <= self.clock() or found[0].owner.gone(self.here):
                log.warning(
                    "%s: taking over the lease of %s, %s", self.slot.where, found[0].owner, self.why_free(found[0])
                )
                token = self.slot.replace(record, found[1])
            elif not wait:
                raise LeaseHeld(held_message(self.slot.where, found[0], self.clock()))
            else:
                if found[0].owner.id != waiting_for:
                    log.info("waiting for the lease: %s", held_message(self.slot.where, found[0], self.clock()))
                    waiting_for = found[0].owner.id
                time.sleep(poll_s)
                continue
            if token:  # None: another process wrote first; look again
                self._start(record, token, started)
                return self

    def why_free(self, record: Record) -> str:
        if record.expires_at <= self.clock():
            return f"expired {self.clock() - record.expires_at:.0f}s ago (its owner stopped renewing it)"
        return "whose process is no longer running on this machine"

    def _start(self, record: Record, token: str, started: float) -> None:
        self.record, self.token = record, token
        self._valid_until = started + self.ttl_s * TRUSTED_FRACTION
        log.info(
            "%s: lease held by %s until %s, renewed every %.3gs",
            self.slot.where,
            self.owner,
            iso(record.expires_at, "seconds"),
            self.ttl_s / RENEWALS_PER_TTL,
        )
        self._heartbeat = threading.Thread(target=self._beat, name="clusterfit-lease", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        interval = self.ttl_s / RENEWALS_PER_TTL
        while not self._stop.wait(interval):
            renewed = self.renew()
            if self._lost:
                return
            interval = self.ttl_s / RENEWALS_PER_TTL if renewed else self.ttl_s / 10  # failed: try again sooner

    def renew(self) -> bool:
        """One renewal; False when it failed (and `lost` says whether for good)."""
        assert self.record is not None
        started, now = time.monotonic(), self.clock()
        record = dataclasses.replace(self.record, renewed_at=now, expires_at=now + self.ttl_s)
        try:
            token = self.slot.replace(record, self.token)
            if token is None:
                found = self.slot.read()
                if found is None or found[0].owner.id != self.owner.id:
                    self._lost = lost_message(self.slot.where, found[0] if found else None)
                    log.error("%s", self._lost)
                    return False
                record, token = found  # our own write, answered as failed (a retried request)
        except Exception as exc:  # noqa: BLE001 - storage or API server trouble: retry soon; check() gives up
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: could not renew the lease (%s); retrying", self.slot.where, exc)
            return False
        self.record, self.token = record, token
        self._valid_until = started + self.ttl_s * TRUSTED_FRACTION
        return True

    @property
    def lost(self) -> str:
        return self._lost

    def check(self) -> None:
        """Raise LeaseLost when this process may no longer write: the lease was taken over, or it went
        unrenewed for so long that others may see it expired. No I/O: called before every write."""
        if not self._lost and time.monotonic() > self._valid_until:
            self._lost = (
                f"{self.slot.where}: the lease went unrenewed for {self.ttl_s * TRUSTED_FRACTION:.3g}s "
                f"({self._last_error or 'renewals did not finish'}), so another process may have taken it over: "
                "this process stopped before publishing anything more. Rerun (with --wait) to continue"
            )
        if self._lost:
            raise LeaseLost(self._lost)

    def confirm(self) -> None:
        """`check`, then ask the lease object itself whether this process still holds it (before publishing)."""
        self.check()
        found = self.slot.read()
        if found is None or found[0].owner.id != self.owner.id:
            self._lost = lost_message(self.slot.where, found[0] if found else None)
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._lost or self.record is None:
            return
        try:
            found = self.slot.read()
            if found is not None and found[0].owner.id == self.owner.id and self.slot.delete(found[1]):
                log.info("%s: lease released", self.slot.where)
        except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more; the lease expires anyway
            log.warning(
                "%s: could not release the lease (%s); it expires at %s",
                self.slot.where,
                exc,
                iso(self.record.expires_at, "seconds"),
            )


@contextlib.contextmanager
def hold_root(store: Store, *, wait: bool = False, ttl_s: float = TTL_S) -> Iterator[Lease]:
    """Hold the lease of `store`'s root for the block: acquire it (refusing, or waiting), fence this process's
    writes below the root, release it at the end."""
    lease = Lease(ObjectSlot(store), ttl_s).acquire(wait)
    undo = fence_writes(store.uri(""), lease)
    try:
        yield lease
    finally:
        undo()
        lease.release()
