"""Object storage that drops, stalls, throttles and refuses, between the steps and MinIO.

Each test copies the reference run's published inputs to a fresh prefix, runs one step through
toxiproxy and the front, and checks that the step either retried through the fault (logged) to
artifacts byte-identical to the reference, or failed naming the endpoint and the object, published
nothing, and finished on a rerun without redoing finished work. Every output is searched for the
secret key.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.conftest import cli
from tests.faults.conftest import Faulty, assert_no_secret, files_of, retries_logged, small_overrides

pytestmark = pytest.mark.faults
RESETS_HOLD_S = 3.0  # how long a burst of resets lasts: longer than botocore's own retries (< 1 s)


def assert_same_clusters(ours: Faulty, theirs: Faulty) -> None:
    """The same centroids, labels and distances, byte for byte; stats.json too, but for its timing."""
    a, b = files_of(ours.manifest("cluster")), files_of(theirs.manifest("cluster"))
    assert {k: v for k, v in a.items() if k != "stats.json"} == {k: v for k, v in b.items() if k != "stats.json"}
    stats_a, stats_b = ours.json("clusters/res5-k10/stats.json"), theirs.json("clusters/res5-k10/stats.json")
    assert {k: v for k, v in stats_a.items() if k != "train_s"} == {k: v for k, v in stats_b.items() if k != "train_s"}


def assert_same_tensors(ours: Any, theirs: Any) -> None:
    import torch

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix: tree}

    a, b = flat(ours), flat(theirs)
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[name]), name


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("clusterfit: error:")]
    assert lines and "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def test_extract_retries_through_connection_resets_mid_upload(reference: Faulty, faulty: Faulty) -> None:
    # When the second chunk's part goes up, every connection is cut after 20 kB for a few seconds:
    # the next parts (about 100 kB each) break off mid-body.
    faulty.burst(
        "PUT", "/features/train/res5/part-00000-000001.npy", "limit_data", RESETS_HOLD_S, "upstream", bytes=20_000
    )
    proc = faulty.run("extract")
    assert proc.returncode == 0, proc.stderr[-3000:]
    retries = retries_logged(proc.stderr)
    print(f"{len(retries)} retries logged, e.g. {retries[:2]}")
    assert retries, "the resets were not noticed: no retry was logged"
    assert files_of(faulty.manifest("extract")) == files_of(reference.manifest("extract"))
    assert_no_secret(faulty)


def test_extract_stall_fails_naming_endpoint_and_object_then_resumes(reference: Faulty, faulty: Faulty) -> None:
    # The third chunk's upload stalls: toxiproxy holds every byte until the toxic goes.
    faulty.front.on(
        "PUT", "/features/train/res5/part-00000-000002.npy", action=lambda: faulty.toxiproxy.add("timeout", timeout=0)
    )
    stalled = faulty.run(
        "extract", **{"STORAGE.S3.READ_TIMEOUT_S": 3, "STORAGE.S3.MAX_ATTEMPTS": 2, "STORAGE.S3.RETRY_BUDGET_S": 0}
    )
    error = error_line(stalled.stderr)
    print(error)
    assert faulty.proxy_url in error and f"{faulty.root}/features/" in error and "part-00000-000002.npy" in error
    assert faulty.manifest("extract") is None
    done = [key for key in faulty.keys("features") if "_chunks/" in key]
    assert len(done) == 2, done  # chunks 0 and 1 were finished before the stall

    faulty.heal()
    rerun = faulty.run("extract")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"2 of this rank's 4 chunks already done; resuming at chunk 2", rerun.stderr), rerun.stderr
    puts = [path for method, path in faulty.front.seen if method == "PUT" and "/features/train/" in path]
    assert not any("-000000.npy" in path or "-000001.npy" in path for path in puts), puts  # not redone
    assert files_of(faulty.manifest("extract")) == files_of(reference.manifest("extract"))
    assert_no_secret(faulty)


def test_cluster_reads_retry_through_bodies_cut_short(reference: Faulty, faulty: Faulty) -> None:
    faulty.copy_from(reference.prefix, "extract")
    # The first read of a feature part starts a burst in which every response breaks off after 30 kB.
    faulty.burst("GET", "/features/train/res5/part-", "limit_data", RESETS_HOLD_S, bytes=30_000)
    proc = faulty.run("cluster")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert retries_logged(proc.stderr), proc.stderr[-3000:]
    assert_same_clusters(faulty, reference)
    assert_no_secret(faulty)


def test_train_checkpoint_upload_waits_out_a_stall(reference: Faulty, faulty: Faulty) -> None:
    faulty.copy_from(reference.prefix, "extract", "cluster")
    # The first checkpoint's upload stalls for 4 s; with a 1 s read timeout every attempt in that
    # window times out, and the retry budget carries the step past it.
    faulty.burst("PUT", "/train/checkpoints/", "timeout", 4.0, timeout=0)
    proc = faulty.run("train", **{"STORAGE.S3.READ_TIMEOUT_S": 1})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert retries_logged(proc.stderr), proc.stderr[-3000:]
    assert files_of(faulty.manifest("train")).keys() == files_of(reference.manifest("train")).keys()
    # The checkpoint carries its config (another root, another timeout), so compare what it learned.
    ours, theirs = faulty.checkpoint("train/final.pt"), reference.checkpoint("train/final.pt")
    assert ours["epoch"] == theirs["epoch"] and ours["step"] == theirs["step"]
    assert_same_tensors(ours["classy_state_dict"], theirs["classy_state_dict"])
    assert_no_secret(faulty)


def test_evaluate_report_upload_fails_clearly_and_a_rerun_finishes(reference: Faulty, faulty: Faulty) -> None:
    faulty.copy_from(reference.prefix, "extract", "cluster", "train")
    faulty.front.on("PUT", "/eval/report.html", action=lambda: faulty.toxiproxy.add("limit_data", bytes=0))
    failed = faulty.run("evaluate", **{"STORAGE.S3.MAX_ATTEMPTS": 2, "STORAGE.S3.RETRY_BUDGET_S": 0})
    error = error_line(failed.stderr)
    print(error)
    assert faulty.proxy_url in error and f"{faulty.root}/eval/report.html" in error
    assert faulty.manifest("evaluate") is None

    faulty.heal()
    rerun = faulty.run("evaluate")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert files_of(faulty.manifest("evaluate")).keys() == files_of(reference.manifest("evaluate")).keys()
    ours, theirs = faulty.json("eval/metrics.json"), reference.json("eval/metrics.json")
    assert ours["rows"] == theirs["rows"] and ours["comparison"] == theirs["comparison"]
    assert_no_secret(faulty)


def test_slowdown_bursts_are_retried_with_backoff(reference: Faulty, faulty: Faulty) -> None:
    faulty.copy_from(reference.prefix, "extract")
    # A loaded store: the first 4 writes of the cluster step, and 3 of its reads, answer 503 SlowDown.
    burst_put = faulty.front.on("PUT", "/clusters/", times=4, status=503, code="SlowDown")
    burst_get = faulty.front.on("GET", "/part-", times=3, status=503, code="SlowDown")
    proc = faulty.run("cluster")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert burst_put.hits == 4 and burst_get.hits == 3
    slowdowns = [line for line in retries_logged(proc.stderr) if "SlowDown" in line]
    assert len(slowdowns) >= 4, proc.stderr[-3000:]
    assert_same_clusters(faulty, reference)
    assert_no_secret(faulty)


def test_a_permanent_403_on_one_prefix_fails_fast_naming_it(reference: Faulty, faulty: Faulty) -> None:
    faulty.copy_from(reference.prefix, "extract")
    denied = faulty.front.on("PUT", "/clusters/", times=-1, status=403, code="AccessDenied")
    proc = faulty.run("cluster")
    error = error_line(proc.stderr)
    print(f"{proc.elapsed_s:.1f} s: {error}")  # type: ignore[attr-defined]
    assert "access denied" in error and f"{faulty.root}/clusters/" in error
    assert denied.hits == 1  # refused once, never retried
    assert faulty.manifest("cluster") is None
    assert not retries_logged(proc.stderr)
    assert_no_secret(faulty)


def test_config_show_and_errors_never_print_the_secret(reference: Faulty, faulty: Faulty) -> None:
    shown = cli("config", "show", *small_overrides(faulty.root), env=faulty.minio.env(faulty.proxy_url))
    assert shown.returncode == 0, shown.stderr
    wrong = faulty.minio.env(faulty.minio.endpoint_url)
    wrong["AWS_SECRET_ACCESS_KEY"] = faulty.minio.secret_key[::-1]  # a wrong key: the error must not echo it
    refused = cli("extract", *small_overrides(faulty.root), env=wrong)
    error = error_line(refused.stderr)
    assert "access denied" in error or "SignatureDoesNotMatch" in error, error
    assert faulty.minio.secret_key[::-1] not in refused.stdout + refused.stderr
    assert_no_secret(faulty, shown.stdout, shown.stderr, refused.stdout, refused.stderr)
    assert_no_secret(reference)
