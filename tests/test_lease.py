"""The experiment root's lease (clusterfit/lease.py) and the conditional writes it is made of, on local
files and on a real S3 server.

Oracles: the object itself (who wrote the content that is there), the count of winners the racers
report (exactly one per race), the keys a fenced process managed to write, and the messages a user reads.
moto 5.2.5 checks If-None-Match / If-Match outside any lock (16 threads racing for one key: two
winners once in 150 races), so the races run against a moto that takes conditional requests one at
a time, the atomicity S3 and MinIO promise; the other tests use the session's plain moto.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterfit.artifacts import Ledger, publish
from clusterfit.lease import Lease, LeaseError, LeaseHeld, LeaseLost, ObjectSlot, Owner, Record, hold_root
from clusterfit.storage import NotFound, Store, open_store
from tests.s3server import S3Server, free_port

SERIALIZED_MOTO = """
import sys, threading
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()
def conditional_requests_one_at_a_time(environ, start_response):
    if "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ:
        with lock:
            return app(environ, start_response)
    return app(environ, start_response)
run_simple("127.0.0.1", int(sys.argv[1]), conditional_requests_one_at_a_time, threaded=True,
           request_handler=MotoRequestHandler)
"""

HOLDER = """
import sys, time
from clusterfit.config import StorageConfig
from clusterfit.lease import hold_root
from clusterfit.runtime import setup_logging
from clusterfit.storage import open_store
setup_logging()
store = open_store(sys.argv[1], StorageConfig.model_validate_json(sys.argv[2]))
with hold_root(store, ttl_s=float(sys.argv[3])):
    print("held", flush=True)
    for tick in range(100000):
        store.put_bytes(f"ticks/{tick:06d}", b"x")
        time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def atomic_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto taking conditional requests one at a time (no authentication: any key signs)."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto-serial") / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", SERIALIZED_MOTO, str(port)], stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{port}", access_key="testing", secret_key="testing")
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{server.endpoint_url}/moto-api/data.json", timeout=2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the serialized moto did not start"
            time.sleep(0.1)
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(params=["file", "s3"])
def race_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    if request.param == "file":
        return open_store((tmp_path / "root").as_uri())
    server: S3Server = request.getfixturevalue("atomic_s3")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return open_store(f"s3://{server.make_bucket()}/exp", server.settings())


def test_conditional_writes_happen_only_on_the_version_they_name(store: Store) -> None:
    first = store.put_if_absent("lease", b"one")
    assert first and store.put_if_absent("lease", b"two") is None
    assert store.get_bytes("lease") == b"one" and store.get_with_token("lease") == (b"one", first)
    assert store.put_if_match("lease", b"two", "not-a-version") is None
    second = store.put_if_match("lease", b"two", first)
    assert second and second != first and store.get_with_token("lease") == (b"two", second)
    assert store.put_if_match("lease", b"three", first) is None  # a stale token
    assert store.delete_if_match("lease", first) is False and store.get_bytes("lease") == b"two"
    assert store.delete_if_match("lease", second) is True
    with pytest.raises(NotFound):
        store.get_bytes("lease")
    assert store.put_if_match("lease", b"x", second) is None and store.delete_if_match("lease", second) is False
    assert store.list() == []  # the local lock file is hidden


def race(store: Store, rounds: int, barrier: Any, results: Any, worker: int, threads: int) -> None:
    """One racing process: `threads` threads, each in every round racing to create the key, then to replace
    the version all of them read, then to delete the version all of them read."""

    def one(thread: int) -> None:
        me = f"{worker}.{thread}"
        for r in range(rounds):
            key = f"race/{r}"
            barrier.wait()
            results.put((r, "create", me, store.put_if_absent(key, f"create {me}".encode()) is not None))
            barrier.wait()
            content, token = store.get_with_token(key)
            results.put((r, "created", me, content.decode()))
            barrier.wait()
            results.put((r, "replace", me, store.put_if_match(key, f"replace {me}".encode(), token) is not None))
            barrier.wait()
            content, token = store.get_with_token(key)
            results.put((r, "replaced", me, content.decode()))
            barrier.wait()
            results.put((r, "delete", me, store.delete_if_match(key, token)))

    pool = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def test_of_many_racing_writers_exactly_one_wins_each_race(race_store: Store) -> None:
    processes, threads, rounds = 4, 4, 6
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes * threads, timeout=60), context.Queue()
    workers = [
        context.Process(target=race, args=(race_store, rounds, barrier, results, w, threads)) for w in range(processes)
    ]
    for worker in workers:
        worker.start()
    seen = [results.get(timeout=60) for _ in range(processes * threads * rounds * 5)]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    for r in range(rounds):
        for verb, then in (("create", "created"), ("replace", "replaced")):
            (winner,) = [me for rr, v, me, won in seen if rr == r and v == verb and won]
            assert {content for rr, v, _, content in seen if rr == r and v == then} == {f"{verb} {winner}"}
        assert sum(won for rr, v, _, won in seen if rr == r and v == "delete") == 1
    assert race_store.list() == []


