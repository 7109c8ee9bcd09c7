"""Two real `clusterfit run` processes on one experiment root, on local files and on S3 (clusterfit/lease.py).

The first run is caught in its first step (SIGSTOP right after its lease appears, so the second surely
meets it); oracles are the exit codes, the messages, and the published objects themselves (their
modification times and digests, or ETags: a run that redid work would rewrite them).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clusterfit.lease import Owner, Record
from clusterfit.storage import open_store
from tests.conftest import REPO, cli, error_of, tiny_overrides
from tests.s3server import S3Server

pytestmark = pytest.mark.slow  # each runs the tiny experiment's first steps: a minute on 2 cores
Snapshot = dict[str, tuple[object, ...]]


def start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[str]:
    """`clusterfit ARGS` in the background (its environment is this one's), output to files named `name`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    out, err = (tmp_path / f"{name}.out").open("w"), (tmp_path / f"{name}.err").open("w")
    command = [sys.executable, "-m", "clusterfit", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the process ended ({process.returncode}) first"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def experiment(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, Callable[[], Snapshot]]:
    """The root URI and a snapshot of the artifacts under it (what would change if a file were rewritten); the
    lease, which comes and goes with the runs, left out."""
    if backend == "file":
        folder = tmp_path / "exp"

        def files() -> Snapshot:
            return {
                str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in folder.rglob("*")
                if p.is_file() and "_lease.json" not in p.name
            }

        return folder.as_uri(), files
    server: S3Server = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket").removeprefix("s3://")

    def objects() -> Snapshot:
        listing = server.client().list_objects_v2(Bucket=bucket, Prefix="exp/").get("Contents", [])
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing if not o["Key"].endswith("_lease.json")}

    return f"s3://{bucket}/exp", objects


def small(root: str, **extra: object) -> list[str]:
    return tiny_overrides(root, **{"DATA.TRAIN.DATA_LIMIT": 256, "PIPELINE.STEPS": "[extract,cluster]", **extra})


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_second_run_refuses_then_waits_and_redoes_nothing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root, snapshot = experiment(backend, tmp_path, request)
    store = open_store(root, request.getfixturevalue("s3_env").settings() if backend == "s3" else None)
    args = small(root)
    first = start(tmp_path, "first", "run", *args)
    wait_until(lambda: store.exists("_lease.json"), first)
    first.send_signal(signal.SIGSTOP)
    try:
        refused = cli("run", *args)
        message = error_of(refused)
        assert refused.returncode == 2
        assert f"{store.uri('_lease.json')} is held by " in message
        assert f"pid {first.pid} (clusterfit run config=quickstart " in message and "expires at " in message
        assert "add --wait" in message
        second = start(tmp_path, "second", "run", *args, "--wait")
        wait_until(lambda: "waiting for the lease" in (tmp_path / "second.err").read_text(), second)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()[-3000:]
    published = snapshot()
    assert second.wait(timeout=300) == 0, (tmp_path / "second.err").read_text()[-3000:]
    assert "Nothing to do: all 2 steps are already done" in (tmp_path / "second.out").read_text()
    assert snapshot() == published  # the same artifacts, none written again
    assert not store.exists("_lease.json")  # released by both


def test_a_run_killed_mid_step_is_taken_over_at_once_by_the_next_run_on_the_machine(tmp_path: Path) -> None:
    root = (tmp_path / "exp").as_uri()
    store = open_store(root)
    args = small(root)
    killed = start(tmp_path, "killed", "run", *args)
    train_features = tmp_path / "exp/features/train/_SUCCESS.json"
    wait_until(train_features.exists, killed)  # mid-extraction: TRAIN published, TEST not yet
    killed.kill()
    killed.wait()
    published = train_features.stat().st_mtime_ns
    assert store.exists("_lease.json")  # left behind, valid for another minute
    taker = cli("run", *args)
    assert taker.returncode == 0, taker.stderr[-3000:]
    assert "taking over the lease of " in taker.stderr
    assert f"pid {killed.pid} (clusterfit run " in taker.stderr
    assert "whose process is no longer running on this machine" in taker.stderr
    assert train_features.stat().st_mtime_ns == published  # what the killed run published stands
    assert "Ran extract, cluster." in taker.stdout and not store.exists("_lease.json")


def test_a_run_whose_lease_is_taken_over_stops_before_publishing(tmp_path: Path) -> None:
    root = (tmp_path / "exp").as_uri()
    store = open_store(root)
    first = start(tmp_path, "first", "run", *small(root, **{"PIPELINE.LEASE_TTL_S": 3}))
    wait_until(lambda: store.exists("_lease.json"), first)
    _, token = store.get_with_token("_lease.json")
    usurper = Owner("usurper", "other-host", 99, "", "clusterfit run config=elsewhere")
    now = time.time()
    assert store.put_if_match("_lease.json", Record(usurper, now, now, now + 600).to_json(), token)
    published = [key for key in store.list() if key.endswith("_SUCCESS.json")]
    assert first.wait(timeout=300) == 2
    err = (tmp_path / "first.err").read_text()
    assert "clusterfit: error: " in err and "was taken over by other-host pid 99" in err, err[-3000:]
    assert "stopped before publishing anything more" in err and "Traceback" not in err
    assert [key for key in store.list() if key.endswith("_SUCCESS.json")] == published
    assert Record.from_json(store.get_bytes("_lease.json"), "lease").owner == usurper  # left to its owner