def contend(store: Store, barrier: Any, results: Any) -> None:
    """A process that tries once to take over the expired lease; a winner holds it until every one has tried."""
    lease = Lease(ObjectSlot(store), ttl_s=30)
    barrier.wait()
    try:
        lease.acquire()
        results.put(("won", str(lease.owner)))
    except LeaseHeld as exc:
        results.put(("refused", str(exc)))
    barrier.wait()
    lease.release()


def test_of_several_takers_of_an_expired_lease_exactly_one_wins(race_store: Store) -> None:
    dead = Record(Owner("dead", "gone-host", 4242, "someone", "clusterfit run config=x"), 0.0, 0.0, 1.0)
    race_store.put_bytes("_lease.json", dead.to_json())
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(6, timeout=60), context.Queue()
    takers = [context.Process(target=contend, args=(race_store, barrier, results)) for _ in range(6)]
    for taker in takers:
        taker.start()
    outcomes = [results.get(timeout=60) for _ in takers]
    for taker in takers:
        taker.join(timeout=30)
    (winner,) = [who for verdict, who in outcomes if verdict == "won"]
    refusals = [message for verdict, message in outcomes if verdict == "refused"]
    assert len(refusals) == 5 and all(f"is held by {winner} since" in message for message in refusals), refusals
    assert race_store.list() == []  # the winner released it


def test_a_held_lease_is_refused_naming_its_owner_and_a_released_one_is_free(store: Store) -> None:
    with hold_root(store, ttl_s=30) as first:
        record = Record.from_json(store.get_bytes("_lease.json"), "lease")
        assert record.owner == first.owner and record.expires_at - record.renewed_at == 30
        with pytest.raises(LeaseHeld) as refused:
            Lease(ObjectSlot(store), ttl_s=30).acquire()
    message = str(refused.value)
    assert message.startswith(f"{store.uri('_lease.json')} is held by ")
    assert f"@{first.owner.host} pid {first.owner.pid} (clusterfit" in message
    assert "unless renewed" in message and "add --wait" in message and "taken over automatically" in message
    assert store.list() == []  # released
    Lease(ObjectSlot(store), ttl_s=30).acquire().release()


def test_a_waiting_acquirer_starts_when_the_holder_releases(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    holder = Lease(ObjectSlot(store), ttl_s=30).acquire()
    waiter = Lease(ObjectSlot(store), ttl_s=30)
    thread = threading.Thread(target=lambda: waiter.acquire(wait=True, poll_s=0.1))
    with caplog.at_level("INFO", logger="clusterfit.lease"):
        thread.start()
        deadline = time.monotonic() + 10
        while "waiting for the lease" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        time.sleep(0.5)
        assert thread.is_alive()
        holder.release()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert Record.from_json(store.get_bytes("_lease.json"), "lease").owner == waiter.owner
    waiter.release()


def start_holder(store: Store, ttl_s: float) -> subprocess.Popen[str]:
    settings = store.settings.model_dump_json()
    command = [sys.executable, "-c", HOLDER, store.root, settings, str(ttl_s)]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n", holder.communicate()[1]
    return holder


def test_a_killed_holders_lease_is_taken_over_at_once_here_and_once_expired_elsewhere(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = ("another-boot-id", "pid:[1]")  # a reader on another machine cannot look the process up
    holder = start_holder(store, ttl_s=2.0)
    holder.kill()  # kill -9: no release
    holder.wait()
    with pytest.raises(LeaseHeld, match=f"pid {holder.pid} "):
        Lease(ObjectSlot(store), ttl_s=30, here=elsewhere).acquire()
    expires_at = Record.from_json(store.get_bytes("_lease.json"), "lease").expires_at
    time.sleep(max(0.0, expires_at - time.time()) + 0.1)
    taker = Lease(ObjectSlot(store), ttl_s=30, here=elsewhere).acquire()
    assert "taking over the lease of " in caplog.text
    assert f"pid {holder.pid} " in caplog.text and "expired" in caplog.text
    assert Record.from_json(store.get_bytes("_lease.json"), "lease").owner == taker.owner
    taker.release()
    caplog.clear()

    holder = start_holder(store, ttl_s=30.0)
    holder.kill()
    holder.wait()
    taker = Lease(ObjectSlot(store), ttl_s=30).acquire()  # on this machine: its process is gone, no need to wait
    assert f"pid {holder.pid} " in caplog.text and "whose process is no longer running on this machine" in caplog.text
    taker.release()


def pause(holder: subprocess.Popen[str], store: Store) -> None:
    """SIGSTOP the holder, though not inside a conditional write on a local root: stopped there it would keep
    the write's lock, as a hung process does, and the taker would wait for it."""
    while True:
        holder.send_signal(signal.SIGSTOP)
        if not store.root.startswith("file:"):
            return
        fd = os.open(Path(store.backend.root) / "._lease.json.lock", os.O_RDWR)  # type: ignore[attr-defined]
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            holder.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        finally:
            os.close(fd)


def test_a_paused_holder_writes_nothing_more_once_its_lease_may_have_expired(store: Store) -> None:
    holder = start_holder(store, ttl_s=1.5)
    time.sleep(0.3)
    pause(holder, store)  # a stalled machine: no renewal, no write
    time.sleep(2.0)
    taker = Lease(ObjectSlot(store), ttl_s=30).acquire()  # expired: taken over
    written = store.list("ticks/")
    holder.send_signal(signal.SIGCONT)
    _, err = holder.communicate(timeout=30)
    assert holder.returncode == 1 and "LeaseLost" in err, err
    assert "went unrenewed" in err or "was taken over by" in err
    # At most the write the pause caught past its check lands late (no lease without fencing tokens can stop
    # that one); nothing after it.
    late = sorted(set(store.list("ticks/")) - set(written))
    assert late in ([], [f"ticks/{len(written):06d}"]), late
    assert Record.from_json(store.get_bytes("_lease.json"), "lease").owner == taker.owner  # not released by it
    taker.release()


def usurp(store: Store) -> None:
    """Take the lease over behind its holder's back."""
    _, token = store.get_with_token("_lease.json")
    usurper = Owner("usurper", "other-host", 99, "", "clusterfit run config=x")
    now = time.time()
    assert store.put_if_match("_lease.json", Record(usurper, now, now, now + 60).to_json(), token)


def test_a_lease_taken_over_behind_its_holders_back_stops_its_publication_and_writes(store: Store) -> None:
    with hold_root(store, ttl_s=30):  # no renewal during the test: publish itself must notice
        store.put_bytes("before/x", b"1")
        usurp(store)
        with pytest.raises(LeaseLost, match="was taken over by other-host pid 99 .*stopped before publishing"):
            publish(Ledger(store, "step"), step="step", config={}, inputs={}, fingerprint_="f", started_s=0.0)
        with pytest.raises(LeaseLost):
            store.put_bytes("after/x", b"1")
    assert store.list() == ["_lease.json", "before/x"]  # nothing published, and the new owner's lease stays
    assert json.loads(store.get_bytes("_lease.json"))["owner"]["id"] == "usurper"
    store.delete("_lease.json")  # the fence went with the lease

    with hold_root(store, ttl_s=1.5) as lease:
        usurp(store)
        deadline = time.monotonic() + 5
        while not lease.lost:  # the heartbeat finds it within a third of the TTL
            assert time.monotonic() < deadline, "the heartbeat never noticed the take-over"
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="was taken over by other-host pid 99"):
            store.put_bytes("after/x", b"1")
    assert store.list() == ["_lease.json", "before/x"]


def test_a_corrupt_lease_is_refused_with_the_fix(store: Store) -> None:
    store.put_bytes("_lease.json", b"not json")
    with pytest.raises(LeaseError, match="not a clusterfit lease .*delete it"):
        Lease(ObjectSlot(store)).acquire()


def test_a_record_round_trips() -> None:
    record = Record(Owner("id", "host", 1, "user", "clusterfit run config=quickstart"), 1.5, 2.25, 62.25)
    assert Record.from_json(record.to_json(), "x") == record
